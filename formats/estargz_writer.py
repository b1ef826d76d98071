"""Re-pack an uncompressed layer tar, streamed once, into an eStargz blob (full mode).

Layout, as the spec and stargz-snapshotter's writer have it: a regular file's tar header
goes into the gzip member that is open when the file is reached; its data then starts a
new member, one per chunk of ``chunk_size`` bytes; the last chunk's member also takes the
tar padding and the headers that follow, up to the next file data. So every member
boundary is a chunk start, and a chunk's compressed range runs from its member's start to
the next chunk's (or the TOC's) offset.

Members are independent, so they are deflated on a thread pool (zlib releases the GIL)
while the calling thread parses the tar and hashes, keeping a bounded number in flight:
memory stays at a few chunks whatever the layer size.

Prefetch: entries named by the prefetch list (plus their parent directories) must come
first, then ``.prefetch.landmark``. The input is read once, so the other entries are
compressed as they come into a spool file and appended after the landmark; their TOC
offsets are shifted then, and their uncompressed bytes are re-inflated from the spool to
compute the new blob's diff_id in output order. Without a prefetch list nothing is
spooled and ``.no.prefetch.landmark`` leads the blob, as in stargz-snapshotter.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import hashlib
import json
import math
import os
import posixpath
import tarfile
import tempfile
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any

from formats.estargz_toc import (
    DEFAULT_CHUNK_SIZE,
    GZIP_WBITS,
    LANDMARK_CONTENTS,
    LANDMARK_NAMES,
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    TAR_END_OF_ARCHIVE,
    TOC_DIGEST_ANNOTATION,
    TOC_TAR_NAME,
    TOC_VERSION,
    UNCOMPRESSED_SIZE_ANNOTATION,
    footer_bytes,
    tar_padding,
)
from formats.fast_zlib import ZLIB, MemberInflater
from formats.plan_path import PlanPath
from formats.toc import HostileLayerError, TocEntry, iter_tar_entries

DEFAULT_LEVEL = 6
# Files smaller than this share a gzip member with the files before them (their chunks
# carry an `innerOffset`, as stargz-snapshotter's --estargz-min-chunk-size does): one
# member per small file costs ~20 bytes of framing plus a cold deflate dictionary,
# which is what pushes file-dense layers past 105% of their original size.
DEFAULT_MIN_CHUNK_SIZE = 64 << 10
_COPY_BLOCK = 1 << 20
_INFLATE_LIMIT = 8 << 20
_EMPTY_SHA256 = "sha256:" + hashlib.sha256(b"").hexdigest()
_RENAMING_PAX_KEYS = ("path", "linkpath")


@dataclass(frozen=True)
class EstargzResult:
    """What the converter needs to describe the new layer in a manifest and config."""

    blob_digest: str
    blob_size: int
    diff_id: str
    uncompressed_size: int
    toc_digest: str
    toc_offset: int
    missed_prefetch: tuple[str, ...]
    """Prefetch paths not put in the prioritized area: absent from this layer (they may
    be in another), or entries that must stay behind an earlier, unprioritized one (a
    hard link behind its target, a file behind a link made to its name before it)."""

    def annotations(self) -> dict[str, str]:
        """The layer descriptor annotations stargz-snapshotter looks for."""
        return {
            TOC_DIGEST_ANNOTATION: self.toc_digest,
            UNCOMPRESSED_SIZE_ANNOTATION: str(self.uncompressed_size),
        }


def write_estargz(
    src: IO[bytes],
    dst: IO[bytes],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    level: int = DEFAULT_LEVEL,
    prefetch: Sequence[str] = (),
    workers: int | None = None,
    spool_dir: str | None = None,
    min_chunk_size: int = DEFAULT_MIN_CHUNK_SIZE,
) -> EstargzResult:
    """Convert the uncompressed tar ``src`` into an eStargz blob written to ``dst``.

    ``prefetch`` holds absolute paths; one ending in ``/`` names a directory tree.
    Raises HostileLayerError for tars that cannot (or must not) be converted.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    plan = _PrefetchPlan(prefetch)
    workers = workers or os.cpu_count() or 1
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="estargz")
        )
        spool = (
            stack.enter_context(tempfile.TemporaryFile(dir=spool_dir, prefix="estargz-spool-"))
            if plan.active
            else None
        )
        out = _Output(dst, pool, level, in_flight=2 * (workers + 1))
        builder = _Builder(out, plan, chunk_size, spool, min_chunk_size)
        for entry, info, reader in iter_tar_entries(src):
            builder.add(entry, info, reader)
        return builder.finish()


