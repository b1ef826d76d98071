"""The index-only artifact for one layer: gzip checkpoints, span digests and file table.

With it the agent serves a layer's files straight from the untouched registry blob: the
file table says where a file's bytes lie in the uncompressed tar, the checkpoints say
which compressed byte range to fetch and where to start inflating, and the span and file
digests prove what was inflated. Since version 2 each span is also digested in pieces,
with where each piece's compressed bytes end, so that a reader who needs only the start
of a span fetches and checks only that. The artifact arrives from the registry, so
parsing treats it as hostile: every count, offset and name is checked before anything
trusts it.

Encoding: a msgpack map. The file table, which repeats itself a lot (paths, owners,
small offset gaps), is a zlib-compressed msgpack array of per-entry arrays, with each
offset stored as the gap after the previous entry's data.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import math
import operator
import queue
import threading
import zlib
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, cast

import msgpack

from formats.bounded_msgpack import BoundedUnpacker
from formats.gzip_index import (
    DEFAULT_PIECE,
    DEFAULT_SPAN,
    WINDOW_SIZE,
    Checkpoint,
    CorruptSpanError,
    GzipCheckpointer,
    GzipIndexError,
    RangePlan,
    SpanDecoder,
    decompress_window,
    inflate_prefix,
    inflate_range,
    inflate_span,
    plan_range,
    span_bounds,
)
from formats.media_types import GZIP_LAYERS, TAR_LAYERS
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
    WHITEOUT_PREFIX,
    HostileLayerError,
    TocEntry,
    all_normalized,
    all_of_type,
    all_within,
    check_placement,
    is_normalized,
    iter_tar_entries,
    normalize_name,
)

MAGIC = "acceld.layer-index"
VERSION = 2
"""2 added span pieces (``piece_size``, ``piece_digests``, ``piece_ends``); version 1
indexes are still read, and their spans are fetched whole."""
_VERSIONS = (1, VERSION)
_PIECE_FIELDS = {"piece_size", "piece_digests", "piece_ends"}
MIN_PIECE = 4096
"""Smaller pieces would cost more index (36 bytes each) than they save fetching."""
MIN_SPAN = WINDOW_SIZE
MAX_SPAN = 1 << 30
MAX_LAYER_SIZE = 1 << 44
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
_DIGEST_BYTES = 32
_READ_CHUNK = 1 << 20
# How far behind the tar walker's read position file data may start (tarfile reads
# ahead by at most one 10 KiB record).
_TYPE_CODES = {name: code for code, name in enumerate(ENTRY_TYPES)}
_ENTRY_FIELDS = 15
# Tar names are bytes; toc.py carries undecodable ones as surrogate escapes, and so
# does the file table, so such a name survives the round trip unchanged.
_NAME_ERRORS = "surrogateescape"
_REG_CODE = ENTRY_TYPES.index("reg")
_SYMLINK_CODE = ENTRY_TYPES.index("symlink")
_PLAIN_TYPE_CODES = frozenset(ENTRY_TYPES.index(kind) for kind in ("reg", "dir", "symlink"))


class IndexFormatError(ValueError):
    """The bytes are not a valid layer index: never use any part of them."""


class UnsupportedLayerError(ValueError):
    """The layer's media type has no random-access index form (zstd, unknown)."""


