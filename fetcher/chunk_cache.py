"""The node's on-disk cache of verified chunks, one file per chunk.

Layout under ``root``::

    sha256/<hex>/<chunk key>   verified chunk content (only ever created by link(2))
    sha256/.evicted-<uuid>/    a layer being deleted
    tmp/                       writes in progress

Everything the FUSE layer reads comes from here, so a file under a layer directory must
be complete and verified: chunks are written to ``tmp/``, fsynced and hard-linked into
place. A crash can lose a chunk that was just linked (the directory is not fsynced: the
chunk is simply fetched again), but never exposes a torn one. ``tmp/`` and evicted
layers are emptied on open.

Locks, and why no rename crosses a directory. The cache usually shares a file system
with containerd's writable layers. overlayfs copies a directory up while holding that
file system's rename lock and, meanwhile, asks acceld through FUSE for the lower
directory's attributes and xattrs. A cross-directory rename(2) on that file system waits
for the same lock, so any FUSE answer that waits on such a rename, even through a lock,
never comes: the node deadlocks. Hence:

* No cross-directory rename: chunks are published with link(2) (which locks only the
  destination directory), layers are evicted by a rename within their own parent.
* ``_lock`` guards the in-memory accounting only. It is a leaf: nothing is called
  while it is held that takes another lock or enters the kernel's file-system code.
  The read path (FUSE handlers, on the event loop) takes only this lock.
* The MemoryBudget's lock is a leaf of its own: the spill charges and releases it with
  ``_lock`` not held.
* ``_publish_lock`` orders the cache's own directory changes (publishing a chunk,
  evicting a layer or chunks) so that accounting and files agree. It may be held across
  link/unlink/same-directory rename, which wait on no FUSE answer; ``_lock`` may be
  taken inside it, never the reverse. Readers never take it.
* The read path writes nothing to the file system: a layer's use time is persisted to
  its directory's mtime by the next ``put`` (a writer thread), not by the reader.

Eviction is whole layers, least recently used first, because per-chunk bookkeeping on
disk would cost a metadata write per read. The cap is a promise to the node's operator,
so it holds even when every cached layer belongs to a snapshot: pinned layers (those
of present snapshots) only go after every unpinned one, and a single layer larger than
the cap (a 10 GiB file read through) gives up its own oldest chunks. Evicted chunks are
simply fetched again. A full filesystem is different: there only unpinned layers make
room, and a chunk that still does not fit is not cached rather than taking data from
layers in use: the last such chunks are kept in memory instead (the spill, charged to
the agent's MemoryBudget, dropping its least recently used chunks when that is spent),
so that the several reads a chunk usually serves do not each fetch it again.

Pins live in memory: after a restart the agent re-pins the layers of its snapshots;
opening the cache never evicts, only a later ``put`` does. One process owns a cache
root at a time. All methods are thread-safe, since the fetcher stores chunks from
worker threads.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from common.digest import validate_digest
from common.logging import get_logger
from fetcher.chunks import validate_chunk_key
from fetcher.memory_budget import MemoryBudget

log = get_logger(__name__)

BLOCK = 4096
"""Chunks are charged in filesystem blocks: many tiny chunks use more disk than their sum."""
TOUCH_INTERVAL = 60.0
"""How stale a layer directory's mtime may get before a use refreshes it (restart LRU)."""
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
_GRAVE_PREFIX = ".evicted-"


class CacheFullError(OSError):
    """The cache's filesystem has no room for a chunk even after evicting what it could."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)


def charged_size(length: int) -> int:
    """Bytes a chunk of ``length`` counts against the cap (whole blocks)."""
    return -(-length // BLOCK) * BLOCK


@dataclass
class CacheStats:
    """A snapshot of the cache's accounting and counters (for metrics and `accelctl`)."""

    bytes: int
    max_bytes: int
    layers: int
    chunks: int
    pinned_layers: int
    hits: int
    misses: int
    evicted_layers: int
    evicted_bytes: int


@dataclass
class _Layer:
    chunks: dict[str, int] = field(default_factory=dict)
    bytes: int = 0
    last_used: float = 0.0
    touched: float = 0.0