class _PrefetchPlan:
    """Which tar entries belong in the prioritized area before the prefetch landmark.

    An entry is prioritized when a prefetch path names it or a tree (``/dir/``) holds
    it; the parents of prefetch paths come along so that the area unpacks on its own.
    """

    def __init__(self, paths: Iterable[str]) -> None:
        self.files: set[str] = set()
        self.trees: set[str] = set()
        self.ancestors: set[str] = set()
        self.requested: list[tuple[str, tuple[bool, str]]] = []
        self.matched: set[tuple[bool, str]] = set()
        for raw in paths:
            path = PlanPath.parse(raw)  # a PlanPathError is a ValueError, as before
            name, is_tree = path.name, path.whole_directory
            (self.trees if is_tree else self.files).add(name)
            self.requested.append((raw, (is_tree, name)))
            parent = name
            while parent:
                parent = posixpath.dirname(parent)
                self.ancestors.add(parent)

    @property
    def active(self) -> bool:
        return bool(self.requested)

    def request_for(self, name: str) -> tuple[bool, str] | None:
        """The prefetch request that names ``name`` directly, if any."""
        if name in self.files:
            return (False, name)
        tree = name
        while True:
            if tree in self.trees:
                return (True, tree)
            if not tree:
                return None
            tree = posixpath.dirname(tree)

    def missed(self) -> tuple[str, ...]:
        return tuple(raw for raw, request in self.requested if request not in self.matched)


def _ancestors(name: str) -> list[str]:
    """The directories above a normalized name, the root left out."""
    parts = name.split("/")
    return ["/".join(parts[:end]) for end in range(1, len(parts))]


def _written_name(entry: TocEntry) -> str:
    """The name an entry changes when unpacked: a whiteout's is the name it removes."""
    return entry.whiteout_target if entry.is_whiteout else entry.name


class _Footprint:
    """What the entries of the back part do to names, to tell whether a later entry may
    go ahead of them, into the prioritized front, without changing what unpacking the
    blob gives. An entry writes its name, needs directories above it (a file in the way
    is replaced by one) and, if it is a hard link, reads its target: the file the
    target name holds when the link is unpacked. Two entries give the same result in
    either order unless one writes or reads a name the other writes, or one writes a
    non-directory or reads a file where the other needs a directory, or one writes a
    non-directory above a name the other reads."""

    def __init__(self) -> None:
        self.written: set[str] = set()
        self.files: set[str] = set()
        """Names written by non-directories."""
        self.dirs_needed: set[str] = set()
        """Directories above written names."""
        self.read: set[str] = set()
        """Hard link targets."""
        self.above_read: set[str] = set()
        """Directories above hard link targets."""

    def add(self, entry: TocEntry) -> None:
        name = _written_name(entry)
        self.written.add(name)
        self.dirs_needed.update(_ancestors(name))
        if entry.type != "dir":
            self.files.add(name)
        if entry.type == "hardlink":
            self.read.add(entry.link_name)
            self.above_read.update(_ancestors(entry.link_name))

    def meets(self, entry: TocEntry) -> bool:
        """Whether ``entry`` must stay behind these entries."""
        name = _written_name(entry)
        if name in self.written or name in self.read:
            return True
        if entry.type != "dir" and (name in self.dirs_needed or name in self.above_read):
            return True
        if any(above in self.files or above in self.read for above in _ancestors(name)):
            return True
        if entry.type != "hardlink":
            return False
        target = entry.link_name
        return (
            target in self.written
            or target in self.dirs_needed
            or any(above in self.files for above in _ancestors(target))
        )


