"""Which chunks go on the wire next: one priority queue per registry host.

A process blocked in read(2) waits on the network, so its chunk (DEMAND) goes ahead of
profile prefetch, which goes ahead of background fill. Each host's queue hands out
batches (a lead and the neighbours one Range GET should fetch with it, see
fetcher/coalesce.py). Background fill starts only once no demand or prefetch request
has run for a moment, in small requests, so a starting container finds the link, a
connection and the CPUs free; the cache's write-behind asks the same question before
it fsyncs (``until_quiet``).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from fetcher.chunks import BlobSource, ChunkSpec, Priority
from fetcher.coalesce import RangeQueue

BACKGROUND_REQUEST_BYTES = 2 << 20
"""Fill requests stay small: one already on the wire when a read arrives delays it
by at most this much transfer."""
PREFETCH_REQUEST_BYTES = 4 << 20
"""Prefetch requests stay moderate for the same reason: a demand read shares the link
with every request already on the wire until it ends, whatever its priority."""

_HEAP_SLACK = 256
"""Stale heap entries tolerated beyond twice the live ones before a rebuild."""


def per_priority() -> dict[Priority, int]:
    """A zero count for each priority."""
    return dict.fromkeys(Priority, 0)


@dataclass(eq=False)
class ChunkJob:
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


class HostQueue:
    """Queued jobs of one registry host: a priority heap plus per-blob range order."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, int, ChunkJob]] = []
        self._entries = itertools.count()
        self._blobs: dict[str, RangeQueue[ChunkJob]] = {}
        self.in_flight = per_priority()
        self.urgent_done_at = float("-inf")
        """Loop time the last demand or prefetch request ended (fill waits for quiet)."""
        self.wake: asyncio.TimerHandle | None = None

    def add(self, job: ChunkJob) -> None:
        job.queued = True
        ranges = self._blobs.get(job.blob.digest)
        if ranges is None:
            ranges = self._blobs[job.blob.digest] = RangeQueue()
        ranges.add(job)
        self.reprioritize(job)

    def reprioritize(self, job: ChunkJob) -> None:
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

    def peek(self) -> ChunkJob | None:
        """The most urgent, oldest queued job, dropping stale heap entries on the way."""
        while self._heap:
            priority, _, _, job = self._heap[0]
            if job.queued and job.priority == priority:
                return job
            heapq.heappop(self._heap)
        return None

    def take(self, lead: ChunkJob, gap: int, max_bytes: int) -> list[ChunkJob]:
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


class RequestQueues:
    """Every host's queue, and what "the link is quiet" means. Use within one loop."""

    def __init__(self, fill_idle_s: float = 0.5) -> None:
        if fill_idle_s < 0:
            raise ValueError(f"fill_idle_s must not be negative, not {fill_idle_s}")
        self._fill_idle = fill_idle_s
        self._hosts: dict[str, HostQueue] = {}

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._hosts))

    def of(self, host: str) -> HostQueue:
        """The host's queue (made on first use)."""
        queue = self._hosts.get(host)
        if queue is None:
            queue = self._hosts[host] = HostQueue()
        return queue

    def next_batch(
        self,
        host: str,
        gap: int,
        max_request: int,
        *,
        free: int,
        spare_for_demand: int,
        demand_only: bool,
        on_quiet: Callable[[str], None],
    ) -> tuple[Priority, list[ChunkJob]] | None:
        """Dequeue the host's most urgent job and its neighbours, with the priority the
        request runs at (the most urgent job's), or None when nothing may start now:
        nothing queued; only prefetch or fill while ``demand_only``, or while no more than
        ``spare_for_demand`` of the host's ``free`` connections are left (they are kept
        for the next demand read, so it never waits for a request to end before its own
        starts); or only fill before the link is quiet (``on_quiet(host)`` is called
        once it is)."""
        queue = self._hosts.get(host)
        lead = None if queue is None else queue.peek()
        if queue is None or lead is None:
            return None
        if lead.priority != Priority.DEMAND:
            if demand_only or free <= spare_for_demand:
                return None
            max_request = min(max_request, PREFETCH_REQUEST_BYTES)
        if lead.priority == Priority.BACKGROUND:
            if not self._fill_may_start(host, queue, on_quiet):
                return None
            max_request = min(max_request, BACKGROUND_REQUEST_BYTES)
        return lead.priority, queue.take(lead, gap, max_request)

    def _fill_may_start(self, host: str, queue: HostQueue, on_quiet: Callable[[str], None]) -> bool:
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
            queue.wake = loop.call_later(left, self._wake, host, on_quiet)
        return False

    def _wake(self, host: str, on_quiet: Callable[[str], None]) -> None:
        self.of(host).wake = None
        on_quiet(host)

    def quiet_wait(self, now: float) -> float:
        """Seconds until no demand or prefetch work will have run for ``fill_idle_s``
        on any host (an estimate while some is queued or in flight: then ask again)."""
        queues = self._hosts.values()
        lefts = [queue.quiet_left(now, self._fill_idle) for queue in queues]
        if None in lefts or any(_urgent(queue.peek()) for queue in queues):
            return max(self._fill_idle, 0.05)
        return max((left for left in lefts if left is not None), default=0.0)

    async def until_quiet(self) -> None:
        """Until ``quiet_wait`` says quiet: what work outside the queues waits for (the
        cache's write-behind, a fill audit's blob stream)."""
        loop = asyncio.get_running_loop()
        while True:
            wait = self.quiet_wait(loop.time())
            if wait <= 0:
                return
            await asyncio.sleep(wait)  # an estimate while urgent work runs: ask again

    def cancel_wakes(self) -> None:
        """Drop pending fill timers (the fetcher closes)."""
        for queue in self._hosts.values():
            if queue.wake is not None:
                queue.wake.cancel()


def _urgent(job: ChunkJob | None) -> bool:
    return job is not None and job.priority != Priority.BACKGROUND
