"""Blob bytes downloaded before anyone knew which chunks they hold.

While a big eStargz TOC is validated, the members a learned profile names are already
being downloaded (see formats/estargz_extents.py): raw compressed bytes, kept here per
blob until the chunk fetches they were meant for come, or for ``ttl`` at most (a pull
given up on must not pin them), charged to the agent's MemoryBudget. A fetch whose
range they cover takes its bytes from here instead of the network; it then inflates and
digest-checks them like any other.
"""

from __future__ import annotations

import asyncio
import bisect
from dataclasses import dataclass

from fetcher.memory_budget import MemoryBudget


@dataclass(eq=False)
class _Warm:
    start: int
    end: int
    data: asyncio.Future[bytes]
    untaken: int = 0
    """Bytes no fetch has taken yet: at zero the range has served its purpose."""


class WarmRanges:
    """Ranges of blobs on their way or arrived, by blob digest. Use within one loop."""

    def __init__(self, ttl: float, memory: MemoryBudget) -> None:
        self._ttl = ttl
        self._memory = memory
        self._blobs: dict[str, list[_Warm]] = {}
        self.bytes = 0
        """Bytes held or on their way (a gauge; each is charged to the budget)."""

    def add(self, digest: str, start: int, end: int) -> asyncio.Future[bytes] | None:
        """Register ``[start, end)`` of a blob as on its way; resolve the returned future
        with its bytes (or fail it, and the range is forgotten). None when the memory
        budget has no room for it: the range is not warmed."""
        if not self._memory.try_charge(end - start):
            return None
        loop = asyncio.get_running_loop()
        warm = _Warm(start, end, loop.create_future(), end - start)
        bisect.insort(self._blobs.setdefault(digest, []), warm, key=lambda w: w.start)
        self.bytes += end - start
        warm.data.add_done_callback(lambda _: self._drop_failed(digest, warm))
        loop.call_later(self._ttl, self._drop, digest, warm)
        return warm.data

    def _drop_failed(self, digest: str, warm: _Warm) -> None:
        if not warm.data.cancelled() and warm.data.exception() is not None:
            self._drop(digest, warm)

    def _drop(self, digest: str, warm: _Warm) -> None:
        held = self._blobs.get(digest)
        if held is None or warm not in held:
            return
        held.remove(warm)
        self.bytes -= warm.end - warm.start
        self._memory.release(warm.end - warm.start)
        if not held:
            del self._blobs[digest]
        if not warm.data.done():
            warm.data.cancel()

    async def take(self, digest: str, start: int, end: int) -> bytes | None:
        """Bytes ``[start, end)`` if held ranges cover all of it (waiting for those on
        their way), else None: the caller fetches it from the registry. A range is let
        go once fetches have taken all of its bytes."""
        pieces = self._covering(digest, start, end)
        if pieces is None:
            return None
        # asyncio.wait: a range dropped or failed meanwhile is not this caller's error.
        await asyncio.wait([warm.data for warm in pieces])
        parts: list[bytes] = []
        reached = start
        for warm in pieces:
            if warm.data.cancelled() or warm.data.exception() is not None:
                return None
            # Ranges may overlap (index-only spans share a byte): each piece goes on
            # from where the previous one ended.
            hi = min(end, warm.end)
            parts.append(warm.data.result()[reached - warm.start : hi - warm.start])
            warm.untaken -= hi - reached
            reached = hi
            if warm.untaken <= 0:
                self._drop(digest, warm)
        return b"".join(parts)

    def covers(self, digest: str, start: int, end: int) -> bool:
        """Whether ``[start, end)`` is held or on its way already."""
        return self._covering(digest, start, end) is not None

    def _covering(self, digest: str, start: int, end: int) -> list[_Warm] | None:
        """Held ranges that together cover ``[start, end)`` without a gap, or None."""
        pieces: list[_Warm] = []
        reached = start
        for warm in self._blobs.get(digest, ()):
            if warm.start > reached:
                break
            if warm.end <= reached:
                continue
            pieces.append(warm)
            reached = warm.end
            if reached >= end:
                return pieces
        return None

    def clear(self) -> None:
        """Forget everything (the fetcher closes)."""
        for digest, held in list(self._blobs.items()):
            for warm in list(held):
                self._drop(digest, warm)
