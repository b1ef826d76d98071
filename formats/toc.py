"""The file table of a layer: every tar entry with its metadata and where its data lies.

Both accelerated forms describe a layer by such a table (eStargz in its JSON TOC, the
index-only artifact in msgpack), and the agent builds its FUSE tree from it. Names are
normalized and checked here, once, so that no later part can be handed a path that
escapes the layer (`..`, absolute paths, NUL bytes) or an absurd size.
"""

from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import IO, Any

MAX_NAME_BYTES = 4096
MAX_ENTRY_SIZE = 1 << 44  # 16 TiB: bigger than any real layer file, small enough to be sane
MAX_XATTR_BYTES = 64 * 1024
MAX_ID = (1 << 32) - 1
MAX_DEVICE_MAJOR = (1 << 12) - 1
MAX_DEVICE_MINOR = (1 << 20) - 1
"""A device node's numbers as the kernel's dev_t holds them (mknod keeps no more); the
FUSE side turns them into st_rdev with os.makedev, which larger ones overflow."""
MAX_OWNER_NAME = 256
"""Longest user/group name the TOC formats keep (Linux caps them at 32)."""
MAX_MTIME = float(1 << 62)
"""Beyond any date a file system stores; the index-only file table refuses larger ones."""
MAX_EXTENDED_HEADER = 1 << 20
"""Largest pax or GNU long-name record one member may carry. tarfile reads such a
record whole before anything can look at it, so a hostile one sets the converter's
memory; real ones hold a path (4 KiB) and a few xattrs (64 KiB each at most)."""
MAX_HEADER_BLOCKS = 16
"""Most extended headers (pax, global pax, GNU long names) before one member: tarfile
reads a chain of them recursively, and keeps each record until the member is made."""
MAX_HEADER_CHAIN = MAX_HEADER_BLOCKS * (MAX_EXTENDED_HEADER + tarfile.BLOCKSIZE)
"""Bytes from where a member's headers start to where its data does, at most."""

ENTRY_TYPES = ("reg", "dir", "symlink", "hardlink", "char", "block", "fifo")
_TAR_TYPES = {
    tarfile.REGTYPE: "reg",
    tarfile.AREGTYPE: "reg",
    tarfile.CONTTYPE: "reg",
    tarfile.DIRTYPE: "dir",
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
}
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
XATTR_PAX_PREFIX = "SCHILY.xattr."


class HostileLayerError(ValueError):
    """A layer entry that would escape the layer or break an invariant; never served."""


_ODD_PARTS = frozenset(("", ".", ".."))
_PLAIN_NAME_CHARS = MAX_NAME_BYTES // 4
"""Names this short are within MAX_NAME_BYTES whatever they encode to (<= 4 bytes a char)."""


def is_normalized(name: str) -> bool:
    """Whether ``name`` is already what normalize_name would make of it (and short):
    the common case, checked in C-level string operations because a big layer's TOC
    holds tens of thousands of names and is parsed while a pull waits. False means
    "look closer", not "invalid"; the root ("") is not counted as normalized."""
    return (
        0 < len(name) <= _PLAIN_NAME_CHARS
        and "\0" not in name
        and not _ODD_PARTS.intersection(name.split("/"))
    )


def all_normalized(names: Sequence[str]) -> bool:
    """Whether ``is_normalized`` holds for every name, decided on the whole batch with
    substring searches: in "/" + the names joined by "/" + "/", the parts between
    slashes are exactly the names' parts, so an empty, "." or ".." part shows as "//",
    "/./" or "/../". For file tables of tens of thousands of names parsed while a pull
    waits."""
    if not names:
        return True
    joined = "/" + "/".join(names) + "/"
    return (
        min(map(len, names)) > 0
        and max(map(len, names)) <= _PLAIN_NAME_CHARS
        and "\0" not in joined
        and "//" not in joined
        and "/./" not in joined
        and "/../" not in joined
    )


def all_of_type(kind: type, *columns: Sequence[Any]) -> bool:
    """Every value of every (non-empty) column is exactly of ``kind``: no subclass, so a
    bool is no int here, as in the field-by-field checks. Decided by C-level set and map
    calls, for the columns of file tables of tens of thousands of rows; checked before
    anything compares or hashes a column's values, so hostile values cannot raise."""
    return all(set(map(type, column)) == {kind} for column in columns)


