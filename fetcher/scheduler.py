"""The prioritized, coalescing, single-flight chunk fetcher behind every lazy read.

A process blocked in read(2) waits on the network, so its chunk (DEMAND) goes ahead of
profile prefetch, which goes ahead of background fill. Each registry host gets its own
queue and a bounded number of concurrent Range GETs; a demand read therefore never
waits behind more than the requests already on the wire. Background fill starts only
once no demand or prefetch request has run for a moment, in small requests, so a
starting container finds the link, a connection and the CPUs free. Every chunk is
fetched once however many readers want it, decoded (inflated and digest-checked) off
the event loop and handed to its readers, then stored in the ChunkCache by writer
threads of its own (an fsync per chunk must not sit between a blocked read and its
bytes).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from common.logging import get_logger
from fetcher.chunk_cache import ChunkCache
from fetcher.chunks import (
    BlobSource,
    ChunkSpec,
    CorruptChunkError,
    FetcherClosedError,
    FetchTimeoutError,
    Priority,
)
from fetcher.coalesce import RangeQueue
from fetcher.registry import RegistryClient
from fetcher.streaming_decode import StreamingDecode
from fetcher.transport import Target
from fetcher.warm_ranges import WarmRanges

log = get_logger(__name__)

BACKGROUND_REQUEST_BYTES = 2 << 20
"""Fill requests stay small: one already on the wire when a read arrives delays it
by at most this much transfer."""

WARM_TTL_S = 60.0
"""How long bytes warmed ahead of their chunks wait for them (a pull may be given up on)."""
WARM_MAX_BYTES = 256 << 20
"""Memory for warmed bytes: a few startups' worth of profiled files."""
WARM_STREAMS = 4
"""Warming requests on the wire at once: the rest of the connections stay free for the
TOC downloads and demand reads of the same pull."""

STORE_HOLD_BYTES = 128 << 20
"""Verified chunks held in memory, not yet written, while a startup's fetches go on.
Every cache write ends in an fsync, and a burst of them as a container starts keeps
the filesystem's journal committing while containerd and runc wait on their own commits.
Past this much, chunks are written at once."""

_HEAP_SLACK = 256
"""Stale heap entries tolerated beyond twice the live ones before a rebuild."""

RequestObserver = Callable[[Priority, int, float], None]
"""Called after each Range GET with (priority, bytes received, seconds taken)."""


def _per_priority() -> dict[Priority, int]:
    return dict.fromkeys(Priority, 0)


@dataclass
class FetchStats:
    """Counters for metrics; ``in_flight`` is a gauge of Range GETs on the wire."""

    requests: dict[Priority, int] = field(default_factory=_per_priority)
    bytes_fetched: dict[Priority, int] = field(default_factory=_per_priority)
    chunks_fetched: dict[Priority, int] = field(default_factory=_per_priority)
    in_flight: dict[Priority, int] = field(default_factory=_per_priority)
    cache_hits: int = 0
    shared_fetches: int = 0
    priority_upgrades: int = 0
    corrupt_refetches: int = 0
    corrupt_chunks: int = 0
    request_errors: int = 0
    demand_timeouts: int = 0
    cache_write_errors: int = 0
    _observers: list[RequestObserver] = field(default_factory=list, repr=False)

    def add_observer(self, observer: RequestObserver) -> None:
        """Call ``observer`` for every completed Range GET (e.g. a latency histogram)."""
        self._observers.append(observer)

    def record_request(self, priority: Priority, nbytes: int, seconds: float) -> None:
        """Count one completed Range GET and tell the observers."""
        self.requests[priority] += 1
        self.bytes_fetched[priority] += nbytes
        for observer in self._observers:
            try:
                observer(priority, nbytes, seconds)
            except Exception:
                log.exception("fetcher.observer_failed", observer=repr(observer))


@dataclass(eq=False)
class _Job:
    """One chunk being fetched, shared by every reader that wants it."""

    blob: BlobSource
    chunk: ChunkSpec
    priority: Priority
    seq: int
    future: asyncio.Future[bytes]
    queued: bool = False
    refetched: bool = False

    @property
    def fetch_start(self) -> int:
        return self.chunk.fetch_start

    @property
    def fetch_end(self) -> int:
        return self.chunk.fetch_end


