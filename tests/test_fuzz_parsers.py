"""Hostile input against every parser that reads bytes from a registry or a layer.

The agent parses what anyone with push rights put in a registry: manifests, eStargz
footers and TOCs, index-only artifacts, tar streams and prefetch profiles. Each parser
documents one error type for "refuse this"; anything else it raises (TypeError,
KeyError, RecursionError, OverflowError, struct.error...) is an unplanned failure of
the agent, and any entry it accepts must stay inside the layer once the agent builds
its FUSE tree from it. The per-module tests fuzz each parser's own fields; these tests
feed fully random bytes and structure-aware mutations of valid inputs (made with the
project's own writers) through the same path the agent takes, up to the tree.

Time bound: the ``acceld-fuzz`` hypothesis profile below keeps this file within about
40 s on a 2-core CI machine. For a longer local hunt raise the number of examples per
test with the environment variable ``ACCELD_FUZZ_EXAMPLES`` (e.g.
``ACCELD_FUZZ_EXAMPLES=5000 .venv/bin/pytest tests/test_fuzz_parsers.py``). The examples
are derived from a fixed seed unless ``ACCELD_FUZZ_RANDOM=1``: CI must fail for a change,
not for a draw, while a local hunt should explore new inputs each time (hypothesis keeps
what it finds in .hypothesis/ and replays it first).
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import io
import json
import os
import stat
import struct
import tarfile
import zlib
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fetcher import mediatypes as mt
from fetcher.errors import RegistryError
from fetcher.manifest import ImageIndex, ImageManifest, parse_manifest
from formats import layer_index, layer_index_codec
from formats.estargz import (
    FOOTER_SIZE,
    TOC_TAR_NAME,
    ChunkDigestError,
    EstargzFormatError,
    EstargzToc,
    parse_footer,
    parse_toc,
    read_chunk,
    write_estargz,
)
from formats.gzip_index import GzipCheckpointer, GzipIndexError, inflate_span
from formats.layer_index_builder import build_layer_index
from formats.layer_tree import InodeAllocator, LayerTree
from formats.toc import HostileLayerError, TocEntry, iter_tar_entries, normalize_name
from profiles import format as profile_format

FUZZ_EXAMPLES = int(os.environ.get("ACCELD_FUZZ_EXAMPLES", "100"))
settings.register_profile(
    "acceld-fuzz",
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=os.environ.get("ACCELD_FUZZ_RANDOM") != "1",
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ = settings.get_profile("acceld-fuzz")

DIGEST = "sha256:" + "c" * 64
CHUNK_SIZE = 1000
SPAN = 32 * 1024
# Deep enough to exhaust Python's recursion limit in any per-level recursion, short
# enough (under MAX_NAME_BYTES) that the name itself is legal.
DEEP_NAME = "d/" * 2040 + "f"

# --- hostile values -----------------------------------------------------------------

_HOSTILE_INTS = st.sampled_from(
    [-1, -(1 << 63), 1 << 31, (1 << 32) - 1, 1 << 32, (1 << 63) - 1, 1 << 63, 1 << 64, 1 << 100]
) | st.integers(-(1 << 64), 1 << 64)
_HOSTILE_NAMES = st.sampled_from(
    [
        "../x",
        "../../../../etc/shadow",
        "/etc/passwd",
        "a/../../b",
        "./..",
        "a\0b",
        "\ud800",
        "\udcff",
        ".wh.",
        ".wh..",
        ".wh...",
        "etc/.wh..",
        ".wh..wh..opq",
        "",
        ".",
        "/",
        "//",
        "x" * 5000,
        DEEP_NAME,
        DEEP_NAME + "/g",
        TOC_TAR_NAME,
        ".prefetch.landmark",
        "etc",
        "etc/f1",
        "etc/big",
        "etc/missing",
    ]
) | st.text(max_size=12)
_HOSTILE_LEAVES = st.one_of(
    _HOSTILE_INTS,
    _HOSTILE_NAMES,
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["reg", "dir", "symlink", "hardlink", "chunk", "char", "block", "fifo"]),
    st.sampled_from(
        ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "2020-01-01T00:00:00"]
    ),
    st.sampled_from(["AAAA", "!!", "=" * 8, DIGEST, "sha256:", "sha512:" + "0" * 128]),
)
_HOSTILE_VALUES = st.recursive(
    _HOSTILE_LEAVES,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=6,
)


def _mutate_list(items: list[Any], data: st.DataObject, hostile: st.SearchStrategy[Any]) -> None:
    """One structural edit of a record list: drop, duplicate, move or replace a record."""
    if not items:
        items.append(data.draw(hostile))
        return
    index = data.draw(st.integers(0, len(items) - 1))
    action = data.draw(st.sampled_from(["drop", "duplicate", "move", "replace"]))
    if action == "drop":
        del items[index]
    elif action == "duplicate":
        items.insert(data.draw(st.integers(0, len(items))), _json_copy(items[index]))
    elif action == "move":
        items.insert(data.draw(st.integers(0, len(items))), items.pop(index))
    else:
        items[index] = data.draw(hostile)


def _json_copy(value: Any) -> Any:
    """A deep copy of plain data (records are mutated in place)."""
    if isinstance(value, dict):
        return {k: _json_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_copy(v) for v in value]
    return value


# --- what the agent does with an accepted table -------------------------------------


def assert_entries_stay_inside(entries: list[TocEntry]) -> None:
    """Every accepted name is a clean relative path; hardlinks point at one too."""
    for entry in entries:
        assert normalize_name(entry.name) == entry.name
        if entry.type == "hardlink":
            assert entry.link_name and normalize_name(entry.link_name) == entry.link_name
        assert entry.size >= 0 and entry.offset >= 0


def assert_tree_stays_inside(entries: list[TocEntry]) -> LayerTree:
    """Build the agent's tree and walk it as the kernel would: every name a single
    path component, every reachable inode known to the FUSE layer, directories reached
    once (no hardlinked directories, no cycles), st_mode agreeing with the node kind."""
    tree = LayerTree(entries, InodeAllocator())
    assert stat.S_ISDIR(tree.root.mode)
    seen: set[int] = set()
    reachable = {tree.root.inode}
    stack = [(tree.root, "")]
    while stack:
        directory, path = stack.pop()
        assert directory.children is not None and id(directory) not in seen
        seen.add(id(directory))
        for raw, child in directory.children.items():
            assert raw not in (b"", b".", b"..") and b"/" not in raw and b"\0" not in raw
            assert tree.nodes.get(child.inode) is child
            assert stat.S_ISDIR(child.mode) == child.is_dir
            name = raw.decode("utf-8", "surrogateescape")
            child_path = f"{path}/{name}" if path else name
            assert normalize_name(child_path) == child_path
            assert tree.lookup(child_path) is child
            reachable.add(child.inode)
            if child.is_dir:
                stack.append((child, child_path))
    assert reachable == set(tree.nodes)
    return tree


# --- eStargz: footer -> TOC -> chunks -> tree ---------------------------------------


def _sample_tar() -> bytes:
    """Every entry kind the agent serves, with files spanning several chunks."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def add(name: str, kind: bytes, data: bytes = b"", **fields: Any) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.size, info.mtime = kind, len(data), 1_700_000_000
            for key, value in fields.items():
                setattr(info, key, value)
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        add("etc", tarfile.DIRTYPE, mode=0o755)
        add("etc/f1", tarfile.REGTYPE, b"one\n", uname="app", uid=1000)
        add("etc/big", tarfile.REGTYPE, bytes(range(256)) * 12)
        add("etc/link", tarfile.SYMTYPE, linkname="f1")
        add("etc/hard", tarfile.LNKTYPE, linkname="etc/f1")
        add("dev", tarfile.DIRTYPE)
        add("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3)
        add("dev/pipe", tarfile.FIFOTYPE)
        add("old/.wh.gone", tarfile.REGTYPE)
        add("opaque/.wh..wh..opq", tarfile.REGTYPE)
        add("caps", tarfile.REGTYPE, b"x", pax_headers={"SCHILY.xattr.user.k": "v"})
    return out.getvalue()


@functools.cache
def _sample_estargz() -> bytes:
    out = io.BytesIO()
    write_estargz(io.BytesIO(_sample_tar()), out, chunk_size=CHUNK_SIZE, workers=1)
    return out.getvalue()


def _toc_document(blob: bytes) -> dict[str, Any]:
    offset = parse_footer(blob[-FOOTER_SIZE:], len(blob))
    plain = zlib.decompressobj(31).decompress(blob[offset : len(blob) - FOOTER_SIZE])
    size = tarfile.TarInfo.frombuf(plain[:512], "utf-8", "strict").size
    document: dict[str, Any] = json.loads(plain[512 : 512 + size])
    return document


def _toc_member(toc_json: bytes) -> bytes:
    """A TOC gzip member as writers frame it: one tar entry holding the JSON."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(TOC_TAR_NAME)
        info.size = len(toc_json)
        tar.addfile(info, io.BytesIO(toc_json))
    return gzip.compress(out.getvalue())


def _open_estargz(blob: bytes, expected_digest: str | None = None) -> EstargzToc:
    """What the agent does with a blob: footer, TOC, every chunk, then the tree."""
    toc_offset = parse_footer(blob[-FOOTER_SIZE:], len(blob))
    toc = parse_toc(blob[toc_offset : len(blob) - FOOTER_SIZE], toc_offset, expected_digest)
    _check_accepted_toc(toc, blob)
    return toc


def _check_accepted_toc(toc: EstargzToc, blob: bytes) -> None:
    assert_entries_stay_inside(toc.entries)
    for entry, chunks in toc.chunks.items():
        assert normalize_name(entry.name) == entry.name
        for chunk in chunks:
            assert 0 < chunk.blob_offset < chunk.blob_end <= toc.toc_offset
            try:
                payload = read_chunk(chunk, blob[chunk.blob_offset : chunk.blob_end])
            except ChunkDigestError:
                continue
            assert len(payload) == chunk.size
            assert "sha256:" + hashlib.sha256(payload).hexdigest() == chunk.digest
    assert_tree_stays_inside(toc.entries)


@FUZZ
@given(blob=st.binary(max_size=400))
def test_random_bytes_are_no_estargz_blob(blob: bytes) -> None:
    with contextlib.suppress(EstargzFormatError):
        _open_estargz(blob)
    with contextlib.suppress(EstargzFormatError):
        parse_toc(blob, 1 << 20)


@FUZZ
@given(data=st.data())
def test_flipped_bytes_of_a_real_blob_are_refused_or_verified(data: st.DataObject) -> None:
    blob = bytearray(_sample_estargz())
    for _ in range(data.draw(st.integers(1, 6))):
        position = data.draw(st.integers(0, len(blob) - 1))
        blob[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.sampled_from([len(blob), data.draw(st.integers(0, len(blob)))]))
    with contextlib.suppress(EstargzFormatError):
        _open_estargz(bytes(blob[:cut]))


_TOC_FIELDS = st.sampled_from(
    [
        "name",
        "type",
        "size",
        "offset",
        "innerOffset",
        "chunkOffset",
        "chunkSize",
        "chunkDigest",
        "digest",
        "linkName",
        "mode",
        "uid",
        "gid",
        "userName",
        "groupName",
        "modtime",
        "devMajor",
        "devMinor",
        "xattrs",
    ]
)


@FUZZ
@given(data=st.data())
def test_mutated_toc_records_are_refused_or_stay_inside(data: st.DataObject) -> None:
    blob = _sample_estargz()
    toc_offset = parse_footer(blob[-FOOTER_SIZE:], len(blob))
    document = _toc_document(blob)
    records: list[Any] = document["entries"]
    for _ in range(data.draw(st.integers(1, 4))):
        if data.draw(st.booleans()) and records:
            record = records[data.draw(st.integers(0, len(records) - 1))]
            if isinstance(record, dict):
                record[data.draw(_TOC_FIELDS)] = data.draw(_HOSTILE_VALUES)
        else:
            _mutate_list(records, data, _HOSTILE_VALUES)
    if data.draw(st.integers(0, 9)) == 0:
        document[data.draw(st.sampled_from(["version", "entries"]))] = data.draw(_HOSTILE_VALUES)
    toc_json = json.dumps(document).encode()
    if data.draw(st.integers(0, 9)) == 0:
        toc_json = toc_json[: data.draw(st.integers(0, len(toc_json)))]
    try:
        toc = parse_toc(_toc_member(toc_json), toc_offset)
    except EstargzFormatError:
        return
    _check_accepted_toc(toc, blob)


_TREE_NAMES = st.sampled_from(
    [
        "",
        "a",
        "a/b",
        "a/b/c",
        "b",
        ".wh.a",
        "a/.wh.b",
        "a/.wh..wh..opq",
        ".wh..wh..opq",
        ".wh.",
        ".wh..",
        "a/.wh...",
        DEEP_NAME,
        DEEP_NAME + "/g",
        "d/d/d",
    ]
)


@st.composite
def _tree_records(draw: st.DrawFn) -> list[dict[str, Any]]:
    """TOC records with valid framing but a hostile shape: names that replace each
    other, whiteouts of odd targets, directories under files, hardlinks to missing,
    later or directory targets, and symlinks out of the layer."""
    records = []
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(["dir", "reg", "symlink", "hardlink", "char", "fifo"]))
        record: dict[str, Any] = {"name": draw(_TREE_NAMES), "type": kind}
        if kind in ("symlink", "hardlink"):
            record["linkName"] = draw(_TREE_NAMES | st.sampled_from(["../../etc", "/etc"]))
        records.append(record)
    return records


@FUZZ
@given(records=_tree_records())
def test_hostile_toc_shapes_build_a_contained_tree(records: list[dict[str, Any]]) -> None:
    """The agent's tree from any TOC the parser accepts: no escape, no crash."""
    document = {"version": 1, "entries": records}
    try:
        toc = parse_toc(_toc_member(json.dumps(document).encode()), 1 << 20)
    except EstargzFormatError:
        return
    assert_entries_stay_inside(toc.entries)
    assert_tree_stays_inside(toc.entries)


@FUZZ
@given(depth=st.integers(1, 2), nesting=st.integers(100, 100_000))
def test_deeply_nested_toc_json_is_refused(depth: int, nesting: int) -> None:
    toc_json = b'{"version":1,"entries":' + b"[" * nesting * depth + b"]" * nesting * depth + b"}"
    try:
        parse_toc(_toc_member(toc_json), 1 << 20)
    except EstargzFormatError:
        return


# --- tar reader ---------------------------------------------------------------------

_TAR_FIELDS = {  # name: (offset, length) in a ustar header
    "name": (0, 100),
    "mode": (100, 8),
    "uid": (108, 8),
    "size": (124, 12),
    "mtime": (136, 12),
    "typeflag": (156, 1),
    "linkname": (157, 100),
    "devmajor": (329, 8),
    "prefix": (345, 155),
}
_PAX_KEYS = st.sampled_from(
    ["path", "linkpath", "size", "uid", "gid", "mtime", "uname", "SCHILY.xattr.user.x"]
)


def _base256(value: int, length: int) -> bytes:
    """GNU's binary numeric field (high bit set), as tarfile reads sizes past 8 GiB."""
    raw = (value % (1 << (8 * length - 1))).to_bytes(length, "big")
    return bytes([raw[0] | 0x80]) + raw[1:] if value >= 0 else bytes([0xFF]) + raw[1:]


def _field_value(draw: st.DrawFn, length: int) -> bytes:
    choice = draw(st.sampled_from(["text", "number", "bytes"]))
    if choice == "text":
        text = draw(_HOSTILE_NAMES).encode("utf-8", "surrogatepass")
    elif choice == "number":
        text = _base256(draw(_HOSTILE_INTS), length)
    else:
        text = draw(st.binary(max_size=length))
    return text[:length].ljust(length, b"\0")


def _with_checksum(header: bytearray) -> None:
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)


