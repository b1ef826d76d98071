"""The layer index as an artifact (formats/layer_index.py has the model): its bytes,
and parsing them back without trusting them.

The artifact arrives from the registry, so parsing treats it as hostile: every count,
offset and name is checked before anything trusts it, and decoding itself is bounded
(formats/bounded_msgpack.py) so that no artifact can make the agent build more than
its caps allow. The rows of the file table are held to formats/layer_index_table.py.

Encoding: a msgpack map. The file table, which repeats itself a lot (paths, owners,
small offset gaps), is a zlib-compressed msgpack array of rows, with each offset stored
as the gap after the previous entry's data.
"""

from __future__ import annotations

import hashlib
import itertools
import operator
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from formats.bounded_msgpack import BoundedUnpacker
from formats.gzip_index import Checkpoint, GzipIndexError, decompress_window, inflate_bounded
from formats.layer_index import (
    DIGEST_BYTES,
    MAX_LAYER_SIZE,
    MAX_SPAN,
    MIN_PIECE,
    MIN_SPAN,
    IndexFormatError,
    LayerIndex,
    checked_int,
    checked_text,
)
from formats.layer_index_table import (
    GAP,
    NAME,
    ROW_FIELDS,
    SIZE,
    all_row_shaped,
    check_row,
    check_table,
    encode_row,
)
from formats.media_types import GZIP_LAYERS, TAR_LAYERS
from formats.toc import MAX_NAME_BYTES, MAX_XATTR_BYTES, TocEntry, all_of_type

MAGIC = "acceld.layer-index"
VERSION = 2
"""2 added span pieces (``piece_size``, ``piece_digests``, ``piece_ends``); version 1
indexes are still read, and their spans are fetched whole."""
_VERSIONS = (1, VERSION)
_PIECE_FIELDS = {"piece_size", "piece_digests", "piece_ends"}
MAX_CHECKPOINTS = 1 << 22
MAX_ENTRIES = 1 << 22
MAX_TOC_BYTES = 1 << 28
MAX_ARTIFACT_BYTES = 1 << 30
MAX_XATTRS = (64 << 10) // len("user.x\0")
"""Linux lists a file's xattr names, each NUL-terminated and at least ``user.`` and a
byte long, in at most 64 KiB (XATTR_LIST_MAX): no file it serves can carry more."""
_MAX_PIECES = MAX_SPAN // MIN_PIECE
# Name limits count characters; in UTF-8 a character takes up to four bytes.
_MAX_TEXT_BYTES = 4 * MAX_NAME_BYTES
# Above any header field's text (digest and media type: at most 200 characters).
_MAX_FIELD_TEXT = 1024
# Tar names are bytes; toc.py carries undecodable ones as surrogate escapes, and so
# does the file table, so such a name survives the round trip unchanged.
_NAME_ERRORS = "surrogateescape"


def serialize(index: LayerIndex) -> bytes:
    """The artifact bytes for ``index``."""
    toc: list[list[Any]] = []
    previous_end = 0
    for entry in index.entries:
        toc.append(encode_row(entry, entry.offset - previous_end))
        previous_end = entry.offset + entry.size
    document = {
        "magic": MAGIC,
        "version": VERSION,
        "layer_digest": index.layer_digest,
        "media_type": index.media_type,
        "compressed_size": index.compressed_size,
        "uncompressed_size": index.uncompressed_size,
        "span_size": index.span_size,
        "checkpoints": [
            [c.compressed_offset, c.bit_offset, c.uncompressed_offset] for c in index.checkpoints
        ],
        "windows": index.windows,
        "span_digests": b"".join(index.span_digests),
        "piece_size": index.piece_size,
        "piece_digests": [b"".join(digests) for digests in index.piece_digests],
        "piece_ends": index.piece_ends,
        "entry_count": len(index.entries),
        "toc": zlib.compress(msgpack.packb(toc, use_bin_type=True, unicode_errors=_NAME_ERRORS), 9),
    }
    packed: bytes = msgpack.packb(document, use_bin_type=True)
    return packed


def fingerprint(index: LayerIndex) -> str:
    """The digest of ``index`` as an artifact. Two indexes of one blob may lay its
    spans out differently, so whatever is derived from one (cache keys, a mounted
    tree) must name it, or one index's spans would be served under the other's."""
    if not index.source_digest:
        index.source_digest = "sha256:" + hashlib.sha256(serialize(index)).hexdigest()
    return index.source_digest


