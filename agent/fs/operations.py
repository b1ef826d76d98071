"""pyfuse3 operations for the node's single read-only mount.

The root directory holds one entry per mounted lazy layer; below it is that layer's
tree. Layer data is immutable (content-addressed), so entries and attributes get long
kernel cache timeouts and opened files keep their page cache: after the first read of a
page, the kernel never asks again. Reads ask one ChunkReader for their bytes, which come
from the cache or are fetched; a fetch that fails or times out becomes EIO, never wrong
bytes.

Every handler is served through `LayerFS._serve`: pyfuse3 answers a request only when
its handler returns or raises FUSEError, so any other exception would leave the reader
blocked in the kernel (D state) forever. `_serve` also records the request in the
in-flight table the watchdog reads, and counts it.
"""

from __future__ import annotations

import errno
import math
import os
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import pyfuse3

from agent import metrics
from agent.fs.in_flight import InFlightRequests
from agent.fs.inode_slots import InodeSlots
from agent.layers.distrust import DistrustedMetadata
from agent.layers.lazy_layer import ChunkSlice, LazyLayer, ReadAheadBudget
from common.gc_pause import gc_paused
from common.logging import get_logger
from fetcher.chunk_reader import ChunkReader
from fetcher.chunks import ChunkFetchError
from fetcher.errors import RegistryError
from formats.header_check import HeaderMismatchError
from formats.layer_tree import LayerTree, Node
from formats.toc import TocEntry

log = get_logger(__name__)
T = TypeVar("T")

IMMUTABLE_TIMEOUT = 86400.0
# After a read misses, the chunks that follow it in the blob are fetched too, in the
# background: a start reads files of one directory one after another, and these sit
# next to each other in the layer, so one round trip per file becomes one per group.
READ_AHEAD = ReadAheadBudget(fetch_bytes=1 << 20, decoded_bytes=4 << 20)
ROOT_TIMEOUT = 1.0
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC | os.O_CREAT


class FsListener(Protocol):
    """Who learns from file-system activity (the startup recorder)."""

    def opened(self, mounted: MountedLayer, entry: TocEntry, pid: int) -> None:
        """A process opened a file of a lazy layer."""

    def read(self, mounted: MountedLayer, entry: TocEntry, offset: int, size: int) -> None:
        """A read reached FUSE (page-cache hits never do)."""


@dataclass
class MountedLayer:
    """A layer placed under the mount root."""

    name: str
    layer: LazyLayer
    tree: LayerTree
    mounted_at: float
    first_byte_seen: bool = False


def _errno_of(exc: BaseException) -> int:
    if isinstance(exc, pyfuse3.FUSEError):
        return exc.errno
    return errno.EIO


