"""Declarative tar layers for test images, written deterministically in one streaming pass.

The lazy loader must present every tar feature exactly as containerd's own unpack would
(modes, owners, mtimes, xattrs, links, devices, whiteouts), so the rig needs layers that
contain each of them on purpose, with bytes that are identical from run to run: a test
that compares digests or cached chunks must see the same blob every time. Large files
are generated while writing (never held in memory), and the three digests a manifest
needs (diff_id, blob digest, blob size) come out of the same pass that writes the blob.
"""

from __future__ import annotations

import copy
import enum
import hashlib
import io
import random
import tarfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, ClassVar

import zstandard

from common.byte_streams import IteratorReader
from common.digest import digest_of_hasher

DEFAULT_MTIME = 1_700_000_000
"""Fixed mtime (2023-11-14) for entries that do not set one, so layers are reproducible."""

_CHUNK = 1 << 20
_ZEROS = bytes(_CHUNK)


class Compression(enum.Enum):
    """How a layer blob is encoded; each maps to its own layer media type."""

    GZIP = "gzip"
    ZSTD = "zstd"
    NONE = "none"


# -- file contents ---------------------------------------------------------------------


@dataclass(frozen=True)
class SparseishFile:
    """``size`` bytes of zeros with one random ``block_size`` block in every ``data_every``.

    Stands in for a multi-GB image file: it compresses well (cheap to build and push)
    yet its random blocks make a misplaced or stale chunk visible to any byte check.
    The same seed always yields the same bytes.
    """

    size: int
    seed: int = 0
    data_every: int = 1 << 20
    block_size: int = 4096

    def __post_init__(self) -> None:
        if self.size < 0 or self.data_every <= 0 or self.block_size <= 0:
            raise ValueError(f"invalid SparseishFile geometry: {self}")

    def chunks(self) -> Iterator[bytes]:
        """The content, streamed in pieces of at most 1 MiB."""
        rng = random.Random(self.seed)
        offset = 0
        while offset < self.size:
            window = min(self.data_every, self.size - offset)
            block = min(self.block_size, window)
            start = rng.randrange(window - block + 1)
            data = rng.randbytes(block)
            yield from _zeros(start)
            yield data
            yield from _zeros(window - start - block)
            offset += window

    def sha256(self) -> str:
        """Digest of the content, for checking what a reader got back."""
        hasher = hashlib.sha256()
        for chunk in self.chunks():
            hasher.update(chunk)
        return digest_of_hasher(hasher)


@dataclass(frozen=True)
class HostFile:
    """Content copied from a file on this host (e.g. the static /bin/busybox)."""

    path: Path


FileContent = bytes | SparseishFile | HostFile


def _zeros(count: int) -> Iterator[bytes]:
    while count > 0:
        piece = min(count, _CHUNK)
        yield _ZEROS[:piece]
        count -= piece


def content_size(content: FileContent) -> int:
    """Byte length of a file's content without producing it."""
    if isinstance(content, bytes):
        return len(content)
    if isinstance(content, SparseishFile):
        return content.size
    return content.path.stat().st_size


def _open_content(content: FileContent) -> BinaryIO:
    if isinstance(content, bytes):
        return io.BytesIO(content)
    if isinstance(content, SparseishFile):
        # Buffered: tarfile treats any short read() as a truncated file.
        return io.BufferedReader(IteratorReader(content.chunks()), buffer_size=_CHUNK)
    return content.path.open("rb")


# -- entries -----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class EntryMeta:
    """Metadata every tar entry carries; ``mode`` None means the entry type's usual mode.

    ``xattrs`` become PAX ``SCHILY.xattr.<name>`` records, the form containerd reads.
    """

    mode: int | None = None
    uid: int = 0
    gid: int = 0
    uname: str = ""
    gname: str = ""
    mtime: int = DEFAULT_MTIME
    xattrs: Mapping[str, str | bytes] = field(default_factory=dict)

    default_mode: ClassVar[int] = 0o644

    @property
    def effective_mode(self) -> int:
        """The permission bits written to the tar."""
        return self.default_mode if self.mode is None else self.mode


@dataclass(frozen=True)
class File(EntryMeta):
    """A regular file."""

    path: str
    content: FileContent = b""


@dataclass(frozen=True)
class Directory(EntryMeta):
    """A directory."""

    path: str

    default_mode: ClassVar[int] = 0o755


@dataclass(frozen=True)
class Symlink(EntryMeta):
    """A symbolic link; ``target`` is stored verbatim (relative or absolute)."""

    path: str
    target: str

    default_mode: ClassVar[int] = 0o777


