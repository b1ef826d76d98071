"""Convert-on-push: the real registry notifies the convert-server of a `skopeo` push."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator

import pytest
from aiohttp import web

from converter.prefetch import PrefetchList
from converter.push_events import RepositoryRule, ServerConfig, ServerConfigError
from converter.record_at_conversion import ContainerdTarget, RecordSettings
from converter.server import ConvertServer
from fetcher.errors import NotFoundError
from fetcher.manifest import ImageManifest
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from formats.accelerated import ARTIFACT_TYPE_INDEX
from profiles.plan import prefetch_plan
from profiles.provenance import conversion_node
from profiles.registry_sync import fetch_profile
from rig.images import build_image, oci_layout_reference, push_image
from rig.ports import free_port
from rig.threaded_server import ThreadedServer
from tests.test_profiles_e2e import app_image_spec

TOKEN = "s3cret-token"


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


@contextlib.contextmanager
def _serving(config: ServerConfig) -> Iterator[tuple[ThreadedServer, ConvertServer]]:
    convert_server = ConvertServer(config)

    async def app() -> web.Application:
        return convert_server.app()

    server = ThreadedServer(app, name="convert-server")
    server.start()
    try:
        yield server, convert_server
    finally:
        server.stop()


async def test_skopeo_push_is_converted_and_reported(make_registry, built_busybox, repo_name):
    receiver = _Receiver()
    receiver.server.start()
    config = ServerConfig(
        rules=(RepositoryRule("rig/*", "index", PrefetchList.parse_lines(["/bin/"])),),
        webhook_url=f"{receiver.server.url}/hook",
        token=TOKEN,
        allowed_registries=("127.0.0.1:*",),
    )
    try:
        with _serving(config) as (server, _):
            registry = make_registry(
                notification_urls=[f"{server.url}/events"],
                notification_headers={"Authorization": f"Bearer {TOKEN}"},
            )
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
            assert json.loads(health) == {"queued": 0, "done": 1, "failed": 0, "worker": "running"}
    finally:
        receiver.server.stop()


def _envelope(registry: str, *images: tuple[str, str]) -> bytes:
    """A notification envelope of tagged manifest pushes ((repository, digest) each)."""
    events = [
        {
            "action": "push",
            "target": {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "repository": repository,
                "tag": "v1",
                "digest": digest,
                "url": f"http://{registry}/v2/{repository}/manifests/{digest}",
            },
        }
        for repository, digest in images
    ]
    return json.dumps({"events": events}).encode()


def _post(url: str, body: bytes, token: str | None = TOKEN) -> tuple[int, dict[str, str]]:
    request = urllib.request.Request(url, data=body, method="POST")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers)


UNREACHABLE = f"127.0.0.1:{free_port()}"
"""A registry nobody listens on: a conversion from it fails after its retries."""
DIGEST = "sha256:" + "c" * 64


def _config(**changes: object) -> ServerConfig:
    settings: dict[str, object] = {
        "rules": (RepositoryRule("*", "index", PrefetchList(())),),
        "token": TOKEN,
        "allowed_registries": ("127.0.0.1:*",),
    }
    return ServerConfig(**(settings | changes))  # type: ignore[arg-type]


def test_a_server_with_open_events_or_open_registries_does_not_start() -> None:
    with pytest.raises(ServerConfigError, match="token"):
        ConvertServer(_config(token=None))
    with pytest.raises(ServerConfigError, match="registry"):
        ConvertServer(_config(allowed_registries=()))


def test_events_need_the_token_and_name_an_allowed_registry() -> None:
    with _serving(_config()) as (server, convert_server):
        body = _envelope(UNREACHABLE, ("app", DIGEST))
        assert _post(f"{server.url}/events", body, token=None)[0] == 401
        assert _post(f"{server.url}/events", body, token="wrong")[0] == 401
        assert convert_server.metrics.events.labels("unauthorized")._value.get() == 2
        elsewhere = _envelope("registry.example:443", ("app", DIGEST))
        assert _post(f"{server.url}/events", elsewhere)[0] == 200
        assert convert_server.metrics.events.labels("registry_not_allowed")._value.get() == 1
        assert convert_server.metrics.events.labels("queued")._value.get() == 0


def test_a_push_that_breaks_its_conversion_does_not_stop_the_worker() -> None:
    with _serving(_config()) as (server, convert_server):
        # A digest the reference parser refuses: the conversion raises ValueError.
        assert _post(f"{server.url}/events", _envelope(UNREACHABLE, ("app", "sha256:zz")))[0] == 200
        assert _post(f"{server.url}/events", _envelope(UNREACHABLE, ("app", DIGEST)))[0] == 200
        deadline = time.monotonic() + 60
        while convert_server.failed < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        health = json.loads(_get(f"{server.url}/healthz"))
        assert health == {"queued": 0, "done": 0, "failed": 2, "worker": "running"}


def test_a_full_queue_answers_429_and_queues_nothing_more() -> None:
    with _serving(_config(queue_size=1)) as (server, convert_server):
        images = [(f"app{i}", DIGEST) for i in range(4)]  # the first keeps the worker busy
        statuses = [
            _post(f"{server.url}/events", _envelope(UNREACHABLE, image)) for image in images
        ]
        assert [status for status, _ in statuses][:2] == [200, 200]
        assert statuses[-1][0] == 429 and statuses[-1][1]["Retry-After"]
        assert convert_server.metrics.events.labels("queue_full")._value.get() >= 1


def test_record_profile_is_read_per_repository_rule(tmp_path) -> None:
    config = tmp_path / "server.yaml"
    config.write_text(
        "allowed_registries: ['127.0.0.1:*']\n"
        "containerd: {address: /run/c.sock, snapshotter: overlayfs}\n"
        "repositories:\n"
        "  - match: 'web/*'\n"
        "    record_profile: {ready_pattern: 'listening on', timeout_s: 30, memory_mb: 256}\n"
        "  - match: 'batch/*'\n"
        "    record_profile: true\n"
        "  - match: '*'\n"
    )
    loaded = ServerConfig.load(config)
    web, batch, rest = loaded.rules
    assert web.record == RecordSettings(ready_pattern="listening on", timeout_s=30, memory_mb=256)
    assert batch.record == RecordSettings()
    assert rest.record is None
    assert loaded.containerd == ContainerdTarget("/run/c.sock", "overlayfs")
    config.write_text("repositories: [{match: '*', record_profile: {ready_pattern: '('}}]\n")
    with pytest.raises(ServerConfigError, match="ready_pattern"):
        ServerConfig.load(config)


def _metric(server_url: str, line_start: str) -> float:
    for line in _get(f"{server_url}/metrics").splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_a_rule_with_record_profile_records_after_conversion_and_one_without_does_not(
    make_registry, containerd, tmp_path
):
    """The real flow: the registry notifies the server of two pushes of one image, to a
    repository whose rule records and to one whose rule does not."""
    suffix = uuid.uuid4().hex[:8]
    recorded_repo, plain_repo = f"rig/rec-{suffix}", f"rig/plain-{suffix}"
    receiver = _Receiver()
    receiver.server.start()
    config = ServerConfig(
        rules=(
            RepositoryRule(
                "rig/rec-*",
                "full",
                PrefetchList(()),
                RecordSettings(ready_pattern=r"^ready$", timeout_s=60),
            ),
            RepositoryRule("rig/plain-*", "full", PrefetchList(())),
        ),
        webhook_url=f"{receiver.server.url}/hook",
        token=TOKEN,
        allowed_registries=("127.0.0.1:*",),
        containerd=ContainerdTarget(str(containerd.address), "overlayfs"),
    )
    built = build_image(
        app_image_spec("cat /app/a.bin >/dev/null; echo ready; sleep 60"), tmp_path / "oci", "v1"
    )
    try:
        with _serving(config) as (server, _):
            registry = make_registry(
                notification_urls=[f"{server.url}/events"],
                notification_headers={"Authorization": f"Bearer {TOKEN}"},
            )
            recorded = ImageReference.parse(f"{registry.host}/{recorded_repo}:v1")
            plain = ImageReference.parse(f"{registry.host}/{plain_repo}:v1")
            async with RegistryClient() as client:
                for ref in (recorded, plain):
                    await push_image(client, str(ref), built)
                for ref in (recorded, plain):
                    await _wait_for(client, ref.with_tag("v1_accelerated"))
            deadline = time.monotonic() + 120
            while len(receiver.reports) < 2:
                assert time.monotonic() < deadline, receiver.reports
                await asyncio.sleep(0.5)
            by_image = {report["image"].split("@")[0]: report for report in receiver.reports}
            assert by_image[str(recorded)]["profile"]["outcome"] == "ok", by_image
            assert "profile" not in by_image[str(plain)]
            ok = 'acceld_conversion_profiles_total{outcome="ok"}'
            assert await asyncio.to_thread(_metric, server.url, ok) == 1.0
            async with RegistryClient() as client:
                for ref, expected in ((recorded, True), (plain, False)):
                    accelerated = ref.with_tag("v1_accelerated")
                    resolved = await client.resolve(accelerated)
                    profile = await fetch_profile(client, accelerated, resolved.manifest_digest)
                    assert (profile is not None) is expected, ref
                    if profile is not None:
                        node = conversion_node(socket.gethostname())
                        assert dict(profile.runs.nodes) == {node: 1}
                        assert "/app/a.bin" in {e.path for e in prefetch_plan(profile)}
    finally:
        receiver.server.stop()