def _headers(tar: bytes) -> list[int]:
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as archive:
        return [info.offset_data - 512 for info in archive]


@st.composite
def _hostile_tars(draw: st.DrawFn) -> bytes:
    """The sample tar with a hostile pax record, header fields overwritten (checksum
    fixed, so tarfile reads them), stray bytes changed, and maybe cut short."""
    tar = _sample_tar()
    if draw(st.booleans()):
        tar = _with_pax_record(tar, draw(_PAX_KEYS), draw(_HOSTILE_NAMES))
    headers = _headers(tar)
    damaged = bytearray(tar)
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.integers(0, 3)):
            start = draw(st.sampled_from(headers))
            offset, length = _TAR_FIELDS[draw(st.sampled_from(sorted(_TAR_FIELDS)))]
            header = bytearray(damaged[start : start + 512])
            header[offset : offset + length] = _field_value(draw, length)
            _with_checksum(header)
            damaged[start : start + 512] = header
        else:
            damaged[draw(st.integers(0, len(damaged) - 1))] = draw(st.integers(0, 255))
    if draw(st.integers(0, 4)) == 0:
        del damaged[draw(st.integers(0, len(damaged))) :]
    return bytes(damaged)


def _with_pax_record(tar: bytes, key: str, value: str) -> bytes:
    """Re-write the tar with one more pax record on a random-ish (the last) member."""
    out = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as source,
        tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as sink,
    ):
        members = source.getmembers()
        for number, info in enumerate(members):
            data = source.extractfile(info) if info.isreg() else None
            if number == len(members) - 1:
                info.pax_headers = {**info.pax_headers, key: value}
            try:
                sink.addfile(info, data)
            except (ValueError, UnicodeError, tarfile.TarError):
                return tar  # not writable as a tar: no layer can carry it either
    return out.getvalue()


