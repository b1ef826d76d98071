"""One batch of chunks from the blob to verified bytes: a Range GET, then decoding.

The bytes come from warmed memory when a warmed range covers the batch, else from the
registry. Every chunk is decoded (inflated and digest-checked) off the event loop, on
threads of the transfer's own, and comes out as its verified content or as the reason
its bytes cannot be trusted; what to do about the latter is the fetcher's call.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from common.logging import get_logger
from fetcher.chunks import BlobSource, ChunkSpec, Priority
from fetcher.fetch_stats import FetchStats
from fetcher.registry import RegistryClient
from fetcher.streaming_decode import StreamingDecode
from fetcher.warming import RangeWarmer

log = get_logger(__name__)

Outcome = bytes | str
"""A chunk's verified content, or why its bytes cannot be trusted."""


class Transfer:
    """Downloads and decodes batches of one blob's chunks. Use within one event loop."""

    def __init__(self, client: RegistryClient, warmer: RangeWarmer, stats: FetchStats) -> None:
        self._client = client
        self._warmer = warmer
        self._stats = stats
        # Demand chunks are decoded while they arrive, in order, on a thread of their own.
        self._streamer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="acceld-stream")
        # Other chunks are decoded on threads of their own too, not the loop's default
        # executor: that one also walks containerd's writable layers (du, rmtree), which
        # can wait behind an overlayfs copy-up that itself waits for a FUSE read; a read
        # must never queue behind such a job.
        self._decoder = ThreadPoolExecutor(max_workers=2, thread_name_prefix="acceld-decode")

    async def fetch(
        self, blob: BlobSource, specs: list[ChunkSpec], priority: Priority, *, fresh: bool
    ) -> list[Outcome]:
        """Each chunk's outcome, in order, from one Range GET (or warmed bytes, unless
        ``fresh``: a refetch after a failed check must not be served the same bytes
        again). A failed request raises its registry error, logged and counted here."""
        start = min(spec.fetch_start for spec in specs)
        end = max(spec.fetch_end for spec in specs)
        if blob.size > start:
            end = min(end, blob.size)
        warmed = None if fresh else await self._warmer.take(blob, start, end)
        if warmed is not None:
            data = warmed
        else:
            sink = self._streaming(specs, priority)
            data = await self._download(blob, specs, priority, start, end, sink)
            if sink is not None:
                return [await self._streamed(sink)]
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._decoder, _decode, specs, start, data)

    def forget_redirect(self, blob: BlobSource) -> None:
        """A redirect to a bad CDN copy must not serve the retry too."""
        self._client.forget_redirect(blob.ref, blob.digest)

    async def close(self) -> None:
        """Let the decoding threads finish what they started."""
        await asyncio.to_thread(self._streamer.shutdown, wait=True)
        await asyncio.to_thread(self._decoder.shutdown, wait=True)

    async def _download(
        self,
        blob: BlobSource,
        specs: list[ChunkSpec],
        priority: Priority,
        start: int,
        end: int,
        sink: StreamingDecode | None,
    ) -> bytes:
        """The batch's bytes by one Range GET, with ``sink`` fed as they arrive."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        try:
            data = await self._client.get_range(blob.ref, blob.digest, start, end - start, sink)
        except asyncio.CancelledError:
            if sink is not None:
                sink.abandon()
            raise
        except Exception as exc:
            if sink is not None:
                sink.abandon()
            self._stats.request_errors += 1
            log.warning(
                "fetcher.range_failed",
                digest=blob.digest,
                start=start,
                length=end - start,
                chunks=len(specs),
                priority=priority.name,
                error=str(exc),
            )
            raise
        self._stats.record_request(priority, len(data), loop.time() - began)
        return data

    def _streaming(self, specs: list[ChunkSpec], priority: Priority) -> StreamingDecode | None:
        """A decoder fed while the body arrives, for the one chunk a blocked read waits
        for; prefetch and fill keep decoding afterwards, in parallel threads, so their
        work never queues ahead of a demand chunk's on the streaming thread."""
        make = specs[0].streaming
        if priority != Priority.DEMAND or len(specs) != 1 or make is None:
            return None
        return StreamingDecode(make, self._streamer)

    @staticmethod
    async def _streamed(sink: StreamingDecode) -> Outcome:
        try:
            return await sink.outcome()
        except Exception as exc:
            # As in _decode: anything the decoder raises means the bytes are untrusted.
            return f"{type(exc).__name__}: {exc}"


def _decode(specs: list[ChunkSpec], start: int, data: bytes) -> list[Outcome]:
    """Each chunk's verified content, or why its bytes cannot be trusted (CPU bound:
    runs in a worker thread)."""
    outcomes: list[Outcome] = []
    for spec in specs:
        raw = data[spec.fetch_start - start : spec.fetch_end - start]
        try:
            outcomes.append(spec.decode(raw))
        except Exception as exc:
            # Anything decode raises means these bytes cannot be trusted.
            outcomes.append(f"{type(exc).__name__}: {exc}")
    return outcomes