class _Output:
    """Deflates members on the pool and writes them, in submission order, to their sink."""

    def __init__(
        self, dst: IO[bytes], pool: ThreadPoolExecutor, level: int, in_flight: int
    ) -> None:
        self.dst = dst
        self.pool = pool
        self.level = level
        self.in_flight = in_flight
        self.queue: collections.deque[
            tuple[_Part, Future[tuple[bytes, str]], list[tuple[dict[str, Any], int]]]
        ] = collections.deque()
        self.blob_hash = hashlib.sha256()
        self.blob_size = 0

    def submit(
        self, part: _Part, pieces: list[bytes], records: list[tuple[dict[str, Any], int]]
    ) -> None:
        """Queue a member and the chunk records in it, each with its inner offset; when a
        chunk starts the member, its data is the member's first piece."""
        chunk_first = bool(records) and records[0][1] == 0
        future = self.pool.submit(_deflate_member, pieces, self.level, chunk_first)
        self.queue.append((part, future, records))
        while len(self.queue) > self.in_flight or (self.queue and self.queue[0][1].done()):
            self._write_oldest()

    def drain(self) -> None:
        while self.queue:
            self._write_oldest()

    def write_blob(self, data: bytes) -> None:
        """Write bytes that go straight into the blob (not through a part)."""
        self.dst.write(data)
        self.blob_hash.update(data)
        self.blob_size += len(data)

    def _write_oldest(self) -> None:
        part, future, records = self.queue.popleft()
        member, first_digest = future.result()
        for record, inner_offset in records:
            record["offset"] = part.written
            if inner_offset:
                record["innerOffset"] = inner_offset
            else:
                record["chunkDigest"] = first_digest
            if record.get("digest") == "":  # a file of one chunk: same digest
                record["digest"] = record["chunkDigest"]
        part.written += len(member)
        if part.sink is None:
            self.write_blob(member)
        else:
            part.sink.write(member)


class _Part:
    """A run of gzip members in output order: the blob itself, or the spooled back part.

    ``pieces`` is the open member's uncompressed content; ``record`` the TOC record of
    the chunk it starts with, whose offset is only known once earlier members are written.
    """

    def __init__(self, out: _Output, sink: IO[bytes] | None, diff_hash: Any) -> None:
        self.out = out
        self.sink = sink
        self.diff_hash = diff_hash
        self.written = 0
        self.uncompressed = 0
        self.pieces: list[bytes] = []
        self.member_records: list[tuple[dict[str, Any], int]] = []
        self.member_bytes = 0
        self.records: list[dict[str, Any]] = []
        self.names: set[str] = set()

    def append(self, data: bytes) -> None:
        if data:
            self.pieces.append(data)
            self.member_bytes += len(data)
            self.uncompressed += len(data)
            if self.diff_hash is not None:
                self.diff_hash.update(data)

    def start_member(self, record: dict[str, Any] | None) -> None:
        """Close the open member (if it holds anything) and open one at a chunk start."""
        if self.pieces:
            self.out.submit(self, self.pieces, self.member_records)
        self.pieces, self.member_bytes = [], 0
        self.member_records = [(record, 0)] if record is not None else []

    def add_chunk(self, record: dict[str, Any], data: bytes, min_chunk_size: int) -> None:
        """Put a chunk in a member of its own, or, while the open member (which starts
        with a chunk) is still smaller than ``min_chunk_size``, into that member."""
        if (
            self.member_records
            and self.member_records[0][1] == 0
            and (self.member_bytes < min_chunk_size)
        ):
            record["chunkDigest"] = "sha256:" + hashlib.sha256(data).hexdigest()
            self.member_records.append((record, self.member_bytes))
        else:
            self.start_member(record)
        self.append(data)


