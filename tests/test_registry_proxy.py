"""Registries reached through an HTTP proxy the way containerd reaches them (issue 26):
a real proxy from Debian's packages (tinyproxy, `rig.http_proxy`) between the node and
the registry, chosen by HTTP_PROXY / HTTPS_PROXY / NO_PROXY (`fetcher.proxy_env`).

Go never proxies loopback, so the registry must be somewhere else: in a network
namespace of the test's own, at its private address, for the starts through the real
agent and containerd (plain http, so HTTP_PROXY and absolute-URI requests, as
containerd does for an http registry); on "public" addresses of a throwaway namespace
(`rig.isolated_net`) for https through CONNECT tunnels, token realms and redirects to
storage, driven through the registry client itself.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import os
import secrets
import ssl
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from converter.convert import ConvertOptions, convert_image
from fetcher.errors import RegistryError
from fetcher.proxy_env import ProxyEnvironment, ProxySelector
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from rig.agent_process import AgentProcess
from rig.certificates import write_self_signed
from rig.containerd import ACCELD_SNAPSHOTTER, CRI_NAMESPACE, ContainerdServer
from rig.http_proxy import HttpProxy
from rig.isolated_net import run_isolated
from rig.netns import create_netns, delete_netns, remove_orphaned_namespaces
from rig.registry import RegistryServer
from rig.rootfs_digest import describe_tree, tree_differences
from rig.snapshot_view import image_chain_id, mounted_view
from tests.fixtures.registry import running

SMALL = {"chunk_size": 256 << 10, "span": 1 << 20}
SETTLE_S = 10.0


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """This module's registry (the image fixtures push here): in a namespace of its own,
    at the namespace's private address, which is not loopback and so is proxied."""
    remove_orphaned_namespaces()
    netns = create_netns()
    try:
        server = RegistryServer(
            tmp_path_factory.mktemp("registry"),
            host=netns.ns_address,
            command_prefix=netns.command_prefix,
        )
        with running(server):
            yield server
    finally:
        delete_netns(netns)


@pytest.fixture
def http_proxy(tmp_path: Path) -> Iterator[HttpProxy]:
    """tinyproxy on loopback, asking for Basic credentials (so that a client that does
    not send the ones in the proxy URL is refused)."""
    with running(HttpProxy(tmp_path / "proxy", credentials=("node", secrets.token_hex(8)))) as p:
        yield p


def _node_env(proxy: HttpProxy, no_proxy: str = "") -> dict[str, str]:
    """What a node's agent and containerd both inherit; the lower-case variables are
    set empty so that nothing from the test's own environment takes part."""
    env = {"HTTP_PROXY": proxy.url, "HTTPS_PROXY": proxy.url, "NO_PROXY": no_proxy}
    return env | {name.lower(): "" for name in env}


def _through(proxy: HttpProxy, registry: RegistryServer) -> list[tuple[str, str]]:
    """(method, path) of each request the proxy was asked to pass to the registry."""
    return [(r.method, r.path) for r in proxy.requests() if r.authority == registry.host]


def _registry_saw(registry: RegistryServer, since: int) -> list[tuple[str, str]]:
    return [(r.method, r.path) for r in registry.requests()[since:]]


def _wait_for_equal_logs(
    proxy: HttpProxy, registry: RegistryServer, since: int
) -> tuple[collections.Counter[tuple[str, str]], collections.Counter[tuple[str, str]]]:
    """Both logs' requests, once they agree or after SETTLE_S (each writes its line a
    moment after the answer)."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        proxied = collections.Counter(_through(proxy, registry))
        served = collections.Counter(_registry_saw(registry, since))
        if proxied == served or time.monotonic() > deadline:
            return proxied, served
        time.sleep(0.2)


async def _convert(registry: RegistryServer, reference: str) -> None:
    async with RegistryClient(plain_http_hosts={registry.host}) as client:
        options = ConvertOptions(mode="index", **SMALL)
        await convert_image(client, ImageReference.parse(reference), options)


def _lazy_containerd(
    containerd_factory: Any, agent: AgentProcess, env: dict[str, str], registry: RegistryServer
) -> ContainerdServer:
    """A containerd with the agent's environment, pulling over http from ``registry``."""
    lazy: ContainerdServer = containerd_factory(
        snapshotter=ACCELD_SNAPSHOTTER, acceld_socket=agent.socket, env=env
    )
    lazy.allow_insecure_registry(registry.host)
    return lazy