@dataclass
class LayerIndex:
    """Everything the agent needs to serve one untouched layer lazily.

    ``checkpoints``, ``windows`` (zlib-compressed; empty where the span needs no history,
    e.g. at a gzip member start) and ``span_digests`` run in parallel; all three are
    empty for an uncompressed tar, whose bytes are read directly at the entries' offsets.
    """

    layer_digest: str
    media_type: str
    compressed_size: int
    uncompressed_size: int
    span_size: int
    checkpoints: list[Checkpoint] = field(default_factory=list)
    windows: list[bytes] = field(default_factory=list)
    span_digests: list[bytes] = field(default_factory=list)
    entries: list[TocEntry] = field(default_factory=list)
    piece_size: int = 0
    """0: spans are only fetched whole (a plain tar layer, or a version 1 index)."""
    piece_digests: list[list[bytes]] = field(default_factory=list)
    piece_ends: list[list[int]] = field(default_factory=list)
    source_digest: str = field(default="", compare=False)
    """The digest of the artifact bytes this was parsed from (empty for an index built in
    memory): what an agent binds its view of the layer to (see ``fingerprint``)."""

    def fingerprint(self) -> str:
        """The digest of this index as an artifact. Two indexes of one blob may lay its
        spans out differently, so whatever is derived from one (cache keys, a mounted
        tree) must name it, or one index's spans would be served under the other's."""
        if not self.source_digest:
            self.source_digest = "sha256:" + hashlib.sha256(serialize(self)).hexdigest()
        return self.source_digest

    @property
    def is_gzip(self) -> bool:
        return self.media_type in GZIP_LAYERS

    def window(self, number: int) -> bytes:
        return decompress_window(self.windows[number])

    def plan_read(self, offset: int, length: int) -> RangePlan:
        """Which checkpoint to inflate from and which blob bytes to fetch for
        uncompressed ``[offset, offset + length)`` (checkpoint -1 for a plain tar: the
        bytes are fetched as they are)."""
        if offset < 0 or length < 0 or offset + length > self.uncompressed_size:
            raise ValueError(f"range {offset}+{length} outside the layer")
        if not self.is_gzip:
            return RangePlan(-1, offset, offset + length)
        return plan_range(self.checkpoints, self.compressed_size, offset, length)

    def read(self, plan: RangePlan, fetched: bytes, offset: int, length: int) -> bytes:
        """Uncompressed ``[offset, offset + length)`` from the bytes ``plan`` fetched."""
        if not self.is_gzip:
            return bytes(fetched[offset - plan.fetch_start : offset - plan.fetch_start + length])
        number = plan.checkpoint
        return inflate_range(self.checkpoints[number], self.window(number), fetched, offset, length)

    def span_range(self, number: int) -> tuple[int, int]:
        """Uncompressed ``(start, end)`` of span ``number``."""
        return span_bounds(self.checkpoints, self.uncompressed_size, number)

    def read_plain_span(self, number: int, fetched: bytes) -> bytes:
        """Span ``number`` of an uncompressed tar layer (the fetched bytes themselves),
        checked against its digest."""
        start = number * self.span_size
        expected = min(self.span_size, self.uncompressed_size - start)
        if (
            len(fetched) != expected
            or hashlib.sha256(fetched).digest() != (self.span_digests[number])
        ):
            raise CorruptSpanError(f"span {number} of {self.layer_digest} fails its digest")
        return fetched

    def pieces(self, number: int) -> int:
        """How many of span ``number``'s leading pieces can be read without the rest."""
        return len(self.piece_ends[number]) if self.piece_size else 0

    def prefix_fetch(self, number: int, count: int) -> tuple[int, int]:
        """Compressed ``(start, end)`` to fetch for the first ``count`` pieces of span
        ``number`` (``1 <= count <= pieces(number)``)."""
        return self.checkpoints[number].compressed_offset, self.piece_ends[number][count - 1]

    def read_prefix(self, number: int, count: int, fetched: bytes) -> bytes:
        """The first ``count`` pieces of span ``number``, each checked against its
        digest (CorruptSpanError otherwise), from the bytes ``prefix_fetch`` names."""
        return inflate_prefix(
            self.checkpoints[number],
            self.window(number),
            fetched,
            self.piece_size,
            self.piece_digests[number][:count],
        )

    def span_decoder(self, number: int) -> SpanDecoder:
        """``read_span`` fed while the span's bytes arrive (same outcome, earlier)."""
        return SpanDecoder(
            self.checkpoints,
            self.span_digests,
            self.uncompressed_size,
            number,
            self.window(number),
        )

    def read_span(self, number: int, fetched: bytes) -> bytes:
        """The whole span ``number``, digest-checked (CorruptSpanError otherwise), from
        the blob bytes ``plan_read(*span)`` says to fetch."""
        return inflate_span(
            self.checkpoints,
            self.span_digests,
            self.uncompressed_size,
            number,
            self.window(number),
            fetched,
        )


