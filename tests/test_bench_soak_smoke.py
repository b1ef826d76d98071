"""bench/soak end to end on a few starts: real link, registry, fault proxy, agent and
containerd; every start must end correct or failed cleanly, never wrong or hung."""

from __future__ import annotations

from bench.soak import run_soak, summary_table


def test_soak_counts_every_start_and_stays_within_the_cap() -> None:
    summary, records = run_soak(
        starts=6, image_count=2, cache_max_mb=8, rate_mbit=300, rtt_ms=5, seed=3
    )
    assert summary.starts == len(records) == 6
    assert summary.correct + summary.failed_cleanly == 6
    assert summary.wrong_bytes == 0 and summary.hangs == 0
    assert summary.correct >= 4, records  # transient faults are retried through
    assert 0 < summary.peak_agent_rss_mb < 1024
    assert summary.peak_cache_mb <= summary.cache_cap_mb + 1
    assert "wrong bytes" in summary_table(summary)