async def test_a_lazy_start_goes_through_the_proxy(
    registry: RegistryServer,
    image_pusher: Any,
    built_features: Any,
    containerd: ContainerdServer,
    containerd_factory: Any,
    http_proxy: HttpProxy,
    tmp_path: Path,
) -> None:
    pushed = await image_pusher.push(built_features)
    await _convert(registry, pushed.reference)
    top = image_chain_id(built_features.config_bytes)

    def reference_tree() -> dict[str, Any]:
        containerd.ctr("images", "pull", "--plain-http", pushed.reference)
        with mounted_view(containerd, top, tmp_path / "reference") as root:
            return describe_tree(root)

    expected = await asyncio.to_thread(reference_tree)
    env = _node_env(http_proxy)
    layer_digests = {layer.digest for layer in built_features.layers}
    since = len(registry.requests())
    with AgentProcess(
        tmp_path / "agent", plain_http=[registry.host], extra_args=["--no-background-fill"], env=env
    ) as agent:
        lazy = _lazy_containerd(containerd_factory, agent, env, registry)

        def lazy_tree() -> dict[str, Any]:
            lazy.cri_pull_image(pushed.reference)
            with mounted_view(
                lazy,
                top,
                tmp_path / "lazy",
                snapshotter=ACCELD_SNAPSHOTTER,
                namespace=CRI_NAMESPACE,
            ) as root:
                return describe_tree(root)

        actual = await asyncio.to_thread(lazy_tree)
        assert tree_differences(expected, actual) == []
        assert agent.metric("acceld_fallbacks_total") == 0
        assert agent.metric("acceld_range_requests_total") > 0
        proxied, served = await asyncio.to_thread(_wait_for_equal_logs, http_proxy, registry, since)
        agent_log = agent.log_path.read_text()

    # Both the agent (layer range reads, the accelerated index) and containerd (the
    # image's manifest) went through the proxy, and nothing reached the registry that
    # the proxy did not pass on.
    assert proxied == served
    paths = [path for _, path in proxied]
    assert sum(any(d in path for d in layer_digests) for path in paths) > 0
    assert sum("_accelerated" in path for path in paths) > 0
    assert sum(path.endswith("/manifests/latest") for path in paths) > 0
    # The agent said once which proxy applies, without its password.
    assert agent_log.count('"event": "registry.proxy"') == 1
    assert http_proxy.credentials is not None
    assert http_proxy.credentials[1] not in agent_log


async def test_no_proxy_naming_the_registry_bypasses_the_proxy(
    registry: RegistryServer,
    image_pusher: Any,
    built_busybox: Any,
    containerd_factory: Any,
    http_proxy: HttpProxy,
    tmp_path: Path,
) -> None:
    pushed = await image_pusher.push(built_busybox)
    await _convert(registry, pushed.reference)
    env = _node_env(http_proxy, no_proxy=registry.bind_host)
    with AgentProcess(
        tmp_path / "agent", plain_http=[registry.host], extra_args=["--no-background-fill"], env=env
    ) as agent:
        lazy = _lazy_containerd(containerd_factory, agent, env, registry)
        await asyncio.to_thread(lazy.cri_pull_image, pushed.reference)
        out = await asyncio.to_thread(
            lazy.run_container,
            pushed.reference,
            f"no-proxy-{uuid.uuid4().hex[:8]}",
            snapshotter=ACCELD_SNAPSHOTTER,
            namespace=CRI_NAMESPACE,
        )
        assert out.stdout.strip() == "hello from acceld"
        assert agent.metric("acceld_fallbacks_total") == 0
        assert agent.metric("acceld_range_requests_total") > 0
        assert '"event": "registry.proxy"' in agent.log_path.read_text()
    assert http_proxy.requests() == []
    # The proxy was there and logging all along: one request sent through it shows.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": http_proxy.url}))
    with opener.open(f"{registry.url}/v2/", timeout=10) as response:
        assert response.status == 200
    assert _through(http_proxy, registry) == [("GET", "/v2/")]


# --- https through CONNECT tunnels, token realms and redirects, in a throwaway network

REGISTRY_ADDRESS = "11.0.0.30"
STORAGE_ADDRESS = "11.0.0.40"
PRIVATE_STORAGE_ADDRESS = "127.0.0.2"
NAMES = {
    "registry.public.test": REGISTRY_ADDRESS,
    "storage.public.test": STORAGE_ADDRESS,
    "auth.public.test": STORAGE_ADDRESS,
    "storage.private.test": PRIVATE_STORAGE_ADDRESS,
}
REGISTRY = "registry.public.test"
BLOB = bytes(range(256)) * 64
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": "sha256:" + "c" * 64,
            "size": 2,
        },
        "layers": [],
    }
).encode()
WORK_VARIABLE = "ACCELD_TEST_PROXY_WORK"


