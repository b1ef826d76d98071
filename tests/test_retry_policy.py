"""Backoff has jitter and a cap, Retry-After wins, redirect expiry reads signed URLs."""

import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

from fetcher.retry import RetryPolicy, parse_retry_after
from fetcher.transport import redirect_expiry


def test_backoff_is_jittered_and_capped():
    policy = RetryPolicy(base_delay=0.5, max_delay=2.0)
    delays = {policy.delay(attempt) for attempt in range(8) for _ in range(5)}
    assert len(delays) > 10
    assert all(0 <= d <= 2.0 for d in delays)


def test_retry_after_seconds_and_date():
    assert RetryPolicy().delay(0, "3") == 3.0
    assert RetryPolicy(max_retry_after=5).delay(0, "3600") == 5
    future = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    hinted = parse_retry_after(future)
    assert hinted is not None and 25 < hinted <= 30
    assert parse_retry_after("garbage") is None


def test_redirect_expiry_from_s3_and_expires_params():
    now = time.monotonic()
    signed = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    s3 = f"https://b.s3/x?X-Amz-Date={signed}&X-Amz-Expires=300&X-Amz-Signature=f"
    assert 280 < redirect_expiry(s3, now) - now <= 300
    cdn = f"https://cdn/x?Expires={int(time.time()) + 120}"
    assert 100 < redirect_expiry(cdn, now) - now <= 120
    assert redirect_expiry("https://cdn/plain", now, default_ttl=42) == now + 42
