"""The snapshotter itself: containerd's overlayfs semantics plus remote layers.

All metadata work and the directory moves that go with it run in one dedicated thread,
one job per request: that serialises writers the way containerd's bolt store does, and
keeps disk I/O (renames, du, SQLite fsyncs) off the event loop the agent shares with
its FUSE file system. Deleting trees, which can take long, runs in other threads: a
removed snapshot's id is never reused, so nothing can race with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import weakref
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from agent.snapshotter.errors import AlreadyExistsError, InvalidArgumentError, UnavailableError
from agent.snapshotter.filters import parse_filters
from agent.snapshotter.metastore import Info, Kind, Layer, Metastore, Record, validate_labels
from agent.snapshotter.overlay import (
    Mount,
    SnapshotDirs,
    disk_usage,
    mounts,
    overlay_supports_index_option,
)
from agent.snapshotter.remote import REMOTE_REF_LABEL, NoRemoteLayers, RemoteLayers
from common.logging import get_logger

log = get_logger(__name__)

T = TypeVar("T")

RESTORE_CONCURRENCY = 8
"""Remote layers restored at once after a restart."""
RETRY_UNSERVED_S = 30.0
"""How often layers not restored after a restart are tried again in the background."""


class Snapshotter:
    """containerd snapshots rooted at ``root`` (``metadata.db`` and ``snapshots/``)."""

    def __init__(self, root: Path, remote: RemoteLayers | None = None) -> None:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.root = root
        self.dirs = SnapshotDirs(root)
        self.remote: RemoteLayers = remote or NoRemoteLayers()
        self._store = Metastore(root / "metadata.db")
        self._index_off = overlay_supports_index_option()
        self._db_thread = ThreadPoolExecutor(1, thread_name_prefix="snapshotter-db")
        # One remote preparation per chain ID at a time; entries vanish once unused.
        self._ref_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        self._unserved: dict[int, Record] = {}
        """Remote snapshots the hook could not serve again after a restart (say, their
        registry was unreachable then), by id: retried in the background and whenever a
        mount needs one."""
        self._restoring = asyncio.Lock()
        self._retrying: asyncio.Task[None] | None = None

    async def close(self) -> None:
        """Finish pending metadata work and close the database."""
        if self._retrying is not None:
            self._retrying.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retrying
        await self._in_db_thread(self._store.close)
        self._db_thread.shutdown()

    async def prepare(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        """A writable snapshot on ``parent``, unless the hook serves the layer remotely.

        When it does, the layer is committed under its chain ID and this raises
        ALREADY_EXISTS: containerd's signal to look the chain ID up and skip the layer.
        """
        validate_labels(labels)
        ref = labels.get(REMOTE_REF_LABEL)
        if ref:
            await self._commit_remote_if_served(key, parent, labels, ref)
        await self._serve_parents(parent)
        return await self._in_db_thread(self._create, Kind.ACTIVE, key, parent, labels)

    async def view(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        """A read-only snapshot of ``parent``."""
        await self._serve_parents(parent)
        return await self._in_db_thread(self._create, Kind.VIEW, key, parent, labels)

    async def mounts(self, key: str) -> list[Mount]:
        """The mounts of an active snapshot or view, again."""
        snapshot = await self._in_db_thread(self._store.snapshot, key)
        if await self._serve_again(snapshot.parents):
            snapshot = await self._in_db_thread(self._store.snapshot, key)  # paths moved
        return mounts(snapshot, self.dirs, self._index_off)

    async def commit(self, name: str, key: str, labels: dict[str, str]) -> None:
        """Make the active snapshot ``key`` the committed, immutable ``name``."""
        await self._in_db_thread(self._commit, name, key, labels)

    async def remove(self, key: str) -> None:
        """Forget ``key`` and delete its tree (or release its remote layer).

        Once the metadata is gone the removal has happened: like containerd, failing
        to reclaim the space is logged, not reported (Cleanup retries local trees).
        """
        removed = await self._in_db_thread(self._transaction, self._store.remove, key)
        log.info("snapshotter.removed", key=key, id=removed.id, remote=removed.remote)
        self._unserved.pop(removed.id, None)
        if removed.remote_path is None:
            await asyncio.to_thread(
                shutil.rmtree, self.dirs.snapshot_dir(removed.id), ignore_errors=True
            )
            return
        try:
            await self.remote.release_layer(removed.info.labels, removed.remote_path)
        except Exception:
            log.exception("snapshotter.remote_release_failed", key=key)

    async def stat(self, key: str) -> Info:
        """The info of any snapshot by key or name."""
        record = await self._in_db_thread(self._store.record, key)
        return record.info

    async def update(self, name: str, labels: dict[str, str], paths: list[str]) -> Info:
        """Change labels: all of them (no paths, or ``labels``) or ``labels.<key>`` ones.

        Everything else about a snapshot is immutable.
        """
        change = _label_change(labels, paths, name)
        record = await self._in_db_thread(
            self._transaction, self._store.update_labels, name, change
        )
        return record.info

    async def walk(self, filters: list[str]) -> AsyncIterator[Info]:
        """Snapshots matching any of ``filters`` (all without filters)."""
        match = parse_filters(filters)
        for record in await self._in_db_thread(self._store.records):
            if match.matches(record.info):
                yield record.info

    async def usage(self, key: str) -> tuple[int, int]:
        """(bytes, inodes): measured now while active, recorded at commit otherwise."""
        record = await self._in_db_thread(self._store.record, key)
        if record.remote_path is not None:
            return self.remote.layer_usage(record.remote_path)
        if record.info.kind == Kind.ACTIVE:
            return await asyncio.to_thread(disk_usage, self.dirs.fs_dir(record.id))
        return record.size, record.inodes

    async def cleanup(self) -> None:
        """Delete directories no snapshot owns: leftovers of crashes and removals."""
        orphans = await self._in_db_thread(lambda: self.dirs.orphans(self._store.ids()))
        for orphan in orphans:
            log.info("snapshotter.cleanup", path=str(orphan))
            await asyncio.to_thread(shutil.rmtree, orphan, ignore_errors=True)

    async def restore_remote(self) -> None:
        """After a restart: have the hook serve every committed remote snapshot again.

        A layer the hook cannot serve keeps its record: containerd still references it
        and decides what to do with its images. It is retried in the background, and
        whenever a snapshot on it is prepared or mounted (refused with UNAVAILABLE while
        it still fails).
        """
        records = await self._in_db_thread(self._store.records)
        # Side by side: containerd cannot reach the snapshotter until this is done, and
        # a layer whose registry is down takes its retries' worth of seconds to fail.
        turns = asyncio.Semaphore(RESTORE_CONCURRENCY)

        async def restore(record: Record) -> None:
            async with turns:
                await self._restore(record)

        await asyncio.gather(*(restore(r) for r in records if r.remote_path is not None))
        if self._unserved:
            self._retrying = asyncio.get_running_loop().create_task(self._retry_unserved())

    async def _retry_unserved(self) -> None:
        """Try the layers the restart left unserved again until all are back: running
        containers read them through nodes the kernel kept, with no Prepare to ask."""
        while self._unserved:
            await asyncio.sleep(RETRY_UNSERVED_S)
            async with self._restoring:
                for record in list(self._unserved.values()):
                    if record.id in self._unserved:  # not removed meanwhile
                        await self._restore(record)

    async def _restore(self, record: Record) -> bool:
        """Ask the hook to serve ``record``'s layer again; False (and kept for a later
        try) when it cannot."""
        try:
            path = await self.remote.restore_layer(record.info.labels)
        except Exception:
            log.exception("snapshotter.remote_restore_failed", name=record.info.name)
            path = None
        else:
            if path is None:
                log.error("snapshotter.remote_unavailable", name=record.info.name)
        if path is None:
            self._unserved[record.id] = record
            return False
        self._unserved.pop(record.id, None)
        if path != record.remote_path:
            await self._in_db_thread(
                self._transaction, self._store.set_remote_path, record.id, path
            )
        log.info("snapshotter.remote_restored", name=record.info.name, path=str(path))
        return True

    async def _serve_parents(self, parent: str) -> None:
        """Before a snapshot is stacked on ``parent``: its remote layers are served."""
        if self._unserved:
            await self._serve_again(await self._in_db_thread(self._store.layers_of, parent))

    async def _serve_again(self, layers: tuple[Layer, ...]) -> bool:
        """Retry the layers among ``layers`` that were not served after the restart;
        True if any was. Handing out their mounts would fail in containerd with a bare
        "no such file or directory", so one that still fails is refused by name."""
        if not any(layer.id in self._unserved for layer in layers):
            return False
        async with self._restoring:  # one hook call per layer, however many ask
            for layer in layers:
                record = self._unserved.get(layer.id)
                if record is not None and not await self._restore(record):
                    raise UnavailableError(
                        f"layer {record.info.name} is not served: the agent could not serve"
                        " it again after it restarted (its registry unreachable, or the"
                        " image gone; see snapshotter.remote_unavailable in its log). It is"
                        " retried each time a container needs it."
                    )
        return True

    async def _commit_remote_if_served(
        self, key: str, parent: str, labels: dict[str, str], ref: str
    ) -> None:
        lock = self._ref_locks.get(ref)
        if lock is None:
            lock = self._ref_locks[ref] = asyncio.Lock()
        async with lock:
            existing = await self._in_db_thread(self._store.get, ref)
            if existing is not None and existing.info.kind == Kind.COMMITTED:
                raise AlreadyExistsError(f"target snapshot {ref!r} already exists")
            if existing is not None:
                log.warning("snapshotter.remote_fallback", key=key, ref=ref, reason="name taken")
                return
            # Refuse what a normal Prepare would refuse before asking the hook.
            if await self._in_db_thread(self._store.get, key) is not None:
                raise AlreadyExistsError(f"snapshot {key} already exists")
            await self._in_db_thread(self._store.committed_parent, parent)
            try:
                path = await self.remote.prepare_layer(key, parent or None, dict(labels))
            except Exception as exc:
                log.warning(
                    "snapshotter.remote_fallback",
                    key=key,
                    ref=ref,
                    reason="hook failed",
                    error=repr(exc),
                )
                return
            if path is None:
                log.info("snapshotter.remote_fallback", key=key, ref=ref, reason="not served")
                return
            try:
                await self._in_db_thread(
                    self._transaction, self._store.commit_remote, ref, parent, labels, path
                )
            except BaseException:
                await self.remote.release_layer(labels, path)
                raise
            log.info("snapshotter.remote_committed", ref=ref, parent=parent, path=str(path))
            raise AlreadyExistsError(f"target snapshot {ref!r} already exists")

    def _create(self, kind: Kind, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        temp = self.dirs.new_directory(kind)
        try:
            with self._store.transaction():
                snapshot = self._store.create(kind, key, parent, labels)
                self.dirs.install(temp, snapshot)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        log.info("snapshotter.created", key=key, parent=parent, kind=kind.name, id=snapshot.id)
        return mounts(snapshot, self.dirs, self._index_off)

    def _commit(self, name: str, key: str, labels: dict[str, str]) -> None:
        # Measured before the transaction, like containerd; nothing else can touch the
        # snapshot meanwhile since every metadata job runs in this one thread.
        active = self._store.get(key)
        usage = (0, 0)
        if active is not None and active.info.kind == Kind.ACTIVE:
            usage = disk_usage(self.dirs.fs_dir(active.id))
        with self._store.transaction():
            committed = self._store.commit_active(key, name, labels, usage)
        self.dirs.drop_work_dir(committed.id)
        log.info("snapshotter.committed", key=key, name=name, id=committed.id, size=usage[0])

    def _transaction(self, operation: Callable[..., T], *args: object) -> T:
        with self._store.transaction():
            return operation(*args)

    async def _in_db_thread(self, function: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._db_thread, function, *args)


def _label_change(
    labels: dict[str, str], paths: list[str], name: str
) -> Callable[[dict[str, str]], dict[str, str]]:
    """How an Update's mask turns the current labels into the new ones."""
    for path in paths:
        if path != "labels" and not path.startswith("labels."):
            raise InvalidArgumentError(f"cannot update {path!r} field on snapshot {name!r}")

    def change(current: dict[str, str]) -> dict[str, str]:
        if not paths:
            return dict(labels)
        for path in paths:
            if path == "labels":
                current = dict(labels)
            else:
                label = path.removeprefix("labels.")
                current[label] = labels.get(label, "")
        return current

    return change