def _registry_app() -> web.Application:
    """A registry on https whose manifests need a token from auth.public.test and whose
    blobs redirect to storage.<repository>.test."""

    async def manifest(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != "Bearer t0ken":
            challenge = 'Bearer realm="https://auth.public.test/token",service="svc"'
            return web.Response(status=401, headers={"WWW-Authenticate": challenge})
        media = "application/vnd.oci.image.manifest.v1+json"
        return web.Response(body=MANIFEST, headers={"Content-Type": media})

    async def blob(request: web.Request) -> web.Response:
        location = f"https://storage.{request.match_info['repo']}.test/blob"
        return web.Response(status=307, headers={"Location": location})

    app = web.Application()
    app.router.add_get("/v2/{repo}/manifests/{reference}", manifest)
    app.router.add_get("/v2/{repo}/blobs/{digest}", blob)
    return app


def _storage_app(reached: list[str]) -> web.Application:
    """Storage and token service, recording the address each request reached."""

    def record(request: web.Request) -> None:
        assert request.transport is not None
        reached.append(request.transport.get_extra_info("sockname")[0])

    async def blob(request: web.Request) -> web.Response:
        record(request)
        first, last = request.http_range.start, request.http_range.stop
        headers = {"Content-Range": f"bytes {first}-{last - 1}/{len(BLOB)}"}
        return web.Response(status=206, body=BLOB[first:last], headers=headers)

    async def token(request: web.Request) -> web.Response:
        record(request)
        return web.json_response({"token": "t0ken", "expires_in": 300})

    app = web.Application()
    app.router.add_get("/blob", blob)
    app.router.add_get("/token", token)
    return app


async def _read(repository: str, proxies: ProxySelector) -> str:
    """A manifest and a blob range read by a fresh client: ``ok`` or the error's class."""
    reference = ImageReference.parse(f"{REGISTRY}/{repository}:v1")
    try:
        async with RegistryClient() as client:
            client.transport.proxies = proxies
            assert (await client.get_manifest(reference)).body == MANIFEST
            assert await client.get_range(reference, BLOB_DIGEST, 100, 1000) == BLOB[100:1100]
    except RegistryError as exc:
        return type(exc).__name__
    return "ok"


async def _connect_scenarios() -> dict[str, Any]:
    """Each scenario's outcome, the CONNECTs the proxy was asked for meanwhile and the
    addresses storage was reached at."""
    work = Path(os.environ[WORK_VARIABLE])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(work / "server.crt", work / "server.key")
    reached: list[str] = []
    runners = []
    for app, address in (
        (_registry_app(), REGISTRY_ADDRESS),
        (_storage_app(reached), STORAGE_ADDRESS),
        (_storage_app(reached), PRIVATE_STORAGE_ADDRESS),
    ):
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, address, 443, ssl_context=context).start()
        runners.append(runner)
    proxy = HttpProxy(work / "proxy", credentials=("node", "pr0xy"))
    scenarios = {
        "all through the proxy": ("public", ""),
        "storage in NO_PROXY": ("public", "storage.public.test"),
        "registry in NO_PROXY": ("public", REGISTRY),
        "storage on a private name": ("private", ""),
        "without the proxy's credentials": ("public", ""),
    }
    report: dict[str, Any] = {}
    with proxy:
        for name, (repository, no_proxy) in scenarios.items():
            url = proxy.url
            if name == "without the proxy's credentials":
                url = f"http://127.0.0.1:{proxy.port}"
            selector = ProxySelector(ProxyEnvironment(https_proxy=url, no_proxy=no_proxy))
            before, reached_before = len(proxy.requests()), len(reached)
            outcome = await _read(repository, selector)
            report[name] = {
                "outcome": outcome,
                "connects": sorted({r.target for r in proxy.requests()[before:]}),
                "methods": sorted({r.method for r in proxy.requests()[before:]}),
                "reached": sorted(set(reached[reached_before:])),
            }
    for runner in runners:
        await runner.cleanup()
    return report


@pytest.mark.netns
def test_https_goes_through_connect_tunnels_host_by_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_self_signed(
        tmp_path / "server.key",
        tmp_path / "server.crt",
        "acceld proxy test",
        dns_names=list(NAMES),
    )
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "server.crt"))
    monkeypatch.setenv(WORK_VARIABLE, str(tmp_path))
    report = run_isolated(
        f"{__name__}:_connect_scenarios",
        tmp_path / "net",
        addresses=[REGISTRY_ADDRESS, STORAGE_ADDRESS],
        hosts=NAMES,
    )
    registry, auth, storage = (
        f"{name}:443" for name in (REGISTRY, "auth.public.test", "storage.public.test")
    )
    assert report["all through the proxy"] == {
        "outcome": "ok",
        "connects": [auth, registry, storage],
        "methods": ["CONNECT"],
        "reached": [STORAGE_ADDRESS],
    }
    assert report["storage in NO_PROXY"]["outcome"] == "ok"
    assert report["storage in NO_PROXY"]["connects"] == [auth, registry]
    assert report["registry in NO_PROXY"]["outcome"] == "ok"
    assert report["registry in NO_PROXY"]["connects"] == [auth, storage]
    # The node resolves the redirect's name to loopback: refused before the proxy is
    # asked, as it would be at connect time without a proxy.
    assert report["storage on a private name"] == {
        "outcome": "DelegationRefusedError",
        "connects": [auth, registry],
        "methods": ["CONNECT"],
        "reached": [STORAGE_ADDRESS],
    }
    assert report["without the proxy's credentials"]["outcome"] != "ok"
    assert report["without the proxy's credentials"]["connects"] == [registry]
