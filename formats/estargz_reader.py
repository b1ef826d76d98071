"""Read an eStargz layer lazily: footer -> TOC -> per-chunk byte ranges -> verified data.

Everything here comes from a registry and may have been written by anyone, so the TOC is
treated as hostile: names go through ``normalize_name``, every number is range-checked,
chunks must tile their file exactly, and data offsets must lie before the TOC in blob
order (the order real writers use, and what lets a chunk's compressed range end where
the next one starts). The agent gets back plain ``TocEntry`` objects plus, per regular
file, the chunk ranges to fetch; it never needs to look at the JSON itself.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import io
import itertools
import operator
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

import orjson

from formats.estargz_toc import (
    GZIP_WBITS,
    LANDMARK_NAMES,
    MAX_CHUNK_BYTES,
    MAX_TOC_ENTRIES,
    MAX_TOC_JSON_BYTES,
    PREFETCH_LANDMARK,
    TAR_BLOCK,
    TAR_END_OF_ARCHIVE,
    TOC_BYTES_PER_VALUE,
    TOC_TAR_NAME,
    TOC_VERSION,
    ChunkDigestError,
    EstargzFormatError,
    TocDigestError,
    all_sha256_digests,
    is_sha256_digest,
)
from formats.fast_zlib import ZLIB
from formats.toc import (
    ENTRY_TYPES,
    MAX_DEVICE_MAJOR,
    MAX_DEVICE_MINOR,
    MAX_ENTRY_SIZE,
    MAX_ID,
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
    normalize_name,
)

# A pax header, the TOC's header, the JSON, its padding and the end-of-archive blocks.
_MAX_TOC_TAR_BYTES = 4 * TAR_BLOCK + MAX_TOC_JSON_BYTES + len(TAR_END_OF_ARCHIVE)
# Room for the document's own fields, so that a TOC of a few entries never comes near.
_FREE_VALUES = 64
_PLAIN_FILE_FIELDS = ("name", "type", "size", "mode", "modtime", "offset", "digest", "chunkDigest")
_PLAIN_COLUMNS = operator.itemgetter(*_PLAIN_FILE_FIELDS)
_PLAIN_FILE_KEYS = frozenset(_PLAIN_FILE_FIELDS)
"""The record of a root-owned regular file in one chunk, as writers emit most files."""
_PLAIN_PACKED_FILE_KEYS = _PLAIN_FILE_KEYS | {"innerOffset"}
"""The same, for a small file sharing a gzip member with its neighbours."""
_MOST = {
    "size": MAX_ENTRY_SIZE,
    "mode": MAX_ID,
    "uid": MAX_ID,
    "gid": MAX_ID,
    "devMajor": MAX_DEVICE_MAJOR,
    "devMinor": MAX_DEVICE_MINOR,
    "chunkOffset": MAX_ENTRY_SIZE,
    "innerOffset": MAX_CHUNK_BYTES,
}
"""The largest value of each integer field of a record, for the field-by-field checks
and the plain files' column checks alike. Fields bounded by what is around them (a data
offset by the TOC's, a chunk's size by what is left of its file) are bounded where they
are checked."""
_MAX_MODTIME_CHARS = 64


MEMBER_SLACK = 128 << 10
"""A gzip member's header (its optional name, comment and extra fields) and the tar
padding and headers around what is read of it."""


def member_bound(inflated: int) -> int:
    """The most compressed bytes that can hold the first ``inflated`` bytes of a gzip
    member: zlib's deflateBound (stored blocks are the worst case) plus ``MEMBER_SLACK``."""
    return inflated + (inflated >> 12) + (inflated >> 14) + (inflated >> 25) + 13 + MEMBER_SLACK


class ChunkRef(NamedTuple):
    """One chunk of a regular file and the compressed byte range that holds it.

    Fetch ``[blob_offset, blob_end)`` from the blob, inflate from its start, skip
    ``inner_offset`` bytes, and the next ``size`` bytes are the file's bytes at
    ``file_offset``; their sha256 must be ``digest``. A tuple: immutable and built
    several times faster than a frozen dataclass, for the tens of thousands a TOC holds.
    """

    name: str
    file_offset: int
    size: int
    blob_offset: int
    blob_end: int
    inner_offset: int
    digest: str