def build_layer_index(
    source: IO[bytes] | Iterable[bytes],
    *,
    layer_digest: str,
    media_type: str,
    span: int = DEFAULT_SPAN,
    piece: int = DEFAULT_PIECE,
) -> LayerIndex:
    """Index a layer in one streaming pass over its blob (a stream or chunks, e.g. a
    registry download): checkpoints and span digests while inflating, and the file
    table while walking the tar (plain tar layers get span digests of their own)."""
    if not MIN_SPAN <= span <= MAX_SPAN:
        raise ValueError(f"span must be within {MIN_SPAN}..{MAX_SPAN}")
    if piece < MIN_PIECE:
        raise ValueError(f"piece must be at least {MIN_PIECE}")
    compressed = _Counted(_iter_chunks(source) if isinstance(source, io.IOBase) else source)
    checkpointer: GzipCheckpointer | None = None
    plain_spans: _PlainSpans | None = None
    uncompressed: Iterable[bytes] = compressed
    if media_type in TAR_LAYERS:
        plain_spans = _PlainSpans(span)
        uncompressed = plain_spans.hash(compressed)
    elif media_type in GZIP_LAYERS:
        checkpointer = GzipCheckpointer(span, piece)
        uncompressed = _in_background(checkpointer.inflate(compressed))
    else:
        raise UnsupportedLayerError(
            f"layer {layer_digest} has media type {media_type!r}: only gzip or plain tar "
            "layers can be read in place"
        )
    tar_stream = _ChunkReader(iter(uncompressed))
    try:
        entries = _walk_tar(tar_stream)
        tar_stream.drain(max((e.offset + e.size for e in entries if e.type == "reg"), default=0))
    finally:
        if isinstance(uncompressed, Generator):
            uncompressed.close()  # stops the inflating thread if the walk failed
    index = LayerIndex(
        layer_digest=layer_digest,
        media_type=media_type,
        compressed_size=compressed.total,
        uncompressed_size=tar_stream.position,
        span_size=span,
        entries=entries,
    )
    if checkpointer is not None:
        found = checkpointer.result()
        index.checkpoints = found.checkpoints
        index.windows = found.stored_windows
        index.span_digests = found.span_digests
        index.piece_size = checkpointer.piece
        index.piece_digests = found.piece_digests
        index.piece_ends = found.piece_ends
    if plain_spans is not None:
        index.span_digests = plain_spans.finish()
    return index


