"""Counters of the read path, kept free of Prometheus (agent/metrics.py exports them).

One object is shared by the parts that count: the reader (hits and misses), the
fetcher and its transfer (requests, chunks, errors) and the write-behind (chunks served
but not cached).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from common.logging import get_logger
from fetcher.chunks import Priority
from fetcher.request_queue import per_priority

log = get_logger(__name__)

RequestObserver = Callable[[Priority, int, float], None]
"""Called after each Range GET with (priority, bytes received, seconds taken)."""
MAX_UNREAD_TRACKED = 1 << 16
"""Fetched chunks remembered until a read touches them (about 200 bytes each): a start's
chunks fit, a 40 000-file eStargz layer's included; beyond, new chunks go uncounted
rather than let the fill of a huge image grow the map."""


@dataclass
class FetchStats:
    """Counters for metrics; ``in_flight`` is a gauge of Range GETs on the wire."""

    requests: dict[Priority, int] = field(default_factory=per_priority)
    bytes_fetched: dict[Priority, int] = field(default_factory=per_priority)
    chunks_fetched: dict[Priority, int] = field(default_factory=per_priority)
    in_flight: dict[Priority, int] = field(default_factory=per_priority)
    cache_hits: int = 0
    """Read slices answered without a fetch (from disk, spill or write-behind)."""
    cache_misses: int = 0
    """Read slices that waited for a fetch."""
    shared_fetches: int = 0
    priority_upgrades: int = 0
    corrupt_refetches: int = 0
    corrupt_chunks: int = 0
    request_errors: int = 0
    demand_timeouts: int = 0
    cache_write_errors: int = 0
    chunk_bytes: dict[Priority, int] = field(default_factory=per_priority)
    """Compressed bytes of the chunks fetched: a coalesced request also carries the gaps
    between its chunks, which ``bytes_fetched`` counts and this does not."""
    unread_bytes: dict[Priority, int] = field(default_factory=per_priority)
    """Compressed bytes of fetched chunks no read has touched yet: at a start's readiness,
    what prefetch and fill fetched that the start did not need (over-fetch by cause)."""
    streams_open: dict[Priority, int] = field(default_factory=per_priority)
    """Bytes received so far by whole-blob streams (the fill's audit) still running: a
    stream is one request, counted in ``bytes_fetched`` only when it ends, and on a big
    layer it can run through a whole start."""
    stream_bytes: dict[Priority, int] = field(default_factory=per_priority)
    """Bytes of the finished streams (part of ``bytes_fetched``, no chunk's)."""
    _unread: dict[tuple[str, str], tuple[Priority, int]] = field(default_factory=dict, repr=False)
    _observers: list[RequestObserver] = field(default_factory=list, repr=False)

    def add_observer(self, observer: RequestObserver) -> None:
        """Call ``observer`` for every completed Range GET (e.g. a latency histogram)."""
        self._observers.append(observer)

    def chunk_fetched(self, blob: str, key: str, priority: Priority, size: int) -> None:
        """Count a verified chunk of ``size`` compressed bytes, unread until ``chunk_read``."""
        self.chunks_fetched[priority] += 1
        self.chunk_bytes[priority] += size
        if (blob, key) not in self._unread and len(self._unread) < MAX_UNREAD_TRACKED:
            self._unread[blob, key] = (priority, size)
            self.unread_bytes[priority] += size

    def chunk_read(self, blob: str, key: str) -> None:
        """A read touched the chunk: its bytes were not fetched in vain."""
        found = self._unread.pop((blob, key), None)
        if found is not None:
            self.unread_bytes[found[0]] -= found[1]

    def stream_received(self, priority: Priority, nbytes: int) -> None:
        """A running stream received ``nbytes`` more."""
        self.streams_open[priority] += nbytes

    def stream_ended(self, priority: Priority, nbytes: int, seconds: float) -> None:
        """A stream that received ``nbytes`` in all ended (completed or not)."""
        self.streams_open[priority] -= nbytes
        self.stream_bytes[priority] += nbytes
        self.record_request(priority, nbytes, seconds)

    def record_request(self, priority: Priority, nbytes: int, seconds: float) -> None:
        """Count one completed Range GET and tell the observers."""
        self.requests[priority] += 1
        self.bytes_fetched[priority] += nbytes
        for observer in self._observers:
            try:
                observer(priority, nbytes, seconds)
            except Exception:
                log.exception("fetcher.observer_failed", observer=repr(observer))