class _Builder:
    """Walks entries once, placing each in the front (prioritized) or back part."""

    def __init__(
        self,
        out: _Output,
        plan: _PrefetchPlan,
        chunk_size: int,
        spool: IO[bytes] | None,
        min_chunk_size: int,
    ) -> None:
        self.out = out
        self.plan = plan
        self.chunk_size = chunk_size
        self.min_chunk_size = min_chunk_size
        self.diff_hash = hashlib.sha256()
        self.front = _Part(out, None, self.diff_hash)
        self.spool = spool
        self.back: _Part | None = None
        self.behind = _Footprint()
        if spool is not None:
            self.back = _Part(out, spool, None)
        else:
            self._add_landmark(NO_PREFETCH_LANDMARK)
        self.last_owner_names: dict[tuple[str, int], str] = {}

    def add(self, entry: TocEntry, info: tarfile.TarInfo, reader: IO[bytes] | None) -> None:
        if entry.name in LANDMARK_NAMES or entry.name == TOC_TAR_NAME:
            return  # left by an earlier conversion: this one writes its own
        if not entry.name and entry.type != "dir":
            raise HostileLayerError(f"a {entry.type} entry named {info.name!r} replaces the root")
        tar_name = entry.name + "/" if entry.type == "dir" and entry.name else entry.name or "./"
        record = self._record(entry, info, tar_name)
        part = self._part_for(entry)
        part.names.add(entry.name)
        if part is self.back:
            self.behind.add(entry)
        part.append(_tar_header(info, tar_name, entry))
        part.records.append(record)
        if entry.type == "reg":
            assert reader is not None
            self._add_data(part, record, reader, entry.size)

    def _part_for(self, entry: TocEntry) -> _Part:
        """Front for prioritized entries, unless that would change what unpacking gives:
        an entry that meets one already in the back part stays behind it (``_Footprint``),
        and a hard link whose target went to the back follows it."""
        if self.back is None:
            return self.front
        request = self.plan.request_for(entry.name)
        if (
            (request is not None or entry.name in self.plan.ancestors)
            and not self.behind.meets(entry)
            and (entry.type != "hardlink" or entry.link_name in self.front.names)
        ):
            if request is not None:
                self.plan.matched.add(request)
            return self.front
        return self.back

    def _add_data(self, part: _Part, record: dict[str, Any], reader: IO[bytes], size: int) -> None:
        """Stream a file's data as chunk members, each hashed where it is deflated."""
        if size == 0:
            record["digest"] = _EMPTY_SHA256
            return
        file_hash = hashlib.sha256() if size > self.chunk_size else None
        chunk_record = record
        done = 0
        while done < size:
            length = min(self.chunk_size, size - done)
            data = _read_exact(reader, length, record["name"])
            if done:
                chunk_record = {"name": record["name"], "type": "chunk", "offset": 0}
                chunk_record["chunkOffset"] = done
                part.records.append(chunk_record)
            if done + length < size:
                chunk_record["chunkSize"] = length
            if file_hash is not None:
                file_hash.update(data)
            if length < self.min_chunk_size and size == length:
                part.add_chunk(chunk_record, data, self.min_chunk_size)
            else:
                part.start_member(chunk_record)
                part.append(data)
            done += length
        part.append(tar_padding(size))
        if file_hash is not None:
            record["digest"] = "sha256:" + file_hash.hexdigest()

    def _add_landmark(self, name: str) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(LANDMARK_CONTENTS)
        info.mode = 0o644
        self.front.append(info.tobuf(tarfile.PAX_FORMAT))
        record: dict[str, Any] = {"name": name, "type": "reg", "size": info.size, "offset": 0}
        record["digest"] = ""
        self.front.records.append(record)
        self.front.start_member(record)
        self.front.append(LANDMARK_CONTENTS)
        self.front.append(tar_padding(info.size))

    def _record(self, entry: TocEntry, info: tarfile.TarInfo, tar_name: str) -> dict[str, Any]:
        """The entry's TOC record, fields in the spec's (and Go's) order, zeros omitted."""
        record: dict[str, Any] = {"name": _utf8_checked(tar_name, entry.name), "type": entry.type}
        if entry.size:
            record["size"] = entry.size
        if modtime := _rfc3339(entry.mtime):
            record["modtime"] = modtime
        if entry.link_name:
            record["linkName"] = _utf8_checked(entry.link_name, entry.name)
        for key, value in (("mode", info.mode), ("uid", entry.uid), ("gid", entry.gid)):
            if value:
                record[key] = value
        # Like stargz-snapshotter: owner names only when they change for an id.
        for key, id_, name in (
            ("userName", entry.uid, entry.uname),
            ("groupName", entry.gid, entry.gname),
        ):
            if name and self.last_owner_names.get((key, id_)) != name:
                self.last_owner_names[key, id_] = name
                record[key] = _utf8_checked(name, entry.name)
        if entry.size:
            record["offset"] = 0
        if entry.type == "reg":
            record["digest"] = ""
        # Zero device numbers are omitted, as stargz-snapshotter's writer does.
        for key, number in (("devMajor", entry.dev_major), ("devMinor", entry.dev_minor)):
            if number:
                record[key] = number
        if entry.xattrs:
            record["xattrs"] = {
                _utf8_checked(key, entry.name): base64.b64encode(value).decode()
                for key, value in entry.xattrs.items()
            }
        return record

    def finish(self) -> EstargzResult:
        if self.back is not None:
            landmark = PREFETCH_LANDMARK if self.plan.matched else NO_PREFETCH_LANDMARK
            self._add_landmark(landmark)
        self.front.start_member(None)
        self.out.drain()
        records = self.front.records
        uncompressed = self.front.uncompressed
        if self.back is not None and self.spool is not None:
            self.back.start_member(None)
            self.out.drain()
            shift = self.out.blob_size
            for record in self.back.records:
                if "offset" in record:
                    record["offset"] += shift
            records += self.back.records
            uncompressed += self.back.uncompressed
            self._append_spool(self.spool)
        toc_offset = self.out.blob_size
        toc_json = json.dumps(
            {"version": TOC_VERSION, "entries": records}, indent="\t", ensure_ascii=False
        ).encode()
        toc_info = tarfile.TarInfo(TOC_TAR_NAME)
        toc_info.size = len(toc_json)
        toc_info.mode = 0o644
        toc_tar = b"".join(
            (
                toc_info.tobuf(tarfile.PAX_FORMAT),
                toc_json,
                tar_padding(len(toc_json)),
                TAR_END_OF_ARCHIVE,
            )
        )
        self.diff_hash.update(toc_tar)
        self.out.write_blob(_deflate_member([toc_tar], self.out.level, False)[0])
        self.out.write_blob(footer_bytes(toc_offset))
        return EstargzResult(
            blob_digest="sha256:" + self.out.blob_hash.hexdigest(),
            blob_size=self.out.blob_size,
            diff_id="sha256:" + self.diff_hash.hexdigest(),
            uncompressed_size=uncompressed + len(toc_tar),
            toc_digest="sha256:" + hashlib.sha256(toc_json).hexdigest(),
            toc_offset=toc_offset,
            missed_prefetch=self.plan.missed(),
        )

    def _append_spool(self, spool: IO[bytes]) -> None:
        """Copy the back part into the blob, inflating it to extend the diff_id.

        Output per call is capped: a member of zeros inflates a thousandfold.
        """
        spool.seek(0)
        inflater = MemberInflater(_INFLATE_LIMIT)
        while block := spool.read(_COPY_BLOCK):
            self.out.write_blob(block)
            for data in inflater.feed(block):
                self.diff_hash.update(data)


