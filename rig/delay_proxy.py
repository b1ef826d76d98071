"""A TCP proxy that adds a fixed one-way delay in each direction, like a long cable.

This kernel has no netem, so the round-trip time of a realistic registry link has to be
made in user space. The proxy behaves like a pipe, not like a slow hop: every chunk is
stamped when it is read and written once its stamp plus the delay has passed, while the
next chunks are already being read. Throughput therefore stays what the link beneath
allows and only latency is added. Each direction holds at most ``queue_limit`` bytes in
flight; beyond that the proxy stops reading, so TCP flow control slows the sender
instead of the proxy's memory growing.

The kernel completes the client's handshake with the proxy at once, but on a real link a
connection costs a round trip before the first request byte can leave. The proxy charges
it: bytes from the client count as sent no earlier than one RTT after the accept, so the
first response on a fresh connection arrives after two RTTs, as it would over the wire.

Run in-process with `BackgroundDelayProxy`, or standalone:
`python -m rig.delay_proxy --listen 127.0.0.1:8080 --target 10.1.2.2:5000 --delay-ms 2.5`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import threading
from collections import deque
from typing import Final

from common.logging import configure_logging, get_logger

log = get_logger(__name__)

_READ_SIZE: Final = 256 * 1024
DEFAULT_QUEUE_LIMIT: Final = 4 * 1024 * 1024


class _Marker:
    """End-of-stream events that travel through a delay line behind the data."""

    def __init__(self, name: str) -> None:
        self.name = name


_EOF: Final = _Marker("eof")
_RESET: Final = _Marker("reset")


class _DelayLine:
    """One direction of one connection: chunks in flight, each with its due time."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._items: deque[tuple[float, bytes | _Marker]] = deque()
        self._bytes = 0
        self._changed = asyncio.Condition()

    async def put(self, due: float, item: bytes | _Marker) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self._bytes < self._limit)
            self._items.append((due, item))
            if isinstance(item, bytes):
                self._bytes += len(item)
            self._changed.notify_all()

    async def get(self) -> tuple[float, bytes | _Marker]:
        async with self._changed:
            await self._changed.wait_for(lambda: bool(self._items))
            due, item = self._items.popleft()
            if isinstance(item, bytes):
                self._bytes -= len(item)
            self._changed.notify_all()
            return due, item


class DelayProxy:
    """Forward every connection accepted on a listening socket to ``target``, delayed."""

    def __init__(
        self,
        target: tuple[str, int],
        delay_ms: float,
        queue_limit: int = DEFAULT_QUEUE_LIMIT,
    ) -> None:
        self.target = target
        self.delay = delay_ms / 1000.0
        self.queue_limit = queue_limit
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int = 0) -> tuple[str, int]:
        """Listen on ``host:port`` (0 = any free port) and return the bound address."""
        self._server = await asyncio.start_server(self._serve_connection, host, port)
        bound = self._server.sockets[0].getsockname()
        log.info(
            "delay_proxy.started",
            listen=f"{bound[0]}:{bound[1]}",
            target=f"{self.target[0]}:{self.target[1]}",
            delay_ms=self.delay * 1000,
        )
        return bound[0], bound[1]

    async def close(self) -> None:
        """Stop listening and drop every open connection."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        log.info("delay_proxy.stopped", target=f"{self.target[0]}:{self.target[1]}")

    async def _serve_connection(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        writers = [client_writer]
        try:
            await self._relay(client_reader, client_writer, writers)
        except asyncio.CancelledError:
            # Only close() cancels a connection. Python 3.11's start_server reports a
            # handler that ends cancelled as an unhandled loop error, so end normally.
            pass
        finally:
            for writer in writers:
                writer.transport.abort()
            self._connections.discard(task)

    async def _relay(
        self,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
        writers: list[asyncio.StreamWriter],
    ) -> None:
        """Pump both directions until both ended; ``writers`` collects what to close."""
        handshake_done = asyncio.get_running_loop().time() + 2 * self.delay
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
            writers.append(upstream_writer)
            upload, download = _DelayLine(self.queue_limit), _DelayLine(self.queue_limit)
            async with asyncio.TaskGroup() as group:
                group.create_task(self._read_into(client_reader, upload, handshake_done))
                group.create_task(self._write_from(upload, upstream_writer))
                group.create_task(self._read_into(upstream_reader, download, 0.0))
                group.create_task(self._write_from(download, client_writer))
        except* OSError as errors:
            log.debug("delay_proxy.connection_failed", error=str(errors.exceptions[0]))

    async def _read_into(
        self, reader: asyncio.StreamReader, line: _DelayLine, not_before: float
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await reader.read(_READ_SIZE)
            except OSError:
                await line.put(max(loop.time(), not_before) + self.delay, _RESET)
                return
            await line.put(max(loop.time(), not_before) + self.delay, data or _EOF)
            if not data:
                return

    async def _write_from(self, line: _DelayLine, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, item = await line.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if item is _RESET:
                writer.transport.abort()
                return
            if item is _EOF:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            assert isinstance(item, bytes)
            writer.write(item)
            await writer.drain()


class BackgroundDelayProxy:
    """A `DelayProxy` on its own thread and event loop, for synchronous callers.

    Tests and benchmarks drive clients that block (or run their own loop), so the proxy
    cannot share their loop.
    """

    def __init__(
        self,
        listen_host: str,
        target: tuple[str, int],
        delay_ms: float,
        listen_port: int = 0,
        queue_limit: int = DEFAULT_QUEUE_LIMIT,
    ) -> None:
        self._proxy = DelayProxy(target, delay_ms, queue_limit)
        self._listen = (listen_host, listen_port)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.address: tuple[str, int] | None = None

    def start(self) -> tuple[str, int]:
        """Start serving; returns the (host, port) clients should connect to."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="delay-proxy", daemon=True
        )
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._proxy.start(*self._listen), self._loop)
        try:
            self.address = future.result(10)
        except BaseException:
            self.stop()
            raise
        return self.address

    def stop(self) -> None:
        """Close every connection and join the thread (idempotent)."""
        thread, self._thread = self._thread, None
        loop, self._loop = self._loop, None
        if thread is None or loop is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._proxy.close(), loop).result(10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()

    @property
    def running(self) -> bool:
        """Whether the proxy thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> BackgroundDelayProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


async def _serve_until_signalled(listen: tuple[str, int], proxy: DelayProxy) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await proxy.start(*listen)
    try:
        await stop.wait()
    finally:
        await proxy.close()


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: serve until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--listen", type=_host_port, required=True, help="HOST:PORT to accept on")
    parser.add_argument("--target", type=_host_port, required=True, help="HOST:PORT to forward to")
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay per direction")
    parser.add_argument("--queue-limit", type=int, default=DEFAULT_QUEUE_LIMIT)
    args = parser.parse_args(argv)
    configure_logging()
    proxy = DelayProxy(args.target, args.delay_ms, args.queue_limit)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_until_signalled(args.listen, proxy))


if __name__ == "__main__":
    main()
