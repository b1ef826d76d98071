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
import contextlib
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

from converter.convert import ConvertOptions, convert_image
from fetcher.proxy_env import ProxyEnvironment, ProxySelector
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from rig.agent_process import AgentProcess
from rig.certificates import write_self_signed
from rig.containerd import ACCELD_SNAPSHOTTER, CRI_NAMESPACE, ContainerdServer
from rig.delegating_registry import DelegatingRegistry, StorageDelegate, read_outcome, serving
from rig.http_proxy import HttpProxy
from rig.isolated_net import run_isolated
from rig.netns import create_netns, delete_netns, remove_orphaned_namespaces
from rig.registry import RegistryServer
from rig.rootfs_digest import FileFacts, tree_differences
from rig.snapshot_view import image_chain_id, view_tree
from tests.fixtures.registry import running

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
        options = ConvertOptions(mode="index", chunk_size=256 << 10, span=1 << 20)
        await convert_image(client, ImageReference.parse(reference), options)


@contextlib.contextmanager
def _node(
    tmp_path: Path, registry: RegistryServer, containerd_factory: Any, env: dict[str, str]
) -> Iterator[tuple[AgentProcess, ContainerdServer]]:
    """A node whose agent and containerd both have ``env`` and reach ``registry`` over
    plain http."""
    with AgentProcess(
        tmp_path / "agent", plain_http=[registry.host], extra_args=["--no-background-fill"], env=env
    ) as agent:
        lazy = containerd_factory(
            snapshotter=ACCELD_SNAPSHOTTER, acceld_socket=agent.socket, env=env
        )
        lazy.allow_insecure_registry(registry.host)
        yield agent, lazy


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

    def reference_tree() -> dict[str, FileFacts]:
        containerd.ctr("images", "pull", "--plain-http", pushed.reference)
        return view_tree(containerd, top, tmp_path / "reference")

    expected = await asyncio.to_thread(reference_tree)
    env = _node_env(http_proxy)
    layer_digests = {layer.digest for layer in built_features.layers}
    since = len(registry.requests())
    with _node(tmp_path, registry, containerd_factory, env) as (agent, lazy):

        def lazy_tree() -> dict[str, FileFacts]:
            lazy.cri_pull_image(pushed.reference)
            return view_tree(lazy, top, tmp_path / "lazy", ACCELD_SNAPSHOTTER, CRI_NAMESPACE)

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
    with _node(tmp_path, registry, containerd_factory, env) as (agent, lazy):
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
NAMES = {
    "registry.public.test": REGISTRY_ADDRESS,
    "storage.public.test": STORAGE_ADDRESS,
    "auth.public.test": STORAGE_ADDRESS,
    "storage.private.test": "127.0.0.2",
}
REGISTRY = "registry.public.test"
DELEGATE_PORT = 8443
"""Storage's and the token service's, on every address (the registry has 443)."""
WORK_VARIABLE = "ACCELD_TEST_PROXY_WORK"
REPOSITORIES = ("public", "private")
SCENARIOS = {
    # name: (repository, NO_PROXY, whether the proxy URL carries the credentials)
    "all through the proxy": ("public", "", True),
    "storage in NO_PROXY": ("public", "storage.public.test", True),
    "registry in NO_PROXY": ("public", REGISTRY, True),
    "storage on a private name": ("private", "", True),
    "without the proxy's credentials": ("public", "", False),
}


async def _connect_scenarios() -> dict[str, Any]:
    """Per scenario: a manifest read (its token from auth.public.test) and a blob read
    (redirected to storage.<repository>.test) by fresh clients over https, their
    outcomes, the CONNECTs the proxy was asked for meanwhile and the addresses the
    storage and token service were reached at."""
    work = Path(os.environ[WORK_VARIABLE])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(work / "server.crt", work / "server.key")
    delegate = StorageDelegate(port=DELEGATE_PORT, ssl_context=context)
    registry = DelegatingRegistry(
        REGISTRY_ADDRESS,
        delegate,
        redirects={repo: f"https://storage.{repo}.test:{{port}}/blob" for repo in REPOSITORIES},
        realms={repo: "https://auth.public.test:{port}/token" for repo in REPOSITORIES},
        port=443,
        ssl_context=context,
    )
    proxy = HttpProxy(work / "proxy", credentials=("node", "pr0xy"))
    report: dict[str, Any] = {}
    with proxy, serving(delegate, registry):
        for name, (repository, no_proxy, credentials) in SCENARIOS.items():
            url = proxy.url if credentials else f"http://127.0.0.1:{proxy.port}"
            selector = ProxySelector(ProxyEnvironment(https_proxy=url, no_proxy=no_proxy))
            before, reached_before = len(proxy.requests()), len(delegate.reached)
            outcomes = [
                await read_outcome(REGISTRY, repository, what, plain_http=False, proxies=selector)
                for what in ("manifest", "blob")
            ]
            asked = proxy.requests()[before:]
            report[name] = {
                "outcomes": outcomes,
                "connects": sorted({r.target for r in asked}),
                "methods": sorted({r.method for r in asked}),
                "reached": sorted(set(delegate.reached[reached_before:])),
            }
    return report


@pytest.mark.netns
def test_https_goes_through_connect_tunnels_host_by_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_self_signed(
        tmp_path / "server.key", tmp_path / "server.crt", "acceld proxy test", dns_names=list(NAMES)
    )
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "server.crt"))
    monkeypatch.setenv(WORK_VARIABLE, str(tmp_path))
    report = run_isolated(
        f"{__name__}:_connect_scenarios",
        tmp_path / "net",
        addresses=[REGISTRY_ADDRESS, STORAGE_ADDRESS],
        hosts=NAMES,
    )
    registry = f"{REGISTRY}:443"
    auth, storage = (f"{name}.public.test:{DELEGATE_PORT}" for name in ("auth", "storage"))
    assert report["all through the proxy"] == {
        "outcomes": ["ok", "ok"],
        "connects": [auth, registry, storage],
        "methods": ["CONNECT"],
        "reached": [STORAGE_ADDRESS],
    }
    # Each host is judged on its own: the redirect's, the realm's, the registry's.
    assert report["storage in NO_PROXY"]["outcomes"] == ["ok", "ok"]
    assert report["storage in NO_PROXY"]["connects"] == [auth, registry]
    assert report["registry in NO_PROXY"]["outcomes"] == ["ok", "ok"]
    assert report["registry in NO_PROXY"]["connects"] == [auth, storage]
    # The node resolves the redirect's name to loopback: refused before the proxy is
    # asked, as it would be at connect time without a proxy.
    assert report["storage on a private name"] == {
        "outcomes": ["ok", "DelegationRefusedError"],
        "connects": [auth, registry],
        "methods": ["CONNECT"],
        "reached": [STORAGE_ADDRESS],
    }
    # tinyproxy refuses a CONNECT without them (407): they were sent above.
    refused = report["without the proxy's credentials"]
    assert "ok" not in refused["outcomes"]
    assert refused["connects"] == [registry]
    assert refused["reached"] == []
