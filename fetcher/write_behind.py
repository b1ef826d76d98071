"""Verified chunks on their way into the ChunkCache, readable while they are.

Every cache write ends in an fsync, and a burst of them as a container starts keeps
the filesystem's journal committing while containerd and runc wait on their own
commits. So chunks a start asked for (demand and prefetch) are held in memory until
the link has been quiet as long as background fill waits for, then written; fill's
chunks, and any the memory budget has no room for, are written at once. Either way
the writing happens on threads of its own: an fsync must never sit between a blocked
read and its bytes, nor queue ahead of the decoding readers wait for.

A chunk held or being written is answered from memory by ``read`` and counts as
present for ``contains``, so neither a read nor a prefetch fetches it again meanwhile.
Everything here runs on the event loop except the writes themselves; the read path
takes no lock beyond the ChunkCache's leaf ``_lock``.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from common.logging import get_logger
from fetcher.chunk_cache import ChunkCache
from fetcher.fetch_stats import FetchStats
from fetcher.memory_budget import MemoryBudget

log = get_logger(__name__)

Chunks = list[tuple[str, bytes]]
"""(chunk key, verified content) of one blob."""


class Link(Protocol):
    """When fetching has paused long enough for writes not to get in a start's way."""

    async def until_quiet(self) -> None:
        """Return once it is quiet."""


class WriteBehindCache:
    """The ChunkCache with the chunks not written yet in front. Use within one loop."""

    def __init__(
        self, cache: ChunkCache, link: Link, memory: MemoryBudget, stats: FetchStats
    ) -> None:
        self._cache = cache
        self._link = link
        self._memory = memory
        self._stats = stats
        self._pending: dict[tuple[str, str], bytes] = {}
        """Chunks held or being written, by (blob digest, key)."""
        self._held: list[tuple[str, Chunks, int]] = []
        """Batches waiting for a quiet link, with what each charged the budget."""
        self._writing_held: asyncio.Task[None] | None = None
        self._writes: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._writer = ThreadPoolExecutor(max_workers=2, thread_name_prefix="acceld-cache-write")

    # -- lookups (event loop) ---------------------------------------------------------

    def read(self, blob_digest: str, key: str, offset: int, length: int) -> bytes | None:
        """Up to ``length`` bytes at ``offset`` of the chunk, from disk or from memory,
        or None: it has to be fetched."""
        data = self._cache.read(blob_digest, key, offset, length)
        if data is None:
            pending = self._pending.get((blob_digest, key))
            if pending is not None:
                data = pending[offset : offset + length]
        return data

    def contains(self, blob_digest: str, key: str) -> bool:
        """Whether reading the chunk needs no fetch."""
        return (blob_digest, key) in self._pending or self._cache.contains(blob_digest, key)

    def pending(self, blob_digest: str, key: str) -> bytes | None:
        """The chunk's content if it is held or being written (not on disk yet)."""
        return self._pending.get((blob_digest, key))

    # -- storing (event loop) ---------------------------------------------------------

    def add(self, blob_digest: str, chunks: Chunks, *, hold: bool) -> None:
        """Take verified chunks for the cache: ``hold`` them for a quiet link if the
        memory budget has room, else write them now."""
        if not chunks:
            return
        for key, content in chunks:
            self._pending[(blob_digest, key)] = content
        self._idle.clear()
        size = sum(len(content) for _, content in chunks)
        if hold and self._memory.try_charge(size):
            self._held.append((blob_digest, chunks, size))
            if self._writing_held is None or self._writing_held.done():
                self._writing_held = asyncio.get_running_loop().create_task(
                    self._write_held_when_quiet()
                )
            return
        task = asyncio.get_running_loop().create_task(self._write(blob_digest, chunks))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def wait_idle(self) -> None:
        """Until every chunk taken is on disk (or failed to get there)."""
        await self._idle.wait()

    async def close(self) -> None:
        """Write what is held (verified already: worth keeping); writes not started yet
        of chunks that were not held are dropped, those started finish, so no chunk is
        left half-way into the cache."""
        tasks = [*self._writes, *([self._writing_held] if self._writing_held else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._write_held()
        await asyncio.to_thread(self._writer.shutdown, wait=True, cancel_futures=True)

    async def _write_held_when_quiet(self) -> None:
        while self._held:
            await self._link.until_quiet()
            await self._write_held()

    async def _write_held(self) -> None:
        """One batch at a time, so that what a cancelled writer left is still held."""
        while self._held:
            blob_digest, chunks, size = self._held.pop(0)
            self._memory.release(size)
            await self._write(blob_digest, chunks)

    async def _write(self, blob_digest: str, chunks: Chunks) -> None:
        """Cache chunks on the writer threads; they are no longer pending then."""
        try:
            loop = asyncio.get_running_loop()
            errors = await loop.run_in_executor(self._writer, self._store, blob_digest, chunks)
        finally:
            for key, _ in chunks:
                self._pending.pop((blob_digest, key), None)
            if not self._pending:
                self._idle.set()
        for key, error in errors:
            self._stats.cache_write_errors += 1
            log.warning("fetcher.cache_write_failed", digest=blob_digest, chunk=key, error=error)

    def _store(self, blob_digest: str, chunks: Chunks) -> list[tuple[str, str]]:
        """Cache verified chunks (disk bound, with an fsync each: a writer thread);
        returns (chunk key, error) of those that could not be stored. Readers already
        have their bytes; only the cache misses out."""
        errors = []
        for key, content in chunks:
            try:
                self._cache.put(blob_digest, key, content)
            except OSError as exc:
                errors.append((key, str(exc)))
        return errors
