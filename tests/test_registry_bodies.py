"""The registry client against a registry that lies about its bodies (issue 21, items
4 and 7): bodies are read to their end but never past what they may legitimately be,
and a manifest pinned by any registered digest algorithm is checked in that algorithm.

The registry is a small aiohttp server of the test's own on loopback: what it sends is
what the test says, byte for byte and piece by piece.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterator

import pytest
from aiohttp import web

from fetcher.errors import (
    DigestMismatchError,
    NotFoundError,
    RegistryUnavailableError,
    ResponseTooLargeError,
    UnauthorizedError,
)
from fetcher.manifest import MAX_MANIFEST_BYTES
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from fetcher.retry import RetryPolicy
from rig.threaded_server import ThreadedServer

LAYER = "sha256:" + "a" * 64
CONFIG = {"mediaType": "application/vnd.oci.image.config.v1+json", "size": 2}
MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {**CONFIG, "digest": "sha256:" + "b" * 64},
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": LAYER,
                "size": 10,
            }
        ]
        * 40,
        "annotations": {"padding": "x" * 20_000},
    }
).encode()
SHA256 = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()
SHA512 = "sha512:" + hashlib.sha512(MANIFEST).hexdigest()
HUGE = 64 << 20
"""Far past every cap, small enough that the test stays quick if a cap fails."""


async def _stream(
    request: web.Request, pieces: Iterator[bytes], **headers: str
) -> web.StreamResponse:
    response = web.StreamResponse(headers=headers)
    await response.prepare(request)
    for piece in pieces:
        await response.write(piece)
        await asyncio.sleep(0.05)  # each piece its own arrival
    await response.write_eof()
    return response


def _pieces(body: bytes) -> Iterator[bytes]:
    for start in range(0, len(body), 1000):
        yield body[start : start + 1000]


def _zeros(total: int) -> Iterator[bytes]:
    for _ in range(total // (1 << 20)):
        yield bytes(1 << 20)


async def _app() -> web.Application:
    async def manifest(request: web.Request) -> web.StreamResponse:
        repo = request.match_info["repo"]
        media = {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}
        if repo == "huge":
            return await _stream(request, _zeros(HUGE), **media)
        if repo == "forged":
            return await _stream(request, iter([MANIFEST.replace(b"padding", b"paddinG")]), **media)
        return await _stream(request, _pieces(MANIFEST), **media)

    async def blob(request: web.Request) -> web.StreamResponse:
        repo = request.match_info["repo"]
        if repo == "missing":  # a 404 whose error document never ends
            response = web.StreamResponse(status=404)
            await response.prepare(request)
            for piece in _zeros(HUGE):
                await response.write(piece)
            await response.write_eof()
            return response
        start, _, end = request.headers["Range"].removeprefix("bytes=").partition("-")
        length = int(end) - int(start) + 1
        headers = {"Content-Range": f"bytes {start}-{end}/{HUGE}"}
        response = web.StreamResponse(status=206, headers=headers)
        await response.prepare(request)
        for piece in _zeros(HUGE):  # far more than the range asked for
            await response.write(piece)
        await response.write_eof()
        assert length < HUGE
        return response

    async def referrers(request: web.Request) -> web.StreamResponse:
        return await _stream(
            request, _zeros(HUGE), **{"Content-Type": "application/vnd.oci.image.index.v1+json"}
        )

    async def token_challenge(request: web.Request) -> web.Response:
        realm = f"http://{request.host}/token"
        return web.Response(
            status=401, headers={"WWW-Authenticate": f'Bearer realm="{realm}",service="t"'}
        )

    async def token(request: web.Request) -> web.StreamResponse:
        return await _stream(request, _zeros(HUGE), **{"Content-Type": "application/json"})

    async def base(_: web.Request) -> web.Response:
        return web.Response(text="{}")

    async def tags(request: web.Request) -> web.Response:
        """A tag listing whose next page never stops coming."""
        page = int(request.query.get("page", "0"))
        link = f'</v2/{request.match_info["repo"]}/tags/list?page={page + 1}>; rel="next"'
        return web.json_response({"tags": [f"t{page}a", f"t{page}b"]}, headers={"Link": link})

    app = web.Application()
    app.router.add_get("/v2/", base)
    app.router.add_get("/v2/{repo}/manifests/{reference}", manifest)
    app.router.add_get("/v2/{repo}/blobs/{digest}", blob)
    app.router.add_get("/v2/{repo}/referrers/{digest}", referrers)
    app.router.add_get("/v2/{repo}/tags/list", tags)
    app.router.add_get("/v2/auth/manifests/{reference}", token_challenge)
    app.router.add_get("/token", token)
    return app


@pytest.fixture(scope="module")
def liar() -> Iterator[ThreadedServer]:
    server = ThreadedServer(_app, name="lying-registry")
    server.start()
    yield server
    server.stop()


def _client(server: ThreadedServer) -> RegistryClient:
    return RegistryClient(
        plain_http_hosts=frozenset({server.host}), retry=RetryPolicy(attempts=2, base_delay=0.01)
    )


async def test_a_manifest_arriving_in_pieces_is_read_whole(liar: ThreadedServer) -> None:
    async with _client(liar) as client:
        fetched = await client.get_manifest(ImageReference.parse(f"{liar.host}/slow:tag"))
    assert fetched.body == MANIFEST and fetched.digest == SHA256


@pytest.mark.parametrize("digest", [SHA256, SHA512])
async def test_a_pinned_manifest_is_checked_in_its_own_algorithm(
    liar: ThreadedServer, digest: str
) -> None:
    async with _client(liar) as client:
        fetched = await client.get_manifest(ImageReference.parse(f"{liar.host}/slow@{digest}"))
        assert fetched.body == MANIFEST
        with pytest.raises(DigestMismatchError):
            await client.get_manifest(ImageReference.parse(f"{liar.host}/forged@{digest}"))


async def test_bodies_past_their_bound_are_refused(liar: ThreadedServer) -> None:
    async with _client(liar) as client:
        with pytest.raises(ResponseTooLargeError):
            await client.get_manifest(ImageReference.parse(f"{liar.host}/huge:tag"))
        ref = ImageReference.parse(f"{liar.host}/any:tag")
        with pytest.raises(RegistryUnavailableError, match="ResponseTooLargeError"):
            await client.get_range(ref, LAYER, 0, 4096)
        with pytest.raises(ResponseTooLargeError):
            await client.referrers(ref, SHA256)
        with pytest.raises(NotFoundError):  # the status counts, not the endless document
            await client.get_range(ImageReference.parse(f"{liar.host}/missing:tag"), LAYER, 0, 1)
        with pytest.raises(UnauthorizedError, match="token"):
            await client.get_manifest(ImageReference.parse(f"{liar.host}/auth:tag"))
    assert MAX_MANIFEST_BYTES < HUGE


async def test_a_tag_listing_that_never_ends_is_read_only_as_far_as_asked(
    liar: ThreadedServer,
) -> None:
    async with RegistryClient() as client:
        listed = await client.list_tags(ImageReference.parse(f"{liar.host}/endless:tag"), 5)
    assert listed == ["t0a", "t0b", "t1a", "t1b", "t2a"]