class _PlainSpans:
    """sha256 of every ``span`` bytes of a plain tar stream, so reads of an uncompressed
    layer are verified like inflated spans are."""

    def __init__(self, span: int) -> None:
        self.span = span
        self.digests: list[bytes] = []
        self._hash = hashlib.sha256()
        self._filled = 0

    def hash(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                take = min(len(view), self.span - self._filled)
                self._hash.update(view[:take])
                self._filled += take
                view = view[take:]
                if self._filled == self.span:
                    self.digests.append(self._hash.digest())
                    self._hash, self._filled = hashlib.sha256(), 0
            yield chunk

    def finish(self) -> list[bytes]:
        if self._filled:
            self.digests.append(self._hash.digest())
        return self.digests


def _walk_tar(stream: _ChunkReader) -> list[TocEntry]:
    entries: list[TocEntry] = []
    for entry, _info, _reader in iter_tar_entries(cast(IO[bytes], stream)):
        entries.append(entry)
    return entries


def _in_background(
    chunks: Generator[bytes, None, None], depth: int = 4
) -> Generator[bytes, None, None]:
    """Run a generator in a worker thread and hand its chunks over through a bounded
    queue. Inflating (zlib through ctypes) and hashing release the GIL, so on two cores
    the inflate pass and the Python-heavy tar walk overlap instead of adding up."""
    handoff: queue.Queue[bytes | BaseException | None] = queue.Queue(depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for chunk in chunks:
                if stop.is_set():
                    break
                handoff.put(chunk)
            else:
                handoff.put(None)
        except BaseException as exc:
            handoff.put(exc)
        finally:
            chunks.close()

    worker = threading.Thread(target=produce, name="layer-index-inflate", daemon=True)
    worker.start()
    try:
        while (item := handoff.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while worker.is_alive():
            with contextlib.suppress(queue.Empty):
                handoff.get(timeout=0.05)
        worker.join()


def _iter_chunks(stream: io.IOBase) -> Iterator[bytes]:
    while chunk := stream.read(_READ_CHUNK):
        yield chunk


class _Counted:
    """Counts the compressed bytes going by: the blob size, without a second pass."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = chunks
        self.total = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._chunks:
            self.total += len(chunk)
            yield chunk


class _ChunkReader(io.RawIOBase):
    """A read-only stream over an iterator of chunks.

    ``read`` hands out slices of the current chunk rather than filling a caller buffer:
    tarfile reads in small records, and avoiding a copy per record matters at GB scale.
    """

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._current = b""
        self._pos = 0
        self.position = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return b"".join(iter(lambda: self.read(_READ_CHUNK), b""))
        while self._pos >= len(self._current):
            if not self._advance():
                return b""
        piece = self._current[self._pos : self._pos + size]
        self._pos += len(piece)
        self.position += len(piece)
        return piece

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def drain(self, required_end: int) -> None:
        """Consume what the tar walker left (end-of-archive padding), so the whole
        stream is inflated and counted; the stream must reach ``required_end``."""
        self.position += len(self._current) - self._pos
        self._pos = len(self._current)
        while self._advance():
            self.position += len(self._current)
            self._pos = len(self._current)
        if self.position < required_end:
            raise HostileLayerError("the layer ends inside a file's data")

    def _advance(self) -> bool:
        nxt = next(self._chunks, None)
        if nxt is None:
            return False
        self._current, self._pos = nxt, 0
        return True


def serialize(index: LayerIndex) -> bytes:
    """The artifact bytes for ``index``."""
    toc: list[list[Any]] = []
    previous_end = 0
    for entry in index.entries:
        toc.append(_encode_entry(entry, entry.offset - previous_end))
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


def _encode_entry(entry: TocEntry, offset_gap: int) -> list[Any]:
    mtime: int | float = int(entry.mtime) if entry.mtime.is_integer() else entry.mtime
    digest = b""  # span digests verify every byte served; per-file ones would double the TOC
    return [
        entry.name,
        _TYPE_CODES[entry.type],
        entry.size,
        entry.mode,
        entry.uid,
        entry.gid,
        entry.uname,
        entry.gname,
        mtime,
        entry.link_name,
        entry.dev_major,
        entry.dev_minor,
        entry.xattrs,
        offset_gap,
        digest,
    ]


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
        plain = _plain_table(self.rows, self.index.uncompressed_size)
        self.index.entries = (
            plain
            if plain is not None
            else _table_row_by_row(self.rows, self.index.uncompressed_size)
        )
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
        if not rows or set(map(type, rows)) != {list} or set(map(len, rows)) != {_ENTRY_FIELDS}:
            return
        names, sizes, gaps = (tuple(map(operator.itemgetter(i), rows)) for i in (0, 2, 13))
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
            entry = _entry(self.rows[number], number, previous_end)
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
        compressed_size=_int(document["compressed_size"], "compressed_size", MAX_LAYER_SIZE),
        uncompressed_size=_int(document["uncompressed_size"], "uncompressed_size", MAX_LAYER_SIZE),
        span_size=_int(document["span_size"], "span_size", MAX_SPAN, MIN_SPAN),
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


def _int(value: Any, name: str, maximum: int, minimum: int = 0) -> int:
    if type(value) is not int or not minimum <= value <= maximum:
        raise IndexFormatError(f"{name} must be an integer in {minimum}..{maximum}")
    return value


def _str(value: Any, name: str, max_bytes: int = MAX_NAME_BYTES) -> str:
    if not isinstance(value, str) or len(value) > max_bytes or "\0" in value:
        raise IndexFormatError(f"{name} must be a string without NUL, at most {max_bytes}")
    return value


def _digest_string(value: Any) -> str:
    text = _str(value, "layer_digest", 200)
    algorithm, _, hexpart = text.partition(":")
    if algorithm != "sha256" or len(hexpart) != 64 or hexpart.strip("0123456789abcdef"):
        raise IndexFormatError(f"layer_digest {text!r} is not a sha256 digest")
    return text


def _media_type(value: Any) -> str:
    text = _str(value, "media_type", 200)
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
    if not isinstance(digests, bytes) or len(digests) % _DIGEST_BYTES:
        raise IndexFormatError("span_digests must be whole sha256 digests")
    count = len(raw_points)
    if not index.is_gzip:
        if count or windows:
            raise IndexFormatError("a plain tar layer has no checkpoints")
        if index.compressed_size != index.uncompressed_size:
            raise IndexFormatError("a plain tar layer's two sizes must be equal")
        spans = -(-index.uncompressed_size // index.span_size)
        if len(digests) != spans * _DIGEST_BYTES:
            raise IndexFormatError(f"a plain tar layer of this size has {spans} span digests")
        index.span_digests = _digest_list(digests)
        return
    limit = min(MAX_CHECKPOINTS, index.uncompressed_size // index.span_size + 1)
    if not 1 <= count <= limit:
        raise IndexFormatError(f"{count} checkpoints for this layer size (1..{limit} allowed)")
    if len(windows) != count or len(digests) != count * _DIGEST_BYTES:
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
    index.piece_size = _int(size, "piece_size", index.span_size, MIN_PIECE)
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
            or len(span_digests) != pieces * _DIGEST_BYTES
            or not isinstance(span_ends, list)
            or len(span_ends) != pieces
        ):
            raise IndexFormatError(f"span {number} must have {pieces} piece digests and ends")
        low = index.checkpoints[number].compressed_offset
        high = (
            index.checkpoints[number + 1].fetch_end if number + 1 < count else index.compressed_size
        )
        for place, end in enumerate(span_ends):
            low = _int(end, f"span {number} piece {place} end", high, low + 1)
        index.piece_digests.append(_digest_list(span_digests))
        index.piece_ends.append(span_ends)


def _digest_list(raw: bytes) -> list[bytes]:
    """Concatenated sha256 digests (a whole number of them), one by one."""
    return [raw[i : i + _DIGEST_BYTES] for i in range(0, len(raw), _DIGEST_BYTES)]


def _checkpoint(raw: Any, number: int, index: LayerIndex) -> Checkpoint:
    if not isinstance(raw, list) or len(raw) != 3:
        raise IndexFormatError(f"checkpoint {number} is not a 3-element array")
    name = f"checkpoint {number}"
    return Checkpoint(
        compressed_offset=_int(raw[0], f"{name} compressed offset", index.compressed_size - 1),
        bit_offset=_int(raw[1], f"{name} bit offset", 7),
        uncompressed_offset=_int(raw[2], f"{name} uncompressed offset", index.uncompressed_size),
    )


def _decode_toc(document: dict[str, Any]) -> list[Any]:
    """The file table's rows, decoded without trusting it: the array must hold
    ``entry_count`` rows, and the rows (15 fields, one of them the xattrs map) may
    build one array and one map each, so no table builds more than that."""
    count = _int(document["entry_count"], "entry_count", MAX_ENTRIES)
    blob = document["toc"]
    if not isinstance(blob, bytes):
        raise IndexFormatError("toc must be bytes")
    inflater = zlib.decompressobj()
    try:
        packed = inflater.decompress(blob, MAX_TOC_BYTES + 1)
    except zlib.error as exc:
        raise IndexFormatError(f"toc does not decompress: {exc}") from None
    if len(packed) > MAX_TOC_BYTES or not inflater.eof or inflater.unused_data:
        raise IndexFormatError("toc is not one zlib stream of a sane size")
    table = BoundedUnpacker(
        packed,
        IndexFormatError,
        "toc",
        max_str_len=_MAX_TEXT_BYTES,
        max_bin_len=MAX_XATTR_BYTES,
        max_array_len=_ENTRY_FIELDS,
        max_map_len=MAX_XATTRS,
        unicode_errors=_NAME_ERRORS,
    )
    if table.array(MAX_ENTRIES, "toc") != count:
        raise IndexFormatError(f"toc must be an array of entry_count ({count}) entries")
    table.allow(arrays=count, maps=count)
    rows = table.values(count)
    table.finish()
    return rows


def _table_row_by_row(rows: list[Any], uncompressed_size: int) -> list[TocEntry]:
    entries: list[TocEntry] = []
    previous_end = 0
    for number, row in enumerate(rows):
        entry = _entry(row, number, previous_end)
        if entry.offset + entry.size > uncompressed_size:
            raise IndexFormatError(f"entry {entry.name!r} lies past the end of the layer")
        previous_end = entry.offset + entry.size
        entries.append(entry)
    return entries


def _plain_table(rows: list[Any], uncompressed_size: int) -> list[TocEntry] | None:
    """The entries of a file table every row of which is plainly valid (see
    ``_plainly_valid``), checked and built column by column with C-level set, min, max
    and join operations: the rows one at a time, in Python, were most of a big layer's
    parse while its pull waited. None means "some row needs a closer look": the caller then
    goes row by row, which names the row at fault. Types are checked before anything
    hashes or compares a column, so hostile values cannot raise here."""
    if not rows:
        return []
    if set(map(type, rows)) != {list} or set(map(len, rows)) != {_ENTRY_FIELDS}:
        return None
    columns = list(zip(*rows, strict=False))  # lengths checked above
    names, codes, sizes, modes, uids, gids, unames, gnames = columns[:8]
    mtimes, links, majors, minors, xattrs, gaps, digests = columns[8:]
    if not (
        all_of_type(str, names, unames, gnames, links)
        and all_of_type(int, codes, sizes, modes, uids, gids, majors, minors, gaps)
        and all_of_type(dict, xattrs)
        and all_of_type(bytes, digests)
        and set(map(type, mtimes)) <= {int, float}
    ):
        return None
    valid = (
        all_normalized(names)
        # No whiteout prefix in any name: a match cannot span two names, as the
        # prefix holds no "\n".
        and WHITEOUT_PREFIX not in "\n".join(names)
        and set(codes) <= _PLAIN_TYPE_CODES
        and all_within(sizes, 0, MAX_ENTRY_SIZE)
        and set(itertools.compress(codes, sizes)) <= {_REG_CODE}
        and all_within(modes, 0, 0o7777)
        and all_within(uids, 0, MAX_ID)
        and all_within(gids, 0, MAX_ID)
        and max(map(len, unames)) <= MAX_OWNER_NAME
        and max(map(len, gnames)) <= MAX_OWNER_NAME
        and "\0" not in "".join(itertools.chain(unames, gnames, links))
        and min(mtimes) > -MAX_MTIME
        and max(mtimes) < MAX_MTIME
        and not any(map(math.isnan, mtimes))  # after max: isnan overflows on huge ints
        and max(map(len, links)) <= MAX_NAME_BYTES
        and set(itertools.compress(codes, links)) <= {_SYMLINK_CODE}
        and set(majors) == {0}
        and set(minors) == {0}
        and not any(xattrs)
        and all_within(gaps, 0, MAX_LAYER_SIZE)
        and not any(digests)
    )
    if not valid:
        return None
    ends = list(itertools.accumulate(map(operator.add, gaps, sizes)))
    if ends[-1] > uncompressed_size:
        return None  # row by row names the entry that lies past the end
    return list(
        map(
            TocEntry,
            names,
            map(ENTRY_TYPES.__getitem__, codes),
            sizes,
            modes,
            uids,
            gids,
            unames,
            gnames,
            map(float, mtimes),
            links,
            majors,
            minors,
            xattrs,
            map(operator.sub, ends, sizes),
            itertools.repeat("", len(rows)),
        )
    )


def _entry(row: Any, number: int, previous_end: int) -> TocEntry:
    """One decoded file-table row, held to the same rules as a tar header in toc.py.

    A big layer has tens of thousands of rows and the agent parses its index while
    containerd waits on the pull, so rows that are plainly fine (the rule) take a path
    of cheap C-level checks; anything unusual goes through the checks that say what is
    wrong."""
    if _plainly_valid(row):
        return _make_entry(row, ENTRY_TYPES[row[1]], previous_end + row[13])
    return _checked_entry(row, number, previous_end)


def _plainly_valid(row: Any) -> bool:
    """A row every field of which is of the common, obviously sane kind: a normalized
    short name without whiteouts, a file/dir/symlink, in-range numbers, no xattrs, no
    digest. False means "look closer", not "invalid"."""
    if type(row) is not list or len(row) != _ENTRY_FIELDS:
        return False
    name, code, size, mode, uid, gid, uname, gname, mtime, link, major, minor = row[:12]
    return (
        type(name) is str
        and is_normalized(name)
        and WHITEOUT_PREFIX not in name
        and type(code) is int
        and code in _PLAIN_TYPE_CODES
        and type(size) is int
        and 0 <= size <= (MAX_ENTRY_SIZE if code == _REG_CODE else 0)
        and type(mode) is int
        and 0 <= mode <= 0o7777
        and type(uid) is int
        and 0 <= uid <= MAX_ID
        and type(gid) is int
        and 0 <= gid <= MAX_ID
        and type(uname) is str
        and len(uname) <= MAX_OWNER_NAME
        and "\0" not in uname
        and type(gname) is str
        and len(gname) <= MAX_OWNER_NAME
        and "\0" not in gname
        and type(mtime) in (int, float)
        and -MAX_MTIME < mtime < MAX_MTIME
        and type(link) is str
        and (code == _SYMLINK_CODE or not link)
        and len(link) <= MAX_NAME_BYTES
        and "\0" not in link
        and major == 0
        and minor == 0
        and type(major) is int
        and type(minor) is int
        and row[12] == {}
        and type(row[13]) is int
        and 0 <= row[13] <= MAX_LAYER_SIZE
        and row[14] == b""
    )


def _make_entry(row: list[Any], kind: str, offset: int) -> TocEntry:
    digest = row[14]
    return TocEntry(
        row[0],
        kind,
        row[2],
        row[3],
        row[4],
        row[5],
        row[6],
        row[7],
        float(row[8]),
        row[9],
        row[10],
        row[11],
        row[12],
        offset,
        "sha256:" + digest.hex() if digest else "",
    )


def _checked_entry(row: Any, number: int, previous_end: int) -> TocEntry:
    """Every rule, one at a time, so that a refusal names the field at fault."""
    if not isinstance(row, list) or len(row) != _ENTRY_FIELDS:
        raise IndexFormatError(f"toc entry {number} is not a {_ENTRY_FIELDS}-element array")
    where = f"toc entry {number}"
    name = _str(row[0], f"{where} name")
    try:
        if normalize_name(name) != name:
            raise IndexFormatError(f"{where} name {name!r} is not normalized")
    except HostileLayerError as exc:
        raise IndexFormatError(f"{where}: {exc}") from None
    kind_code = _int(row[1], f"{where} type", len(ENTRY_TYPES) - 1)
    kind = ENTRY_TYPES[kind_code]
    try:
        check_placement(name, kind)
    except HostileLayerError as exc:
        raise IndexFormatError(f"{where}: {exc}") from None
    _int(row[2], f"{where} size", MAX_ENTRY_SIZE if kind == "reg" else 0)
    mtime = row[8]
    if type(mtime) not in (int, float) or not -MAX_MTIME < mtime < MAX_MTIME:
        raise IndexFormatError(f"{where} mtime must be a number")
    link = _str(row[9], f"{where} link name")
    if kind == "hardlink":
        try:
            if not link or normalize_name(link) != link:
                raise IndexFormatError(f"{where} hardlink target {link!r} is not normalized")
        except HostileLayerError as exc:
            raise IndexFormatError(f"{where}: {exc}") from None
    elif kind != "symlink" and link:
        raise IndexFormatError(f"{where}: only links have a link name")
    device = kind in ("char", "block")
    xattrs = row[12]
    if not isinstance(xattrs, dict) or not all(
        isinstance(k, str) and isinstance(v, bytes) and len(v) <= MAX_XATTR_BYTES
        for k, v in xattrs.items()
    ):
        raise IndexFormatError(f"{where} xattrs must map names to at most 64 KiB of bytes")
    offset = previous_end + _int(row[13], f"{where} offset gap", MAX_LAYER_SIZE)
    digest = row[14]
    if not isinstance(digest, bytes) or len(digest) not in (
        (0, _DIGEST_BYTES) if kind == "reg" else (0,)
    ):
        raise IndexFormatError(f"{where}: only a regular file may carry a sha256 digest")
    _int(row[3], f"{where} mode", 0o7777)
    _int(row[4], f"{where} uid", MAX_ID)
    _int(row[5], f"{where} gid", MAX_ID)
    _str(row[6], f"{where} uname", MAX_OWNER_NAME)
    _str(row[7], f"{where} gname", MAX_OWNER_NAME)
    _int(row[10], f"{where} device major", MAX_DEVICE_MAJOR if device else 0)
    _int(row[11], f"{where} device minor", MAX_DEVICE_MINOR if device else 0)
    return _make_entry(row, kind, offset)