class FileChunks:
    """Each regular file's chunks in file order, found by its entry (the object in
    ``EstargzToc.entries``), not by its name: a layer can hold several files of one
    name, each with data of its own, and a hard link written between them serves the
    earlier one (formats/layer_tree.py). Neither the name nor the member offset tells them
    apart, as small files share members. Entries are unhashable dataclasses, so they
    are held by identity, the entry kept with its chunks so that its id stays its own;
    an equal copy of an entry finds nothing."""

    __slots__ = ("_by_id",)

    def __init__(self) -> None:
        self._by_id: dict[int, tuple[TocEntry, list[ChunkRef]]] = {}

    def add(self, entry: TocEntry, chunks: list[ChunkRef]) -> None:
        self._by_id[id(entry)] = (entry, chunks)

    def get(self, entry: TocEntry) -> list[ChunkRef]:
        """The entry's chunks: none for a file without data, or an entry not of this TOC."""
        found = self._by_id.get(id(entry))
        return found[1] if found is not None and found[0] is entry else []

    def items(self) -> Iterator[tuple[TocEntry, list[ChunkRef]]]:
        """(entry, chunks) of every regular file, in TOC order."""
        return iter(self._by_id.values())

    def values(self) -> Iterator[list[ChunkRef]]:
        """The chunks of every regular file, in TOC order."""
        return (chunks for _, chunks in self._by_id.values())

    def __len__(self) -> int:
        return len(self._by_id)

    def __eq__(self, other: object) -> bool:
        """Equal files with equal chunks, in the same order: what two parses of one TOC
        give."""
        if not isinstance(other, FileChunks):
            return NotImplemented
        return list(self.items()) == list(other.items())


@dataclass
class EstargzToc:
    """A validated TOC. ``entries`` keep blob order and tar semantics (a later entry of
    the same name wins); landmark files are not entries but ``prefetch_end``."""

    entries: list[TocEntry]
    chunks: FileChunks
    """Per regular file entry (every one, replaced or not), its chunks in file order."""
    toc_digest: str
    toc_offset: int
    prefetch_end: int | None
    """Blob offset where the prioritized area ends; None when the layer has none."""


@dataclass(slots=True)
class _PlainFiles:
    """The plain-file records of a TOC, checked and built in one go, in TOC order."""

    names: tuple[str, ...]
    entries: list[TocEntry]
    chunks: list[_PendingChunk]
    files: list[_OpenFile]


@dataclass(slots=True)
class _OpenFile:
    entry: TocEntry
    chunks: list[_PendingChunk] = field(default_factory=list)
    covered: int = 0


@dataclass(slots=True)
class _PendingChunk:
    file_offset: int
    size: int
    offset: int
    inner_offset: int
    digest: str


def parse_toc(
    toc_member: bytes,
    toc_offset: int,
    expected_digest: str | None = None,
    on_decoded: Callable[[list[Any]], None] | None = None,
) -> EstargzToc:
    """Parse and validate the TOC gzip member (``blob[toc_offset : size - FOOTER_SIZE]``).

    ``expected_digest`` is the layer's ``containerd.io/snapshot/stargz/toc.digest``
    annotation; without it the TOC is unverified and only its structure is checked.
    ``on_decoded`` is shown the TOC's records, not yet validated, before they are: what
    lets downloads start while validation takes its time (formats/estargz_extents.py).
    """
    toc_json = _toc_json(toc_member)
    digest = "sha256:" + hashlib.sha256(toc_json).hexdigest()
    if expected_digest is not None and digest != expected_digest:
        raise TocDigestError(f"TOC digest {digest} does not match {expected_digest}")
    try:
        # orjson: strict UTF-8 (no lone surrogates), no NaN, and several times faster
        # than json on the 15 MB TOC of a 40 000-file layer, parsed while a pull waits.
        document = orjson.loads(toc_json)
    except (ValueError, RecursionError) as exc:
        raise EstargzFormatError(f"TOC is not valid JSON: {exc}") from None
    if not isinstance(document, dict) or document.get("version") != TOC_VERSION:
        raise EstargzFormatError(f"TOC is not a version {TOC_VERSION} eStargz TOC")
    records = document.get("entries")
    if not isinstance(records, list):
        raise EstargzFormatError("TOC has no entries list")
    if len(records) > MAX_TOC_ENTRIES:
        raise EstargzFormatError(f"TOC has {len(records)} entries, more than {MAX_TOC_ENTRIES}")
    if on_decoded is not None:
        on_decoded(records)
    return _TocValidator(toc_offset).run(records, digest)