def _walk_like_a_writer(tar: bytes) -> list[TocEntry]:
    """Consume iter_tar_entries as its callers do, data included."""
    entries = []
    for entry, _info, reader in iter_tar_entries(io.BytesIO(tar)):
        if reader is not None:
            try:
                reader.read()
            except tarfile.TarError:  # documented: short data surfaces in the caller
                raise HostileLayerError("truncated") from None
        entries.append(entry)
    return entries


@FUZZ
@given(tar=_hostile_tars())
def test_mutated_tars_are_refused_or_stay_inside(tar: bytes) -> None:
    try:
        entries = _walk_like_a_writer(tar)
    except HostileLayerError:
        return
    assert_entries_stay_inside(entries)
    assert_tree_stays_inside(entries)


@FUZZ
@given(blob=st.binary(max_size=2048))
def test_random_bytes_are_no_tar(blob: bytes) -> None:
    try:
        _walk_like_a_writer(blob)
    except HostileLayerError:
        return


@FUZZ
@given(tar=_hostile_tars())
def test_converting_a_mutated_tar_gives_a_layer_the_agent_accepts(tar: bytes) -> None:
    """Whatever the converter accepts, the agent must be able to read back: full mode
    (eStargz) and index-only mode (layer index, serialized and parsed again)."""
    out = io.BytesIO()
    try:
        write_estargz(io.BytesIO(tar), out, chunk_size=CHUNK_SIZE, workers=1)
    except HostileLayerError:
        return
    toc = _open_estargz(out.getvalue())
    index = build_layer_index(
        [gzip.compress(tar)], layer_digest=DIGEST, media_type=mt.OCI_LAYER_GZIP, span=SPAN
    )
    parsed = layer_index_codec.parse(layer_index_codec.serialize(index))
    assert [e.name for e in parsed.entries] == [e.name for e in index.entries]
    assert {e.name for e in toc.entries} <= {e.name for e in parsed.entries}
    assert_tree_stays_inside(parsed.entries)


