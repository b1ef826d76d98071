"""The prioritized, coalescing, single-flight chunk fetcher behind every lazy read.

Every chunk is fetched once however many readers want it: a reader arriving while its
chunk is queued or on the wire joins that job (and may raise its priority). Which job
goes on the wire next is the request queue's call (fetcher/request_queue.py), getting
the bytes and decoding them the transfer's (fetcher/transfer.py); verified chunks go to
their readers and to the write-behind cache (fetcher/write_behind.py), which writes
them when the link is quiet. A chunk that fails its check is fetched once more, afresh,
then its readers get CorruptChunkError.

The fetcher does not look in the cache for what it is asked to get: the read path
(fetcher/chunk_reader.py) has looked already. Background work (``enqueue``) skips what
the cache has or is about to have.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncGenerator, Iterator, Sequence

from common.logging import get_logger
from fetcher.chunks import (
    BlobSource,
    ChunkSpec,
    CorruptChunkError,
    FetcherClosedError,
    FetchTimeoutError,
    Priority,
)
from fetcher.fetch_stats import FetchStats
from fetcher.memory_budget import MemoryBudget
from fetcher.registry import RegistryClient
from fetcher.request_queue import ChunkJob, RequestQueues
from fetcher.transfer import Transfer
from fetcher.warming import RangeWarmer
from fetcher.write_behind import WriteBehindCache

log = get_logger(__name__)
DEMAND_SPARE_CONNECTIONS = 1
"""Connections per host that prefetch and fill leave free for demand reads (when the
host is allowed more than this)."""


class ChunkFetcher:
    """Fetches and verifies chunks for the read path and for prefetch. Use within one
    event loop."""

    def __init__(
        self,
        client: RegistryClient,
        store: WriteBehindCache,
        queues: RequestQueues,
        memory: MemoryBudget,
        stats: FetchStats,
        *,
        max_connections_per_registry: int = 8,
        coalesce_gap: int = 256 << 10,
        max_request_bytes: int = 16 << 20,
        demand_timeout: float | None = None,
    ) -> None:
        """``queues`` are shared with ``store`` (whose writes wait for a quiet link);
        ``memory`` bounds the bytes warmed ahead (see ``warm``)."""
        if max_connections_per_registry < 1:
            raise ValueError("max_connections_per_registry must be at least 1")
        self._client = client
        self._store = store
        self._queues = queues
        self._max_connections = max_connections_per_registry
        self._gap = coalesce_gap
        self._max_request = max_request_bytes
        self._demand_timeout = demand_timeout
        self.stats = stats
        self._warmer = RangeWarmer(
            client,
            memory,
            stats,
            coalesce_gap=coalesce_gap,
            max_request_bytes=max_request_bytes,
        )
        self._transfer = Transfer(client, self._warmer, stats)
        self._jobs: dict[tuple[str, str], ChunkJob] = {}
        self._seq = itertools.count()
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self._demand_only = 0
        """Callers inside ``demand_only`` now."""

    # -- public API -----------------------------------------------------------------

    async def get(
        self, blob: BlobSource, chunk: ChunkSpec, priority: Priority = Priority.DEMAND
    ) -> bytes:
        """The chunk's verified content, fetched once however many callers ask
        concurrently. Registry errors propagate with their own types."""
        return (await self.get_many(blob, [chunk], priority))[0]

    async def get_many(
        self, blob: BlobSource, chunks: Sequence[ChunkSpec], priority: Priority = Priority.DEMAND
    ) -> list[bytes]:
        """Several chunks of one blob (e.g. every chunk one read(2) misses), queued
        together so that neighbours share a request; the contents in the order asked
        for. The caller has looked in the cache (see the module docstring)."""
        self._check_open()
        jobs = [self._submit(blob, chunk, priority, waiting=True) for chunk in chunks]
        self._pump(blob.ref.api_host)
        await self._wait(blob, jobs, priority)
        return [job.future.result() for job in jobs]

    def enqueue(self, blob: BlobSource, chunks: Sequence[ChunkSpec], priority: Priority) -> None:
        """Fetch ``chunks`` into the cache in the background (call from the event loop),
        skipping those the cache has or is writing.

        All chunks are queued before any request is issued, so neighbours coalesce.
        """
        self._check_open()
        for chunk in chunks:
            job = self._jobs.get((blob.digest, chunk.key))
            if job is not None and job.priority <= priority:
                continue  # already coming, at least as soon
            if not self._store.contains(blob.digest, chunk.key):
                self._submit(blob, chunk, priority, waiting=False)
        self._pump(blob.ref.api_host)

    def warm(self, blob: BlobSource, extents: Sequence[tuple[int, int]]) -> None:
        """Download ``extents`` of the blob now, before the chunks they hold are known
        (call from the event loop): a chunk fetch they cover later takes its bytes from
        memory (fetcher/warming.py). Unlike prefetch this runs inside ``demand_only``."""
        self._check_open()
        self._warmer.warm(blob, extents)

    @contextlib.contextmanager
    def demand_only(self) -> Iterator[None]:
        """Start no new prefetch or fill request while inside (demand reads and warming
        go on).

        Discovery holds this while a layer's index or TOC downloads and is parsed: the
        pull waits for that, and a profile's prefetch of the layers below would
        otherwise take most of the link from the download (many prefetch streams
        against one index download) and, decoding, a core from the parse.
        """
        self._demand_only += 1
        try:
            yield
        finally:
            self._demand_only -= 1
            if not self._demand_only:
                for host in self._queues:
                    self._pump(host)

    async def background_stream(self, blob: BlobSource) -> AsyncGenerator[bytes, None]:
        """The whole blob as one background request (a fill audit's), counted as fill.

        It runs outside the queues, so it yields to a start by itself: it begins only
        once no demand or prefetch request has run for the fill's idle time, and pauses
        (stops reading its socket, which TCP turns into the sender pausing) whenever
        they run again, as queued fill chunks wait. Close it (``contextlib.aclosing``)
        when done early, so its bytes are booked as it ends.
        """
        started = time.monotonic()
        received = 0
        try:
            await self._queues.until_quiet()
            async for data in self._client.iter_blob(blob.ref, blob.digest):
                received += len(data)
                self.stats.stream_received(Priority.BACKGROUND, len(data))
                yield data
                await self._queues.until_quiet()
        finally:
            self.stats.stream_ended(Priority.BACKGROUND, received, time.monotonic() - started)

    async def wait_idle(self) -> None:
        """Until nothing is queued, in flight or waiting to be written to the cache."""
        await self._idle.wait()
        await self._store.wait_idle()

    async def close(self) -> None:
        """Stop fetching; readers still waiting get FetcherClosedError. Verified chunks
        already handed to the write-behind cache are its to keep (close it after)."""
        self._closed = True
        self._queues.cancel_wakes()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for job in list(self._jobs.values()):
            self._finish(job, error=FetcherClosedError("chunk fetcher closed"))
        await self._warmer.close()
        await self._transfer.close()

    # -- queueing -----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise FetcherClosedError("chunk fetcher closed")

    async def _wait(self, blob: BlobSource, jobs: list[ChunkJob], priority: Priority) -> None:
        """Until every job is done, or FetchTimeoutError once a demand read waited too long.

        asyncio.wait neither cancels the shared futures on timeout nor when this caller is
        cancelled: the fetch goes on for the other waiters and for the cache.
        """
        timeout = self._demand_timeout if priority == Priority.DEMAND else None
        _, pending = await asyncio.wait([job.future for job in jobs], timeout=timeout)
        if pending:
            self.stats.demand_timeouts += 1
            assert timeout is not None
            late = next(job for job in jobs if job.future in pending)
            raise FetchTimeoutError(blob.digest, late.chunk.key, timeout)

    def _submit(
        self, blob: BlobSource, chunk: ChunkSpec, priority: Priority, *, waiting: bool
    ) -> ChunkJob:
        """The job for this chunk: the one already queued or in flight, else a new one."""
        job = self._jobs.get((blob.digest, chunk.key))
        if job is not None:
            if waiting:
                self.stats.shared_fetches += 1
            if priority < job.priority:
                job.priority = priority
                if job.queued:
                    self.stats.priority_upgrades += 1
                    self._queues.of(blob.ref.api_host).reprioritize(job)
            return job
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        # Background jobs may fail with no reader awaiting them; that is logged instead.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        job = ChunkJob(blob, chunk, priority, next(self._seq), future)
        self._jobs[(blob.digest, chunk.key)] = job
        self._idle.clear()
        self._queues.of(blob.ref.api_host).add(job)
        return job

    def _pump(self, host: str) -> None:
        """Start requests for the host's most urgent work while connections are free."""
        queue = self._queues.of(host)
        spare = DEMAND_SPARE_CONNECTIONS if self._max_connections > DEMAND_SPARE_CONNECTIONS else 0
        while not self._closed and sum(queue.in_flight.values()) < self._max_connections:
            taken = self._queues.next_batch(
                host,
                self._gap,
                self._max_request,
                free=self._max_connections - sum(queue.in_flight.values()),
                spare_for_demand=spare,
                demand_only=bool(self._demand_only),
                on_quiet=self._pump,
            )
            if taken is None:
                return
            priority, batch = taken
            queue.in_flight[priority] += 1
            self.stats.in_flight[priority] += 1
            task = asyncio.get_running_loop().create_task(self._run(host, batch, priority))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _finish(self, job: ChunkJob, error: BaseException | None = None) -> None:
        """The job is over: fail its readers if it has not served them, and forget it."""
        if self._jobs.get((job.blob.digest, job.chunk.key)) is job:
            del self._jobs[(job.blob.digest, job.chunk.key)]
        if not job.future.done():
            job.future.set_exception(error or FetcherClosedError("chunk fetch abandoned"))
        if not self._jobs:
            self._idle.set()

    # -- fetching -----------------------------------------------------------------

    async def _run(self, host: str, batch: list[ChunkJob], priority: Priority) -> None:
        try:
            await self._fetch(batch, priority)
        finally:
            queue = self._queues.of(host)
            queue.in_flight[priority] -= 1
            self.stats.in_flight[priority] -= 1
            if priority != Priority.BACKGROUND:
                queue.urgent_done_at = asyncio.get_running_loop().time()
            self._pump(host)

    async def _fetch(self, batch: list[ChunkJob], priority: Priority) -> None:
        """One transfer for the batch, then hand each verified chunk to its readers and
        the write-behind cache (in one step: a reader arriving finds it in one or the
        other), and give each failed one its second chance."""
        blob = batch[0].blob
        specs = [job.chunk for job in batch]
        fresh = any(job.refetched for job in batch)
        try:
            outcomes = await self._transfer.fetch(blob, specs, priority, fresh=fresh)
        except Exception as exc:
            for job in batch:
                self._finish(job, error=exc)
            return
        served: list[tuple[ChunkJob, bytes]] = []
        for job, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, bytes):
                chunk = job.chunk
                self.stats.chunk_fetched(
                    blob.digest, chunk.key, priority, chunk.fetch_end - chunk.fetch_start
                )
                if not job.future.done():
                    job.future.set_result(outcome)
                served.append((job, outcome))
            else:
                self._reject(job, outcome)
        self._store.add(
            blob.digest,
            [(job.chunk.key, content) for job, content in served],
            hold=priority != Priority.BACKGROUND,
        )
        for job, _ in served:
            self._finish(job)

    def _reject(self, job: ChunkJob, problem: str) -> None:
        """A chunk failed verification: fetch it once more, afresh, then give up."""
        blob = job.blob
        if not job.refetched:
            job.refetched = True
            self.stats.corrupt_refetches += 1
            log.warning(
                "fetcher.corrupt_chunk_refetch",
                digest=blob.digest,
                chunk=job.chunk.key,
                problem=problem,
            )
            self._transfer.forget_redirect(blob)
            self._queues.of(blob.ref.api_host).add(job)
            return
        self.stats.corrupt_chunks += 1
        log.error("fetcher.corrupt_chunk", digest=blob.digest, chunk=job.chunk.key, problem=problem)
        self._finish(job, error=CorruptChunkError(blob.digest, job.chunk.key, problem))