def all_within(column: Sequence[int], low: int, high: int) -> bool:
    """Every value of a non-empty column of ints lies in ``[low, high]``."""
    return min(column) >= low and max(column) <= high


def normalize_name(raw: str) -> str:
    """A tar member name as a clean relative path (`./a//b/` -> `a/b`); refuse escapes.

    The root directory itself normalizes to ``""``.
    """
    if is_normalized(raw):
        return raw
    if "\0" in raw:
        raise HostileLayerError(f"entry name contains NUL: {raw!r}")
    if len(raw.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        raise HostileLayerError(f"entry name longer than {MAX_NAME_BYTES} bytes")
    if raw.startswith("/"):
        raise HostileLayerError(f"absolute entry name: {raw!r}")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise HostileLayerError(f"entry name escapes the layer: {raw!r}")
    return "/".join(parts)


def check_placement(name: str, kind: str) -> None:
    """Refuse a normalized name the layer tree cannot hold: a non-directory replacing
    the layer's root, or a whiteout of "", "." or "..", which would become a directory
    entry of that name (or, unpacked, delete the directory itself)."""
    if name and WHITEOUT_PREFIX not in name:
        return
    if not name and kind != "dir":
        raise HostileLayerError(f"a {kind} entry replaces the layer's root directory")
    base = posixpath.basename(name)
    if base.startswith(WHITEOUT_PREFIX) and base[len(WHITEOUT_PREFIX) :] in ("", ".", ".."):
        raise HostileLayerError(f"whiteout {name!r} names no file")


@dataclass(slots=True)
class TocEntry:
    """One tar entry. ``offset`` is where its data starts in the form that describes it:
    the uncompressed tar stream (index-only) or the compressed blob (eStargz)."""

    name: str
    type: str
    size: int = 0
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    uname: str = ""
    gname: str = ""
    mtime: float = 0.0
    link_name: str = ""
    dev_major: int = 0
    dev_minor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    offset: int = 0
    digest: str = ""

    @property
    def is_whiteout(self) -> bool:
        """An OCI whiteout (`.wh.<name>`): deletes <name> from lower layers."""
        base = posixpath.basename(self.name)
        return base.startswith(WHITEOUT_PREFIX) and base != OPAQUE_MARKER

    @property
    def is_opaque_marker(self) -> bool:
        """An OCI opaque-directory marker: hides everything below its dir in lower layers."""
        return posixpath.basename(self.name) == OPAQUE_MARKER

    @property
    def whiteout_target(self) -> str:
        """The path a whiteout deletes."""
        head, base = posixpath.split(self.name)
        return posixpath.join(head, base[len(WHITEOUT_PREFIX) :])


_EXTENDED_TYPES = frozenset(
    {tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE}
    | {tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK}
)
_CHAIN_BLOCKS: ContextVar[int] = ContextVar("acceld_tar_header_chain", default=0)
"""Extended headers read so far in the chain being parsed (tarfile recurses through a
chain, so a context variable scoped by that recursion counts it)."""


class BoundedTarInfo(tarfile.TarInfo):
    """A tar header whose extended records are capped before tarfile reads them.

    tarfile takes the header class as its documented ``tarinfo`` argument; the hook
    overridden is its per-header dispatch, the one place that sees a record's size
    before the record is read."""

    def _proc_member(self, tarfile: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type not in _EXTENDED_TYPES:
            return super()._proc_member(tarfile)  # type: ignore[misc]
        blocks = _CHAIN_BLOCKS.get() + 1
        if self.size > MAX_EXTENDED_HEADER or blocks > MAX_HEADER_BLOCKS:
            raise HostileLayerError(
                f"extended tar header of {self.size} bytes ({blocks} in a row); "
                f"at most {MAX_EXTENDED_HEADER} bytes and {MAX_HEADER_BLOCKS} headers"
            )
        token = _CHAIN_BLOCKS.set(blocks)
        try:
            return super()._proc_member(tarfile)  # type: ignore[misc]
        finally:
            _CHAIN_BLOCKS.reset(token)


def entry_from_tarinfo(info: tarfile.TarInfo) -> TocEntry:
    """Translate and validate one tar header; raise HostileLayerError on anything unsafe."""
    kind = _TAR_TYPES.get(info.type)
    if kind is None:
        raise HostileLayerError(f"unsupported tar entry type {info.type!r} for {info.name!r}")
    name = normalize_name(info.name)
    check_placement(name, kind)
    if info.size < 0 or info.size > MAX_ENTRY_SIZE:
        raise HostileLayerError(f"absurd size {info.size} for {info.name!r}")
    # GNU base-256 fields and pax records carry any integer; the TOC formats (and the
    # kernel) only hold 32-bit modes, ids and device numbers.
    numbers = (info.mode, info.uid, info.gid, info.devmajor, info.devminor)
    if not all(0 <= number <= MAX_ID for number in numbers):
        raise HostileLayerError(f"mode, owner or device number out of range for {info.name!r}")
    device = kind in ("char", "block")
    if device and (info.devmajor > MAX_DEVICE_MAJOR or info.devminor > MAX_DEVICE_MINOR):
        raise HostileLayerError(f"device number beyond what the kernel holds: {info.name!r}")
    if not -MAX_MTIME < info.mtime < MAX_MTIME:  # also refuses NaN
        raise HostileLayerError(f"absurd mtime {info.mtime!r} for {info.name!r}")
    for owner in (info.uname or "", info.gname or ""):
        if len(owner) > MAX_OWNER_NAME or "\0" in owner:
            raise HostileLayerError(f"invalid owner name for {info.name!r}")
    link = (info.linkname or "") if kind in ("symlink", "hardlink") else ""
    if kind == "hardlink":
        link = normalize_name(link)
        if not link:
            raise HostileLayerError(f"hardlink {info.name!r} has no target")
    elif kind == "symlink" and ("\0" in link or len(link) > MAX_NAME_BYTES):
        raise HostileLayerError(f"invalid symlink target for {info.name!r}")
    xattrs: dict[str, bytes] = {}
    for key, value in (info.pax_headers or {}).items():
        if key.startswith(XATTR_PAX_PREFIX):
            raw = value.encode("utf-8", "surrogateescape")
            if len(raw) > MAX_XATTR_BYTES:
                raise HostileLayerError(f"xattr {key} of {info.name!r} is too large")
            xattrs[key[len(XATTR_PAX_PREFIX) :]] = raw
    return TocEntry(
        name=name,
        type=kind,
        size=info.size if kind == "reg" else 0,
        mode=info.mode & 0o7777,
        uid=info.uid,
        gid=info.gid,
        uname=info.uname or "",
        gname=info.gname or "",
        mtime=float(info.mtime),
        link_name=link,
        dev_major=info.devmajor if device else 0,
        dev_minor=info.devminor if device else 0,
        xattrs=xattrs,
        offset=info.offset_data,
    )


def iter_tar_entries(
    stream: IO[bytes],
) -> Iterator[tuple[TocEntry, tarfile.TarInfo, IO[bytes] | None]]:
    """Walk an uncompressed tar stream once, front to back (no seeking).

    Yields each entry with its tarinfo and, for regular files, a reader for its data
    that must be consumed (or ignored) before the next iteration. Entry ``offset`` is
    the data's offset in the uncompressed tar stream.
    """
    kinds: dict[str, str] = {}
    try:
        with tarfile.open(
            fileobj=stream, mode="r|", format=tarfile.PAX_FORMAT, tarinfo=BoundedTarInfo
        ) as tar:
            for info in tar:
                entry = entry_from_tarinfo(info)
                # As when unpacking: a hard link needs an earlier non-directory to share.
                if entry.type == "hardlink" and kinds.get(entry.link_name, "dir") == "dir":
                    raise HostileLayerError(
                        f"hardlink {entry.name!r} to {entry.link_name!r}, "
                        "which is no earlier non-directory"
                    )
                kinds[entry.name] = entry.type
                reader = tar.extractfile(info) if entry.type == "reg" else None
                yield entry, info, reader
    except tarfile.TarError as exc:
        raise HostileLayerError(f"malformed tar stream: {exc}") from None
