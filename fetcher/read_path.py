"""The chunk read path's parts, wired together in one place.

The agent (agent/daemon.py), the FUSE benchmark and the tests all need the same graph:
one cache with its write-behind in front, one fetcher whose queues tell the
write-behind when the link is quiet, one reader in front of both, and one memory budget
and one set of counters shared by them. Each part gets its collaborators as
constructor arguments here; nothing is re-pointed afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

from fetcher.chunk_cache import ChunkCache
from fetcher.chunk_reader import ChunkReader
from fetcher.fetch_stats import FetchStats
from fetcher.registry import RegistryClient
from fetcher.request_queue import RequestQueues
from fetcher.scheduler import ChunkFetcher
from fetcher.write_behind import WriteBehindCache


@dataclass(frozen=True)
class ReadPath:
    """The parts; ``reader`` is what reads ask, ``fetcher`` what prefetch and fill ask."""

    cache: ChunkCache
    store: WriteBehindCache
    fetcher: ChunkFetcher
    reader: ChunkReader
    stats: FetchStats

    @classmethod
    def build(
        cls,
        client: RegistryClient,
        cache: ChunkCache,
        *,
        fill_idle_s: float = 0.5,
        max_connections_per_registry: int = 8,
        coalesce_gap: int = 256 << 10,
        max_request_bytes: int = 16 << 20,
        demand_timeout: float | None = None,
    ) -> ReadPath:
        """The graph over ``cache``, whose memory budget (the spill's) the write-behind
        and warming share. Call from the event loop."""
        memory = cache.memory
        stats = FetchStats()
        queues = RequestQueues(fill_idle_s)
        store = WriteBehindCache(cache, queues, memory, stats)
        fetcher = ChunkFetcher(
            client,
            store,
            queues,
            memory,
            stats,
            max_connections_per_registry=max_connections_per_registry,
            coalesce_gap=coalesce_gap,
            max_request_bytes=max_request_bytes,
            demand_timeout=demand_timeout,
        )
        return cls(cache, store, fetcher, ChunkReader(store, fetcher, stats), stats)

    async def close(self) -> None:
        """Stop fetching, then write what the write-behind still holds."""
        await self.fetcher.close()
        await self.store.close()
