"""The agent's Prometheus metrics: one registry, one definition of every series.

The Grafana dashboard and alerts query these names, so they are defined in one module
(and tested against the dashboard) rather than wherever they are incremented.

Scrapes run on the metrics server's thread (`agent.metrics_server`), not the event
loop, so a collector here only reads: counters the loop updates in place (dicts with
fixed keys, `Counter.get`), never state that is rebuilt or iterated while it changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fetcher.fetch_stats import FetchStats
from fetcher.transport import RETRY_CAUSES, RegistryTransport

REGISTRY = CollectorRegistry()

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
)

FETCH_BYTES = Counter(
    "acceld_fetch_bytes_total",
    "Compressed bytes fetched from registries",
    ["priority"],
    registry=REGISTRY,
)
RANGE_REQUESTS = Counter(
    "acceld_range_requests_total", "HTTP Range requests sent", ["priority"], registry=REGISTRY
)
RANGE_SECONDS = Histogram(
    "acceld_range_request_seconds",
    "Latency of one Range request, by the priority it ran at (a demand read's shows how"
    " much the prefetch and fill sharing the link delayed it)",
    ["priority"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
PREFETCH_CHUNKS = Counter(
    "acceld_prefetch_chunks_total",
    "Chunks handed to the fetcher ahead of a start, by plan source",
    ["source"],
    registry=REGISTRY,
)
PROFILE_PLANS = Counter(
    "acceld_profile_plans_total",
    "Learned plans loaded at an image's first Prepare, by origin (own, inherited, none)",
    ["origin"],
    registry=REGISTRY,
)
FUSE_RESUMES = Counter(
    "acceld_fuse_resumes_total",
    "FUSE connections taken over from an earlier agent (restarts, crashes)",
    registry=REGISTRY,
)
FUSE_RESUME_GAP = Gauge(
    "acceld_fuse_resume_gap_seconds",
    "At the last resume, how long the connection went unserved, the keeper's wait for an "
    "agent and the new agent's restoring of layers (the longest any request waited)",
    registry=REGISTRY,
)
FUSE_RESUME_WAITING = Gauge(
    "acceld_fuse_resume_waiting_requests",
    "At the last resume, requests that were waiting for an agent",
    registry=REGISTRY,
)
CORRUPT_CHUNKS = Counter(
    "acceld_corrupt_chunks_total", "Chunks whose bytes failed verification", registry=REGISTRY
)
FUSE_OPS = Counter("acceld_fuse_ops_total", "FUSE operations served", ["op"], registry=REGISTRY)
FUSE_ERRORS = Counter(
    "acceld_fuse_errors_total",
    "FUSE operations answered with an error",
    ["op", "errno"],
    registry=REGISTRY,
)
FUSE_INTERNAL_ERRORS = Counter(
    "acceld_fuse_internal_errors_total",
    "FUSE operations whose handler raised an unexpected exception (answered EIO)",
    ["op"],
    registry=REGISTRY,
)
FUSE_SECONDS = Histogram(
    "acceld_fuse_op_seconds",
    "Latency of FUSE operations",
    ["op"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
CACHE_BYTES = Gauge("acceld_cache_bytes", "Bytes in the on-disk chunk cache", registry=REGISTRY)
LAYERS = Counter(
    "acceld_layers_total", "Layers prepared, lazily or by fallback", ["mode"], registry=REGISTRY
)
FALLBACKS = Counter(
    "acceld_fallbacks_total", "Layers that fell back to a full pull", ["reason"], registry=REGISTRY
)
DISTRUSTED_METADATA = Counter(
    "acceld_distrusted_metadata_total",
    "Layer metadata (index artifacts) caught contradicting the layer's own bytes",
    ["kind"],
    registry=REGISTRY,
)
FIRST_BYTE_SECONDS = Histogram(
    "acceld_prepare_to_first_byte_seconds",
    "Time from a layer's Prepare to its first byte served",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
LAZY_LAYERS_MOUNTED = Gauge(
    "acceld_lazy_layers_mounted", "Lazy layers currently mounted", registry=REGISTRY
)
# The watchdog's series are set from its own thread, so they stay current while the
# event loop (FUSE, snapshotter) is stuck; /metrics is served from a thread too.
WATCHDOG_LOOP_STALLS = Counter(
    "acceld_watchdog_loop_stalls_total",
    "Times the event loop stopped running callbacks for longer than the stall threshold",
    registry=REGISTRY,
)
WATCHDOG_STALLED_FUSE_REQUESTS = Counter(
    "acceld_watchdog_stalled_fuse_requests_total",
    "FUSE requests still unanswered after the request threshold",
    ["op"],
    registry=REGISTRY,
)
WATCHDOG_LOOP_LAG = Gauge(
    "acceld_watchdog_loop_lag_seconds",
    "Time since the event loop last ran the watchdog's heartbeat",
    registry=REGISTRY,
)
WATCHDOG_WORST_LOOP_STALL = Gauge(
    "acceld_watchdog_worst_loop_stall_seconds",
    "Longest event-loop stall seen since start (grows while a stall lasts)",
    registry=REGISTRY,
)
WATCHDOG_WORST_LOOP_LAG = Gauge(
    "acceld_watchdog_worst_loop_lag_seconds",
    "Longest the event loop ran a due heartbeat late since start, below the stall "
    "threshold too: how long any FUSE answer may have waited for the loop",
    registry=REGISTRY,
)
WATCHDOG_OLDEST_FUSE_REQUEST = Gauge(
    "acceld_watchdog_oldest_fuse_request_seconds",
    "Age of the oldest FUSE request in progress (0 when none is)",
    registry=REGISTRY,
)


class RetryCollector(Collector):
    """Exports the registry client's retry counts at scrape time (the transport keeps
    them, so the fetcher stays free of Prometheus); every cause is listed, even at 0."""

    def __init__(self, retries: Callable[[], Mapping[str, int]]) -> None:
        self._retries = retries

    def collect(self) -> Iterator[Metric]:
        counts = self._retries()
        family = CounterMetricFamily(
            "acceld_registry_retries", "Registry requests sent again, by cause", labels=["cause"]
        )
        for cause in RETRY_CAUSES:
            family.add_metric([cause], counts.get(cause, 0))
        yield family


class RegistryHostsCollector(Collector):
    """Exports which registry host answered each request (mirror or server, as the
    node's hosts.toml lists them) and why a host was passed over. The transport caps
    the distinct host names it counts, so the label sets stay few."""

    def __init__(self, transport: RegistryTransport) -> None:
        self._transport = transport

    def collect(self) -> Iterator[Metric]:
        # One C-level copy each while the loop may add keys (holding the GIL).
        served = tuple(self._transport.served.items())
        skipped = tuple(self._transport.skipped.items())
        requests = CounterMetricFamily(
            "acceld_registry_requests",
            "Registry requests answered, by the host that answered (role: mirror, server)",
            labels=["host", "role"],
        )
        for (host, role), count in served:
            requests.add_metric([host, role], count)
        skips = CounterMetricFamily(
            "acceld_registry_host_skips",
            "Requests that passed a registry host by, and why (fetcher.transport.SKIP_REASONS)",
            labels=["host", "role", "reason"],
        )
        for (host, role, reason), count in skipped:
            skips.add_metric([host, role, reason], count)
        yield requests
        yield skips


class FetcherCollector(Collector):
    """Exports the fetcher's own counters at scrape time (they live in `FetchStats`, so
    the fetcher stays free of Prometheus)."""

    _COUNTERS = (
        (
            "acceld_corrupt_chunks_total",
            "corrupt_chunks",
            "Chunks that failed verification twice and were never served",
        ),
        (
            "acceld_corrupt_refetches_total",
            "corrupt_refetches",
            "Chunks refetched after failing verification once",
        ),
        ("acceld_fetch_errors_total", "request_errors", "Range requests that failed"),
        (
            "acceld_demand_timeouts_total",
            "demand_timeouts",
            "Blocked reads that gave up waiting (answered EIO)",
        ),
        (
            "acceld_cache_write_errors_total",
            "cache_write_errors",
            "Chunks served but not cached (disk full)",
        ),
        ("acceld_cache_hits_total", "cache_hits", "Reads served from the chunk cache"),
        ("acceld_cache_misses_total", "cache_misses", "Reads that waited for a fetch"),
        (
            "acceld_shared_fetches_total",
            "shared_fetches",
            "Reads that joined a fetch already in flight",
        ),
    )

    def __init__(self, stats: Callable[[], FetchStats | None]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        if stats is None:
            return
        for name, attribute, help_text in self._COUNTERS:
            yield CounterMetricFamily(
                name.removesuffix("_total"), help_text, value=getattr(stats, attribute)
            )
        in_flight = GaugeMetricFamily(
            "acceld_fetch_in_flight", "Range GETs on the wire", labels=["priority"]
        )
        chunk_bytes = CounterMetricFamily(
            "acceld_fetch_chunk_bytes",
            "Compressed bytes of the verified chunks fetched (without coalescing gaps)",
            labels=["priority"],
        )
        unread = GaugeMetricFamily(
            "acceld_unread_chunk_bytes",
            "Compressed bytes of fetched chunks no read has touched yet",
            labels=["priority"],
        )
        streams_open = GaugeMetricFamily(
            "acceld_stream_bytes_open",
            "Bytes received by whole-blob streams still running (not yet in "
            "acceld_fetch_bytes_total)",
            labels=["priority"],
        )
        stream_bytes = CounterMetricFamily(
            "acceld_stream_bytes",
            "Bytes of whole-blob streams that ended (in acceld_fetch_bytes_total, no chunk's)",
            labels=["priority"],
        )
        for priority in stats.in_flight:
            label = [priority.name.lower()]
            in_flight.add_metric(label, stats.in_flight[priority])
            chunk_bytes.add_metric(label, stats.chunk_bytes[priority])
            unread.add_metric(label, stats.unread_bytes[priority])
            streams_open.add_metric(label, stats.streams_open[priority])
            stream_bytes.add_metric(label, stats.stream_bytes[priority])
        yield from (in_flight, chunk_bytes, unread, streams_open, stream_bytes)
