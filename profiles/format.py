"""The learned prefetch profile and its wire format (msgpack behind a magic and version).

Profiles travel through the registry, where any node (or anyone with push rights) can
put one, so the parser treats every blob as hostile: size limits before decoding, the
schema's caps while decoding (a list's length is checked before its items are read,
and no more lists are built than the caps allow: formats/bounded_msgpack.py), then a
strict schema in which every field has one type, one range and one canonical order.
Anything else is refused with ProfileFormatError naming the offending field; an unknown
version is refused rather than half-read, because a newer writer may have changed what
a field means.

Canonical order (files by layer position then path, everything else sorted) means one
profile has exactly one encoding, so identical merges produce identical blobs and the
registry's content addressing can deduplicate them.
"""

from __future__ import annotations

import itertools
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import msgpack

from common.digest import InvalidDigestError, validate_digest
from formats.bounded_msgpack import BoundedUnpacker
from formats.toc import MAX_NAME_BYTES, HostileLayerError, normalize_name
from profiles.coverage import Segments

MAGIC = b"ACCELD-PROFILE\x00"
FORMAT_VERSION = 1
_HEADER = struct.Struct(">H")

MAX_PROFILE_BYTES = 32 << 20
MAX_LAYERS = 512
MAX_FILES = 100_000
MAX_SEGMENTS_PER_FILE = 1024
MAX_TOTAL_SEGMENTS = 500_000
MAX_SAMPLES = 32
MAX_NODES = 1024
MAX_NODE_NAME = 253
MAX_SUPERSEDES = 65_536
MAX_COUNT = 1 << 53
MAX_OFFSET = 1 << 62
SOURCE_KEYS = ("ebpf", "ebpf+fuse", "fuse")
DEFAULT_THRESHOLD = 0.5

Sample = tuple[int, int]
"""(wall-clock start of the run in ns, value): ordered by run start so "most recent K"
is a total order, which keeps truncation associative."""


class ProfileFormatError(ValueError):
    """A profile blob that is not one we wrote: wrong magic, version, size, type or order."""


@dataclass(frozen=True)
class FileStat:
    """One file of one layer as the merged runs used it.

    ``runs``: how many successful runs opened it; ``coverage``: per byte, how many runs
    read it; ``first_access``: the latest (run start, ns after start) samples.
    """

    layer: str
    path: str
    runs: int
    coverage: Segments
    first_access: tuple[Sample, ...]


@dataclass(frozen=True)
class RunStats:
    """What the merged runs were: counts per outcome, node and trace source.

    ``page_cache_blind`` counts runs traced only through FUSE: their reads that the page
    cache answered are missing, so a profile made mostly of them under-reports.
    """

    count: int
    crashed: int
    timed_out: int
    page_cache_blind: int
    nodes: tuple[tuple[str, int], ...]
    sources: tuple[tuple[str, int], ...]
    bytes_read: tuple[Sample, ...]


@dataclass(frozen=True)
class Profile:
    """A prefetch profile for one accelerated image manifest.

    ``supersedes``: digests of profile artifacts already merged into this
    one, so a reader that still finds them does not count their runs twice.
    """

    image: str
    layers: tuple[str, ...]
    threshold: float
    files: tuple[FileStat, ...]
    runs: RunStats
    supersedes: tuple[str, ...] = ()


def serialize(profile: Profile) -> bytes:
    """The profile's one canonical encoding."""
    position = {layer: i for i, layer in enumerate(profile.layers)}
    runs = profile.runs
    body = {
        "image": profile.image,
        "layers": list(profile.layers),
        "threshold": float(profile.threshold),
        "runs": {
            "count": runs.count,
            "crashed": runs.crashed,
            "timed_out": runs.timed_out,
            "page_cache_blind": runs.page_cache_blind,
            "nodes": [list(n) for n in runs.nodes],
            "sources": [list(s) for s in runs.sources],
            "bytes_read": [list(s) for s in runs.bytes_read],
        },
        "files": [
            [
                position[f.layer],
                f.path,
                f.runs,
                [list(s) for s in f.coverage],
                [list(s) for s in f.first_access],
            ]
            for f in profile.files
        ],
        "pinned": [],  # reserved: see _profile
        "supersedes": list(profile.supersedes),
    }
    return MAGIC + _HEADER.pack(FORMAT_VERSION) + msgpack.packb(body, use_bin_type=True)


