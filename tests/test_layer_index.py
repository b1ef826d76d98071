"""The layer index artifact: built in one pass from a real layer, it reproduces what
tarfile sees, reads any range through the planned slice, survives serialization, and
refuses hostile bytes with IndexFormatError only."""

from __future__ import annotations

import contextlib
import copy
import functools
import gzip
import io
import random
import tarfile
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from formats.gzip_index import CorruptSpanError, GzipFormatError
from formats.layer_index import MAX_LAYER_SIZE, IndexFormatError, LayerIndex, UnsupportedLayerError
from formats.layer_index_builder import build_layer_index
from formats.layer_index_codec import MAX_XATTRS, parse, serialize
from formats.layer_index_table import (
    GAP,
    NAME,
    ROW_FIELDS,
    RULES,
    SIZE,
    TYPE,
    XATTRS,
    check_table,
    table_by_columns,
    table_by_rows,
)
from formats.media_types import DOCKER_LAYER_GZIP, OCI_LAYER_GZIP, OCI_LAYER_TAR, OCI_LAYER_ZSTD
from formats.toc import (
    ENTRY_TYPES,
    MAX_DEVICE_MAJOR,
    MAX_DEVICE_MINOR,
    MAX_ENTRY_SIZE,
    MAX_ID,
    MAX_MTIME,
    MAX_NAME_BYTES,
    MAX_OWNER_NAME,
    MAX_XATTR_BYTES,
    HostileLayerError,
    TocEntry,
)
from tests.decode_memory import PEAK_LIMIT, decode_in_child

SPAN = 64 * 1024
PIECE = 16 * 1024
DIGEST = "sha256:" + "ab" * 32


def _layer_tar(files: int = 60) -> bytes:
    rnd = random.Random(11)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("bin", "usr", "usr/share"):
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
            tar.addfile(info)
        for number in range(files):
            size = rnd.choice([0, 1, 511, 512, 513, 5000, 70_000, 200_000])
            data = rnd.randbytes(size) if number % 3 == 0 else bytes(rnd.choices(b"abc \n", k=size))
            info = tarfile.TarInfo(f"usr/share/f{number}.txt")
            info.size, info.mode, info.uid, info.gid = len(data), 0o640, 1000 + number, 50
            info.uname, info.gname, info.mtime = "user", "staff", 1_700_000_000 + number
            if number == 5:
                info.pax_headers = {"SCHILY.xattr.user.note": "hello"}
            tar.addfile(info, io.BytesIO(data))
        symlink = tarfile.TarInfo("bin/sh")
        symlink.type, symlink.linkname = tarfile.SYMTYPE, "/usr/share/f1.txt"
        tar.addfile(symlink)
        hardlink = tarfile.TarInfo("usr/share/hard")
        hardlink.type, hardlink.linkname = tarfile.LNKTYPE, "usr/share/f2.txt"
        tar.addfile(hardlink)
        device = tarfile.TarInfo("dev-null")
        device.type, device.devmajor, device.devminor = tarfile.CHRTYPE, 1, 3
        tar.addfile(device)
        whiteout = tarfile.TarInfo("usr/.wh.old")
        tar.addfile(whiteout, io.BytesIO(b""))
    return buf.getvalue()


RAW = _layer_tar()
GZ = gzip.compress(RAW, 6)


def _build(blob: bytes, media_type: str = OCI_LAYER_GZIP, chunk: int = 10_000) -> LayerIndex:
    chunks = [blob[i : i + chunk] for i in range(0, len(blob), chunk)]
    return build_layer_index(
        chunks, layer_digest=DIGEST, media_type=media_type, span=SPAN, piece=PIECE
    )


@pytest.fixture(scope="module")
def index() -> LayerIndex:
    return _build(GZ)


def test_toc_matches_what_tarfile_reads(index: LayerIndex) -> None:
    with tarfile.open(fileobj=io.BytesIO(RAW)) as tar:
        members = tar.getmembers()
        expected = []
        for member in members:
            expected.append((member.name, member.size if member.isreg() else 0, member.offset_data))
    got = [(e.name, e.size, e.offset) for e in index.entries]
    assert got == expected
    by_name = {e.name: e for e in index.entries}
    assert by_name["usr/share/f5.txt"].xattrs == {"user.note": b"hello"}
    assert by_name["usr/share/hard"].type == "hardlink"
    assert by_name["bin/sh"].link_name == "/usr/share/f1.txt"
    assert (by_name["dev-null"].dev_major, by_name["dev-null"].dev_minor) == (1, 3)
    assert by_name["usr/.wh.old"].is_whiteout
    assert index.compressed_size == len(GZ)
    assert index.uncompressed_size == len(RAW)