def parse(data: bytes) -> LayerIndex:
    """Parse and fully validate artifact bytes; IndexFormatError on anything off."""
    return parse_spans(data).checked()


@dataclass
class DecodedIndex:
    """An index whose header and spans are checked and whose file table is decoded but
    not yet checked: enough to find the files a learned profile names and fetch their
    spans while the table is checked: decoding a big table is a fraction of checking
    it and building the tree from it, which the profile's prefetch need not wait for."""

    index: LayerIndex
    """Entries still empty: ``checked`` fills them in."""
    rows: list[Any]
    _names: dict[str, int] | None = None
    _ends: list[int] | None = None

    def checked(self) -> LayerIndex:
        """The index with its file table checked in full (IndexFormatError if it fails)."""
        self.index.entries = check_table(self.rows, self.index.uncompressed_size)
        return self.index

    def live_entry(self, name: str) -> TocEntry | None:
        """The file a tree built from this table shows at ``name``, found before the
        table is checked: the last row of that name (tar semantics), checked on its own
        as the row path checks it, a hardlink followed to its target. None if there is
        none or the table is not plain enough to tell; as the answer only steers
        prefetch, an odd table costs bytes, never serves a wrong one."""
        if self._names is None:
            self._index_rows()
        assert self._names is not None and self._ends is not None
        entry = self._row_entry(self._names.get(name))
        if entry is not None and entry.type == "hardlink":
            entry = self._row_entry(self._names.get(entry.link_name))
        return entry if entry is not None and entry.type == "reg" else None

    def row_ends(self) -> list[int]:
        """Where each row's data ends, in table order (empty as for ``live_entry``)."""
        if self._ends is None:
            self._index_rows()
        assert self._ends is not None
        return self._ends

    def _index_rows(self) -> None:
        """Names to row numbers and where each row's data ends, at C speed; empty when
        the table's shape or types would need the row-by-row checks to make sense of."""
        self._names, self._ends = {}, []
        rows = self.rows
        if not rows or not all_row_shaped(rows):
            return
        names, sizes, gaps = (tuple(map(operator.itemgetter(i), rows)) for i in (NAME, SIZE, GAP))
        if not (all_of_type(str, names) and all_of_type(int, sizes, gaps)):
            return
        self._names = dict(zip(names, range(len(names)), strict=True))
        self._ends = list(itertools.accumulate(map(operator.add, gaps, sizes)))

    def _row_entry(self, number: int | None) -> TocEntry | None:
        if number is None:
            return None
        assert self._ends is not None
        previous_end = self._ends[number - 1] if number else 0
        try:
            entry = check_row(self.rows[number], number, previous_end)
        except IndexFormatError:
            return None
        return entry if entry.offset + entry.size <= self.index.uncompressed_size else None


def parse_spans(data: bytes) -> DecodedIndex:
    """Check the header and spans of artifact bytes and decode their file table
    (IndexFormatError on anything off); ``DecodedIndex.checked`` does the rest."""
    if len(data) > MAX_ARTIFACT_BYTES:
        raise IndexFormatError("layer index is too large")
    document = _read_document(data)
    if document.get("magic") != MAGIC:
        raise IndexFormatError("not an acceld layer index (bad magic)")
    version = document.get("version")
    if type(version) is not int or version not in _VERSIONS:  # (True == 1)
        raise IndexFormatError(f"unsupported layer index version {version!r}")
    expected = set(_FIELD_READERS) - (set() if version >= 2 else _PIECE_FIELDS)
    if set(document) != expected:
        raise IndexFormatError(f"unexpected fields {sorted(set(document) ^ expected)}")
    index = LayerIndex(
        layer_digest=_digest_string(document["layer_digest"]),
        media_type=_media_type(document["media_type"]),
        compressed_size=_size(document, "compressed_size"),
        uncompressed_size=_size(document, "uncompressed_size"),
        span_size=checked_int(document["span_size"], "span_size", MAX_SPAN, MIN_SPAN),
        source_digest="sha256:" + hashlib.sha256(data).hexdigest(),
    )
    _parse_checkpoints(index, document)
    if version >= 2:
        _parse_pieces(index, document)
    return DecodedIndex(index, _decode_toc(document))


