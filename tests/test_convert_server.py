"""Convert-on-push: the real registry notifies the convert-server of a `skopeo` push."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
import urllib.request

from aiohttp import web

from converter.prefetch import PrefetchList
from converter.push_events import RepositoryRule, ServerConfig
from converter.server import ConvertServer
from fetcher.errors import NotFoundError
from fetcher.manifest import ImageManifest
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from formats.accelerated import ARTIFACT_TYPE_INDEX
from rig.images import oci_layout_reference
from rig.threaded_server import ThreadedServer


class _Receiver:
    """The outgoing-webhook endpoint an operator would run; records what it gets."""

    def __init__(self) -> None:
        self.reports: list[dict] = []
        self.received = threading.Event()
        self.server = ThreadedServer(self._app, name="webhook-receiver")

    async def _app(self) -> web.Application:
        async def receive(request: web.Request) -> web.Response:
            self.reports.append(await request.json())
            self.received.set()
            return web.Response(status=204)

        app = web.Application()
        app.router.add_post("/hook", receive)
        return app


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


async def _wait_for(client: RegistryClient, ref: ImageReference, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await client.get_manifest(ref)
        except NotFoundError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def test_skopeo_push_is_converted_and_reported(make_registry, built_busybox, repo_name):
    receiver = _Receiver()
    receiver.server.start()
    config = ServerConfig(
        rules=(RepositoryRule("rig/*", "index", PrefetchList.parse_lines(["/bin/"])),),
        webhook_url=f"{receiver.server.url}/hook",
    )
    convert_server = ConvertServer(config)

    async def app() -> web.Application:
        return convert_server.app()

    server = ThreadedServer(app, name="convert-server")
    server.start()
    try:
        registry = make_registry(notification_urls=[f"{server.url}/events"])
        target = f"{registry.host}/{repo_name}:v1"
        await asyncio.to_thread(
            subprocess.run,
            [
                "skopeo",
                "copy",
                "--dest-tls-verify=false",
                oci_layout_reference(built_busybox.layout, built_busybox.tag),
                f"docker://{target}",
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        async with RegistryClient() as client:
            accelerated = await _wait_for(client, ImageReference.parse(target + "_accelerated"))
        assert isinstance(accelerated.parsed, ImageManifest)
        assert accelerated.parsed.artifact_type == ARTIFACT_TYPE_INDEX
        assert await asyncio.to_thread(receiver.received.wait, 30)
        assert [r["outcome"] for r in receiver.reports] == ["converted"]
        assert receiver.reports[0]["target"] == target + "_accelerated"
        text = await asyncio.to_thread(_get, f"{server.url}/metrics")
        assert 'acceld_conversions_total{mode="index",outcome="converted"} 1.0' in text
        # Our own pushes (the artifact, the referrers tag, `_accelerated`) are not converted.
        await asyncio.sleep(2)
        health = await asyncio.to_thread(_get, f"{server.url}/healthz")
        assert json.loads(health) == {"queued": 0, "done": 1}
    finally:
        server.stop()
        receiver.server.stop()
