"""A stand-in storage CDN: serves a registry's filesystem storage for its redirects.

Production registries answer blob GETs with a redirect to object storage or a CDN.
The real `docker-registry` does the same with its `redirect` storage middleware pointed
at this server, which serves the registry's own storage directory (with Range support),
so redirect handling is tested end to end against the real registry.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from rig.threaded_server import ThreadedServer


class BlobCDN(ThreadedServer):
    """Serves files under ``root`` at their relative paths; counts the requests it gets."""

    def __init__(self, root: Path) -> None:
        super().__init__(self._make_app, name="blob-cdn")
        self.root = root
        self.requests: list[tuple[str, str, str | None]] = []

    async def _make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path, request.headers.get("Range")))
        path = (self.root / request.match_info["tail"]).resolve()
        if not path.is_relative_to(self.root.resolve()) or not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path)