def _read_document(data: bytes) -> dict[str, Any]:
    """The artifact's top-level map, each field read as far as the format's caps allow
    (its arrays' lengths checked before their items are read, a checkpoint the one
    array an item may build): what the fields say is checked afterwards."""
    reader = BoundedUnpacker(
        data,
        IndexFormatError,
        "layer index",
        max_str_len=_MAX_FIELD_TEXT,
        max_bin_len=MAX_ARTIFACT_BYTES,
        max_array_len=3,
    )
    document = reader.fields(_FIELD_READERS, "layer index")
    reader.finish()
    return document


def _piece_ends(reader: BoundedUnpacker) -> list[Any]:
    spans = reader.array(MAX_CHECKPOINTS, "piece_ends")
    return [reader.values(reader.array(_MAX_PIECES, "a span's piece ends")) for _ in range(spans)]


_FIELD_READERS: dict[str, Callable[[BoundedUnpacker], Any]] = {
    **dict.fromkeys(
        (
            "magic",
            "version",
            "layer_digest",
            "media_type",
            "compressed_size",
            "uncompressed_size",
            "span_size",
            "span_digests",
            "piece_size",
            "entry_count",
            "toc",
        ),
        BoundedUnpacker.value,
    ),
    "checkpoints": lambda reader: reader.items(MAX_CHECKPOINTS, "checkpoints", arrays_each=1),
    "windows": lambda reader: reader.items(MAX_CHECKPOINTS, "windows"),
    "piece_digests": lambda reader: reader.items(MAX_CHECKPOINTS, "piece_digests"),
    "piece_ends": _piece_ends,
}
"""How each field of a version 2 artifact is read (version 1 has no piece fields)."""


def _size(document: dict[str, Any], key: str) -> int:
    return checked_int(document[key], key, MAX_LAYER_SIZE)


def _digest_string(value: Any) -> str:
    text = checked_text(value, "layer_digest", 200)
    algorithm, _, hexpart = text.partition(":")
    if algorithm != "sha256" or len(hexpart) != 64 or hexpart.strip("0123456789abcdef"):
        raise IndexFormatError(f"layer_digest {text!r} is not a sha256 digest")
    return text


def _media_type(value: Any) -> str:
    text = checked_text(value, "media_type", 200)
    if text not in GZIP_LAYERS | TAR_LAYERS:
        raise IndexFormatError(f"media type {text!r} cannot be indexed")
    return text


