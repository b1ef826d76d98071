"""One cap on the bytes the agent keeps in memory instead of on disk or on the wire.

Three buffers trade memory for time: raw ranges warmed before their chunks are known
(fetcher/warming.py), verified chunks held until the link is quiet so their fsyncs do
not land in a start (fetcher/write_behind.py), and chunks a full disk would not take
(fetcher/chunk_cache.py's spill). Each used to have a cap of its own, so the agent's
footprint was their sum even when only one of them was busy. They now charge one
budget, and each has its own answer when it is spent: warming skips the range (the
chunk is fetched when asked for), holding writes the chunk at once, the spill drops its
least recently used chunks.

The budget's lock is a leaf: it is taken by the event loop and the cache's writer
threads and nothing is called while it is held.
"""

from __future__ import annotations

import threading

DEFAULT_BYTES = 128 << 20
"""What holding alone had before the buffers shared one budget: the agent's memory bound
while serving a huge file (tests/test_resource_limits.py) was sized with it, and a
start's warmed bytes are a small part of it (docs/bench/design-figures.md)."""


class MemoryBudget:
    """Bytes charged by the buffers, under ``max_bytes``. Thread-safe."""

    def __init__(self, max_bytes: int = DEFAULT_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"memory budget must not be negative, not {max_bytes}")
        self.max_bytes = max_bytes
        self._used = 0
        self._lock = threading.Lock()

    def try_charge(self, nbytes: int) -> bool:
        """Reserve ``nbytes`` if they fit; False (nothing reserved) if they do not."""
        with self._lock:
            if self._used + nbytes > self.max_bytes:
                return False
            self._used += nbytes
            return True

    def release(self, nbytes: int) -> None:
        """Give back bytes an earlier ``try_charge`` reserved."""
        with self._lock:
            self._used -= nbytes

    @property
    def used(self) -> int:
        """Bytes charged now (a gauge)."""
        with self._lock:
            return self._used
