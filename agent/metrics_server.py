"""/metrics and /healthz, served from threads of their own.

They used to run on the agent's event loop, so when that loop hung they hung with it:
the scrape and the probe timed out like everything else and showed nothing. On a thread
they answer through a stall, and /healthz says 503 "stalled" while it lasts.
"""

from __future__ import annotations

import json
import socket
import socketserver
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

Health = Callable[[], Mapping[str, object]]
StartResponse = Callable[..., Any]


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host with getfqdn, which can wait on DNS
        # (e.g. for 0.0.0.0 on a node whose resolver is down) before serving anything.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)
        self.setup_environ()


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    """No access log: Prometheus scrapes and kubelet probes would fill it."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too; an empty host means loopback)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


class MetricsServer:
    """Prometheus exposition and the health probe on ``address``."""

    def __init__(self, address: str, registry: CollectorRegistry, health: Health) -> None:
        self.address = address
        self._metrics = make_wsgi_app(registry)
        self._health = health
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (the configured one, or the one chosen for port 0)."""
        if self._server is None:
            raise RuntimeError("the metrics server is not running")
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Bind (errors surface here, to the caller) and serve on a daemon thread."""
        host, port = split_address(self.address)
        server_class = _Server6 if ":" in host else _Server
        self._server = make_server(
            host, port, self._app, server_class=server_class, handler_class=_QuietHandler
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="acceld-metrics",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting, close the socket, wait for the serving thread (blocking)."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def _app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            body: Iterable[bytes] = self._metrics(environ, start_response)
            return body
        if path == "/healthz":
            status = self._health()
            code = "200 OK" if status.get("status") == "ok" else "503 Service Unavailable"
            payload = json.dumps(status).encode()
            start_response(
                code,
                [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))],
            )
            return [payload]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]
