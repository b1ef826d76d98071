"""A readable stream over an iterator of byte strings.

tarfile, io.BufferedReader and the like want a file; generators of chunks (a blob
streamed and inflated, a file made as it is read) are what we have.
"""

from __future__ import annotations

import io
from collections.abc import Iterator


class IteratorReader(io.RawIOBase):
    """Reads ``chunks`` in order, one at a time, as the reader asks for bytes."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        super().__init__()
        self._chunks = chunks
        self._current = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._current:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._current = memoryview(chunk)
        n = min(len(buffer), len(self._current))
        buffer[:n] = self._current[:n]
        self._current = self._current[n:]
        return n