def parse(data: bytes) -> Profile:
    """Decode and validate a profile blob; raise ProfileFormatError for anything off."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProfileFormatError(f"profile must be bytes, not {type(data).__name__}")
    if len(data) > MAX_PROFILE_BYTES:
        raise ProfileFormatError(f"profile is {len(data)} bytes, over {MAX_PROFILE_BYTES}")
    header_end = len(MAGIC) + _HEADER.size
    if len(data) < header_end or bytes(data[: len(MAGIC)]) != MAGIC:
        raise ProfileFormatError("not an acceld profile (bad magic)")
    (version,) = _HEADER.unpack(data[len(MAGIC) : header_end])
    if version != FORMAT_VERSION:
        raise ProfileFormatError(
            f"unsupported profile version {version} (this build reads {FORMAT_VERSION})"
        )
    reader = BoundedUnpacker(
        bytes(data[header_end:]),
        ProfileFormatError,
        "profile body",
        max_str_len=max(MAX_NAME_BYTES, 4096),
        max_bin_len=0,
        max_array_len=MAX_SEGMENTS_PER_FILE,
    )
    body = reader.fields(_BODY_READERS, "profile")
    reader.finish()
    return _profile(body)


# -- decoding: each list read with its cap, and only as many lists as the caps allow ---

_RUNS_READERS: dict[str, Callable[[BoundedUnpacker], Any]] = {
    **dict.fromkeys(("count", "crashed", "timed_out", "page_cache_blind"), BoundedUnpacker.value),
    "nodes": lambda reader: reader.items(MAX_NODES, "runs.nodes", arrays_each=1),
    "sources": lambda reader: reader.items(len(SOURCE_KEYS), "runs.sources", arrays_each=1),
    "bytes_read": lambda reader: reader.items(MAX_SAMPLES, "runs.bytes_read", arrays_each=1),
}
_BODY_READERS: dict[str, Callable[[BoundedUnpacker], Any]] = {
    "image": BoundedUnpacker.value,
    "layers": lambda reader: reader.items(MAX_LAYERS, "layers"),
    "threshold": BoundedUnpacker.value,
    "runs": lambda reader: reader.fields(_RUNS_READERS, "runs"),
    # A file row is a list holding its coverage and first-access lists, with up to
    # MAX_SAMPLES samples; segments number up to MAX_TOTAL_SEGMENTS in all the rows.
    "files": lambda reader: reader.items(
        MAX_FILES, "files", arrays_each=3 + MAX_SAMPLES, arrays_besides=MAX_TOTAL_SEGMENTS
    ),
    "pinned": lambda reader: reader.items(0, "pinned"),
    "supersedes": lambda reader: reader.items(MAX_SUPERSEDES, "supersedes"),
}


# -- strict schema -------------------------------------------------------------------

T = TypeVar("T")


def _fields(value: Any, what: str, names: Sequence[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProfileFormatError(f"{what} must be a map")
    if set(value) != set(names):
        raise ProfileFormatError(f"{what} must have exactly the fields {sorted(names)}")
    return value


def _int(value: Any, what: str, low: int = 0, high: int = MAX_COUNT) -> int:
    if type(value) is not int or not low <= value <= high:
        raise ProfileFormatError(f"{what} must be an integer in [{low}, {high}]")
    return value


def _list(value: Any, what: str, limit: int, length: int | None = None) -> list[Any]:
    if not isinstance(value, list) or len(value) > limit:
        raise ProfileFormatError(f"{what} must be a list of at most {limit} items")
    if length is not None and len(value) != length:
        raise ProfileFormatError(f"{what} must have exactly {length} items")
    return value


def _digest(value: Any, what: str) -> str:
    try:
        return validate_digest(value)
    except InvalidDigestError:
        raise ProfileFormatError(f"{what} is not a sha256/sha512 digest") from None


def _name(value: Any, what: str, allow_root: bool = False) -> str:
    if not isinstance(value, str):
        raise ProfileFormatError(f"{what} must be a string")
    try:
        clean = normalize_name(value)
    except HostileLayerError as exc:
        raise ProfileFormatError(f"{what}: {exc}") from None
    if clean != value or not (value or allow_root):
        raise ProfileFormatError(f"{what} {value!r} is not a normalized relative path")
    return value


def _ordered(items: list[T], key: Callable[[T], Any], what: str) -> tuple[T, ...]:
    keys = [key(item) for item in items]
    if any(a >= b for a, b in itertools.pairwise(keys)):
        raise ProfileFormatError(f"{what} must be sorted without duplicates")
    return tuple(items)


def _samples(value: Any, what: str, limit: int) -> tuple[Sample, ...]:
    samples = [
        (_int(s[0], f"{what} run start", 0, MAX_OFFSET), _int(s[1], what, 0, MAX_OFFSET))
        for s in (_list(item, what, 2, 2) for item in _list(value, what, limit))
    ]
    if any(a > b for a, b in itertools.pairwise(samples)):
        raise ProfileFormatError(f"{what} must be sorted by run start")
    return tuple(samples)


def _counted(value: Any, what: str, limit: int, names: Callable[[Any], str]) -> tuple[Any, ...]:
    pairs = [
        (names(p[0]), _int(p[1], f"{what} count", 1))
        for p in (_list(item, what, 2, 2) for item in _list(value, what, limit))
    ]
    return _ordered(pairs, lambda p: p[0], what)


def _node_name(value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NODE_NAME:
        raise ProfileFormatError("node names must be strings of 1..253 characters")
    return value


def _source_key(value: Any) -> str:
    if value not in SOURCE_KEYS:
        raise ProfileFormatError(f"unknown trace source {value!r}")
    return str(value)


def _runs(value: Any) -> RunStats:
    names = ("count", "crashed", "timed_out", "page_cache_blind", "nodes", "sources", "bytes_read")
    doc = _fields(value, "runs", names)
    count = _int(doc["count"], "runs.count")
    stats = RunStats(
        count=count,
        crashed=_int(doc["crashed"], "runs.crashed"),
        timed_out=_int(doc["timed_out"], "runs.timed_out"),
        page_cache_blind=_int(doc["page_cache_blind"], "runs.page_cache_blind", 0, count),
        nodes=_counted(doc["nodes"], "runs.nodes", MAX_NODES, _node_name),
        sources=_counted(doc["sources"], "runs.sources", len(SOURCE_KEYS), _source_key),
        bytes_read=_samples(doc["bytes_read"], "runs.bytes_read", min(MAX_SAMPLES, count)),
    )
    for what, pairs in (("nodes", stats.nodes), ("sources", stats.sources)):
        if sum(n for _, n in pairs) > count:
            raise ProfileFormatError(f"runs.{what} count more runs than runs.count")
    return stats


def _coverage(value: Any, what: str, runs: int) -> Segments:
    segments: list[tuple[int, int, int]] = []
    for item in _list(value, what, MAX_SEGMENTS_PER_FILE):
        start, end, count = _list(item, what, 3, 3)
        segment = (
            _int(start, f"{what} start", 0, MAX_OFFSET),
            _int(end, f"{what} end", 0, MAX_OFFSET),
            _int(count, f"{what} runs", 1, runs),
        )
        if segment[0] >= segment[1]:
            raise ProfileFormatError(f"{what} has an empty or reversed segment")
        if segments and (
            segments[-1][1] > segment[0]
            or (segments[-1][1] == segment[0] and segments[-1][2] == segment[2])
        ):
            raise ProfileFormatError(f"{what} segments must be sorted, disjoint and merged")
        segments.append(segment)
    return tuple(segments)


def _file(value: Any, layers: tuple[str, ...], total_runs: int) -> FileStat:
    layer, path, runs, coverage, first_access = _list(value, "file", 5, 5)
    layer_digest = layers[_int(layer, "file layer index", 0, len(layers) - 1)]
    name = _name(path, "file path")
    what = f"file {name!r}"
    runs = _int(runs, f"{what} runs", 1, total_runs)
    samples = _samples(first_access, f"{what} first access", min(MAX_SAMPLES, runs))
    if not samples:
        raise ProfileFormatError(f"{what} has no first-access sample")
    return FileStat(
        layer=layer_digest,
        path=name,
        runs=runs,
        coverage=_coverage(coverage, f"{what} coverage", runs),
        first_access=samples,
    )


def _threshold(value: Any) -> float:
    if type(value) is not float or not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise ProfileFormatError("threshold must be a float in (0, 1]")
    return value


def _profile(body: Any) -> Profile:
    names = ("image", "layers", "threshold", "runs", "files", "pinned", "supersedes")
    doc = _fields(body, "profile", names)
    layers = tuple(_digest(d, "layer digest") for d in _list(doc["layers"], "layers", MAX_LAYERS))
    if len(set(layers)) != len(layers):
        raise ProfileFormatError("layers must not repeat")
    runs = _runs(doc["runs"])
    files = [_file(f, layers, runs.count) for f in _list(doc["files"], "files", MAX_FILES)]
    if sum(len(f.coverage) for f in files) > MAX_TOTAL_SEGMENTS:
        raise ProfileFormatError(f"profile has more than {MAX_TOTAL_SEGMENTS} segments")
    position = {layer: i for i, layer in enumerate(layers)}
    # Format 1's ``pinned`` list once carried the converter's prefetch list, which now
    # travels in the image's annotations and is resolved by the agent with every other
    # plan source. Always written empty, anything else refused: one encoding per
    # profile, and no reader acts on entries no learning made.
    _list(doc["pinned"], "pinned (reserved, always empty)", 0)
    supersedes = [
        _digest(d, "superseded digest")
        for d in _list(doc["supersedes"], "supersedes", MAX_SUPERSEDES)
    ]
    return Profile(
        image=_digest(doc["image"], "image"),
        layers=layers,
        threshold=_threshold(doc["threshold"]),
        files=_ordered(files, lambda f: (position[f.layer], f.path), "files"),
        runs=runs,
        supersedes=_ordered(supersedes, lambda d: d, "supersedes"),
    )
