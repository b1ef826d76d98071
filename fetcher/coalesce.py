"""Turning queued chunks of one blob into as few Range GETs as is worth it.

Each HTTP request costs a round trip, which on a distant registry is worth far more
than a few hundred KiB of bandwidth, so neighbouring chunks are fetched together when
the hole between them is small. Only chunks of the lead's own priority may grow the
range (a demand read must not wait for a megabyte of background fill); chunks of other
priorities that fall entirely inside the range ride along, since their bytes arrive
anyway.
"""

from __future__ import annotations

import bisect
import itertools
from typing import Generic, Protocol, TypeVar


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
    """The queued chunks of one blob, in blob order, so a request finds its neighbours."""

    def __init__(self) -> None:
        self._keys: list[tuple[int, int]] = []
        self._items: list[T] = []
        self._key_of: dict[int, tuple[int, int]] = {}
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: T) -> None:
        """Queue ``item`` (it must not be queued already)."""
        if id(item) in self._key_of:
            raise ValueError("item is already queued")
        key = (item.fetch_start, next(self._order))
        index = bisect.bisect_left(self._keys, key)
        self._keys.insert(index, key)
        self._items.insert(index, item)
        self._key_of[id(item)] = key

    def _index(self, item: T) -> int:
        return bisect.bisect_left(self._keys, self._key_of[id(item)])

    def take_run(self, lead: T, gap: int, max_bytes: int) -> list[T]:
        """Remove and return ``lead`` plus the chunks one request should fetch with it.

        Same-priority neighbours join while the hole to them is at most ``gap`` bytes
        and the whole range stays within ``max_bytes``; then every queued chunk lying
        inside the range joins too. The result is in blob order.
        """
        index = self._index(lead)
        start, end = lead.fetch_start, lead.fetch_end
        chosen = {index}
        for j in range(index + 1, len(self._items)):
            item = self._items[j]
            if item.fetch_start > end + gap:
                break
            if item.priority != lead.priority:
                continue
            if max(end, item.fetch_end) - start > max_bytes:
                break
            end = max(end, item.fetch_end)
            chosen.add(j)
        for j in range(index - 1, -1, -1):
            item = self._items[j]
            if item.fetch_end + gap < start:
                break
            if item.priority != lead.priority:
                continue
            if end - min(start, item.fetch_start) > max_bytes:
                break
            start = min(start, item.fetch_start)
            chosen.add(j)
        j = bisect.bisect_left(self._keys, (start, -1))
        while j < len(self._items) and self._items[j].fetch_start < end:
            if self._items[j].fetch_end <= end:
                chosen.add(j)
            j += 1
        run = [self._items[j] for j in sorted(chosen)]
        self._keys = [k for j, k in enumerate(self._keys) if j not in chosen]
        self._items = [x for j, x in enumerate(self._items) if j not in chosen]
        for item in run:
            del self._key_of[id(item)]
        return run
