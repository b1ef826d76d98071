"""The profile wire format: exact round trips, one canonical encoding, and a parser that
refuses hostile blobs (from any registry user) with ProfileFormatError and nothing else."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from profiles.format import (
    FORMAT_VERSION,
    MAGIC,
    MAX_PROFILE_BYTES,
    MAX_SEGMENTS_PER_FILE,
    ProfileFormatError,
    parse,
    serialize,
)
from profiles.learn import learn
from profiles.trace import FileAccess, Outcome, RunTrace
from tests.decode_memory import PEAK_LIMIT, decode_in_child

IMAGE = "sha256:" + "1" * 64
LAYERS = ("sha256:" + "a" * 64, "sha256:" + "b" * 64)


def _trace(node: str, started: int, outcome: Outcome = Outcome.OK) -> RunTrace:
    accesses = (
        FileAccess(LAYERS[0], "/bin/busybox", ((0, 4096), (8192, 12288)), 1_000),
        FileAccess(LAYERS[0], "etc/passwd", ((0, 120),), 5_000 + started),
        FileAccess(LAYERS[1], "app/main.py", ((100, 900),), 2_000),
    )
    return RunTrace(
        IMAGE,
        LAYERS,
        accesses,
        outcome,
        node,
        frozenset({"fuse"} if node == "fuse-node" else {"ebpf", "fuse"}),
        node != "fuse-node",
        started,
    )


@pytest.fixture(scope="module")
def profile_blob() -> bytes:
    traces = [_trace("node-a", 10), _trace("fuse-node", 20), _trace("node-b", 30, Outcome.CRASHED)]
    profile = learn(traces, 0.6)
    return serialize(profile)


def _body(blob: bytes) -> dict[str, Any]:
    body = msgpack.unpackb(blob[len(MAGIC) + 2 :], raw=False)
    assert isinstance(body, dict)
    return body


def _blob(body: Any, version: int = FORMAT_VERSION) -> bytes:
    return MAGIC + struct.pack(">H", version) + msgpack.packb(body, use_bin_type=True)


def test_round_trip_is_exact_and_canonical(profile_blob: bytes) -> None:
    profile = parse(profile_blob)
    assert serialize(profile) == profile_blob
    assert profile.threshold == 0.6
    assert profile.runs.count == 2 and profile.runs.crashed == 1
    assert profile.runs.page_cache_blind == 1
    assert dict(profile.runs.sources) == {"ebpf+fuse": 1, "fuse": 1}
    assert dict(profile.runs.nodes) == {"fuse-node": 1, "node-a": 1}
    busybox = next(f for f in profile.files if f.path == "bin/busybox")
    assert busybox.coverage == ((0, 4096, 2), (8192, 12288, 2))
    assert [f.path for f in profile.files] == ["bin/busybox", "etc/passwd", "app/main.py"]


def test_supersedes_round_trip(profile_blob: bytes) -> None:
    body = _body(profile_blob)
    body["supersedes"] = sorted(["sha256:" + "e" * 64, "sha256:" + "d" * 64])
    assert parse(_blob(body)).supersedes == tuple(body["supersedes"])


def test_refuses_bad_magic_and_unknown_version(profile_blob: bytes) -> None:
    with pytest.raises(ProfileFormatError, match="bad magic"):
        parse(b"GARBAGE" + profile_blob)
    with pytest.raises(ProfileFormatError, match="unsupported profile version 2"):
        parse(_blob(_body(profile_blob), version=2))
    with pytest.raises(ProfileFormatError, match="bad magic"):
        parse(MAGIC[:4])


def test_refuses_absurd_sizes(profile_blob: bytes) -> None:
    with pytest.raises(ProfileFormatError, match="over"):
        parse(profile_blob + b"\0" * MAX_PROFILE_BYTES)
    body = _body(profile_blob)
    body["files"][0][3] = [[i * 2, i * 2 + 1, 1] for i in range(MAX_SEGMENTS_PER_FILE + 1)]
    with pytest.raises(ProfileFormatError, match="exceeds max_array_len"):
        parse(_blob(body))
    body = _body(profile_blob)
    body["runs"]["count"] = 1 << 60
    with pytest.raises(ProfileFormatError, match=r"runs\.count"):
        parse(_blob(body))


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(body: dict[str, Any]) -> None:
        target: Any = body
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


HOSTILE = {
    "threshold as int": (_set(("threshold",), 1), "threshold"),
    "threshold above one": (_set(("threshold",), 1.5), "threshold"),
    "count as bool": (_set(("runs", "crashed"), True), "crashed"),
    "absolute path": (_set(("files", 0, 1), "/bin/busybox"), "absolute"),
    "unclean path": (_set(("files", 0, 1), "bin//busybox"), "normalized"),
    "escaping path": (_set(("files", 0, 1), "../etc/shadow"), "escapes"),
    "layer index out of range": (_set(("files", 0, 0), 7), "layer index"),
    "bad image digest": (_set(("image",), "sha256:xyz"), "image"),
    "segment over file runs": (_set(("files", 0, 3), [[0, 10, 3]]), "runs"),
    "overlapping segments": (_set(("files", 0, 3), [[0, 10, 1], [5, 20, 2]]), "disjoint"),
    "unmerged segments": (_set(("files", 0, 3), [[0, 10, 1], [10, 20, 1]]), "merged"),
    "reversed segment": (_set(("files", 0, 3), [[10, 10, 1]]), "empty"),
    "file runs over total": (_set(("files", 0, 2), 3), "runs"),
    "no first access": (_set(("files", 0, 4), []), "first-access"),
    "unsorted samples": (_set(("runs", "bytes_read"), [[5, 1], [1, 1]]), "sorted"),
    "unknown source": (_set(("runs", "sources"), [["strace", 1]]), "source"),
    "nodes over count": (_set(("runs", "nodes"), [["a", 2], ["b", 2]]), "nodes"),
    "unsorted files": (lambda b: b["files"].reverse(), "sorted"),
    "unknown field": (_set(("extra",), 1), "exactly the fields"),
    "missing field": (lambda b: b.pop("pinned"), "exactly the fields"),
    "binary path": (_set(("files", 0, 1), b"bin/busybox"), "msgpack"),
    "pinned not empty": (_set(("pinned",), [["etc/hosts", False]]), "pinned"),
    "duplicate supersedes": (_set(("supersedes",), ["sha256:" + "d" * 64] * 2), "duplicates"),
    "body not a map": (lambda b: b.clear() or b.update({"a": 1}), "exactly the fields"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_refuses_wrong_types_and_orders(profile_blob: bytes, case: str) -> None:
    mutate, message = HOSTILE[case]
    body = _body(profile_blob)
    mutate(body)
    with pytest.raises(ProfileFormatError, match=message):
        parse(_blob(body))


def test_a_profile_of_empty_lists_is_refused_before_it_is_built(
    profile_blob: bytes, tmp_path: Path
) -> None:
    """Every list within msgpack's per-list limits, yet eight million of them: each
    byte of 0x90 a list of 56 bytes and more, they must be refused before they are all
    built, not when the schema finally looks at them."""
    body = _body(profile_blob)
    body["files"] = [[[[]] * 1024] * 1024] * 8  # packed in full, shared here
    blob = _blob(body)
    outcome, peak = decode_in_child(
        tmp_path,
        blob,
        "from profiles.format import ProfileFormatError, parse",
        "parse(data)",
        "ProfileFormatError",
    )
    assert outcome == "refused"
    assert peak < PEAK_LIMIT, f"{peak >> 20} MiB to refuse {len(blob)} bytes"


def test_refuses_non_map_body() -> None:
    with pytest.raises(ProfileFormatError, match="must be a map"):
        parse(_blob([1, 2, 3]))
    with pytest.raises(ProfileFormatError, match="msgpack"):
        parse(MAGIC + struct.pack(">H", FORMAT_VERSION) + b"\xc1")


FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _parse_or_refuse(data: bytes) -> None:
    try:
        profile = parse(data)
    except ProfileFormatError:
        return
    assert parse(serialize(profile)) == profile


@FUZZ
@given(st.binary(max_size=512))
def test_fuzz_random_bytes_after_header(tail: bytes) -> None:
    _parse_or_refuse(MAGIC + struct.pack(">H", FORMAT_VERSION) + tail)


@FUZZ
@given(data=st.data())
def test_fuzz_mutated_valid_blob(profile_blob: bytes, data: st.DataObject) -> None:
    blob = bytearray(profile_blob)
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(blob) - 1))
        blob[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(len(MAGIC), len(blob)))
    _parse_or_refuse(bytes(blob[:cut]))


_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(-(1 << 64), 1 << 64)
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.binary(max_size=8)
    | st.sampled_from(LAYERS)
)
_VALUES = st.recursive(
    _LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


@FUZZ
@given(data=st.data())
def test_fuzz_structured_field_replacement(profile_blob: bytes, data: st.DataObject) -> None:
    body = _body(profile_blob)
    paths: list[tuple[Any, ...]] = [(key,) for key in body]
    paths += [("runs", key) for key in body["runs"]]
    paths += [("files", 0, i) for i in range(5)] + [("files", 1)]
    path = data.draw(st.sampled_from(paths))
    try:
        _set(path, data.draw(_VALUES))(body)
        blob = _blob(body)
    except (OverflowError, ValueError, TypeError):
        return  # not encodable as msgpack: no registry can serve it either
    _parse_or_refuse(blob)