@dataclass(frozen=True)
class Hardlink:
    """A hard link to a regular file written earlier in the same layer.

    It has no metadata of its own: its header repeats the target's, as tar writers do
    (both names are one inode), because extractors such as containerd apply a link
    header's mode and owner to the shared inode.
    """

    path: str
    target: str


@dataclass(frozen=True)
class CharDevice(EntryMeta):
    """A character device node."""

    path: str
    major: int
    minor: int


@dataclass(frozen=True)
class BlockDevice(EntryMeta):
    """A block device node."""

    path: str
    major: int
    minor: int

    default_mode: ClassVar[int] = 0o660


@dataclass(frozen=True)
class Fifo(EntryMeta):
    """A named pipe."""

    path: str


@dataclass(frozen=True)
class Whiteout(EntryMeta):
    """Deletes ``path`` of a lower layer: written as the empty file ``<dir>/.wh.<name>``."""

    path: str


@dataclass(frozen=True)
class OpaqueDir(EntryMeta):
    """Hides everything lower layers put in directory ``path``: ``<path>/.wh..wh..opq``."""

    path: str


Entry = (
    File | Directory | Symlink | Hardlink | CharDevice | BlockDevice | Fifo | Whiteout | OpaqueDir
)

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"


def tar_name(path: str) -> str:
    """Archive member name for an image path: relative, normalised, like docker writes it."""
    parts = PurePosixPath("/", path).parts[1:]
    if not parts or any(part in (".", "..") for part in parts):
        raise ValueError(f"not a usable path inside an image: {path!r}")
    return "/".join(parts)


def member_name(entry: Entry) -> str:
    """The name this entry has inside the tar (whiteouts and opaque markers included)."""
    name = tar_name(entry.path)
    if isinstance(entry, Whiteout):
        parent, _, base = name.rpartition("/")
        return f"{parent}/{WHITEOUT_PREFIX}{base}" if parent else f"{WHITEOUT_PREFIX}{base}"
    if isinstance(entry, OpaqueDir):
        return f"{name}/{OPAQUE_MARKER}"
    return name


def _xattr_records(xattrs: Mapping[str, str | bytes]) -> dict[str, str]:
    records = {}
    for name, value in xattrs.items():
        raw = value.encode() if isinstance(value, str) else value
        # tarfile writes non-UTF-8 values back byte for byte (hdrcharset=BINARY).
        records[f"SCHILY.xattr.{name}"] = raw.decode("utf-8", "surrogateescape")
    return records


def tar_info(entry: Entry, files: Mapping[str, tarfile.TarInfo]) -> tarfile.TarInfo:
    """The tar header for ``entry``; ``files`` maps names of regular files written so far.

    For a File the header holds its size; the content is streamed separately.
    """
    if isinstance(entry, Hardlink):
        target = files.get(tar_name(entry.target))
        if target is None:
            raise ValueError(f"hardlink {entry.path!r} -> {entry.target!r}: no earlier file")
        link = copy.copy(target)
        link.name, link.type, link.linkname, link.size = (
            member_name(entry),
            tarfile.LNKTYPE,
            target.name,
            0,
        )
        link.pax_headers = dict(target.pax_headers)
        return link
    info = tarfile.TarInfo(member_name(entry))
    info.mode = entry.effective_mode
    info.uid, info.gid = entry.uid, entry.gid
    info.uname, info.gname = entry.uname, entry.gname
    info.mtime = entry.mtime
    info.pax_headers = _xattr_records(entry.xattrs)
    if isinstance(entry, File):
        info.type, info.size = tarfile.REGTYPE, content_size(entry.content)
    elif isinstance(entry, Directory):
        info.type = tarfile.DIRTYPE
    elif isinstance(entry, Symlink):
        info.type, info.linkname = tarfile.SYMTYPE, entry.target
    elif isinstance(entry, CharDevice | BlockDevice):
        info.type = tarfile.CHRTYPE if isinstance(entry, CharDevice) else tarfile.BLKTYPE
        info.devmajor, info.devminor = entry.major, entry.minor
    elif isinstance(entry, Fifo):
        info.type = tarfile.FIFOTYPE
    else:
        info.type = tarfile.REGTYPE
    return info


# -- layer writing --------------------------------------------------------------------


@dataclass(frozen=True)
class LayerSpec:
    """A layer: its entries in tar order, how to compress it, and its history line."""

    entries: Sequence[Entry]
    compression: Compression = Compression.GZIP
    level: int | None = None
    created_by: str = "acceld rig"