def _parse_checkpoints(index: LayerIndex, document: dict[str, Any]) -> None:
    raw_points, windows, digests = (
        document["checkpoints"],
        document["windows"],
        document["span_digests"],
    )
    if not isinstance(raw_points, list) or not isinstance(windows, list):
        raise IndexFormatError("checkpoints and windows must be arrays")
    if not isinstance(digests, bytes) or len(digests) % DIGEST_BYTES:
        raise IndexFormatError("span_digests must be whole sha256 digests")
    count = len(raw_points)
    if not index.is_gzip:
        if count or windows:
            raise IndexFormatError("a plain tar layer has no checkpoints")
        if index.compressed_size != index.uncompressed_size:
            raise IndexFormatError("a plain tar layer's two sizes must be equal")
        spans = -(-index.uncompressed_size // index.span_size)
        if len(digests) != spans * DIGEST_BYTES:
            raise IndexFormatError(f"a plain tar layer of this size has {spans} span digests")
        index.span_digests = _digest_list(digests)
        return
    limit = min(MAX_CHECKPOINTS, index.uncompressed_size // index.span_size + 1)
    if not 1 <= count <= limit:
        raise IndexFormatError(f"{count} checkpoints for this layer size (1..{limit} allowed)")
    if len(windows) != count or len(digests) != count * DIGEST_BYTES:
        raise IndexFormatError("checkpoints, windows and span digests differ in number")
    previous: Checkpoint | None = None
    for number, raw in enumerate(raw_points):
        point = _checkpoint(raw, number, index)
        if previous is None and point.uncompressed_offset != 0:
            raise IndexFormatError("the first checkpoint must be at uncompressed offset 0")
        if previous is not None and (
            point.uncompressed_offset - previous.uncompressed_offset < index.span_size
            or point.compressed_offset <= previous.compressed_offset
        ):
            raise IndexFormatError(f"checkpoint {number} is not a span after the one before")
        index.checkpoints.append(point)
        previous = point
    for number, stored in enumerate(windows):
        if not isinstance(stored, bytes):
            raise IndexFormatError(f"window {number} is not bytes")
        try:
            decompress_window(stored)
        except GzipIndexError as exc:
            raise IndexFormatError(f"window {number}: {exc}") from None
        index.windows.append(stored)
    index.span_digests = _digest_list(digests)


def _parse_pieces(index: LayerIndex, document: dict[str, Any]) -> None:
    """Span pieces: each span's pieces but the last, every one ``piece_size`` bytes from
    the span's start (so their number follows from the span's length) and each ending
    further into the span's compressed bytes, within them."""
    size, digests, ends = (document[key] for key in ("piece_size", "piece_digests", "piece_ends"))
    if size == 0 and digests == [] and ends == []:
        return  # spans are fetched whole
    if not index.is_gzip:
        raise IndexFormatError("a plain tar layer has no span pieces")
    index.piece_size = checked_int(size, "piece_size", index.span_size, MIN_PIECE)
    count = len(index.checkpoints)
    if not isinstance(digests, list) or not isinstance(ends, list):
        raise IndexFormatError("piece_digests and piece_ends must be arrays")
    if len(digests) != count or len(ends) != count:
        raise IndexFormatError("piece_digests and piece_ends must have one item per span")
    piece = index.piece_size
    most = -(-index.span_size // piece) - 1  # a span's last piece runs on to its end
    for number in range(count):
        start, stop = index.span_range(number)
        pieces = min(most, (stop - start) // piece)
        span_digests, span_ends = digests[number], ends[number]
        if (
            not isinstance(span_digests, bytes)
            or len(span_digests) != pieces * DIGEST_BYTES
            or not isinstance(span_ends, list)
            or len(span_ends) != pieces
        ):
            raise IndexFormatError(f"span {number} must have {pieces} piece digests and ends")
        low = index.checkpoints[number].compressed_offset
        high = (
            index.checkpoints[number + 1].fetch_end if number + 1 < count else index.compressed_size
        )
        for place, end in enumerate(span_ends):
            low = checked_int(end, f"span {number} piece {place} end", high, low + 1)
        index.piece_digests.append(_digest_list(span_digests))
        index.piece_ends.append(span_ends)


def _digest_list(raw: bytes) -> list[bytes]:
    """Concatenated sha256 digests (a whole number of them), one by one."""
    return [raw[i : i + DIGEST_BYTES] for i in range(0, len(raw), DIGEST_BYTES)]


def _checkpoint(raw: Any, number: int, index: LayerIndex) -> Checkpoint:
    if not isinstance(raw, list) or len(raw) != 3:
        raise IndexFormatError(f"checkpoint {number} is not a 3-element array")
    name = f"checkpoint {number}"
    compressed, bit, uncompressed = raw
    return Checkpoint(
        checked_int(compressed, f"{name} compressed offset", index.compressed_size - 1),
        checked_int(bit, f"{name} bit offset", 7),
        checked_int(uncompressed, f"{name} uncompressed offset", index.uncompressed_size),
    )


def _decode_toc(document: dict[str, Any]) -> list[Any]:
    """The file table's rows, decoded without trusting it: the array must hold
    ``entry_count`` rows, and the rows (15 fields, one of them the xattrs map) may
    build one array and one map each, so no table builds more than that."""
    count = checked_int(document["entry_count"], "entry_count", MAX_ENTRIES)
    blob = document["toc"]
    if not isinstance(blob, bytes):
        raise IndexFormatError("toc must be bytes")
    packed = inflate_bounded(blob, MAX_TOC_BYTES, IndexFormatError, "toc")
    table = BoundedUnpacker(
        packed,
        IndexFormatError,
        "toc",
        max_str_len=_MAX_TEXT_BYTES,
        max_bin_len=MAX_XATTR_BYTES,
        max_array_len=len(ROW_FIELDS),
        max_map_len=MAX_XATTRS,
        unicode_errors=_NAME_ERRORS,
    )
    if table.array(MAX_ENTRIES, "toc") != count:
        raise IndexFormatError(f"toc must be an array of entry_count ({count}) entries")
    table.allow(arrays=count, maps=count)
    rows = table.values(count)
    table.finish()
    return rows
