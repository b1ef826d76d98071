"""An HTTP proxy in front of a real registry that injects the faults registries show.

Real registries and their CDNs reset connections mid-body, shed load with 503/429 and
Retry-After, stall, truncate, (rarely) corrupt bytes, and now and then answer with
something that is not HTTP a client can read, such as a header line far past any
parser's limit. Tests put this proxy between acceld and the real `docker-registry` so
every such fault is reproduced on demand, while everything else is served by the real
registry unchanged.
"""

from __future__ import annotations

import abc
import asyncio
import threading
from dataclasses import dataclass, field
from typing import Literal, Self

import aiohttp
from aiohttp import web

from common.logging import get_logger
from rig.threaded_server import ThreadedServer

log = get_logger(__name__)

FaultKind = Literal["reset", "status", "stall", "truncate", "flip", "header"]
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
        "content-length",
    }
)
"""Headers a proxy must not pass on (and Content-Length, which each answer sets anew)."""


@dataclass
class Fault:
    """One fault rule: applies to the next ``times`` requests matching method and path.

    reset: send headers and ``after_bytes`` of the body, then drop the connection.
    status: answer ``status`` (with ``retry_after`` if set) without asking the registry.
    stall: send ``after_bytes`` then stop sending for ``stall_seconds``.
    truncate: declare the full length, send ``after_bytes``, close cleanly.
    flip: invert one byte at offset ``after_bytes`` of the body.
    header: the registry's answer plus one header line of ``header_bytes``.
    """

    kind: FaultKind
    path_contains: str = "/blobs/sha256:"
    method: str = "GET"
    times: int = 1
    status: int = 503
    retry_after: str | None = None
    after_bytes: int = 0
    stall_seconds: float = 5.0
    header_bytes: int = 1 << 20
    hits: int = field(default=0, init=False)


class UpstreamProxy(ThreadedServer, abc.ABC):
    """A reverse proxy on 127.0.0.1 to ``upstream`` (http://host:port), run on its own
    thread: every request goes to ``_handle``, which may ask upstream with ``_session``
    (bodies passed through as they are, not decompressed)."""

    def __init__(self, upstream: str, name: str) -> None:
        super().__init__(self._make_app, name=name)
        self.upstream = upstream.rstrip("/")
        self._lock = threading.Lock()
        self._session: aiohttp.ClientSession | None = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _make_app(self) -> web.Application:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        app.on_cleanup.append(self._close_session)
        return app

    async def _close_session(self, _app: web.Application) -> None:
        if self._session:
            await self._session.close()

    @abc.abstractmethod
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        """Answer one request (each proxy's own business)."""


class FaultProxy(UpstreamProxy):
    """Passes requests to the registry, with the armed faults applied."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream, "fault-proxy")
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str, int]] = []
        self.headers: list[dict[str, str]] = []
        """Each request's headers, in the order of ``requests``' arrival."""

    def add(self, fault: Fault) -> Fault:
        """Arm a fault; returns it so a test can read ``hits`` afterwards."""
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        """Disarm every fault."""
        with self._lock:
            self.faults.clear()

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if (
                    fault.hits < fault.times
                    and fault.method == method
                    and (fault.path_contains in path)
                ):
                    fault.hits += 1
                    return fault
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.headers.append({k: ", ".join(request.headers.getall(k)) for k in request.headers})
        fault = self._take_fault(request.method, request.path)
        if fault and fault.kind == "status":
            self.requests.append((request.method, request.path_qs, fault.status))
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            return web.Response(status=fault.status, headers=headers, text="injected fault")
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        body = await request.read()
        async with self._session.request(
            request.method,
            self.upstream + request.path_qs,
            headers=headers,
            data=body or None,
            allow_redirects=False,
        ) as upstream:
            self.requests.append((request.method, request.path_qs, upstream.status))
            out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
            payload = await upstream.read()
        if fault is None or request.method == "HEAD":
            return web.Response(status=upstream.status, headers=out_headers, body=payload)
        return await self._faulty_response(request, fault, upstream.status, out_headers, payload)

    async def _faulty_response(
        self,
        request: web.Request,
        fault: Fault,
        status: int,
        headers: dict[str, str],
        payload: bytes,
    ) -> web.StreamResponse:
        log.info("fault_proxy.inject", kind=fault.kind, path=request.path)
        if fault.kind == "header":
            headers = {**headers, "X-Fault-Padding": "x" * fault.header_bytes}
            return web.Response(status=status, headers=headers, body=payload)
        if fault.kind == "flip" and fault.after_bytes < len(payload):
            flipped = bytearray(payload)
            flipped[fault.after_bytes] ^= 0xFF
            return web.Response(status=status, headers=headers, body=bytes(flipped))
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = len(payload)
        await response.prepare(request)
        await response.write(payload[: fault.after_bytes])
        if fault.kind == "stall":
            await asyncio.sleep(fault.stall_seconds)
            await response.write(payload[fault.after_bytes :])
            await response.write_eof()
            return response
        transport = request.transport
        if transport is not None:
            if fault.kind == "reset":
                transport.abort()
            else:
                transport.close()
        return response
