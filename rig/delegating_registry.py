"""A registry stand-in that delegates, and the storage and token service it sends to.

Where a client follows a registry is the client's decision (`fetcher.delegation`), and
so is the way it gets there (`fetcher.proxy_env`): tests of both need a registry that
redirects blob GETs and names token realms wherever the test says, and a delegate that
records the address each request reached (the one the client, or its proxy, actually
connected to). The hosts are names and addresses of a test's own network namespace
(`rig.isolated_net`); either server may serve TLS.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import ssl
from collections.abc import Iterator

from aiohttp import web

from fetcher.errors import RegistryError
from fetcher.proxy_env import ProxySelector
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from rig.threaded_server import ThreadedServer

MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": "sha256:" + "b" * 64,
            "size": 2,
        },
        "layers": [],
    }
).encode()
"""The one manifest every repository serves."""
BLOB = bytes(range(256)) * 16
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
RANGE = (100, 1000)
"""(offset, length) of the blob that `read_outcome` reads."""
TOKEN = "t0ken"


class StorageDelegate(ThreadedServer):
    """Storage (``/blob``, Range GETs of BLOB) and token service (``/token``) on every
    address at once, recording the address each request reached."""

    def __init__(self, port: int | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__(
            self._app, name="delegate", host="0.0.0.0", port=port, ssl_context=ssl_context
        )
        self.reached: list[str] = []

    async def _app(self) -> web.Application:
        def record(request: web.Request) -> None:
            assert request.transport is not None
            self.reached.append(request.transport.get_extra_info("sockname")[0])

        async def blob(request: web.Request) -> web.Response:
            record(request)
            first, last = request.http_range.start, request.http_range.stop
            headers = {"Content-Range": f"bytes {first}-{last - 1}/{len(BLOB)}"}
            return web.Response(status=206, body=BLOB[first:last], headers=headers)

        async def token(request: web.Request) -> web.Response:
            record(request)
            return web.json_response({"token": TOKEN, "expires_in": 300})

        app = web.Application()
        app.router.add_get("/blob", blob)
        app.router.add_get("/token", token)
        return app


class DelegatingRegistry(ThreadedServer):
    """A registry on ``address`` that sends each repository's blob GETs to
    ``redirects[repository]`` and, for a repository in ``realms``, its manifest GETs
    for a token to ``realms[repository]`` (URL templates; ``{port}`` is the delegate's)."""

    def __init__(
        self,
        address: str,
        delegate: StorageDelegate,
        redirects: dict[str, str] | None = None,
        realms: dict[str, str] | None = None,
        port: int | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(
            self._app,
            name="delegating-registry",
            host=address,
            port=port,
            ssl_context=ssl_context,
        )
        self.delegate = delegate
        self.redirects = redirects or {}
        self.realms = realms or {}

    async def _app(self) -> web.Application:
        port = self.delegate.port

        async def blob(request: web.Request) -> web.Response:
            location = self.redirects[request.match_info["repo"]].format(port=port)
            return web.Response(status=307, headers={"Location": location})

        async def manifest(request: web.Request) -> web.Response:
            realm = self.realms.get(request.match_info["repo"])
            if realm and request.headers.get("Authorization") != f"Bearer {TOKEN}":
                challenge = f'Bearer realm="{realm.format(port=port)}",service="svc"'
                return web.Response(status=401, headers={"WWW-Authenticate": challenge})
            media = "application/vnd.oci.image.manifest.v1+json"
            return web.Response(body=MANIFEST, headers={"Content-Type": media})

        app = web.Application()
        app.router.add_get("/v2/{repo}/blobs/{digest}", blob)
        app.router.add_get("/v2/{repo}/manifests/{reference}", manifest)
        return app


@contextlib.contextmanager
def serving(*servers: ThreadedServer) -> Iterator[None]:
    """Start ``servers``; stop them all on the way out."""
    with contextlib.ExitStack() as stack:
        for server in servers:
            server.start()
            stack.callback(server.stop)
        yield


async def read_outcome(
    registry: str,
    repository: str,
    what: str,
    *,
    plain_http: bool = True,
    proxies: ProxySelector | None = None,
) -> str:
    """What one read (``blob``: RANGE of BLOB, else the manifest) by a fresh client came
    to: ``ok`` or the error's class name. ``proxies`` replaces the environment's."""
    reference = ImageReference.parse(f"{registry}/{repository}:v1")
    try:
        async with RegistryClient(plain_http_hosts={registry} if plain_http else set()) as client:
            if proxies is not None:
                client.transport.proxies = proxies
            if what == "blob":
                data = await client.get_range(reference, BLOB_DIGEST, RANGE[0], RANGE[1])
                assert data == BLOB[RANGE[0] : RANGE[0] + RANGE[1]]
            else:
                assert (await client.get_manifest(reference)).body == MANIFEST
    except RegistryError as exc:
        return type(exc).__name__
    return "ok"
