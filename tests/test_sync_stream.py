"""The async-to-thread bridge delivers every byte in order and propagates errors both ways."""

import hashlib
import os

import pytest

from fetcher.sync_stream import consume_in_thread


async def _chunks(data: bytes, size: int, fail_at: int | None = None):
    for i in range(0, len(data), size):
        if fail_at is not None and i >= fail_at:
            raise ConnectionResetError("download dropped")
        yield data[i : i + size]


async def test_bytes_arrive_in_order():
    data = os.urandom(5_000_000)
    digest = await consume_in_thread(
        _chunks(data, 65_537), lambda r: hashlib.sha256(r.read()).hexdigest(), max_chunks=2
    )
    assert digest == hashlib.sha256(data).hexdigest()


async def test_download_error_reaches_consumer_and_caller():
    seen = []

    def consumer(reader):
        try:
            while reader.read(1000):
                pass
        except ConnectionResetError as exc:
            seen.append(exc)
            raise

    with pytest.raises(ConnectionResetError):
        await consume_in_thread(_chunks(os.urandom(100_000), 1000, fail_at=50_000), consumer)
    assert seen


async def test_consumer_error_stops_download():
    def consumer(reader):
        reader.read(10)
        raise ValueError("bad tar")

    with pytest.raises(ValueError, match="bad tar"):
        await consume_in_thread(_chunks(os.urandom(10_000_000), 10_000), consumer, max_chunks=1)
