"""The FUSE requests the agent is answering right now, readable from any thread.

A request the agent never answers leaves its reader in D state, unkillable, and says
nothing in the log. The handlers run on the event loop, but the one who must notice a
request that never ends (the watchdog) runs on a thread of its own, so that it still
sees when the loop itself is stuck: hence a lock, not loop-only state.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Awaitable
from dataclasses import dataclass


@dataclass(frozen=True)
class FuseRequest:
    """One request being answered. ``handler`` is the coroutine answering it, kept so
    that the watchdog can show where a stuck request waits (its await chain)."""

    request_id: int
    op: str
    inode: int | None
    started: float
    """time.monotonic() when the handler was entered."""
    handler: Awaitable[object] | None = None

    def age(self, now: float | None = None) -> float:
        """Seconds since the request reached the handler."""
        return (time.monotonic() if now is None else now) - self.started


class InFlightRequests:
    """Thread-safe table of the FUSE requests in progress."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._requests: dict[int, FuseRequest] = {}

    def begin(
        self, op: str, inode: int | None, handler: Awaitable[object] | None = None
    ) -> FuseRequest:
        """Record a request that ``handler`` starts answering."""
        request = FuseRequest(next(self._ids), op, inode, time.monotonic(), handler)
        with self._lock:
            self._requests[request.request_id] = request
        return request

    def end(self, request: FuseRequest) -> None:
        """The request was answered (or failed)."""
        with self._lock:
            self._requests.pop(request.request_id, None)

    def snapshot(self) -> list[FuseRequest]:
        """The requests in progress, oldest first."""
        with self._lock:
            requests = list(self._requests.values())
        return sorted(requests, key=lambda r: r.started)

    def __len__(self) -> int:
        with self._lock:
            return len(self._requests)
