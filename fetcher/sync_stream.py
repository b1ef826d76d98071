"""Hand an async byte stream (a registry download) to synchronous code in a thread.

Format code (tar walking, gzip indexing, eStargz writing) is synchronous and CPU-bound,
so it runs in a worker thread while the event loop keeps downloading. A bounded queue
between them keeps memory flat (the download waits when the consumer lags) and means a
layer is never held whole in memory.
"""

from __future__ import annotations

import asyncio
import io
import queue
from collections.abc import AsyncIterator, Callable
from typing import BinaryIO, TypeVar, cast

T = TypeVar("T")
_EOF = b""


class QueueReader(io.RawIOBase):
    """A readable raw stream fed chunk by chunk from another thread."""

    def __init__(self, max_chunks: int = 8) -> None:
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(max_chunks)
        self._current = memoryview(b"")
        self._eof = False
        self._closed = False
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._current:
            if self._eof:
                return 0
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._eof = True
                raise item
            if item == _EOF:
                self._eof = True
                return 0
            self._current = memoryview(item)
        n = min(len(buffer), len(self._current))
        buffer[:n] = self._current[:n]
        self._current = self._current[n:]
        self.bytes_read += n
        return n

    def put(self, chunk: bytes) -> bool:
        """Producer side: enqueue a chunk, waiting while the queue is full.

        Returns False (chunk dropped) once the consumer has stopped reading.
        """
        while chunk and not self._closed:
            try:
                self._queue.put(chunk, timeout=0.1)
                return True
            except queue.Full:
                continue
        return not self._closed

    def finish(self, error: BaseException | None = None) -> None:
        """Producer side: signal the end, or an error the consumer will raise."""
        item = error if error is not None else _EOF
        while not self._closed:
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def drain(self) -> None:
        """Consumer side: stop reading; a blocked producer gives up on its next wait."""
        self._eof = True
        self._closed = True
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return


async def consume_in_thread(
    chunks: AsyncIterator[bytes], consumer: Callable[[BinaryIO], T], max_chunks: int = 8
) -> T:
    """Run ``consumer(reader)`` in a thread while feeding it ``chunks`` from this loop.

    An error on either side ends both: a failed download surfaces in the consumer as
    the download's exception, and a consumer that fails stops the download.
    """
    raw = QueueReader(max_chunks)
    reader = cast(BinaryIO, io.BufferedReader(raw, buffer_size=1 << 20))
    loop = asyncio.get_running_loop()

    def run_consumer() -> T:
        try:
            return consumer(reader)
        finally:
            raw.drain()

    task = loop.run_in_executor(None, run_consumer)
    try:
        async for chunk in chunks:
            if not await loop.run_in_executor(None, raw.put, chunk):
                break
    except BaseException as exc:
        await loop.run_in_executor(None, raw.finish, exc)
        await asyncio.gather(task, return_exceptions=True)
        raise
    await loop.run_in_executor(None, raw.finish)
    return await task