def read_chunk(chunk: ChunkRef, data: bytes) -> bytes:
    """The chunk's bytes from its compressed range (which starts at ``blob_offset``),
    inflated and checked against its digest: never hand unverified bytes to a reader."""
    return read_member([chunk], data)[chunk.inner_offset :]


def read_member(chunks: Sequence[ChunkRef], data: bytes) -> bytes:
    """A gzip member's inflated bytes up to the end of its last chunk, every chunk in it
    checked against its digest.

    Small files share one member (``innerOffset``); inflating the member once for all of
    them, rather than once per file, is what lets a file-dense layer be served at the
    speed of its bytes instead of its file count. ``chunks`` must all start at the
    member's offset, where ``data`` begins.
    """
    last = max(chunks, key=lambda chunk: chunk.inner_offset + chunk.size)
    wanted = last.inner_offset + last.size
    inflater = ZLIB.decompressobj(GZIP_WBITS)
    try:
        plain = inflater.decompress(data, wanted)
    except ZLIB.error as exc:
        first = chunks[0]
        raise ChunkDigestError(f"{first.name}@{first.file_offset}: corrupt gzip: {exc}") from None
    if len(plain) < wanted:
        raise ChunkDigestError(
            f"{last.name}@{last.file_offset}: inflated {len(plain)} bytes, need {wanted}"
        )
    return _checked(chunks, plain)


class MemberDecoder:
    """``read_member`` fed piece by piece while the member's bytes arrive, so inflating
    overlaps the download. ``feed`` never raises; when the stream is not plainly good,
    ``finish`` runs ``read_member`` over everything received (same verdict, same error).
    """

    def __init__(self, chunks: Sequence[ChunkRef]) -> None:
        self._chunks = chunks
        self._wanted = max(chunk.inner_offset + chunk.size for chunk in chunks)
        self._received: list[bytes] = []
        self._pieces: list[bytes] = []
        self._inflater = ZLIB.decompressobj(GZIP_WBITS)
        self._failed = False

    def feed(self, data: bytes) -> None:
        """Inflate what ``data`` adds of the member, up to the last chunk's end."""
        self._received.append(data)
        inflater = self._inflater
        if self._failed or inflater.eof:
            return
        try:
            if self._wanted:
                out = inflater.decompress(data, self._wanted)
            else:  # past the last chunk: the member's trailer is still checked
                out = inflater.decompress(inflater.unconsumed_tail + data, 1)
                self._failed = bool(out)
                return
        except ZLIB.error:
            self._failed = True
            return
        self._pieces.append(out)
        self._wanted -= len(out)

    def finish(self) -> bytes:
        """The member's verified bytes, or ChunkDigestError."""
        if self._failed or self._wanted:
            return read_member(self._chunks, b"".join(self._received))
        return _checked(self._chunks, b"".join(self._pieces))

    def close(self) -> None:
        """Nothing to free early: zlib's state goes with the object."""


def _checked(chunks: Sequence[ChunkRef], plain: bytes) -> bytes:
    """``plain`` (a member's inflated bytes) once every chunk in it matches its digest."""
    view = memoryview(plain)
    for chunk in chunks:
        payload = view[chunk.inner_offset : chunk.inner_offset + chunk.size]
        actual = "sha256:" + hashlib.sha256(payload).hexdigest()
        if actual != chunk.digest:
            raise ChunkDigestError(
                f"{chunk.name}@{chunk.file_offset}: chunk digest {actual}, TOC says {chunk.digest}"
            )
    return plain


