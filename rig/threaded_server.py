"""Run an aiohttp application on its own thread and event loop.

Rig servers (fault proxy, blob CDN, webhook receivers) must serve while a test's own
code blocks or runs another loop, so each gets a private loop on a daemon thread with a
synchronous start/stop that sync fixtures and async tests can both call.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Awaitable, Callable

from aiohttp import web

from common.logging import get_logger
from rig.ports import free_port

log = get_logger(__name__)


class ThreadedServer:
    """Serve ``app_factory()`` on ``host`` (127.0.0.1) and ``port`` (a free one) until
    ``stop()``; over TLS with ``ssl_context``."""

    def __init__(
        self,
        app_factory: Callable[[], Awaitable[web.Application]],
        name: str,
        host: str = "127.0.0.1",
        port: int | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._app_factory = app_factory
        self.name = name
        self.bind_host = host
        self.port = port or free_port(host)
        self.ssl_context = ssl_context
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def host(self) -> str:
        """`host:port` as a registry reference or URL authority would write it."""
        return f"{self.bind_host}:{self.port}"

    @property
    def url(self) -> str:
        """Base URL of the server."""
        return f"{'https' if self.ssl_context else 'http'}://{self.host}"

    def start(self) -> None:
        """Start serving; returns once the port accepts connections."""
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        if not self._ready.wait(15):
            raise RuntimeError(f"{self.name} did not start")
        if self._error:
            raise RuntimeError(f"{self.name} failed to start") from self._error

    def stop(self) -> None:
        """Stop serving and join the thread (idempotent)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if loop.is_running():
            asyncio.run_coroutine_threadsafe(self._cleanup(), loop).result(15)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(15)
        self._thread = None

    def drop_connections(self) -> None:
        """Close every client connection now (answers still being sent are cut off),
        so that the next requests start on fresh ones."""
        self.call(self._drop_connections())

    async def _drop_connections(self) -> None:
        server = self._runner.server if self._runner else None
        for connection in server.connections if server else []:
            connection.force_close()

    def call(self, coro: Awaitable[object]) -> object:
        """Run a coroutine on the server's loop from another thread and wait for it."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)  # type: ignore[arg-type]

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._startup())
        except BaseException as exc:  # reported to start() on the caller's thread
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        loop.run_forever()
        loop.close()

    async def _startup(self) -> None:
        app = await self._app_factory()
        # Handlers still running at stop (a test's endless stall) are cancelled after
        # a moment, not awaited for aiohttp's default minute.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.bind_host, self.port, ssl_context=self.ssl_context)
        await site.start()
        log.info("rig.server_started", server=self.name, port=self.port)

    async def _cleanup(self) -> None:
        if self._runner:
            await self._runner.cleanup()
