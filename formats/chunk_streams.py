"""Streams of byte chunks, as a layer arrives from a registry download or a file: the
plumbing that lets one pass over a blob inflate it, count it and walk its tar at once.

Kept apart from what uses them (formats/layer_index_builder.py) because none of it
knows about layers: they are iterator and file-object adapters.
"""

from __future__ import annotations

import contextlib
import io
import queue
import threading
from collections.abc import Generator, Iterable, Iterator
from typing import Any

from formats.toc import HostileLayerError

READ_CHUNK = 1 << 20


def iter_chunks(stream: io.IOBase) -> Iterator[bytes]:
    while chunk := stream.read(READ_CHUNK):
        yield chunk


def in_background(
    chunks: Generator[bytes, None, None], depth: int = 4
) -> Generator[bytes, None, None]:
    """Run a generator in a worker thread and hand its chunks over through a bounded
    queue. Inflating (zlib through ctypes) and hashing release the GIL, so on two cores
    the inflate pass and the Python-heavy tar walk overlap instead of adding up."""
    handoff: queue.Queue[bytes | BaseException | None] = queue.Queue(depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for chunk in chunks:
                if stop.is_set():
                    break
                handoff.put(chunk)
            else:
                handoff.put(None)
        except BaseException as exc:
            handoff.put(exc)
        finally:
            chunks.close()

    worker = threading.Thread(target=produce, name="layer-index-inflate", daemon=True)
    worker.start()
    try:
        while (item := handoff.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while worker.is_alive():
            with contextlib.suppress(queue.Empty):
                handoff.get(timeout=0.05)
        worker.join()


class CountedChunks:
    """Counts the bytes going by: a blob's size, without a second pass."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = chunks
        self.total = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._chunks:
            self.total += len(chunk)
            yield chunk


class ChunkReader(io.RawIOBase):
    """A read-only stream over an iterator of chunks.

    ``read`` hands out slices of the current chunk rather than filling a caller buffer:
    tarfile reads in small records, and avoiding a copy per record matters at GB scale.
    """

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._current = b""
        self._pos = 0
        self.position = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return b"".join(iter(lambda: self.read(READ_CHUNK), b""))
        while self._pos >= len(self._current):
            if not self._advance():
                return b""
        piece = self._current[self._pos : self._pos + size]
        self._pos += len(piece)
        self.position += len(piece)
        return piece

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def drain(self, required_end: int) -> None:
        """Consume what the tar walker left (end-of-archive padding), so the whole
        stream is inflated and counted; the stream must reach ``required_end``."""
        self.position += len(self._current) - self._pos
        self._pos = len(self._current)
        while self._advance():
            self.position += len(self._current)
            self._pos = len(self._current)
        if self.position < required_end:
            raise HostileLayerError("the layer ends inside a file's data")

    def _advance(self) -> bool:
        nxt = next(self._chunks, None)
        if nxt is None:
            return False
        self._current, self._pos = nxt, 0
        return True