def _toc_json(toc_member: bytes) -> bytes:
    """The JSON bytes of the TOC tar entry inside the (bounded) TOC gzip member."""
    inflater = ZLIB.decompressobj(GZIP_WBITS)
    try:
        toc_tar = inflater.decompress(toc_member, _MAX_TOC_TAR_BYTES)
    except ZLIB.error as exc:
        raise EstargzFormatError(f"TOC member is not valid gzip: {exc}") from None
    if inflater.unconsumed_tail:
        raise EstargzFormatError(f"TOC inflates to more than {_MAX_TOC_TAR_BYTES} bytes")
    if not inflater.eof or inflater.unused_data:
        raise EstargzFormatError("TOC is not exactly one complete gzip member")
    try:
        with tarfile.open(fileobj=io.BytesIO(toc_tar), mode="r:") as tar:
            info = tar.next()
            if info is None or info.name != TOC_TAR_NAME or not info.isreg():
                raise EstargzFormatError(f"TOC member does not hold {TOC_TAR_NAME}")
            if info.size > MAX_TOC_JSON_BYTES:
                raise EstargzFormatError(f"TOC JSON of {info.size} bytes is too large")
            reader = tar.extractfile(info)
            assert reader is not None
            toc_json = reader.read()
    except tarfile.TarError as exc:
        raise EstargzFormatError(f"TOC member is not a tar entry: {exc}") from None
    if len(toc_json) != info.size:
        raise EstargzFormatError("TOC JSON is truncated")
    _check_structure(toc_json)
    return toc_json


def _check_structure(toc_json: bytes) -> None:
    """Refuse, before json builds them, more arrays, objects and values than the TOC's
    size and the entry cap allow a real one. Every value but a container's first follows
    a ',', so counting '{', '[' and ',' bounds them all, and counting them inside strings
    as well only over-counts."""
    containers = toc_json.count(b"{") + toc_json.count(b"[")
    values = containers + toc_json.count(b",")
    if values > len(toc_json) // TOC_BYTES_PER_VALUE + _FREE_VALUES:
        raise EstargzFormatError(f"TOC has {values} values in {len(toc_json)} bytes of JSON")
    # The document, its entries list, and per entry its object and an xattrs object.
    if containers > 2 + 2 * MAX_TOC_ENTRIES:
        raise EstargzFormatError(f"TOC has {containers} objects and arrays")


