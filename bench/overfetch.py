"""Where the bytes of a lazy start went beyond the honest limit, by cause.

Every byte that crossed the link before readiness is put in exactly one place, so the
causes add up to the link's count:

* ``limit``: the compressed bytes holding the ranges the app read, at the format's
  finest granularity (bench/compressed_limit.py);
* ``granularity``: what acceld's fetch units cost for those ranges beyond that (whole
  spans for unplanned reads of an index-only layer, the spans' leading pieces for
  planned ones; whole members in the full form);
* ``read_ahead``: chunks reads touched beyond those units: the kernel's read-ahead
  (the mount raises ``read_ahead_kb``, and a mapped library faults whole windows in)
  and the app reading what its learned start did not (then it can come out negative);
* ``prefetch_unread`` / ``fill_unread``: chunks prefetched (profile, converter list,
  the agent's read-ahead after a miss) or filled that no read touched by readiness;
  the fill's whole-blob streams (an index-only layer's audit) count as fill;
* ``coalescing``: the gaps between chunks that one Range GET fetched together;
* ``protocol``: the rest, manifests, indexes and TOCs, profiles, HTTP and TCP.

The chunk counts come from the agent's metrics, read right after readiness; the link
count is taken at readiness, so a chunk that landed in between shows in ``protocol``.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.compressed_limit import RangeCost
from bench.startup import RunResult


@dataclass(frozen=True)
class OverFetch:
    """A lazy start's bytes before readiness, by cause (they sum to ``before_ready``)."""

    before_ready: int
    limit: int
    granularity: int
    read_ahead: int
    prefetch_unread: int
    fill_unread: int
    coalescing: int
    protocol: int

    @property
    def over_limit(self) -> int:
        """Bytes before readiness beyond the limit."""
        return self.before_ready - self.limit


def over_fetch(run: RunResult, cost: RangeCost, planned: bool) -> OverFetch:
    """Split ``run``'s link bytes before readiness; ``cost`` is the form's cost of the
    ranges its learned start read, ``planned`` whether the run prefetched a profile."""
    stats = run.agent_stats

    def total(prefix: str) -> int:
        return int(sum(v for k, v in stats.items() if k.startswith(prefix)))

    # Running streams are not in the fetch bytes yet; ended ones are, with no chunks.
    payload = int(sum(run.agent_fetch_bytes.values())) + total("stream_open_")
    streams = total("stream_open_") + total("stream_bytes_")
    chunks = total("chunk_bytes_")
    prefetch_unread = int(stats.get("unread_bytes_prefetch", 0))
    filled_unread = int(stats.get("unread_bytes_background", 0))
    units = cost.piece_bytes if planned else cost.span_bytes
    return OverFetch(
        before_ready=run.link_bytes_before_ready,
        limit=cost.limit_bytes,
        granularity=units - cost.limit_bytes,
        # Demand chunks are read as soon as they land, so all but these were touched.
        read_ahead=chunks - prefetch_unread - filled_unread - units,
        prefetch_unread=prefetch_unread,
        fill_unread=filled_unread + streams,
        coalescing=payload - streams - chunks,
        protocol=run.link_bytes_before_ready - payload,
    )
