"""Decode a chunk while its range GET is still arriving.

A blocked read used to wait for the last byte of its chunk and then for the chunk to be
inflated and hashed (~15-20 ms for a 4 MiB index span, one such wait per demand miss).
Fed piece by piece on a worker thread as the body arrives, the decoder is nearly done
when the last byte lands.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor

from fetcher.chunks import ChunkDecoder


class StreamingDecode:
    """A range sink that runs one chunk's decoder on ``executor`` as the bytes arrive.

    Every step is submitted to the same single-thread executor, so steps run in order
    without the event loop waiting for any of them.
    """

    def __init__(self, make: Callable[[], ChunkDecoder], executor: Executor) -> None:
        self._make = make
        self._executor = executor
        self._decoder: ChunkDecoder | None = None
        self._error: Exception | None = None

    # -- event loop side ----------------------------------------------------------

    def restart(self) -> None:
        """A (new) attempt's body begins."""
        self._executor.submit(self._restart)

    def feed(self, data: bytes) -> None:
        """The next piece of the body."""
        self._executor.submit(self._feed, data)

    async def outcome(self) -> bytes:
        """The verified content once the whole body was fed (raises as decode would)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._finish)

    def abandon(self) -> None:
        """The GET failed or was cancelled: free the decoder."""
        self._executor.submit(self._close)

    # -- worker thread side -------------------------------------------------------

    def _restart(self) -> None:
        self._close()
        try:
            self._decoder = self._make()
        except Exception as exc:  # e.g. a checkpoint window that does not inflate
            self._error = exc

    def _feed(self, data: bytes) -> None:
        if self._decoder is not None:
            self._decoder.feed(data)

    def _finish(self) -> bytes:
        decoder, self._decoder = self._decoder, None
        if self._error is not None:
            raise self._error
        if decoder is None:
            raise ValueError("no response body was fed to the decoder")
        return decoder.finish()

    def _close(self) -> None:
        decoder, self._decoder = self._decoder, None
        self._error = None
        if decoder is not None:
            decoder.close()
