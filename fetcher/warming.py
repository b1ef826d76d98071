"""Raw blob ranges downloaded before the chunks they hold are known.

While a layer's metadata is parsed, the profile already says which members a start
reads (formats/estargz_extents.py). Downloading them then is what keeps the link busy
during the parse (a big TOC's validation otherwise leaves it idle), and it costs the
parse no decoding: the bytes wait in memory (fetcher/warm_ranges.py) for the chunk
fetches they cover, which inflate and check them like any others.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from common.logging import get_logger
from fetcher.chunks import BlobSource, Priority
from fetcher.fetch_stats import FetchStats
from fetcher.memory_budget import MemoryBudget
from fetcher.registry import RegistryClient
from fetcher.warm_ranges import WarmRanges

log = get_logger(__name__)

WARM_TTL_S = 60.0
"""How long bytes warmed ahead of their chunks wait for them (a pull may be given up on)."""
WARM_MAX_BYTES = 256 << 20
"""Most bytes one layer's plan asks to warm: a few startups' worth of profiled files."""
WARM_STREAMS = 4
"""Warming requests on the wire at once: the rest of the connections stay free for the
TOC downloads and demand reads of the same pull."""


class RangeWarmer:
    """Downloads extents of blobs into memory ahead of their chunks. Use within one loop."""

    def __init__(
        self,
        client: RegistryClient,
        memory: MemoryBudget,
        stats: FetchStats,
        *,
        coalesce_gap: int,
        max_request_bytes: int,
    ) -> None:
        self._client = client
        self._stats = stats
        self._gap = coalesce_gap
        self._max_request = max_request_bytes
        self._ranges = WarmRanges(WARM_TTL_S, memory)
        self._tasks: set[asyncio.Task[None]] = set()

    def warm(self, blob: BlobSource, extents: Sequence[tuple[int, int]]) -> None:
        """Start downloading ``extents`` of the blob (near ones as one request), as far
        as the memory budget allows: the rest is fetched when its chunks are asked for."""
        merged: list[list[int]] = []
        for start, end in sorted(extents):
            end = min(end, blob.size)
            if start >= end or self._ranges.covers(blob.digest, start, end):
                continue  # a later look at the same plan (or another pull) warmed it
            near = bool(merged) and start - merged[-1][1] <= self._gap
            if near and end - merged[-1][0] <= self._max_request:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        streams = asyncio.Semaphore(WARM_STREAMS)
        for start, end in merged:
            future = self._ranges.add(blob.digest, start, end)
            if future is None:
                log.info("fetcher.warm_skipped", digest=blob.digest, start=start, end=end)
                break
            task = asyncio.get_running_loop().create_task(
                self._warm_range(blob, start, end, future, streams)
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def take(self, blob: BlobSource, start: int, end: int) -> bytes | None:
        """Warmed bytes ``[start, end)`` of the blob, or None: fetch them."""
        return await self._ranges.take(blob.digest, start, end)

    async def _warm_range(
        self,
        blob: BlobSource,
        start: int,
        end: int,
        future: asyncio.Future[bytes],
        streams: asyncio.Semaphore,
    ) -> None:
        async with streams:
            began = asyncio.get_running_loop().time()
            try:
                data = await self._client.get_range(blob.ref, blob.digest, start, end - start)
            except asyncio.CancelledError:
                future.cancel()
                raise
            except Exception as exc:
                self._stats.request_errors += 1
                log.warning("fetcher.warm_failed", digest=blob.digest, start=start, error=str(exc))
                if not future.done():
                    future.set_exception(exc)
                return
            self._stats.record_request(
                Priority.PREFETCH, len(data), asyncio.get_running_loop().time() - began
            )
            if not future.done():
                future.set_result(data)

    async def close(self) -> None:
        """Stop warming and let go of what is held."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._ranges.clear()