class _TocValidator:
    """One pass over the TOC records; every rule it enforces is one the agent relies on."""

    def __init__(self, toc_offset: int) -> None:
        self.toc_offset = toc_offset
        self.entries: list[TocEntry] = []
        self.chunks = FileChunks()
        self.kinds: dict[str, str] = {}
        self.owner_names: dict[tuple[str, int], str] = {}
        self.open_file: _OpenFile | None = None
        self.files: list[_OpenFile] = []
        self.data: list[_PendingChunk] = []
        self.prefetch_end: int | None = None

    def run(self, records: list[Any], digest: str) -> EstargzToc:
        shaped = list(map(_is_plain_shaped, records))
        plain = self._plain_files(list(itertools.compress(records, shaped)))
        index = taken = 0
        for is_plain, group in itertools.groupby(shaped):
            count = len(list(group))
            if is_plain and plain is not None:
                with _blaming(index):
                    self._take_plain(plain, taken, taken + count)
                taken += count
            else:
                for number in range(index, index + count):
                    record = records[number]
                    if not isinstance(record, dict):
                        raise EstargzFormatError(f"TOC entry {number} is not an object")
                    with _blaming(number):
                        self._record(record)
            index += count
        self._close_file()
        self._resolve_ranges()
        return EstargzToc(self.entries, self.chunks, digest, self.toc_offset, self.prefetch_end)

    def _record(self, record: dict[str, Any]) -> None:
        kind = record.get("type")
        raw_name = record.get("name")
        if not isinstance(raw_name, str):
            raise EstargzFormatError("entry has no name")
        if kind == "chunk":
            self._chunk(record, normalize_name(raw_name))
            return
        if kind not in ENTRY_TYPES:
            raise EstargzFormatError(f"unknown entry type {kind!r}")
        self._close_file()
        name = normalize_name(raw_name)
        check_placement(name, kind)
        if name in LANDMARK_NAMES and kind == "reg":
            self._landmark(record, name)
            return
        entry = self._entry(record, name, kind)
        self.entries.append(entry)
        self.kinds[name] = kind
        if kind == "reg":
            self._open_file(record, entry)

    def _plain_files(self, records: list[dict[str, Any]]) -> _PlainFiles | None:
        """Check and build the records that are plainly fine (the rule: root-owned,
        one-chunk regular files) column by column, in C-level set, min, max, join and
        regex calls; None means "look closer", not "invalid": they then go one by one.

        A big layer's TOC holds tens of thousands of such records and is parsed while
        the pull waits: one at a time, in Python, they were most of the TOC's parse.
        What depends on the records between them (blob order across them, the owner
        names, the file open before them) ``_take_plain`` checks where each run of them
        is taken. The bounds are ``_MOST``'s, as the field-by-field path's; what
        is stated in batch form here (names by ``all_normalized``, digests by
        ``all_sha256_digests``) is a sufficient condition of that path's check, and
        tests/test_estargz.py holds the two paths to the same entries and chunks, or
        the same refusal, on generated TOCs.
        """
        if not records:
            return None
        names, types, sizes, modes, modtimes, offsets, digests, chunk_digests = zip(
            *map(_PLAIN_COLUMNS, records), strict=True
        )
        inners = [record.get("innerOffset", 0) for record in records]
        if not (
            all_of_type(str, names, types, modtimes, digests, chunk_digests)
            and all_of_type(int, sizes, modes, offsets, inners)
        ):
            return None
        places = list(zip(offsets, inners, strict=True))
        if not (
            set(types) == {"reg"}
            and all_normalized(names)
            # No whiteout prefix in any name: a match cannot span two names, as the
            # prefix holds no newline.
            and WHITEOUT_PREFIX not in "\n".join(names)
            and LANDMARK_NAMES.isdisjoint(names)
            # One chunk: the file's size is its chunk's, within both bounds.
            and all_within(sizes, 1, min(_MOST["size"], MAX_CHUNK_BYTES))
            and all_within(modes, 0, _MOST["mode"])
            and all_within(list(map(len, modtimes)), 1, _MAX_MODTIME_CHARS)
            and all_within(offsets, 1, self.toc_offset - 1)
            and all_within(inners, 0, _MOST["innerOffset"])
            # In blob order among themselves; against the records between them, where
            # each run is taken.
            and all(map(operator.lt, places, itertools.islice(places, 1, None)))
            and chunk_digests == digests
            and all_sha256_digests(digests)
        ):
            return None
        try:
            stamps = list(map(_timestamp, modtimes))
        except EstargzFormatError:
            return None
        entries = [
            TocEntry(name, "reg", size, mode & 0o7777, 0, 0, "", "", stamp, "", 0, 0, {},
                     offset, digest)
            for name, size, mode, stamp, offset, digest
            in zip(names, sizes, modes, stamps, offsets, digests, strict=True)
        ]  # fmt: skip
        chunks = list(map(_PendingChunk, itertools.repeat(0), sizes, offsets, inners, digests))
        files = [
            _OpenFile(entry, [chunk], chunk.size)
            for entry, chunk in zip(entries, chunks, strict=True)
        ]
        return _PlainFiles(names, entries, chunks, files)

    def _take_plain(self, plain: _PlainFiles, start: int, stop: int) -> None:
        """Take plain files ``[start, stop)``, a run of consecutive records."""
        self._close_file()
        first = plain.chunks[start]
        if self.data and (first.offset, first.inner_offset) <= (
            self.data[-1].offset,
            self.data[-1].inner_offset,
        ):
            raise EstargzFormatError(
                f"data offset {first.offset} is not after {self.data[-1].offset}"
            )
        entries = plain.entries[start:stop]
        uname = self.owner_names.get(("userName", 0), "")
        gname = self.owner_names.get(("groupName", 0), "")
        if uname or gname:  # an earlier record named root's user or group: as _owner_name
            for entry in entries:
                entry.uname, entry.gname = uname, gname
        self.entries += entries
        self.kinds.update(zip(plain.names[start:stop], itertools.repeat("reg")))
        self.files += plain.files[start:stop]
        self.data += plain.chunks[start:stop]
        self.open_file = plain.files[stop - 1]

    def _entry(self, record: dict[str, Any], name: str, kind: str) -> TocEntry:
        uid = _uint(record, "uid")
        gid = _uint(record, "gid")
        device = kind in ("char", "block")
        return TocEntry(  # positional, in field order: a big TOC builds tens of thousands
            name,
            kind,
            _uint(record, "size") if kind == "reg" else 0,
            _uint(record, "mode") & 0o7777,
            uid,
            gid,
            self._owner_name(record, "userName", uid),
            self._owner_name(record, "groupName", gid),
            _modtime(record),
            self._link_name(record, kind) if kind in ("symlink", "hardlink") else "",
            _uint(record, "devMajor") if device else 0,
            _uint(record, "devMinor") if device else 0,
            _xattrs(record),
            0,
            _optional_digest(record, "digest"),
        )

    def _owner_name(self, record: dict[str, Any], key: str, id_: int) -> str:
        """Writers record an owner name only when it changes for an id; fill the rest."""
        value = record.get(key)
        if value is None or value == "":
            return self.owner_names.get((key, id_), "")
        if not isinstance(value, str) or len(value) > MAX_OWNER_NAME or "\0" in value:
            raise EstargzFormatError(f"invalid {key}")
        self.owner_names[key, id_] = value
        return value

    def _link_name(self, record: dict[str, Any], kind: str) -> str:
        link = record.get("linkName", "")
        if not isinstance(link, str) or "\0" in link or len(link.encode()) > MAX_NAME_BYTES:
            raise EstargzFormatError("invalid linkName")
        if kind == "symlink":
            return link
        target = normalize_name(link)
        if self.kinds.get(target, "dir") == "dir":
            raise EstargzFormatError(f"hardlink to {link!r}, which is no earlier non-directory")
        return target

    def _open_file(self, record: dict[str, Any], entry: TocEntry) -> None:
        self.open_file = _OpenFile(entry)
        self.files.append(self.open_file)
        if entry.size:
            if _uint(record, "chunkOffset", 0) != 0:
                raise EstargzFormatError("a file's first chunk must start at 0")
            self._add_chunk(record, 0)
            entry.offset = self.open_file.chunks[0].offset

    def _chunk(self, record: dict[str, Any], name: str) -> None:
        open_file = self.open_file
        if open_file is None or open_file.entry.name != name:
            raise EstargzFormatError(f"chunk of {name!r} does not follow that file's entry")
        chunk_offset = _uint(record, "chunkOffset")
        if chunk_offset != open_file.covered:
            raise EstargzFormatError(
                f"chunk of {name!r} at {chunk_offset}, expected {open_file.covered}"
            )
        self._add_chunk(record, chunk_offset)

    def _add_chunk(self, record: dict[str, Any], chunk_offset: int) -> None:
        open_file = self.open_file
        assert open_file is not None
        remaining = open_file.entry.size - chunk_offset
        size = _uint(record, "chunkSize", remaining) or remaining
        if size > MAX_CHUNK_BYTES:
            raise EstargzFormatError(f"chunk of {size} bytes exceeds {MAX_CHUNK_BYTES}")
        digest = record.get("chunkDigest")
        if not digest or digest != open_file.entry.digest:  # a whole file's: checked already
            digest = _optional_digest(record, "chunkDigest")
        if not digest:
            raise EstargzFormatError("chunk without chunkDigest")
        chunk = _PendingChunk(
            file_offset=chunk_offset,
            size=size,
            offset=self._data_offset(record),
            inner_offset=_uint(record, "innerOffset"),
            digest=digest,
        )
        open_file.chunks.append(chunk)
        open_file.covered += size
        self.data.append(chunk)

    def _data_offset(self, record: dict[str, Any]) -> int:
        """A data member's offset: inside the blob before the TOC, after the previous one."""
        offset = _uint(record, "offset", self.toc_offset - 1)
        if offset == 0:
            raise EstargzFormatError("data entry without an offset")
        inner = _uint(record, "innerOffset")
        if self.data:
            previous = self.data[-1]
            if (offset, inner) <= (previous.offset, previous.inner_offset):
                raise EstargzFormatError(f"data offset {offset} is not after {previous.offset}")
        return offset

    def _close_file(self) -> None:
        open_file, self.open_file = self.open_file, None
        if open_file is None:
            return
        entry = open_file.entry
        if open_file.covered != entry.size:
            raise EstargzFormatError(
                f"chunks of {entry.name!r} cover {open_file.covered} of {entry.size} bytes"
            )

    def _landmark(self, record: dict[str, Any], name: str) -> None:
        if _uint(record, "size", 1) == 0:
            return
        landmark = _PendingChunk(0, 1, self._data_offset(record), 0, "")
        self.data.append(landmark)
        if name == PREFETCH_LANDMARK:
            self.prefetch_end = landmark.offset

    def _resolve_ranges(self) -> None:
        """End each chunk's range at the next larger data offset (or the TOC), but never
        further than deflate can spread what is read of its member: the TOC says where
        members start, not how long they are, and a 1-byte file followed by nothing
        until a far offset must not fetch everything in between."""
        ends: dict[int, int] = {}
        end, current = self.toc_offset, self.toc_offset
        for chunk in reversed(self.data):
            if chunk.offset != current:
                end, current = current, chunk.offset
            ends[chunk.offset] = end
        needed: dict[int, int] = {}
        for open_file in self.files:
            for chunk in open_file.chunks:
                wanted = chunk.inner_offset + chunk.size
                if wanted > needed.get(chunk.offset, 0):
                    needed[chunk.offset] = wanted
        for offset, wanted in needed.items():
            ends[offset] = min(ends[offset], offset + member_bound(wanted))
        add = self.chunks.add
        for open_file in self.files:
            name = open_file.entry.name
            chunks = open_file.chunks
            # Positional, and no comprehension for the usual one chunk (a frame per file
            # was the larger part of this loop): a big TOC builds tens of thousands.
            if len(chunks) == 1:
                (c,) = chunks
                refs = [
                    ChunkRef(name, 0, c.size, c.offset, ends[c.offset], c.inner_offset, c.digest)
                ]
            else:
                refs = [
                    ChunkRef(
                        name,
                        c.file_offset,
                        c.size,
                        c.offset,
                        ends[c.offset],
                        c.inner_offset,
                        c.digest,
                    )
                    for c in chunks
                ]
            add(open_file.entry, refs)