@dataclass(frozen=True)
class LayerBlob:
    """A written layer: ``digest``/``size`` of the blob, ``diff_id`` of the plain tar."""

    path: Path
    digest: str
    size: int
    diff_id: str
    compression: Compression


class _Compressor:
    """Streaming encoder for one compression; ``level`` None takes the codec default."""

    def __init__(self, compression: Compression, level: int | None) -> None:
        self._zlib = None
        self._zstd = None
        if compression is Compression.GZIP:
            # wbits 16+: a gzip wrapper with mtime 0 and no file name, so output is stable.
            self._zlib = zlib.compressobj(6 if level is None else level, zlib.DEFLATED, 31)
        elif compression is Compression.ZSTD:
            self._zstd = zstandard.ZstdCompressor(
                level=3 if level is None else level, write_checksum=True
            ).compressobj()

    def compress(self, data: bytes) -> bytes:
        if self._zlib is not None:
            return self._zlib.compress(data)
        if self._zstd is not None:
            return self._zstd.compress(data)
        return data

    def flush(self) -> bytes:
        if self._zlib is not None:
            return self._zlib.flush()
        if self._zstd is not None:
            return self._zstd.flush()
        return b""


class _DigestingWriter:
    """The file object tarfile writes into: hashes the tar, compresses, hashes the blob."""

    def __init__(self, out: BinaryIO, compressor: _Compressor) -> None:
        self._out = out
        self._compressor = compressor
        self.tar_hash = hashlib.sha256()
        self.blob_hash = hashlib.sha256()
        self.tar_size = 0
        self.blob_size = 0

    def write(self, data: bytes) -> int:
        self.tar_hash.update(data)
        self.tar_size += len(data)
        self._emit(self._compressor.compress(data))
        return len(data)

    def tell(self) -> int:
        return self.tar_size

    def finish(self) -> None:
        self._emit(self._compressor.flush())

    def _emit(self, data: bytes) -> None:
        if data:
            self._out.write(data)
            self.blob_hash.update(data)
            self.blob_size += len(data)


def write_layer(spec: LayerSpec, dest: Path) -> LayerBlob:
    """Write ``spec`` as a PAX tar blob at ``dest``, digesting in the same pass."""
    files: dict[str, tarfile.TarInfo] = {}
    with dest.open("wb") as out:
        writer = _DigestingWriter(out, _Compressor(spec.compression, spec.level))
        with tarfile.TarFile(
            fileobj=writer,  # type: ignore[arg-type]
            mode="w",
            format=tarfile.PAX_FORMAT,
            encoding="utf-8",
            copybufsize=_CHUNK,
        ) as tar:
            for entry in spec.entries:
                info = tar_info(entry, files)
                if isinstance(entry, File):
                    with _open_content(entry.content) as content:
                        tar.addfile(info, content)
                    files[info.name] = info
                else:
                    tar.addfile(info)
        writer.finish()
    return LayerBlob(
        path=dest,
        digest=digest_of_hasher(writer.blob_hash),
        size=writer.blob_size,
        diff_id=digest_of_hasher(writer.tar_hash),
        compression=spec.compression,
    )


# -- the filesystem a stack of layers produces -------------------------------------------


def _drop_subtree(view: dict[str, Entry], name: str, keep_root: bool = False) -> None:
    for key in [k for k in view if k.startswith(name + "/") or (k == name and not keep_root)]:
        del view[key]


def merged_view(layers: Sequence[LayerSpec]) -> dict[str, Entry]:
    """Path (tar name) -> the entry a container sees, after OCI whiteout rules.

    The reference every unpack (umoci, containerd, acceld's FUSE tree) is checked
    against: a whiteout or opaque marker hides only what lower layers wrote, and a
    non-directory replacing a directory takes the directory's contents with it.
    Markers themselves never appear; hard links keep their own entry.
    """
    view: dict[str, Entry] = {}
    for layer in layers:
        lower = dict(view)
        for entry in layer.entries:
            name = tar_name(entry.path)
            if isinstance(entry, Whiteout):
                _drop_subtree(lower, name)
            elif isinstance(entry, OpaqueDir):
                _drop_subtree(lower, name, keep_root=True)
        upper: dict[str, Entry] = {}
        for entry in layer.entries:
            name = tar_name(entry.path)
            if isinstance(entry, Whiteout | OpaqueDir):
                continue
            if not isinstance(entry, Directory):
                _drop_subtree(lower, name)
            upper[name] = entry
        view = {**lower, **upper}
    return view
