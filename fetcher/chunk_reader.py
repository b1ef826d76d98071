"""The one place a read asks for chunk bytes.

A read does not care whether its bytes were on disk, in the cache's memory (spilled,
held or being written) or on the network: it asks here, and is answered from the
write-behind cache when that has the chunk, else by a DEMAND fetch. A miss also sends
the read-ahead the caller names (the chunks that follow in the layer) to the fetcher
at PREFETCH, since the reads of one start walk neighbouring files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from fetcher.chunks import BlobSource, ChunkSpec, Priority
from fetcher.fetch_stats import FetchStats
from fetcher.scheduler import ChunkFetcher
from fetcher.write_behind import WriteBehindCache

ReadAhead = Callable[[ChunkSpec], Sequence[ChunkSpec]]
"""The chunks to prefetch after a miss of the given chunk."""


class ChunkPart(Protocol):
    """``length`` bytes at ``start`` within the decoded ``chunk``."""

    @property
    def chunk(self) -> ChunkSpec: ...

    @property
    def start(self) -> int: ...

    @property
    def length(self) -> int: ...


class ChunkReader:
    """Bytes of chunks, from wherever they are. Use within one event loop."""

    def __init__(self, store: WriteBehindCache, fetcher: ChunkFetcher, stats: FetchStats) -> None:
        self._store = store
        self._fetcher = fetcher
        self._stats = stats

    async def read(
        self, blob: BlobSource, parts: Sequence[ChunkPart], read_ahead: ReadAhead | None = None
    ) -> list[bytes]:
        """The bytes of each part, in order; the chunks none of the cache's places has
        are fetched together (fetch errors propagate with their own types)."""
        found = [
            self._store.read(blob.digest, part.chunk.key, part.start, part.length) for part in parts
        ]
        missing = [i for i, data in enumerate(found) if data is None]
        self._stats.cache_hits += len(parts) - len(missing)
        if missing:
            self._stats.cache_misses += len(missing)
            ahead = read_ahead(parts[missing[-1]].chunk) if read_ahead is not None else ()
            if ahead:
                self._fetcher.enqueue(blob, ahead, Priority.PREFETCH)
            wanted = {parts[i].chunk.key: parts[i].chunk for i in missing}
            fetched = await self._fetcher.get_many(blob, list(wanted.values()), Priority.DEMAND)
            chunks = dict(zip(wanted, fetched, strict=True))
            for i in missing:
                part = parts[i]
                found[i] = chunks[part.chunk.key][part.start : part.start + part.length]
        for part in parts:  # after the fetch, which counts a fetched chunk as unread
            self._stats.chunk_read(blob.digest, part.chunk.key)
        return [data if data is not None else b"" for data in found]