class _HostQueue:
    """Queued jobs of one registry host: a priority heap plus per-blob range order."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, int, _Job]] = []
        self._entries = itertools.count()
        self._blobs: dict[str, RangeQueue[_Job]] = {}
        self.in_flight = _per_priority()
        self.urgent_done_at = float("-inf")
        """Loop time the last demand or prefetch request ended (fill waits for quiet)."""
        self.wake: asyncio.TimerHandle | None = None

    def add(self, job: _Job) -> None:
        job.queued = True
        ranges = self._blobs.get(job.blob.digest)
        if ranges is None:
            ranges = self._blobs[job.blob.digest] = RangeQueue()
        ranges.add(job)
        self.reprioritize(job)

    def reprioritize(self, job: _Job) -> None:
        """Make the heap see the job's (new) priority; the old entry goes stale.

        Stale entries keep their job, and a finished job its chunk's bytes, until they
        reach the top; behind a fill job that waits for a quiet link they never do. So
        once they outnumber the live entries the heap is rebuilt without them, which
        keeps memory bounded by what is queued, not by what was ever upgraded.
        """
        heapq.heappush(self._heap, (job.priority, job.seq, next(self._entries), job))
        if len(self._heap) > 2 * self._queued() + _HEAP_SLACK:
            self._heap = [
                item for item in self._heap if item[3].queued and item[3].priority == item[0]
            ]
            heapq.heapify(self._heap)

    def peek(self) -> _Job | None:
        """The most urgent, oldest queued job, dropping stale heap entries on the way."""
        while self._heap:
            priority, _, _, job = self._heap[0]
            if job.queued and job.priority == priority:
                return job
            heapq.heappop(self._heap)
        return None

    def take(self, lead: _Job, gap: int, max_bytes: int) -> list[_Job]:
        """Dequeue ``lead`` and the neighbours one request should fetch with it."""
        ranges = self._blobs[lead.blob.digest]
        run = ranges.take_run(lead, gap, max_bytes)
        if not ranges:
            del self._blobs[lead.blob.digest]
        for job in run:
            job.queued = False
        return run

    def _queued(self) -> int:
        """Jobs waiting in this host's queue (live heap entries)."""
        return sum(len(ranges) for ranges in self._blobs.values())

    @property
    def urgent_in_flight(self) -> int:
        return self.in_flight[Priority.DEMAND] + self.in_flight[Priority.PREFETCH]

    def quiet_left(self, now: float, idle: float) -> float | None:
        """Seconds until no demand or prefetch request will have run for ``idle`` (zero
        or less: quiet already); None while one is on the wire (its end asks again)."""
        if self.urgent_in_flight:
            return None
        return idle - (now - self.urgent_done_at)