def _is_plain_shaped(record: Any) -> bool:
    """Whether a record has the fields of a plain file (``_plain_files`` checks them)."""
    return type(record) is dict and (
        record.keys() == _PLAIN_FILE_KEYS or record.keys() == _PLAIN_PACKED_FILE_KEYS
    )


@contextlib.contextmanager
def _blaming(index: int) -> Iterator[None]:
    """Name the record at fault in what a check raises."""
    try:
        yield
    except (HostileLayerError, UnicodeError) as exc:
        raise EstargzFormatError(f"TOC entry {index}: {exc}") from None


def _uint(record: dict[str, Any], key: str, maximum: int | None = None) -> int:
    """Field ``key`` (0 if absent), within 0..``maximum`` (by default, ``_MOST``'s)."""
    if maximum is None:
        maximum = _MOST[key]
    value = record.get(key, 0)
    if type(value) is not int or not 0 <= value <= maximum:  # bool is not int here
        raise EstargzFormatError(f"{key} must be an integer in [0, {maximum}], got {value!r}")
    return value


def _optional_digest(record: dict[str, Any], key: str) -> str:
    value = record.get(key, "")
    if value and not is_sha256_digest(value):
        raise EstargzFormatError(f"{key} is not a sha256 digest: {value!r}")
    return str(value)


