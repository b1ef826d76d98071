"""Warmed blob ranges serve a fetch only when they cover all of it, and never outlive
their time (a pull given up on must not pin memory)."""

from __future__ import annotations

import asyncio

from fetcher.memory_budget import MemoryBudget
from fetcher.warm_ranges import WarmRanges

DIGEST = "sha256:" + "ab" * 32


def _add(warm: WarmRanges, start: int, end: int) -> asyncio.Future[bytes]:
    future = warm.add(DIGEST, start, end)
    assert future is not None, "the budget has room"
    return future


async def test_adjacent_ranges_serve_a_fetch_across_them() -> None:
    warm = WarmRanges(ttl=30, memory=MemoryBudget())
    _add(warm, 10, 20).set_result(bytes(range(10, 20)))
    later = _add(warm, 20, 30)
    taking = asyncio.ensure_future(warm.take(DIGEST, 15, 25))
    await asyncio.sleep(0)
    assert not taking.done()  # waits for the range still on its way
    later.set_result(bytes(range(20, 30)))
    assert await taking == bytes(range(15, 25))
    assert warm.bytes == 20 and warm.covers(DIGEST, 10, 30)
    # Once fetches have taken every byte of a range, it is let go.
    assert await warm.take(DIGEST, 10, 15) == bytes(range(10, 15))
    assert warm.bytes == 10 and not warm.covers(DIGEST, 10, 30)


async def test_overlapping_ranges_give_each_byte_once() -> None:
    warm = WarmRanges(ttl=30, memory=MemoryBudget())
    blob = bytes(range(40))
    _add(warm, 0, 11).set_result(blob[0:11])
    _add(warm, 10, 21).set_result(blob[10:21])
    _add(warm, 15, 40).set_result(blob[15:40])
    assert await warm.take(DIGEST, 5, 35) == blob[5:35]
    assert await warm.take(DIGEST, 0, 12) == blob[0:12]


async def test_a_gap_or_a_failed_range_leaves_the_fetch_to_the_network() -> None:
    warm = WarmRanges(ttl=30, memory=MemoryBudget())
    _add(warm, 0, 10).set_result(bytes(10))
    _add(warm, 12, 20).set_result(bytes(8))
    assert await warm.take(DIGEST, 5, 15) is None
    assert await warm.take("sha256:" + "cd" * 32, 0, 5) is None
    _add(warm, 20, 30).set_exception(ConnectionResetError("gone"))
    assert await warm.take(DIGEST, 20, 25) is None
    assert warm.bytes == 18  # the failed range is forgotten


async def test_ranges_expire_and_clear() -> None:
    warm = WarmRanges(ttl=0.05, memory=MemoryBudget())
    pending = _add(warm, 0, 10)
    await asyncio.sleep(0.1)
    assert pending.cancelled() and warm.bytes == 0
    assert await warm.take(DIGEST, 0, 10) is None
    kept = WarmRanges(ttl=30, memory=MemoryBudget())
    _add(kept, 0, 10).set_result(bytes(10))
    kept.clear()
    assert kept.bytes == 0 and await kept.take(DIGEST, 0, 10) is None


async def test_the_memory_budget_bounds_warming_and_is_given_back() -> None:
    memory = MemoryBudget(25)
    warm = WarmRanges(ttl=30, memory=memory)
    _add(warm, 0, 10).set_result(bytes(10))
    _add(warm, 10, 20)
    assert warm.add(DIGEST, 20, 30) is None  # 30 bytes would not fit in 25
    assert memory.used == 20 and not warm.covers(DIGEST, 20, 30)
    assert await warm.take(DIGEST, 0, 10) == bytes(10)
    assert memory.used == 10  # a range taken whole is let go, and so is its charge
    warm.clear()
    assert memory.used == 0