class ChunkFetcher:
    """Fetches, verifies and caches chunks for the FUSE layer. Use within one event loop."""

    def __init__(
        self,
        client: RegistryClient,
        cache: ChunkCache,
        *,
        max_connections_per_registry: int = 8,
        coalesce_gap: int = 256 << 10,
        max_request_bytes: int = 16 << 20,
        fill_idle_s: float = 0.5,
        decode_in_thread: bool = True,
        demand_timeout: float | None = None,
    ) -> None:
        if max_connections_per_registry < 1:
            raise ValueError("max_connections_per_registry must be at least 1")
        if fill_idle_s < 0:
            raise ValueError(f"fill_idle_s must not be negative, not {fill_idle_s}")
        self._client = client
        self._cache = cache
        self._max_connections = max_connections_per_registry
        self._gap = coalesce_gap
        self._max_request = max_request_bytes
        self._fill_idle = fill_idle_s
        self._decode_in_thread = decode_in_thread
        # Cache writes fsync each chunk: on threads of their own, so a burst of them
        # never queues ahead of the decoding that readers are waiting for.
        self._writer = ThreadPoolExecutor(max_workers=2, thread_name_prefix="acceld-cache-write")
        # Demand chunks are decoded while they arrive, in order, on a thread of their own.
        self._streamer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="acceld-stream")
        # Other chunks are decoded on threads of their own too, not the loop's default
        # executor: that one also walks containerd's writable layers (du, rmtree), which
        # can wait behind an overlayfs copy-up that itself waits for a FUSE read; a read
        # must never queue behind such a job.
        self._decoder = ThreadPoolExecutor(max_workers=2, thread_name_prefix="acceld-decode")
        self._demand_timeout = demand_timeout
        self.stats = FetchStats()
        self._hosts: dict[str, _HostQueue] = {}
        self._jobs: dict[tuple[str, str], _Job] = {}
        self._seq = itertools.count()
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self._metadata = 0
        """Layer indexes or TOCs downloading or parsing now (see metadata_first)."""
        self._warm = WarmRanges(WARM_TTL_S)
        self._held: list[tuple[BlobSource, list[tuple[_Job, bytes]]]] = []
        self._held_bytes = 0
        self._writing_held: asyncio.Task[None] | None = None

    # -- public API -----------------------------------------------------------------

    async def get(
        self, blob: BlobSource, chunk: ChunkSpec, priority: Priority = Priority.DEMAND
    ) -> bytes:
        """The chunk's verified content, from the cache or fetched (once, however many
        callers ask concurrently). Registry errors propagate with their own types."""
        return (await self.get_many(blob, [chunk], priority))[0]

    async def get_many(
        self, blob: BlobSource, chunks: Sequence[ChunkSpec], priority: Priority = Priority.DEMAND
    ) -> list[bytes]:
        """Several chunks of one blob (e.g. every chunk one read(2) spans), queued together
        so that neighbours share a request; the contents in the order asked for."""
        self._check_open()
        found: list[bytes | None] = [self._cache.load(blob.digest, c.key) for c in chunks]
        self.stats.cache_hits += sum(1 for data in found if data is not None)
        jobs = {
            i: self._submit(blob, chunk, priority, waiting=True)
            for i, (chunk, data) in enumerate(zip(chunks, found, strict=True))
            if data is None
        }
        if jobs:
            self._pump(blob.ref.api_host)
            await self._wait(blob, list(jobs.values()), priority)
        return [
            data if data is not None else jobs[i].future.result() for i, data in enumerate(found)
        ]

    async def _wait(self, blob: BlobSource, jobs: list[_Job], priority: Priority) -> None:
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

    def enqueue(self, blob: BlobSource, chunks: Sequence[ChunkSpec], priority: Priority) -> None:
        """Fetch ``chunks`` into the cache in the background (call from the event loop).

        All chunks are queued before any request is issued, so neighbours coalesce.
        """
        self._check_open()
        for chunk in chunks:
            job = self._jobs.get((blob.digest, chunk.key))
            if job is not None and job.priority <= priority:
                continue  # already coming, at least as soon
            if not self._cache.contains(blob.digest, chunk.key):
                self._submit(blob, chunk, priority, waiting=False)
        self._pump(blob.ref.api_host)

    def warm(self, blob: BlobSource, extents: Sequence[tuple[int, int]]) -> None:
        """Download ``extents`` of the blob now, before the chunks they hold are known
        (call from the event loop): a chunk fetch they cover later takes its bytes from
        memory. Unlike prefetch this runs while layer metadata is parsed: it is what
        keeps the link busy then (a big TOC's validation otherwise leaves it idle), and it
        costs the parse no decoding."""
        self._check_open()
        merged: list[list[int]] = []
        for start, end in sorted(extents):
            end = min(end, blob.size)
            if start >= end or self._warm.covers(blob.digest, start, end):
                continue  # a later look at the same plan (or another pull) warmed it
            near = bool(merged) and start - merged[-1][1] <= self._gap
            if near and end - merged[-1][0] <= self._max_request:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        streams = asyncio.Semaphore(WARM_STREAMS)
        for start, end in merged:
            if self._warm.bytes + end - start > WARM_MAX_BYTES:
                break
            future = self._warm.add(blob.digest, start, end)
            task = asyncio.get_running_loop().create_task(
                self._warm_range(blob, start, end, future, streams)
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

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
                self.stats.request_errors += 1
                log.warning("fetcher.warm_failed", digest=blob.digest, start=start, error=str(exc))
                if not future.done():
                    future.set_exception(exc)
                return
            self.stats.record_request(
                Priority.PREFETCH, len(data), asyncio.get_running_loop().time() - began
            )
            if not future.done():
                future.set_result(data)

    @contextlib.contextmanager
    def metadata_first(self) -> Iterator[None]:
        """While a layer's index or TOC downloads and is parsed (an index: decoded, after
        which a profile's prefetch may find its files in it), start no new prefetch or
        fill request.

        The pull waits for that download and parse. A profile's prefetch of the layers
        below would otherwise take most of the link from the download (many prefetch
        streams against one index download) and, decoding, a core from the parse.
        """
        self._metadata += 1
        try:
            yield
        finally:
            self._metadata -= 1
            if not self._metadata:
                for host in list(self._hosts):
                    self._pump(host)

    def held(self, blob: BlobSource, chunk: ChunkSpec) -> bytes | None:
        """The chunk's verified content if it is fetched but not cached yet (see
        STORE_HOLD_BYTES): reading it needs no fetch, and is no miss to read ahead of."""
        job = self._jobs.get((blob.digest, chunk.key))
        if job is None or not job.future.done() or job.future.cancelled():
            return None
        return None if job.future.exception() is not None else job.future.result()

    def has(self, blob: BlobSource, chunk: ChunkSpec) -> bool:
        """Whether the chunk is in the cache (reading it then needs no network)."""
        return self._cache.contains(blob.digest, chunk.key)

    async def wait_idle(self) -> None:
        """Until nothing is queued, in flight or held for the cache (see STORE_HOLD_BYTES)."""
        await self._idle.wait()

    async def close(self) -> None:
        """Stop fetching; readers still waiting get FetcherClosedError."""
        self._closed = True
        for queue in self._hosts.values():
            if queue.wake is not None:
                queue.wake.cancel()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._write_held()  # verified already: worth keeping
        for job in list(self._jobs.values()):
            self._finish(job, error=FetcherClosedError("chunk fetcher closed"))
        self._warm.clear()
        # Writes already started finish, so no chunk is left half-way into the cache.
        await asyncio.to_thread(self._writer.shutdown, wait=True, cancel_futures=True)
        await asyncio.to_thread(self._streamer.shutdown, wait=True)
        await asyncio.to_thread(self._decoder.shutdown, wait=True)

    # -- queueing -----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise FetcherClosedError("chunk fetcher closed")

    def _submit(
        self, blob: BlobSource, chunk: ChunkSpec, priority: Priority, *, waiting: bool
    ) -> _Job:
        """The job for this chunk: the one already queued or in flight, else a new one."""
        job = self._jobs.get((blob.digest, chunk.key))
        if job is not None:
            if waiting:
                self.stats.shared_fetches += 1
            if priority < job.priority:
                job.priority = priority
                if job.queued:
                    self.stats.priority_upgrades += 1
                    self._host(blob).reprioritize(job)
            return job
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        # Background jobs may fail with no reader awaiting them; that is logged instead.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        job = _Job(blob, chunk, priority, next(self._seq), future)
        self._jobs[(blob.digest, chunk.key)] = job
        self._idle.clear()
        self._host(blob).add(job)
        return job

    def _host(self, blob: BlobSource) -> _HostQueue:
        queue = self._hosts.get(blob.ref.api_host)
        if queue is None:
            queue = self._hosts[blob.ref.api_host] = _HostQueue()
        return queue

    def _pump(self, host: str) -> None:
        """Start requests for the host's most urgent work while connections are free."""
        queue = self._hosts.get(host)
        if queue is None:
            return
        while not self._closed and sum(queue.in_flight.values()) < self._max_connections:
            lead = queue.peek()
            if lead is None or (lead.priority != Priority.DEMAND and self._metadata):
                return
            limit = self._max_request
            if lead.priority == Priority.BACKGROUND:
                if not self._fill_may_start(host, queue):
                    return
                limit = min(limit, BACKGROUND_REQUEST_BYTES)
            batch = queue.take(lead, self._gap, limit)
            priority = lead.priority
            queue.in_flight[priority] += 1
            self.stats.in_flight[priority] += 1
            task = asyncio.get_running_loop().create_task(self._run(host, batch, priority))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _fill_may_start(self, host: str, queue: _HostQueue) -> bool:
        """Background fill runs only on an otherwise quiet link: it shares the link and
        the CPUs with a starting container, whose reads come in bursts a few ms apart,
        so it waits until no demand or prefetch request has run for ``fill_idle_s``."""
        loop = asyncio.get_running_loop()
        left = queue.quiet_left(loop.time(), self._fill_idle)
        if left is None:
            return False  # the urgent request's end pumps again
        if left <= 0:
            return True
        if queue.wake is None or queue.wake.cancelled():
            queue.wake = loop.call_later(left, self._wake, host)
        return False

    def _wake(self, host: str) -> None:
        queue = self._hosts.get(host)
        if queue is not None:
            queue.wake = None
        self._pump(host)

    def _resolve(self, job: _Job, content: bytes) -> None:
        if not job.future.done():
            job.future.set_result(content)

    def _finish(self, job: _Job, error: BaseException | None = None) -> None:
        """The job is over: fail its readers if it has not served them, and forget it."""
        if self._jobs.get((job.blob.digest, job.chunk.key)) is job:
            del self._jobs[(job.blob.digest, job.chunk.key)]
        if not job.future.done():
            job.future.set_exception(error or FetcherClosedError("chunk fetch abandoned"))
        if not self._jobs:
            self._idle.set()

    # -- fetching -----------------------------------------------------------------

    async def _run(self, host: str, batch: list[_Job], priority: Priority) -> None:
        try:
            await self._fetch(batch, priority)
        finally:
            queue = self._hosts[host]
            queue.in_flight[priority] -= 1
            self.stats.in_flight[priority] -= 1
            if priority != Priority.BACKGROUND:
                queue.urgent_done_at = asyncio.get_running_loop().time()
            self._pump(host)

    async def _fetch(self, batch: list[_Job], priority: Priority) -> None:
        """One Range GET for the batch, then decode, store and hand out each chunk."""
        blob = batch[0].blob
        start = min(job.fetch_start for job in batch)
        end = max(job.fetch_end for job in batch)
        if blob.size > start:
            end = min(end, blob.size)
        # A refetch after a failed check must not be served the same bytes again.
        warmed = None
        if not any(job.refetched for job in batch):
            warmed = await self._warm.take(blob.digest, start, end)
        if warmed is not None:
            data, sink = warmed, None
        else:
            fetched = await self._download(batch, priority, start, end)
            if fetched is None:
                return
            data, sink = fetched
        specs = [job.chunk for job in batch]
        if sink is not None:
            outcomes = [await self._streamed(sink)]
        elif self._decode_in_thread:
            loop = asyncio.get_running_loop()
            outcomes = await loop.run_in_executor(self._decoder, self._decode, specs, start, data)
        else:
            outcomes = self._decode(specs, start, data)
        good: list[tuple[_Job, bytes]] = []
        for job, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, bytes):
                self.stats.chunks_fetched[priority] += 1
                # Readers go on now; the job stays registered until the chunk is cached,
                # so a reader arriving meanwhile shares this content instead of refetching.
                self._resolve(job, outcome)
                good.append((job, outcome))
            else:
                self._reject(job, outcome)
        size = sum(len(content) for _, content in good)
        if good and priority != Priority.BACKGROUND and self._held_bytes + size <= STORE_HOLD_BYTES:
            self._hold(blob, good, size)
        else:
            await self._write(blob, good)

    def _hold(self, blob: BlobSource, good: list[tuple[_Job, bytes]], size: int) -> None:
        """Keep verified chunks (registered, so readers share them) until the link has
        been quiet as long as background fill waits, then write them."""
        self._held.append((blob, good))
        self._held_bytes += size
        if self._writing_held is None or self._writing_held.done():
            task = asyncio.get_running_loop().create_task(self._write_held_when_quiet())
            self._writing_held = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _write_held_when_quiet(self) -> None:
        loop = asyncio.get_running_loop()
        while self._held:
            wait = self._quiet_wait(loop.time())
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            await self._write_held()

    async def _write_held(self) -> None:
        """One batch at a time, so that what a cancelled writer left is still held."""
        while self._held:
            blob, good = self._held.pop(0)
            self._held_bytes -= sum(len(content) for _, content in good)
            await self._write(blob, good)

    def _quiet_wait(self, now: float) -> float:
        """Seconds until no demand or prefetch work will have run for ``fill_idle_s``
        (an estimate while some is queued or in flight: then it is asked again)."""
        lefts = [queue.quiet_left(now, self._fill_idle) for queue in self._hosts.values()]
        if None in lefts or any(_urgent(queue.peek()) for queue in self._hosts.values()):
            return max(self._fill_idle, 0.05)
        return max((left for left in lefts if left is not None), default=0.0)

    async def _write(self, blob: BlobSource, good: list[tuple[_Job, bytes]]) -> None:
        """Cache verified chunks on the writer threads; their jobs are over then."""
        try:
            if self._decode_in_thread:
                loop = asyncio.get_running_loop()
                errors = await loop.run_in_executor(self._writer, self._store, blob, good)
            else:
                errors = self._store(blob, good)
        finally:
            for job, _ in good:
                self._finish(job)
        for key, error in errors:
            self.stats.cache_write_errors += 1
            log.warning("fetcher.cache_write_failed", digest=blob.digest, chunk=key, error=error)

    async def _download(
        self, batch: list[_Job], priority: Priority, start: int, end: int
    ) -> tuple[bytes, StreamingDecode | None] | None:
        """The batch's bytes by one Range GET (with the decoder fed as they arrive, if
        any); None once a failed request has failed the batch's jobs."""
        blob = batch[0].blob
        loop = asyncio.get_running_loop()
        began = loop.time()
        sink = self._streaming(batch, priority)
        try:
            data = await self._client.get_range(blob.ref, blob.digest, start, end - start, sink)
        except asyncio.CancelledError:
            if sink is not None:
                sink.abandon()
            raise
        except Exception as exc:
            if sink is not None:
                sink.abandon()
            self.stats.request_errors += 1
            log.warning(
                "fetcher.range_failed",
                digest=blob.digest,
                start=start,
                length=end - start,
                chunks=len(batch),
                priority=priority.name,
                error=str(exc),
            )
            for job in batch:
                self._finish(job, error=exc)
            return None
        self.stats.record_request(priority, len(data), loop.time() - began)
        return data, sink

    def _streaming(self, batch: list[_Job], priority: Priority) -> StreamingDecode | None:
        """A decoder fed while the body arrives, for the one chunk a blocked read waits
        for; prefetch and fill keep decoding afterwards, in parallel threads, so their
        work never queues ahead of a demand chunk's on the streaming thread."""
        make = batch[0].chunk.streaming
        if priority != Priority.DEMAND or len(batch) != 1 or make is None:
            return None
        return StreamingDecode(make, self._streamer) if self._decode_in_thread else None

    @staticmethod
    async def _streamed(sink: StreamingDecode) -> bytes | str:
        try:
            return await sink.outcome()
        except Exception as exc:
            # As in _decode: anything the decoder raises means the bytes are untrusted.
            return f"{type(exc).__name__}: {exc}"

    @staticmethod
    def _decode(specs: list[ChunkSpec], start: int, data: bytes) -> list[bytes | str]:
        """Each chunk's verified content, or why its bytes cannot be trusted (CPU bound:
        runs in a worker thread)."""
        outcomes: list[bytes | str] = []
        for spec in specs:
            raw = data[spec.fetch_start - start : spec.fetch_end - start]
            try:
                outcomes.append(spec.decode(raw))
            except Exception as exc:
                # Anything decode raises means these bytes cannot be trusted.
                outcomes.append(f"{type(exc).__name__}: {exc}")
        return outcomes

    def _store(self, blob: BlobSource, good: list[tuple[_Job, bytes]]) -> list[tuple[str, str]]:
        """Cache verified chunks (disk bound, with an fsync each: off the readers' path);
        returns (chunk key, error) of those that could not be stored. Readers already
        have their bytes; only the cache misses out."""
        errors = []
        for job, content in good:
            try:
                self._cache.put(blob.digest, job.chunk.key, content)
            except OSError as exc:
                errors.append((job.chunk.key, str(exc)))
        return errors

    def _reject(self, job: _Job, problem: str) -> None:
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
            # A redirect to a bad CDN copy must not serve the retry too.
            self._client.transport.forget_redirect(
                Target(blob.ref.api_host, blob.ref.repository), blob.digest
            )
            self._host(blob).add(job)
            return
        self.stats.corrupt_chunks += 1
        log.error("fetcher.corrupt_chunk", digest=blob.digest, chunk=job.chunk.key, problem=problem)
        self._finish(job, error=CorruptChunkError(blob.digest, job.chunk.key, problem))


def _urgent(job: _Job | None) -> bool:
    return job is not None and job.priority != Priority.BACKGROUND