def _modtime(record: dict[str, Any]) -> float:
    value = record.get("modtime", "")
    if value == "":
        return 0.0
    if not isinstance(value, str) or len(value) > _MAX_MODTIME_CHARS:
        raise EstargzFormatError("modtime is not a string")
    return _timestamp(value)


@functools.lru_cache(maxsize=4096)
def _timestamp(value: str) -> float:
    """Parsed once per distinct string: files unpacked from one package share one."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise EstargzFormatError(f"modtime is not RFC 3339: {value!r}") from None
    if moment.tzinfo is None:
        raise EstargzFormatError(f"modtime has no time zone: {value!r}")
    return moment.timestamp()


def _xattrs(record: dict[str, Any]) -> dict[str, bytes]:
    raw = record.get("xattrs")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise EstargzFormatError("xattrs is not an object")
    xattrs: dict[str, bytes] = {}
    for key, value in raw.items():
        if not key or "\0" in key or len(key) > 255 or not isinstance(value, str):
            raise EstargzFormatError(f"invalid xattr {key!r}")
        if len(value) > MAX_XATTR_BYTES * 4 // 3 + 4:
            raise EstargzFormatError(f"xattr {key!r} is too large")
        try:
            xattrs[key] = base64.b64decode(value, validate=True)
        except ValueError:  # binascii.Error, or non-ASCII text
            raise EstargzFormatError(f"xattr {key!r} is not base64") from None
    return xattrs