def _deflate_member(pieces: list[bytes], level: int, chunk_first: bool) -> tuple[bytes, str]:
    """One gzip member of ``pieces``, and the digest of the first piece if it is a chunk.

    Runs on the pool: both zlib and hashlib release the GIL on large buffers.
    """
    chunk_digest = "sha256:" + hashlib.sha256(pieces[0]).hexdigest() if chunk_first else ""
    deflater = ZLIB.compressobj(level, ZLIB.DEFLATED, GZIP_WBITS)
    out = [deflater.compress(piece) for piece in pieces]
    out.append(deflater.flush())
    return b"".join(out), chunk_digest


def _tar_header(info: tarfile.TarInfo, tar_name: str, entry: TocEntry) -> bytes:
    """The entry's header, re-emitted under its normalized name so that TOC and tar agree.

    The pax path/linkpath records are dropped because tarfile would let them override
    the new name; it re-creates them when the name needs them.
    """
    info.name = tar_name
    if entry.type == "hardlink":
        info.linkname = entry.link_name
    info.pax_headers = {k: v for k, v in info.pax_headers.items() if k not in _RENAMING_PAX_KEYS}
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _utf8_checked(text: str, entry_name: str) -> str:
    """JSON can only carry valid UTF-8; a TOC must not silently alter a name."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise HostileLayerError(
            f"{entry_name!r}: non-UTF-8 name or text cannot be recorded in an eStargz TOC"
        ) from None
    return text


def _rfc3339(mtime: float) -> str:
    """stargz's modtime: UTC, whole seconds (halves away from zero, as Go rounds), empty
    for the zero time."""
    seconds = int(math.copysign(math.floor(abs(mtime) + 0.5), mtime))
    if seconds == 0:
        return ""
    try:
        return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, ValueError, OSError):
        return ""  # outside what RFC 3339 can spell; the tar header keeps the value


def _read_exact(reader: IO[bytes], length: int, name: str) -> bytes:
    """Exactly ``length`` bytes of a file's data; tarfile reports a short stream with
    its own ReadError, raised here in the caller's frame, outside iter_tar_entries."""
    parts = []
    got = 0
    try:
        while got < length:
            more = reader.read(length - got)
            if not more:
                break
            parts.append(more)
            got += len(more)
    except tarfile.TarError:
        pass
    if got < length:
        raise HostileLayerError(f"tar stream truncated inside {name!r}")
    return parts[0] if len(parts) == 1 else b"".join(parts)
