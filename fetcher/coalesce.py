"""Turning queued chunks of one blob into as few Range GETs as is worth it.

Each HTTP request costs a round trip, which on a distant registry is worth far more
than a few hundred KiB of bandwidth, so neighbouring chunks are fetched together when
the hole between them is small. Only chunks of the lead's own priority may grow the
range (a demand read must not wait for a megabyte of background fill); chunks of other
priorities that fall entirely inside the range ride along, since their bytes arrive
anyway.
"""

from __future__ import annotations

import itertools
from typing import Generic, Protocol, TypeVar

from sortedcontainers import SortedList


class QueuedRange(Protocol):
    """What coalescing needs to know about a queued chunk."""

    @property
    def fetch_start(self) -> int: ...

    @property
    def fetch_end(self) -> int: ...

    @property
    def priority(self) -> int: ...


T = TypeVar("T", bound=QueuedRange)


class RangeQueue(Generic[T]):
    """The queued chunks of one blob, in blob order, so a request finds its neighbours.

    Background fill queues every chunk of a layer (tens of thousands) at once, and each
    request then takes a few of them: adds and takes must cost O(log n), not a rebuild
    of the queue (which made every demand request of a file-dense layer pay ~5 ms CPU).
    """

    def __init__(self) -> None:
        self._keys: SortedList = SortedList()
        self._items: dict[tuple[int, int], T] = {}
        self._key_of: dict[int, tuple[int, int]] = {}
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: T) -> None:
        """Queue ``item`` (it must not be queued already)."""
        if id(item) in self._key_of:
            raise ValueError("item is already queued")
        key = (item.fetch_start, next(self._order))
        self._keys.add(key)
        self._items[key] = item
        self._key_of[id(item)] = key

    def take_run(self, lead: T, gap: int, max_bytes: int) -> list[T]:
        """Remove and return ``lead`` plus the chunks one request should fetch with it.

        Same-priority neighbours join while the hole to them is at most ``gap`` bytes
        and the whole range stays within ``max_bytes``; then every queued chunk lying
        inside the range joins too. The result is in blob order.
        """
        keys = self._keys
        lead_key = self._key_of[id(lead)]
        index = keys.index(lead_key)
        start, end = lead.fetch_start, lead.fetch_end
        chosen = [lead_key]
        for key in keys.islice(index + 1):
            item = self._items[key]
            if item.fetch_start > end + gap:
                break
            if item.priority != lead.priority:
                continue
            if max(end, item.fetch_end) - start > max_bytes:
                break
            end = max(end, item.fetch_end)
            chosen.append(key)
        for key in keys.islice(0, index, reverse=True):
            item = self._items[key]
            if item.fetch_end + gap < start:
                break
            if item.priority != lead.priority:
                continue
            if end - min(start, item.fetch_start) > max_bytes:
                break
            start = min(start, item.fetch_start)
            chosen.append(key)
        picked = set(chosen)
        for key in keys.irange((start, -1), (end, -1), inclusive=(True, False)):
            if key not in picked and self._items[key].fetch_end <= end:
                chosen.append(key)
        chosen.sort()
        run = []
        for key in chosen:
            keys.remove(key)
            item = self._items.pop(key)
            del self._key_of[id(item)]
            run.append(item)
        return run