def test_every_file_reads_back_through_its_planned_slice(index: LayerIndex) -> None:
    with tarfile.open(fileobj=io.BytesIO(RAW)) as tar:
        for entry in index.entries:
            if entry.type != "reg":
                continue
            plan = index.plan_read(entry.offset, entry.size)
            data = index.read(plan, GZ[plan.fetch_start : plan.fetch_end], entry.offset, entry.size)
            reader = tar.extractfile(entry.name)
            assert reader is not None
            assert data == reader.read()


def test_spans_verify_and_corruption_is_refused(index: LayerIndex) -> None:
    for number in range(len(index.checkpoints)):
        start, end = index.span_range(number)
        plan = index.plan_read(start, end - start)
        fetched = GZ[plan.fetch_start : plan.fetch_end]
        assert index.read_span(number, fetched) == RAW[start:end]
        damaged = bytearray(fetched)
        damaged[len(damaged) // 2] ^= 0x01
        with pytest.raises(CorruptSpanError):
            index.read_span(number, bytes(damaged))


def test_span_prefixes_read_from_their_pieces_alone(index: LayerIndex) -> None:
    """A span's leading pieces come from the compressed bytes up to where the last of
    them ends, and are held to their digests."""
    assert index.piece_size == PIECE
    for number in range(len(index.checkpoints)):
        start, end = index.span_range(number)
        assert index.pieces(number) == min(SPAN // PIECE - 1, (end - start) // PIECE)
        for count in range(1, index.pieces(number) + 1):
            fetch_start, fetch_end = index.prefix_fetch(number, count)
            fetched = GZ[fetch_start:fetch_end]
            assert index.read_prefix(number, count, fetched) == RAW[start : start + count * PIECE]
            with pytest.raises(CorruptSpanError, match="ended after"):
                index.read_prefix(number, count, fetched[: -len(fetched) // 4])
            damaged = bytearray(fetched)
            damaged[-len(damaged) // 3] ^= 0x01
            with pytest.raises(CorruptSpanError):
                index.read_prefix(number, count, bytes(damaged))
    assert sum(map(index.pieces, range(len(index.checkpoints)))) > 10


def test_multi_member_prefixes_take_the_general_path() -> None:
    multi = gzip.compress(RAW[:100_000], 1) + gzip.compress(RAW[100_000:], 9)
    indexed = _build(multi)
    for number in range(len(indexed.checkpoints)):
        start, _ = indexed.span_range(number)
        for count in range(1, indexed.pieces(number) + 1):
            fetch_start, fetch_end = indexed.prefix_fetch(number, count)
            data = indexed.read_prefix(number, count, multi[fetch_start:fetch_end])
            assert data == RAW[start : start + count * PIECE]


def test_version_1_indexes_are_read_with_whole_spans(index: LayerIndex) -> None:
    document = _document(index)
    for key in ("piece_size", "piece_digests", "piece_ends"):
        del document[key]
    document["version"] = 1
    old = parse(msgpack.packb(document, use_bin_type=True))
    assert old.piece_size == 0 and old.pieces(0) == 0
    assert old.entries == index.entries and old.checkpoints == index.checkpoints


def test_serialization_round_trip_and_parsed_index_reads(index: LayerIndex) -> None:
    blob = serialize(index)
    parsed = parse(blob)
    assert parsed == index
    assert serialize(parsed) == blob
    entry = max(index.entries, key=lambda e: e.size)
    plan = parsed.plan_read(entry.offset, entry.size)
    data = parsed.read(plan, GZ[plan.fetch_start : plan.fetch_end], entry.offset, entry.size)
    assert data == RAW[entry.offset : entry.offset + entry.size]


def test_stream_and_chunks_give_the_same_index(index: LayerIndex) -> None:
    from_stream = build_layer_index(
        io.BufferedReader(io.BytesIO(GZ)),
        layer_digest=DIGEST,
        media_type=OCI_LAYER_GZIP,
        span=SPAN,
        piece=PIECE,
    )
    assert from_stream == index == _build(GZ, chunk=1 << 20)


def test_plain_tar_layer_has_a_toc_and_span_digests() -> None:
    plain = _build(RAW, OCI_LAYER_TAR)
    assert not plain.checkpoints and not plain.windows
    assert len(plain.span_digests) == -(-len(RAW) // SPAN)
    assert plain.compressed_size == plain.uncompressed_size == len(RAW)
    assert [e.name for e in plain.entries] == [e.name for e in _build(GZ).entries]
    last = len(plain.span_digests) - 1
    tail = RAW[last * SPAN :]
    assert plain.read_plain_span(last, tail) == tail
    with pytest.raises(CorruptSpanError):
        plain.read_plain_span(last, tail[:-1] + bytes([tail[-1] ^ 1]))
    entry = plain.entries[10]
    plan = plain.plan_read(entry.offset, entry.size)
    assert (plan.fetch_start, plan.fetch_end) == (entry.offset, entry.offset + entry.size)
    fetched = RAW[plan.fetch_start : plan.fetch_end]
    assert plain.read(plan, fetched, entry.offset, entry.size) == fetched
    assert parse(serialize(plain)) == plain


def test_empty_tar_and_multi_member_layers() -> None:
    empty = io.BytesIO()
    tarfile.open(fileobj=empty, mode="w").close()
    indexed = _build(gzip.compress(empty.getvalue()), DOCKER_LAYER_GZIP)
    assert indexed.entries == [] and len(indexed.checkpoints) == 1
    assert parse(serialize(indexed)) == indexed
    multi = gzip.compress(RAW[:300_000], 1) + gzip.compress(RAW[300_000:], 9)
    assert _build(multi).entries == _build(GZ).entries


def test_names_that_are_not_utf8_survive_the_round_trip() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("caf\udce9.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    assert b"caf\xe9.txt" in buf.getvalue()
    indexed = _build(gzip.compress(buf.getvalue()))
    assert [e.name for e in indexed.entries] == ["caf\udce9.txt"]
    assert parse(serialize(indexed)) == indexed


def test_unsupported_and_broken_layers_are_refused() -> None:
    with pytest.raises(UnsupportedLayerError, match="zstd"):
        _build(GZ, OCI_LAYER_ZSTD)
    with pytest.raises(GzipFormatError, match="truncated"):
        _build(GZ[: len(GZ) // 2])
    with pytest.raises(GzipFormatError):
        _build(GZ + b"junk")
    with pytest.raises(HostileLayerError):
        _build(gzip.compress(RAW[: len(RAW) // 2]))
    escaping = io.BytesIO()
    with tarfile.open(fileobj=escaping, mode="w") as tar:
        tar.addfile(tarfile.TarInfo("../escape"))
        tar.addfile(tarfile.TarInfo("after"), io.BytesIO(b""))
    with pytest.raises(HostileLayerError, match="escapes"):
        _build(gzip.compress(escaping.getvalue() + RAW))
    assert not [t for t in threading.enumerate() if t.name == "layer-index-inflate"]


def _document(index: LayerIndex) -> dict[str, Any]:
    document: dict[str, Any] = msgpack.unpackb(serialize(index), raw=False)
    return document


def _toc_rows(document: dict[str, Any]) -> list[list[Any]]:
    rows: list[list[Any]] = msgpack.unpackb(zlib.decompress(document["toc"]), raw=False)
    return rows


def _with_toc(document: dict[str, Any], rows: list[list[Any]]) -> dict[str, Any]:
    document["toc"] = zlib.compress(msgpack.packb(rows, use_bin_type=True))
    document["entry_count"] = len(rows)
    return document


def _mutations(index: LayerIndex) -> dict[str, dict[str, Any]]:
    base = _document(index)
    rows = _toc_rows(base)
    reg = next(i for i, r in enumerate(rows) if r[1] == 0 and r[2] > 0)
    dev = next(i for i, r in enumerate(rows) if r[10] or r[11])

    def device_changed(column: int, value: int) -> dict[str, Any]:
        new_rows = copy.deepcopy(rows)
        new_rows[dev][column] = value
        return _with_toc(copy.deepcopy(base), new_rows)

    def changed(**fields: Any) -> dict[str, Any]:
        document = copy.deepcopy(base)
        document.update(fields)
        return document

    def row_changed(column: int, value: Any) -> dict[str, Any]:
        new_rows = copy.deepcopy(rows)
        new_rows[reg][column] = value
        return _with_toc(copy.deepcopy(base), new_rows)

    points = base["checkpoints"]
    ends, piece_digests = base["piece_ends"], base["piece_digests"]
    return {
        "bad magic": changed(magic="estargz"),
        "future version": changed(version=3),
        "version true": changed(version=True),
        "version 1 with pieces": changed(version=1),
        "tiny piece": changed(piece_size=1),
        "piece bigger than span": changed(piece_size=SPAN * 2),
        "piece ends missing": changed(piece_ends=ends[1:]),
        "piece count": changed(piece_ends=[ends[0][:-1], *ends[1:]]),
        "piece digest count": changed(piece_digests=[piece_digests[0][:-32], *piece_digests[1:]]),
        "piece digest text": changed(piece_digests=["x" * 32, *piece_digests[1:]]),
        "piece ends backwards": changed(piece_ends=[ends[0][::-1], *ends[1:]]),
        "piece end at its checkpoint": changed(piece_ends=[[0, *ends[0][1:]], *ends[1:]]),
        "piece end past its span": changed(piece_ends=[[*ends[0][:-1], len(GZ)], *ends[1:]]),
        "piece end type": changed(piece_ends=[[str(ends[0][0]), *ends[0][1:]], *ends[1:]]),
        "extra field": changed(extra=1),
        "string size": changed(compressed_size="12"),
        "negative size": changed(uncompressed_size=-1),
        "absurd size": changed(uncompressed_size=1 << 60),
        "tiny span": changed(span_size=1),
        "bad digest": changed(layer_digest="md5:1234"),
        "zstd media type": changed(media_type=OCI_LAYER_ZSTD),
        "bit offset 8": changed(checkpoints=[[*points[0][:1], 8, 0], *points[1:]]),
        "non-monotonic": changed(checkpoints=[points[0], points[2], points[1], *points[3:]]),
        "first not at zero": changed(checkpoints=[[points[0][0], 0, 5], *points[1:]]),
        "offset past end": changed(checkpoints=[*points[:-1], [len(GZ) + 10, 0, points[-1][2]]]),
        "checkpoint shape": changed(checkpoints=[[1, 2], *points[1:]]),
        "too many checkpoints": changed(checkpoints=points * 1000),
        "window bomb": changed(windows=[zlib.compress(bytes(40_000)), *base["windows"][1:]]),
        "window garbage": changed(windows=[b"\x00garbage", *base["windows"][1:]]),
        "window not bytes": changed(windows=["text", *base["windows"][1:]]),
        "missing window": changed(windows=base["windows"][1:]),
        "digest count": changed(span_digests=base["span_digests"][:-32]),
        "digest ragged": changed(span_digests=base["span_digests"][:-1]),
        "entry count": changed(entry_count=len(rows) + 1),
        "toc garbage": changed(toc=b"not zlib"),
        "toc bomb": changed(toc=zlib.compress(bytes(1 << 20)), entry_count=1),
        "escaping name": row_changed(0, "../etc/passwd"),
        "absolute name": row_changed(0, "/etc/passwd"),
        "unnormalized name": row_changed(0, "usr//share/x"),
        "nul name": row_changed(0, "a\x00b"),
        "type code": row_changed(1, 99),
        "huge size": row_changed(2, 1 << 50),
        "mode bits": row_changed(3, 0o170000),
        "uid type": row_changed(4, "root"),
        "mtime type": row_changed(8, "yesterday"),
        "link on file": row_changed(9, "elsewhere"),
        "device on file": row_changed(10, 7),
        "device major past dev_t": device_changed(10, 1 << 31),
        "device minor past dev_t": device_changed(11, 1 << 20),
        "xattr value": row_changed(12, {"user.x": "text"}),
        "xattr count": row_changed(12, {f"user.{i}": b"" for i in range(MAX_XATTRS + 1)}),
        "row in a row": row_changed(0, rows[0]),
        "negative gap": row_changed(13, -1),
        "data past end": row_changed(13, len(RAW)),
        "short digest": row_changed(14, b"\x01" * 31),
        "short row": _with_toc(copy.deepcopy(base), [r[:5] for r in rows]),
    }


def test_hostile_documents_are_refused(index: LayerIndex) -> None:
    for name, document in _mutations(index).items():
        blob = msgpack.packb(document, use_bin_type=True)
        with pytest.raises(IndexFormatError):
            parse(blob)
            pytest.fail(f"accepted: {name}")


@pytest.mark.parametrize("blob", [b"", b"\xc1", b"\x92\x01", msgpack.packb([1, 2]), b"\x81" * 5000])
def test_garbage_is_refused(blob: bytes) -> None:
    with pytest.raises(IndexFormatError):
        parse(blob)


_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.binary(max_size=40),
)
_VALUE = st.recursive(
    _LEAF,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@functools.cache
def _small_index() -> LayerIndex:
    return _build(gzip.compress(_layer_tar(files=8)))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_documents_parse_or_raise_index_format_error(data: st.DataObject) -> None:
    document = _document(_small_index())
    rows = _toc_rows(document)
    target = data.draw(st.sampled_from(["top", "checkpoint", "row"]))
    value = data.draw(_VALUE)
    if target == "top":
        document[data.draw(st.sampled_from(sorted(document)))] = value
    elif target == "checkpoint":
        point = data.draw(st.sampled_from(document["checkpoints"]))
        point[data.draw(st.integers(0, 2))] = value
    else:
        row = data.draw(st.sampled_from(rows))
        row[data.draw(st.integers(0, len(row) - 1))] = value
        _with_toc(document, rows)
    try:
        parsed = parse(msgpack.packb(document, use_bin_type=True))
    except IndexFormatError:
        return
    assert parse(serialize(parsed)) == parsed


_EDGES: list[Any] = [
    "", ".", "..", "a/./b", "a//b", "/a", "a/", "a/../b", ".wh.a", "d/.wh..wh..opq", "a\0b",
     "x" * 1025, 0, -1, 0o7777, 0o10000, (1 << 32) - 1, 1 << 32, 1 << 44, (1 << 44) + 1,
     1 << 62, 0.5, float("inf"), True, False, None, b"", b"\0" * 32, {}, {"user.a": b"1"}, []
]  # fmt: skip
_EDGE_VALUE = st.sampled_from(_EDGES)


def _ordinary_rows() -> list[list[Any]]:
    """The rows of a real layer's table: files, directories, a symlink, a hard link, a
    device, an xattr and a whiteout."""
    return _toc_rows(_document(_small_index()))


def _outcome(check: Callable[[list[Any], int], list[TocEntry] | None], rows: Any, size: int) -> Any:
    """The entries ``check`` builds from ``rows``, or None where it refuses them."""
    try:
        return check(copy.deepcopy(rows), size)
    except IndexFormatError:
        return None


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_the_column_checks_accept_only_tables_the_row_checks_accept(
    data: st.DataObject,
) -> None:
    """The file table checked column by column must never take a table that the
    row-by-row checks refuse, and must build the very same entries."""
    rows = copy.deepcopy(_ordinary_rows())
    size = data.draw(st.sampled_from([_small_index().uncompressed_size, _table_end(rows) - 1]))
    for _ in range(data.draw(st.integers(0, 3))):
        row = data.draw(st.sampled_from(rows))
        row[data.draw(st.integers(0, len(row) - 1))] = data.draw(
            _EDGE_VALUE | _LEAF | st.sampled_from([float("nan"), ".w", "h.", "a.wh", "\n"])
        )
    if data.draw(st.booleans()):
        rows.append(data.draw(st.lists(_VALUE, max_size=16)))
    fast = table_by_columns(rows, size)
    if fast is not None:
        assert fast == table_by_rows(rows, size)


_ODD: list[Any] = [
    None, True, False, 0.0, 0.5, -1, 1 << 64, 1 << 2000, "", "x", b"", b"\1" * 32, {}, [],
    float("nan"), float("inf"),
]  # fmt: skip
_BAD_NAMES = [
    "", ".", "..", "./a", "a/", "a//b", "/a", "a/../b", ".wh.", "d/.wh..", "d/.wh...",
    "é" * 4097, "a\0b",
]  # fmt: skip
_NAMES = ["a", "d/e", "usr/bin/x", ".wh.x", "d/.wh..wh..opq", "x" * 1025, "é" * 1500, "a\nb"]
_OWNERS = ["", "root", "x" * MAX_OWNER_NAME, "é"]
_LINKS = {"symlink": ["", "a", "/abs", "../up", "x" * MAX_NAME_BYTES], "hardlink": ["a", "d/e"]}
_DEVICES = ("char", "block")
_FIELD_EDGES: list[list[Any]] = [
    _BAD_NAMES,
    list(range(len(ENTRY_TYPES) + 1)),  # a valid row of one kind retyped: fields it may not have
    [1, MAX_ENTRY_SIZE, MAX_ENTRY_SIZE + 1],
    [0o7777, 0o10000],
    [MAX_ID, MAX_ID + 1],
    [MAX_ID, MAX_ID + 1],
    ["x" * (MAX_OWNER_NAME + 1), "a\0"],
    ["x" * (MAX_OWNER_NAME + 1), "a\0"],
    [MAX_MTIME, -MAX_MTIME, (1 << 62) - 1, 1 << 62, float("-inf"), float("nan")],
    ["a", "../a", "a/./b", "x" * (MAX_NAME_BYTES + 1), "a\0", "d/.wh.x"],
    [1, MAX_DEVICE_MAJOR, MAX_DEVICE_MAJOR + 1],
    [1, MAX_DEVICE_MINOR, MAX_DEVICE_MINOR + 1],
    [{"": b""}, {"a": b"x" * (MAX_XATTR_BYTES + 1)}, {"a": "text"}, {1: b""}],
    [MAX_LAYER_SIZE, MAX_LAYER_SIZE + 1],
    [b"\1" * 32, b"\1" * 31],
]


@st.composite
def _row(draw: st.DrawFn) -> list[Any]:
    """A row valid for its kind."""
    kind = draw(st.sampled_from(ENTRY_TYPES))
    device = kind in _DEVICES
    row = [
        draw(st.sampled_from(_NAMES + ([""] if kind == "dir" else []))),
        ENTRY_TYPES.index(kind),
        draw(st.integers(0, 1 << 20)) if kind == "reg" else 0,
        draw(st.integers(0, 0o7777)),
        draw(st.integers(0, MAX_ID)),
        draw(st.integers(0, MAX_ID)),
        draw(st.sampled_from(_OWNERS)),
        draw(st.sampled_from(_OWNERS)),
        draw(st.integers(-(1 << 40), 1 << 40) | st.floats(-1e12, 1e12)),
        draw(st.sampled_from(_LINKS.get(kind, [""]))),
        draw(st.integers(0, MAX_DEVICE_MAJOR)) if device else 0,
        draw(st.integers(0, MAX_DEVICE_MINOR)) if device else 0,
        draw(st.sampled_from([{}, {"user.a": b"1"}])),
        draw(st.integers(0, 1 << 10)),
        draw(st.sampled_from([b"", b"\1" * 32])) if kind == "reg" else b"",
    ]
    return row


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.lists(_row(), max_size=4),
    changes=st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, len(ROW_FIELDS) - 1), st.data()), max_size=2
    ),
    garbage=st.none() | st.lists(st.sampled_from(_ODD), max_size=16),
    size=st.sampled_from([1 << 21, 1 << 23, MAX_LAYER_SIZE]),
)
def test_the_column_and_row_checks_agree_on_generated_tables(
    rows: list[Any],
    changes: list[tuple[int, int, st.DataObject]],
    garbage: list[Any] | None,
    size: int,
) -> None:
    """Tables of valid rows of every kind, with up to two fields swapped for an edge
    value (of the field's own, another kind's or any type) and maybe a row of garbage:
    the column checks either decline or build what the row checks build, and the table
    check (columns, then rows where they decline) refuses exactly what they refuse."""
    for row_number, field, data in changes:
        if rows:
            value = data.draw(st.sampled_from(_FIELD_EDGES[field]) | st.sampled_from(_ODD))
            rows[row_number % len(rows)][field] = value
    if garbage is not None:
        rows.append(garbage)
    fast = _outcome(table_by_columns, rows, size)
    slow = _outcome(table_by_rows, rows, size)
    assert fast is None or fast == slow
    assert _outcome(check_table, rows, size) == slow


_TABLE_EDGES = [
    *_EDGES,
    float("nan"), float("-inf"), 1.5, -(1 << 62), (1 << 62) + 1, "x" * 300, "a\0", ".w", "h.",
    "a/.wh.b", "a/.", "./a", "a/..", "\n", 1 << 40, (1 << 40) + 1, 255, 256, [], {"a": 1},
    "y" * (MAX_NAME_BYTES + 1), MAX_ENTRY_SIZE + 1, 1 << 2000, "a/.wh.", ".wh..", "b/.wh...",
]  # fmt: skip


@pytest.mark.parametrize("where", [0, 1, 3, -2, -1])
def test_every_single_field_change_is_judged_alike_by_columns_and_rows(where: int) -> None:
    """Each edge value in each field of one row (first, middle and last, as min and max
    see values in order): whenever the column checks take the table, the row checks
    build the same entries."""
    ordinary = _ordinary_rows()
    size = _small_index().uncompressed_size
    taken = 0
    for field_number in range(len(ordinary[0])):
        for value in _TABLE_EDGES:
            rows = copy.deepcopy(ordinary)
            rows[where][field_number] = value
            fast = table_by_columns(rows, size)
            if fast is not None:
                taken += 1
                assert fast == table_by_rows(rows, size), (field_number, value)
    assert taken  # some changes keep a table plain (a 0 for another 0, a mode of 0o7777)


def _table_end(rows: list[list[Any]]) -> int:
    """Where the data of the rows ends (size plus offset gap, summed)."""
    return sum(row[SIZE] + row[GAP] for row in rows)


def test_a_real_table_of_every_kind_of_entry_is_checked_column_by_column() -> None:
    """Devices, hard links, xattrs, whiteouts and the root directory included: the row
    by row checks are for tables that break a rule (or hold names too long to tell at
    a glance), not for any ordinary layer."""
    rows = _ordinary_rows()
    kinds = {ENTRY_TYPES[row[TYPE]] for row in rows}
    assert {"reg", "dir", "symlink", "hardlink", "char"} <= kinds
    assert any(row[XATTRS] for row in rows) and any(".wh." in row[NAME] for row in rows)
    size = _small_index().uncompressed_size
    rooted = [["", ENTRY_TYPES.index("dir"), *rows[0][2:]], *rows]
    for table in (rows, rooted):
        assert table_by_columns(table, size) == table_by_rows(table, size) is not None
    assert table_by_columns([], size) == []
    assert table_by_columns(rows, _table_end(rows) - 1) is None  # past the end: rows decide


def test_every_field_of_a_row_has_a_rule() -> None:
    """The column checks compare a column only once its types are checked, and the
    types are the rules': a field without a rule would go unchecked both ways."""
    assert {rule.column for rule in RULES} | {TYPE} == set(range(len(ROW_FIELDS)))


@settings(max_examples=200, deadline=None)
@given(blob=st.binary(max_size=300))
def test_fuzzed_bytes_parse_or_raise_index_format_error(blob: bytes) -> None:
    real = serialize(_small_index())
    for candidate in (blob, real[: len(blob)], blob + real[len(blob) :]):
        with contextlib.suppress(IndexFormatError):
            parse(candidate)


def _tree(depth: int) -> bytes:
    """A 15-ary msgpack tree of empty arrays ``depth`` levels deep: no array in it is
    longer than a file-table row."""
    return b"\x90" if depth == 0 else b"\x9f" + _tree(depth - 1) * 15


def _hostile_artifacts(index: LayerIndex) -> dict[str, bytes]:
    nested_row = _document(index)
    nested_row["entry_count"] = 1
    nested_row["toc"] = zlib.compress(b"\x91" + _tree(6), 9)
    array_windows = _document(index)
    array_windows["windows"] = [[]] * (6 << 20)  # one list, packed 6 Mi times
    return {
        "row of a tree of arrays": msgpack.packb(nested_row, use_bin_type=True),
        "windows of empty arrays": msgpack.packb(array_windows, use_bin_type=True),
    }


@pytest.mark.parametrize("case", ["row of a tree of arrays", "windows of empty arrays"])
def test_hostile_artifacts_are_refused_before_they_are_built(
    index: LayerIndex, tmp_path: Path, case: str
) -> None:
    """msgpack's limits cap each array, not how many there are, and every byte of
    0x90 is a list: kilobytes of (inflated) artifact must not become a gigabyte of
    lists before a count is checked."""
    artifact = _hostile_artifacts(index)[case]
    outcome, peak = decode_in_child(
        tmp_path,
        artifact,
        "from formats.layer_index import IndexFormatError\n"
        "from formats.layer_index_codec import parse",
        "parse(data)",
        "IndexFormatError",
    )
    assert outcome == "refused"
    assert peak < PEAK_LIMIT, f"{peak >> 20} MiB to refuse {len(artifact)} bytes"