class LayerFS(pyfuse3.Operations):
    """Read-only FUSE tree over lazily fetched layers."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        reader: ChunkReader,
        listener: FsListener | None = None,
        requests: InFlightRequests | None = None,
        distrust: DistrustedMetadata | None = None,
        slots: InodeSlots | None = None,
    ) -> None:
        """``slots`` numbers each layer's nodes (by default for a mount no other agent
        takes over)."""
        super().__init__()
        self.reader = reader
        self.distrust = distrust if distrust is not None else DistrustedMetadata()
        self.slots = slots if slots is not None else InodeSlots.fresh()
        self.on_init: Callable[[], None] | None = None
        """Called by ``init`` (`agent.fs.mount` swaps in the real connection there)."""
        self._layers: dict[bytes, MountedLayer] = {}
        self._owner: dict[int, tuple[Node, MountedLayer]] = {}
        self.listener = listener
        self.requests = requests if requests is not None else InFlightRequests()
        self._root_mtime = time.time_ns()

    def init(self) -> None:
        """libfuse calls this while it handles INIT, before it replies."""
        if self.on_init is not None:
            self.on_init()

    # -- layer management ---------------------------------------------------------

    def build_tree(self, name: str, layer: LazyLayer) -> LayerTree:
        """The node table ``add_layer`` needs, numbered in the block of ``name``'s slot.
        Safe on a worker thread, and meant for one: building a large layer's table on
        the event loop would hold up every FUSE request and containerd's calls for the
        other layers of the pull."""
        inodes = self.slots.allocator(name)
        with gc_paused():
            return LayerTree(layer.entries, inodes)

    def add_layer(self, name: str, layer: LazyLayer, tree: LayerTree | None = None) -> MountedLayer:
        """Place ``layer`` at `<mount>/<name>` (with ``tree`` if already built for it);
        idempotent for the same name."""
        key = name.encode()
        existing = self._layers.get(key)
        if existing is not None:
            return existing
        if tree is None:
            tree = self.build_tree(name, layer)
        mounted = MountedLayer(name, layer, tree, time.monotonic())
        for node in tree.nodes.values():
            self._owner[node.inode] = (node, mounted)
        self._layers[key] = mounted
        self._root_mtime = time.time_ns()
        metrics.LAZY_LAYERS_MOUNTED.set(len(self._layers))
        log.info("fs.layer_added", layer=name, kind=layer.kind, files=len(tree.nodes))
        return mounted

    def remove_layer(self, name: str) -> None:
        """Take a layer out of the tree (its snapshot was removed)."""
        mounted = self._layers.pop(name.encode(), None)
        if mounted is None:
            return
        for inode in mounted.tree.nodes:
            self._owner.pop(inode, None)
        self._root_mtime = time.time_ns()
        metrics.LAZY_LAYERS_MOUNTED.set(len(self._layers))

    def layer(self, name: str) -> MountedLayer | None:
        """The mounted layer called ``name``."""
        return self._layers.get(name.encode())

    # -- helpers ----------------------------------------------------------------------

    async def _serve(self, op: str, inode: int | None, call: Awaitable[T]) -> T:
        """Run one handler: listed as in flight while it runs, counted, and answered
        with EIO on an unexpected exception rather than never answered."""
        started = time.perf_counter()
        metrics.FUSE_OPS.labels(op).inc()
        request = self.requests.begin(op, inode, call)
        try:
            return await call
        except pyfuse3.FUSEError as exc:
            metrics.FUSE_ERRORS.labels(op, errno.errorcode.get(exc.errno, "?")).inc()
            raise
        except Exception as exc:
            metrics.FUSE_ERRORS.labels(op, errno.errorcode[errno.EIO]).inc()
            metrics.FUSE_INTERNAL_ERRORS.labels(op).inc()
            log.exception("fs.handler_failed", op=op, inode=inode, error=repr(exc))
            raise pyfuse3.FUSEError(errno.EIO) from None
        except BaseException as exc:  # cancelled at shutdown: pyfuse3 must see it
            metrics.FUSE_ERRORS.labels(op, errno.errorcode.get(_errno_of(exc), "?")).inc()
            raise
        finally:
            self.requests.end(request)
            metrics.FUSE_SECONDS.labels(op).observe(time.perf_counter() - started)

    def _node(self, inode: int) -> tuple[Node, MountedLayer]:
        found = self._owner.get(inode)
        if found is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return found

    def _root_attrs(self) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = pyfuse3.ROOT_INODE
        attrs.st_mode = stat.S_IFDIR | 0o755
        attrs.st_nlink = 2 + len(self._layers)
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = self._root_mtime
        attrs.entry_timeout = attrs.attr_timeout = ROOT_TIMEOUT
        return attrs

    @staticmethod
    def _attrs(node: Node) -> pyfuse3.EntryAttributes:
        entry = node.entry
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = node.inode
        attrs.st_mode = node.mode
        attrs.st_nlink = node.nlink + (1 if node.is_dir else 0)
        attrs.st_uid = entry.uid
        attrs.st_gid = entry.gid
        if entry.type in ("char", "block"):
            attrs.st_rdev = os.makedev(entry.dev_major, entry.dev_minor)
        size = entry.size if entry.type in ("reg", "hardlink") else 0
        if entry.type == "symlink":
            size = len(entry.link_name.encode("utf-8", "surrogateescape"))
        attrs.st_size = size
        attrs.st_blksize = 4096
        attrs.st_blocks = math.ceil(size / 512)
        mtime = int(entry.mtime * 1_000_000_000)
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = mtime
        attrs.entry_timeout = attrs.attr_timeout = IMMUTABLE_TIMEOUT
        return attrs

    # -- pyfuse3 operations ---------------------------------------------------------

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: Any = None
    ) -> pyfuse3.EntryAttributes:
        return await self._serve("lookup", parent_inode, self._lookup(parent_inode, name))

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return await self._serve("getattr", inode, self._getattr(inode))

    async def readlink(self, inode: int, ctx: Any = None) -> bytes:
        return await self._serve("readlink", inode, self._readlink(inode))

    async def opendir(self, inode: int, ctx: Any = None) -> int:
        return await self._serve("opendir", inode, self._opendir(inode))

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        await self._serve("readdir", fh, self._readdir(fh, start_id, token))

    async def open(self, inode: int, flags: int, ctx: Any = None) -> pyfuse3.FileInfo:
        return await self._serve("open", inode, self._open(inode, flags, ctx))

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self._serve("read", fh, self._read(fh, off, size))

    async def getxattr(self, inode: int, name: bytes, ctx: Any = None) -> bytes:
        return await self._serve("getxattr", inode, self._getxattr(inode, name))

    async def listxattr(self, inode: int, ctx: Any = None) -> list[bytes]:
        return await self._serve("listxattr", inode, self._listxattr(inode))

    async def statfs(self, ctx: Any = None) -> pyfuse3.StatvfsData:
        return await self._serve("statfs", None, self._statfs())

    # -- their answers ----------------------------------------------------------------

    async def _lookup(self, parent_inode: int, name: bytes) -> pyfuse3.EntryAttributes:
        if parent_inode == pyfuse3.ROOT_INODE:
            mounted = self._layers.get(name)
            if mounted is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attrs(mounted.tree.root)
        node, _ = self._node(parent_inode)
        child = (node.children or {}).get(name)
        if child is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(child)

    async def _getattr(self, inode: int) -> pyfuse3.EntryAttributes:
        if inode == pyfuse3.ROOT_INODE:
            return self._root_attrs()
        return self._attrs(self._node(inode)[0])

    async def _readlink(self, inode: int) -> bytes:
        node, _ = self._node(inode)
        if node.entry.type != "symlink":
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.entry.link_name.encode("utf-8", "surrogateescape")

    async def _opendir(self, inode: int) -> int:
        if inode != pyfuse3.ROOT_INODE and not self._node(inode)[0].is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def _readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if fh == pyfuse3.ROOT_INODE:
            items = [(name, m.tree.root) for name, m in sorted(self._layers.items())]
        else:
            items = self._node(fh)[0].listing()
        for index in range(start_id, len(items)):
            name, child = items[index]
            if not pyfuse3.readdir_reply(token, name, self._attrs(child), index + 1):
                break

    async def _open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if flags & _WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)
        node, mounted = self._node(inode)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if self.listener is not None and ctx is not None:
            self.listener.opened(mounted, node.entry, ctx.pid)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def _read(self, inode: int, offset: int, size: int) -> bytes:
        node, mounted = self._node(inode)
        layer = mounted.layer
        refused = self.distrust.reason(layer.metadata_digest)
        if refused is not None:
            raise pyfuse3.FUSEError(errno.EIO)
        try:
            header = layer.header_plan(node.entry, offset, size)
            plan = header + layer.read_plan(node.entry, offset, size)
            parts = await self._gather(mounted, node.entry, offset, plan)
            if header:
                layer.check_header(node.entry, b"".join(parts[: len(header)]))
        except HeaderMismatchError as exc:
            self.distrust.mark(layer.metadata_digest, layer.kind, mounted.name, str(exc))
            raise pyfuse3.FUSEError(errno.EIO) from None
        if self.listener is not None:
            self.listener.read(mounted, node.entry, offset, size)
        if not mounted.first_byte_seen:
            mounted.first_byte_seen = True
            metrics.FIRST_BYTE_SECONDS.observe(time.monotonic() - mounted.mounted_at)
        return b"".join(parts[len(header) :])

    async def _gather(
        self, mounted: MountedLayer, entry: TocEntry, offset: int, plan: list[ChunkSlice]
    ) -> list[bytes]:
        """The bytes of every slice of ``plan`` (EIO if a fetch fails)."""
        layer = mounted.layer
        try:
            return await self.reader.read(
                layer.blob, plan, lambda missed: layer.chunks_after(missed, READ_AHEAD)
            )
        except (ChunkFetchError, RegistryError, ValueError, OSError) as exc:
            log.error(
                "fs.read_failed",
                layer=mounted.name,
                path=entry.name,
                offset=offset,
                error=str(exc),
            )
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def _getxattr(self, inode: int, name: bytes) -> bytes:
        if inode == pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        node, _ = self._node(inode)
        value = node.xattrs.get(name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    async def _listxattr(self, inode: int) -> list[bytes]:
        if inode == pyfuse3.ROOT_INODE:
            return []
        return list(self._node(inode)[0].xattrs)

    async def _statfs(self) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_namemax = 255
        return data