class ChunkCache:
    """Verified chunks on disk under a byte cap, with per-layer pins and LRU eviction."""

    def __init__(self, root: Path, max_bytes: int, memory: MemoryBudget | None = None) -> None:
        """``memory`` is the budget the spill shares with the agent's other buffers; a
        cache used alone (tools, tests) gets one of its own."""
        if max_bytes <= 0:
            raise ValueError(f"cache cap must be positive, not {max_bytes}")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.tmp_dir = self.root / "tmp"
        self._lock = threading.Lock()
        self._publish_lock = threading.Lock()
        self._touch_due: set[str] = set()
        self._layers: dict[str, _Layer] = {}
        self._dirs: dict[str, Path] = {}
        self._pins: dict[str, int] = {}
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._evicted_layers = 0
        self._evicted_bytes = 0
        self._spill: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self.memory = memory if memory is not None else MemoryBudget()
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.root.is_symlink() or not self.root.is_dir():
            raise NotADirectoryError(f"cache root {self.root} is not a directory")
        os.chmod(self.root, 0o700)  # an existing root keeps no wider mode: chunks are images
        self._clean_tmp()
        self._scan()

    # -- opening ------------------------------------------------------------------

    def _clean_tmp(self) -> None:
        """Remove writes a crash interrupted. Nothing is followed out of the cache: a
        ``tmp`` that is not a real directory (a symlink, say) is itself removed, never
        what it points at."""
        if self.tmp_dir.is_symlink() or (self.tmp_dir.exists() and not self.tmp_dir.is_dir()):
            log.warning("chunk_cache.foreign_entry", path=str(self.tmp_dir))
            self.tmp_dir.unlink()
        if self.tmp_dir.exists():
            for entry in os.scandir(self.tmp_dir):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
        self.tmp_dir.mkdir(mode=0o700, exist_ok=True)

    def _scan(self) -> None:
        """Rebuild the accounting from the files present (the cache survives restarts)."""
        for algorithm_dir in os.scandir(self.root):
            if algorithm_dir.name == "tmp" or not algorithm_dir.is_dir(follow_symlinks=False):
                continue
            for layer_dir in os.scandir(algorithm_dir.path):
                if layer_dir.name.startswith(_GRAVE_PREFIX) and layer_dir.is_dir(
                    follow_symlinks=False
                ):
                    shutil.rmtree(layer_dir.path, ignore_errors=True)  # eviction interrupted
                    continue
                if not layer_dir.is_dir(follow_symlinks=False):
                    log.warning("chunk_cache.foreign_entry", path=layer_dir.path)
                    continue
                digest = f"{algorithm_dir.name}:{layer_dir.name}"
                try:
                    validate_digest(digest)
                except ValueError:
                    log.warning("chunk_cache.foreign_entry", path=layer_dir.path)
                    continue
                self._scan_layer(digest, Path(layer_dir.path))

    def _scan_layer(self, digest: str, directory: Path) -> None:
        layer = _Layer()
        for entry in os.scandir(directory):
            if entry.name.startswith(".") and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)  # a temporary file from an older layout or by hand
                continue
            try:
                validate_chunk_key(entry.name)
            except ValueError:
                log.warning("chunk_cache.foreign_entry", path=entry.path)
                continue
            if entry.is_file(follow_symlinks=False):
                size = charged_size(entry.stat(follow_symlinks=False).st_size)
                layer.chunks[entry.name] = size
                layer.bytes += size
        layer.last_used = layer.touched = directory.lstat().st_mtime
        self._layers[digest] = layer
        self._bytes += layer.bytes

    # -- lookups ------------------------------------------------------------------

    def _layer_dir(self, blob_digest: str) -> Path:
        """The layer's directory (remembered: every read asks, and building it is not free)."""
        directory = self._dirs.get(blob_digest)
        if directory is None:
            algorithm, hexpart = validate_digest(blob_digest).split(":", 1)
            directory = self._dirs[blob_digest] = self.root / algorithm / hexpart
        return directory

    def contains(self, blob_digest: str, key: str) -> bool:
        """Whether the chunk is on disk: the cheap question readahead and fill ask for
        thousands of chunks at a time (it neither validates the key nor marks a use)."""
        with self._lock:
            layer = self._layers.get(blob_digest)
            return layer is not None and key in layer.chunks

    def holds(self, blob_digest: str) -> bool:
        """Whether any chunk of the blob is on disk: a layer this node has read before,
        whose startup chunks need no warming (see ChunkFetcher.warm)."""
        with self._lock:
            layer = self._layers.get(blob_digest)
            return layer is not None and bool(layer.chunks)

    def _used(self, blob_digest: str, layer: _Layer) -> None:
        """Mark a use (caller holds ``_lock``); now and then it is due to be persisted to
        the directory's mtime, which the next ``put`` does (see the module docstring)."""
        now = time.time()
        layer.last_used = now
        if now - layer.touched > TOUCH_INTERVAL:
            layer.touched = now
            self._touch_due.add(blob_digest)

    def _persist_use_times(self) -> None:
        """Write due use times to layer directories' mtimes (writer threads only)."""
        with self._lock:
            due, self._touch_due = self._touch_due, set()
        for digest in due:
            with contextlib.suppress(FileNotFoundError):
                os.utime(self._layer_dir(digest))

    def path(self, blob_digest: str, key: str) -> Path | None:
        """The cached chunk's file, or None when it is not cached."""
        validate_chunk_key(key)
        with self._lock:
            layer = self._layers.get(blob_digest)
            if layer is None or key not in layer.chunks:
                return None
            self._used(blob_digest, layer)
        return self._layer_dir(blob_digest) / key

    def _forget(self, blob_digest: str, key: str) -> None:
        """Drop a chunk whose file vanished (deleted by hand, or evicted meanwhile)."""
        with self._lock:
            layer = self._layers.get(blob_digest)
            if layer is not None and key in layer.chunks:
                size = layer.chunks.pop(key)
                layer.bytes -= size
                self._bytes -= size

    def read(self, blob_digest: str, key: str, offset: int, length: int) -> bytes | None:
        """Up to ``length`` bytes at ``offset`` of a cached chunk, or None on a miss."""
        if offset < 0 or length < 0:
            raise ValueError(f"invalid read offset={offset} length={length}")
        return self._read(blob_digest, key, offset, length)

    def load(self, blob_digest: str, key: str) -> bytes | None:
        """A cached chunk's whole content, or None on a miss."""
        return self._read(blob_digest, key, 0, None)

    def _read(self, blob_digest: str, key: str, offset: int, length: int | None) -> bytes | None:
        path = self.path(blob_digest, key)
        data: bytes | None = None
        if path is not None:
            data = self._read_file(blob_digest, key, path, offset, length)
        else:
            spilled = self._spilled(blob_digest, key)
            if spilled is not None:
                data = spilled[offset:] if length is None else spilled[offset : offset + length]
        self._count(data is not None)
        return data

    def _read_file(
        self, blob_digest: str, key: str, path: Path, offset: int, length: int | None
    ) -> bytes | None:
        """A chunk file's bytes; None (and forgotten) if it vanished or is not a file
        the cache wrote (a symlink is never followed out of the cache)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ELOOP):
                raise
            if exc.errno == errno.ELOOP:
                log.warning("chunk_cache.foreign_entry", path=str(path))
            self._forget(blob_digest, key)
            return None
        try:
            if length is None:
                length = os.fstat(fd).st_size
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def _spilled(self, blob_digest: str, key: str) -> bytes | None:
        with self._lock:
            data = self._spill.get((blob_digest, key))
            if data is not None:
                self._spill.move_to_end((blob_digest, key))
            return data

    def _keep_in_memory(self, blob_digest: str, key: str, data: bytes) -> None:
        """Hold a chunk the disk would not take, dropping the least recently used ones
        while the memory budget has no room for it (the budget is charged with ``_lock``
        not held: both are leaves)."""
        if len(data) > self.memory.max_bytes:
            return
        with self._lock:
            if (blob_digest, key) in self._spill:
                return
        while not self.memory.try_charge(len(data)):
            with self._lock:
                if not self._spill:
                    return
                _, dropped = self._spill.popitem(last=False)
            self.memory.release(len(dropped))
        with self._lock:
            duplicate = (blob_digest, key) in self._spill
            if not duplicate:
                self._spill[(blob_digest, key)] = data
        if duplicate:  # another writer thread spilled the same chunk meanwhile
            self.memory.release(len(data))

    def _count(self, hit: bool) -> None:
        with self._lock:
            if hit:
                self._hits += 1
            else:
                self._misses += 1

    # -- storing ------------------------------------------------------------------

    def put(self, blob_digest: str, key: str, data: bytes) -> Path:
        """Store a verified chunk atomically and return its file.

        The chunk's charge is reserved before anything is written, so that puts running
        in parallel threads cannot each find room under the cap and together exceed it.
        A full filesystem evicts unpinned layers and tries once more, then raises
        CacheFullError with nothing of the chunk left on disk (it is kept in memory).
        Storing a chunk that is already cached is a no-op.
        """
        validate_chunk_key(key)
        final = self._layer_dir(blob_digest) / key
        charge = charged_size(len(data))
        with self._lock:
            layer = self._layers.setdefault(blob_digest, _Layer())
            self._used(blob_digest, layer)
            if key in layer.chunks:
                return final
            self._bytes += charge
        stored = False
        try:
            self._persist_use_times()
            self._evict_until(self.max_bytes, keep=blob_digest, pinned_too=True)
            try:
                tmp = self._write_tmp_making_room(data, charge, blob_digest)
            except CacheFullError:
                self._keep_in_memory(blob_digest, key, data)
                raise
            try:
                stored = self._publish(blob_digest, key, tmp, charge)
            except OSError as exc:
                if exc.errno in _DISK_FULL:
                    self._keep_in_memory(blob_digest, key, data)
                    raise CacheFullError(f"no room to store {blob_digest} chunk {key}") from exc
                raise
            finally:
                tmp.unlink(missing_ok=True)
        finally:
            if not stored:
                with self._lock:
                    self._bytes -= charge  # failed, or another thread stored it first
        return final

    def _publish(self, blob_digest: str, key: str, tmp: Path, charge: int) -> bool:
        """Link a written chunk into its layer directory and account for it; False when
        another thread had stored it first. link(2), unlike a rename out of ``tmp/``,
        never waits for the file system's rename lock (see the module docstring)."""
        final = self._layer_dir(blob_digest) / key
        with self._publish_lock:
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(tmp, final)
            except FileExistsError:
                # The same verified content, stored by another thread; anything but a
                # regular file there is not ours to serve or to replace.
                if not stat.S_ISREG(os.lstat(final).st_mode):
                    raise
            with self._lock:
                layer = self._layers.setdefault(blob_digest, _Layer())
                if key in layer.chunks:
                    return False
                layer.chunks[key] = charge
                layer.bytes += charge
                return True

    def _write_tmp_making_room(self, data: bytes, charge: int, keep: str) -> Path:
        """`_write_tmp`, evicting unpinned layers once if the filesystem is full."""
        try:
            return self._write_tmp(data)
        except CacheFullError:
            if not self._room_after_eviction(charge, keep=keep):
                raise
            with self._lock:
                target = self._bytes - charge
            self._evict_until(target, keep=keep)
            return self._write_tmp(data)

    def _room_after_eviction(self, charge: int, keep: str) -> bool:
        """Whether evicting every unpinned layer could make room for ``charge`` bytes, so
        a chunk that cannot fit anyway does not wipe the cache on its way to failing."""
        fs = os.statvfs(self.root)
        with self._lock:
            evictable = sum(
                layer.bytes
                for digest, layer in self._layers.items()
                if digest not in self._pins and digest != keep
            )
        return evictable > 0 and fs.f_bavail * fs.f_frsize + evictable >= charge

    def _write_tmp(self, data: bytes) -> Path:
        """Write and fsync ``data`` to a new file in tmp/ (removed again on any failure)."""
        tmp = self.tmp_dir / uuid.uuid4().hex
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in _DISK_FULL:
                raise CacheFullError(
                    f"cache filesystem full writing {len(data)} bytes under {self.root}"
                ) from exc
            raise
        return tmp

    # -- pins and eviction -----------------------------------------------------------

    def pin(self, blob_digest: str) -> None:
        """Keep a layer from eviction (counted: each pin needs its own unpin)."""
        validate_digest(blob_digest)
        with self._lock:
            self._pins[blob_digest] = self._pins.get(blob_digest, 0) + 1

    def unpin(self, blob_digest: str) -> None:
        """Release one pin; the layer becomes evictable when none are left."""
        with self._lock:
            count = self._pins.get(blob_digest, 0)
            if count == 0:
                raise ValueError(f"layer {blob_digest} is not pinned")
            if count == 1:
                del self._pins[blob_digest]
            else:
                self._pins[blob_digest] = count - 1

    def evict(self) -> int:
        """Evict least recently used layers (unpinned first) until under the cap; bytes
        freed."""
        return self._evict_until(self.max_bytes, pinned_too=True)

    def _evict_until(self, target: int, keep: str | None = None, pinned_too: bool = False) -> int:
        """Evict LRU unpinned layers (never ``keep``) until at most ``target`` bytes;
        with ``pinned_too``, then LRU pinned layers, then ``keep``'s oldest chunks.

        A layer directory is renamed to a grave beside it (same parent: no rename lock)
        and deleted once no lock is held; dropped chunks are unlinked."""
        graves: list[tuple[str, Path, int]] = []
        with self._publish_lock:
            with self._lock:
                if self._bytes <= target:
                    return 0
                doomed = self._choose_layers(target, keep, pinned_too)
                chunk_keys: list[str] = []
                if pinned_too and keep is not None and self._bytes > target:
                    chunk_keys = self._drop_oldest_chunks(keep, target)
                freed = sum(size for _, size in doomed)
                self._evicted_layers += len(doomed)
                self._evicted_bytes += freed
            for digest, size in doomed:
                directory = self._layer_dir(digest)
                grave = directory.with_name(f"{_GRAVE_PREFIX}{uuid.uuid4().hex}")
                try:
                    os.rename(directory, grave)
                except FileNotFoundError:
                    continue
                graves.append((digest, grave, size))
            if keep is not None and chunk_keys:
                directory = self._layer_dir(keep)
                for key in chunk_keys:
                    (directory / key).unlink(missing_ok=True)
        for digest, grave, size in graves:
            shutil.rmtree(grave, ignore_errors=True)
            log.info("chunk_cache.evicted", digest=digest, bytes=size)
        if chunk_keys:
            log.info("chunk_cache.evicted_chunks", digest=keep, chunks=len(chunk_keys))
        return freed

    def _choose_layers(
        self, target: int, keep: str | None, pinned_too: bool
    ) -> list[tuple[str, int]]:
        """Forget LRU layers (unpinned first) until at most ``target`` bytes (caller
        holds both locks); their (digest, bytes)."""
        candidates = sorted(  # unpinned (False) before pinned, each oldest first
            (digest in self._pins, layer.last_used, digest)
            for digest, layer in self._layers.items()
            if digest != keep and layer.bytes > 0 and (pinned_too or digest not in self._pins)
        )
        doomed = []
        for _, _, digest in candidates:
            if self._bytes <= target:
                break
            layer = self._layers.pop(digest)
            self._bytes -= layer.bytes
            doomed.append((digest, layer.bytes))
        return doomed

    def _drop_oldest_chunks(self, blob_digest: str, target: int) -> list[str]:
        """Forget the layer's first-stored chunks until at most ``target`` bytes (caller
        holds both locks, and unlinks the returned keys' files before releasing
        ``_publish_lock``, so a put of the same chunk cannot be lost in between).
        First stored stands in for least recently used: a layer bigger than the cap is
        being read through, and per-chunk use times would cost work on every read."""
        layer = self._layers.get(blob_digest)
        if layer is None:
            return []
        dropped = []
        for key in list(layer.chunks):
            if self._bytes <= target:
                break
            size = layer.chunks.pop(key)
            layer.bytes -= size
            self._bytes -= size
            self._evicted_bytes += size
            dropped.append(key)
        return dropped

    # -- accounting ---------------------------------------------------------------

    def size(self) -> int:
        """Bytes charged for every cached chunk (and for chunks being stored right now)."""
        with self._lock:
            return self._bytes

    def stats(self) -> CacheStats:
        """Current accounting and counters."""
        with self._lock:
            return CacheStats(
                bytes=self._bytes,
                max_bytes=self.max_bytes,
                layers=sum(1 for layer in self._layers.values() if layer.chunks),
                chunks=sum(len(layer.chunks) for layer in self._layers.values()),
                pinned_layers=len(self._pins),
                hits=self._hits,
                misses=self._misses,
                evicted_layers=self._evicted_layers,
                evicted_bytes=self._evicted_bytes,
            )