# --- index-only mode: gzip checkpoints and the layer index artifact -----------------


@functools.cache
def _sample_index_bytes() -> bytes:
    index = build_layer_index(
        [gzip.compress(_sample_tar())], layer_digest=DIGEST, media_type=mt.OCI_LAYER_GZIP
    )
    return layer_index_codec.serialize(index)


@FUZZ
@given(blob=st.binary(max_size=600), chunk=st.integers(1, 64))
def test_random_and_damaged_gzip_is_refused_by_the_checkpointer(blob: bytes, chunk: int) -> None:
    real = gzip.compress(_sample_tar())
    for candidate in (blob, real[: len(blob)], real[: len(real) // 2] + blob):
        checkpointer = GzipCheckpointer(SPAN)
        try:
            for _ in checkpointer.inflate(
                candidate[i : i + chunk] for i in range(0, len(candidate), chunk)
            ):
                pass
        except GzipIndexError:
            continue
        result = checkpointer.result()
        assert len(result.checkpoints) == len(result.span_digests) >= 1


@FUZZ
@given(data=st.data())
def test_damaged_span_bytes_are_refused_or_verified(data: st.DataObject) -> None:
    compressed = bytearray(gzip.compress(bytes(range(256)) * 600, 6))
    checkpointer = GzipCheckpointer(SPAN)
    plain = b"".join(checkpointer.inflate([bytes(compressed)]))
    found = checkpointer.result()
    number = data.draw(st.integers(0, len(found.checkpoints) - 1))
    for _ in range(data.draw(st.integers(1, 4))):
        compressed[data.draw(st.integers(0, len(compressed) - 1))] = data.draw(st.integers(0, 255))
    window = found.windows[number]
    if data.draw(st.booleans()):
        window = data.draw(st.binary(max_size=64))
    start = found.checkpoints[number].compressed_offset
    try:
        span = inflate_span(
            found.checkpoints,
            found.span_digests,
            len(plain),
            number,
            window,
            bytes(compressed[start:]),
        )
    except GzipIndexError:
        return
    begin = found.checkpoints[number].uncompressed_offset
    assert span == plain[begin : begin + len(span)]


def _index_document() -> tuple[dict[str, Any], list[Any]]:
    document = msgpack.unpackb(_sample_index_bytes(), raw=False)
    rows = msgpack.unpackb(
        zlib.decompress(document["toc"]), raw=False, unicode_errors="surrogateescape"
    )
    return document, rows


@FUZZ
@given(data=st.data())
def test_mutated_layer_index_rows_are_refused_or_stay_inside(data: st.DataObject) -> None:
    document, rows = _index_document()
    for _ in range(data.draw(st.integers(1, 4))):
        if data.draw(st.booleans()):
            row = rows[data.draw(st.integers(0, len(rows) - 1))]
            if isinstance(row, list) and row:
                # 0 name, 1 type, 2 size, 9 link, 13 offset gap: the fields that place data
                column = data.draw(st.sampled_from([0, 0, 1, 2, 9, 9, 13, 3, 4, 8, 10, 12, 14]))
                row[column % len(row)] = data.draw(_HOSTILE_VALUES | st.integers(0, 6))
        else:
            _mutate_list(rows, data, _HOSTILE_VALUES)
    if data.draw(st.booleans()):
        document["entry_count"] = len(rows)
    if data.draw(st.integers(0, 4)) == 0:
        key = data.draw(
            st.sampled_from(["compressed_size", "uncompressed_size", "span_size", "checkpoints"])
        )
        document[key] = data.draw(_HOSTILE_VALUES)
    try:
        packed_rows = msgpack.packb(rows, use_bin_type=True, unicode_errors="surrogateescape")
        document["toc"] = zlib.compress(packed_rows)
        blob = msgpack.packb(document, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        return  # not encodable as msgpack: no registry can serve it either
    try:
        parsed = layer_index_codec.parse(blob)
    except layer_index.IndexFormatError:
        return
    assert_entries_stay_inside(parsed.entries)
    for entry in parsed.entries:
        assert entry.offset + entry.size <= parsed.uncompressed_size
    assert_tree_stays_inside(parsed.entries)


@FUZZ
@given(data=st.data())
def test_damaged_layer_index_bytes_are_refused_or_stay_inside(data: st.DataObject) -> None:
    blob = bytearray(_sample_index_bytes())
    for _ in range(data.draw(st.integers(1, 6))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    try:
        parsed = layer_index_codec.parse(bytes(blob[: data.draw(st.integers(0, len(blob)))]))
    except layer_index.IndexFormatError:
        return
    assert_tree_stays_inside(parsed.entries)


# --- manifests and indexes ----------------------------------------------------------

_MANIFEST = {
    "schemaVersion": 2,
    "mediaType": mt.OCI_MANIFEST,
    "config": {"mediaType": mt.OCI_CONFIG, "digest": DIGEST, "size": 10},
    "layers": [
        {"mediaType": mt.OCI_LAYER_GZIP, "digest": DIGEST, "size": 20, "annotations": {"a": "b"}}
    ],
    "subject": {"mediaType": mt.OCI_MANIFEST, "digest": DIGEST, "size": 3},
}
_INDEX = {
    "schemaVersion": 2,
    "mediaType": mt.OCI_INDEX,
    "manifests": [
        {
            "mediaType": mt.OCI_MANIFEST,
            "digest": DIGEST,
            "size": 30,
            "platform": {"os": "linux", "architecture": "amd64", "variant": "v8"},
            "urls": ["http://127.0.0.1/x"],
        }
    ],
}
# Tokens json.dumps never writes but a hostile registry may: each is spliced in raw.
_RAW_TOKENS = st.sampled_from(
    ["NaN", "-Infinity", "1" * 5000, "1e999", '"\\ud800"', "[" * 50_000 + "]" * 50_000, "{}"]
)
_RAW_MARK = "@@raw@@"


def _json_paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    paths = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            paths += _json_paths(item, (*prefix, key))
    elif isinstance(value, list):
        for number, item in enumerate(value):
            paths += _json_paths(item, (*prefix, number))
    return paths


def _replace(document: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return document


def _check_manifest(body: bytes, content_type: str | None) -> None:
    try:
        parsed = parse_manifest(body, content_type)
    except RegistryError:  # ManifestError, UnsupportedMediaTypeError
        return
    descriptors = (
        parsed.manifests if isinstance(parsed, ImageIndex) else (parsed.config, *parsed.layers)
    )
    assert isinstance(parsed, ImageIndex | ImageManifest)
    for descriptor in descriptors:
        assert type(descriptor.size) is int and descriptor.size >= 0
        assert descriptor.digest.startswith(("sha256:", "sha512:"))


_CONTENT_TYPES = st.sampled_from(
    [None, "", mt.OCI_MANIFEST, mt.OCI_INDEX, mt.DOCKER_MANIFEST, mt.DOCKER_SCHEMA1, "text/html"]
)


@FUZZ
@given(data=st.data(), content_type=_CONTENT_TYPES)
def test_mutated_manifests_are_refused_or_well_formed(
    data: st.DataObject, content_type: str | None
) -> None:
    document = _json_copy(data.draw(st.sampled_from([_MANIFEST, _INDEX])))
    raw: str | None = None
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(_json_paths(document)))
        if data.draw(st.integers(0, 3)) == 0:
            raw = data.draw(_RAW_TOKENS)
            document = _replace(document, path, _RAW_MARK)
        else:
            document = _replace(document, path, data.draw(_HOSTILE_VALUES))
    text = json.dumps(document)
    if raw is not None:
        text = text.replace(json.dumps(_RAW_MARK), raw)
    body = text.encode("utf-8", "surrogatepass")
    if data.draw(st.integers(0, 9)) == 0:
        body = body[: data.draw(st.integers(0, len(body)))]
    _check_manifest(body, content_type)


@FUZZ
@given(body=st.binary(max_size=300), content_type=_CONTENT_TYPES)
def test_random_bytes_are_no_manifest(body: bytes, content_type: str | None) -> None:
    _check_manifest(body, content_type)
    _check_manifest(b'{"schemaVersion":2,"manifests":' + body, content_type)


# --- prefetch profiles --------------------------------------------------------------


def _sample_profile() -> profile_format.Profile:
    runs = profile_format.RunStats(3, 1, 0, 1, (("node-a", 2),), (("ebpf", 2),), ((10, 500),))
    files = (
        profile_format.FileStat("sha256:" + "a" * 64, "bin/sh", 2, ((0, 4096, 2),), ((10, 5),)),
        profile_format.FileStat("sha256:" + "a" * 64, "etc/passwd", 1, ((0, 9, 1),), ((10, 7),)),
    )
    return profile_format.Profile(
        image=DIGEST,
        layers=("sha256:" + "a" * 64,),
        threshold=0.5,
        files=files,
        runs=runs,
    )


@FUZZ
@given(data=st.data())
def test_hostile_profile_paths_and_numbers_are_refused(data: st.DataObject) -> None:
    """Paths the prefetcher would look up in a layer, and the numbers it would size
    fetches by: escapes and absurd values are refused, accepted paths stay inside."""
    blob = profile_format.serialize(_sample_profile())
    header = len(profile_format.MAGIC) + 2
    body = msgpack.unpackb(blob[header:], raw=False)
    targets = [
        ("files", 0, 1),
        ("files", 1, 1),
        ("pinned",),
        ("files", 0, 3, 0, 1),
        ("files", 0, 4, 0, 0),
        ("runs", "count"),
        ("layers", 0),
        ("files", 0, 0),
    ]
    for _ in range(data.draw(st.integers(1, 3))):
        _replace(body, data.draw(st.sampled_from(targets)), data.draw(_HOSTILE_VALUES))
    try:
        mutated = blob[:header] + msgpack.packb(body, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        return  # not encodable as msgpack: no registry can serve it either
    try:
        parsed = profile_format.parse(mutated)
    except profile_format.ProfileFormatError:
        return
    for stat_ in parsed.files:
        assert stat_.path and normalize_name(stat_.path) == stat_.path


@FUZZ
@given(nesting=st.integers(1, 200_000), opener=st.sampled_from([b"\x91", b"\x81\xa1k"]))
def test_deeply_nested_profiles_are_refused(nesting: int, opener: bytes) -> None:
    blob = profile_format.MAGIC + struct.pack(">H", profile_format.FORMAT_VERSION)
    try:
        profile_format.parse(blob + opener * nesting + b"\xc0")
    except profile_format.ProfileFormatError:
        return
