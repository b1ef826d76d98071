"""Registries reached through an HTTP proxy the way containerd reaches them (issue 26):
a real proxy from Debian's packages (tinyproxy, `rig.http_proxy`) between the node and
the registry, chosen by HTTP_PROXY / HTTPS_PROXY / NO_PROXY (`fetcher.proxy_env`).

Go never proxies loopback, so the registry must be somewhere else: in a network
namespace of the test's own, at its private address, for the starts through the real
agent and containerd: a plain-http registry (HTTP_PROXY and absolute-URI requests, as
containerd does for an http registry) and an https one whose CA both trust only
through a hosts.toml (HTTPS_PROXY and CONNECT tunnels); on "public" addresses of a
throwaway namespace (`rig.isolated_net`) for https through CONNECT tunnels, token realms
and redirects to storage, driven through the registry client itself.
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
from rig.certificates import RigCA, write_self_signed
from rig.containerd import ACCELD_SNAPSHOTTER, CRI_NAMESPACE, ContainerdServer
from rig.delegating_registry import DelegatingRegistry, StorageDelegate, read_outcome, serving
from rig.hosts_toml import write_https_hosts
from rig.http_proxy import HttpProxy, ProxiedRequest
from rig.images import BuiltImage
from rig.isolated_net import run_isolated
from rig.netns import Netns, create_netns, delete_netns, remove_orphaned_namespaces
from rig.registry import RegistryServer
from rig.rootfs_digest import FileFacts, tree_differences
from rig.snapshot_view import image_chain_id, view_tree
from tests.fixtures.registry import registry_tls, running
from tests.test_registry_hosts_e2e import _publish

SETTLE_S = 10.0


@pytest.fixture(scope="module")
def registry_netns() -> Iterator[Netns]:
    """A network namespace of this module's own for its registries: its private address
    is not loopback and so is proxied."""
    remove_orphaned_namespaces()
    netns = create_netns()
    try:
        yield netns
    finally:
        delete_netns(netns)


@pytest.fixture(scope="module")
def registry(
    tmp_path_factory: pytest.TempPathFactory, registry_netns: Netns
) -> Iterator[RegistryServer]:
    """This module's plain-http registry (the image fixtures push here), in the namespace."""
    server = RegistryServer(
        tmp_path_factory.mktemp("registry"),
        host=registry_netns.ns_address,
        command_prefix=registry_netns.command_prefix,
    )
    with running(server):
        yield server


@pytest.fixture(scope="module")
def tls_registry(
    tmp_path_factory: pytest.TempPathFactory, registry_netns: Netns, rig_ca: RigCA
) -> Iterator[RegistryServer]:
    """This module's HTTPS registry, in the namespace too, with a certificate from the rig
    CA (which no trust store holds: the node trusts it only through a hosts.toml)."""
    server = RegistryServer(
        tmp_path_factory.mktemp("tls-registry"),
        host=registry_netns.ns_address,
        tls=registry_tls(rig_ca, address=registry_netns.ns_address),
        command_prefix=registry_netns.command_prefix,
    )
    with running(server):
        yield server


def _new_proxy(work_dir: Path) -> HttpProxy:
    """tinyproxy on loopback, asking for Basic credentials (so that a client that does
    not send the ones in the proxy URL is refused)."""
    return HttpProxy(work_dir, credentials=("node", secrets.token_hex(8)))


@pytest.fixture
def http_proxy(tmp_path: Path) -> Iterator[HttpProxy]:
    """The node's proxy."""
    with running(_new_proxy(tmp_path / "proxy")) as p:
        yield p


def _node_env(proxy: HttpProxy, no_proxy: str = "") -> dict[str, str]:
    """What a node's agent and containerd both inherit; the lower-case variables are
    set empty so that nothing from the test's own environment takes part."""
    env = {"HTTP_PROXY": proxy.url, "HTTPS_PROXY": proxy.url, "NO_PROXY": no_proxy}
    return env | {name.lower(): "" for name in env}


def _through(proxy: HttpProxy, registry: RegistryServer) -> list[tuple[str, str]]:
    """(method, path) of each request the proxy was asked to pass to the registry."""
    return [(r.method, r.path) for r in proxy.requests() if r.authority == registry.host]


def _control_request(proxy: HttpProxy, registry: RegistryServer) -> None:
    """GET the registry's /v2/ through ``proxy`` (a CONNECT tunnel for https), so that a
    proxy log empty of the registry is shown to be empty for want of requests."""
    handlers: list[urllib.request.BaseHandler] = [
        urllib.request.ProxyHandler({"http": proxy.url, "https": proxy.url})
    ]
    if registry.tls is not None:
        handlers.append(urllib.request.HTTPSHandler(context=registry.tls.client_context()))
    with urllib.request.build_opener(*handlers).open(f"{registry.url}/v2/", timeout=10) as answer:
        assert answer.status == 200


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
    tmp_path: Path,
    registry: RegistryServer,
    containerd_factory: Any,
    env: dict[str, str],
    *,
    hosts: Path | None = None,
    containerd_env: dict[str, str] | None = None,
) -> Iterator[tuple[AgentProcess, ContainerdServer]]:
    """A node whose agent has ``env`` and containerd ``containerd_env`` (``env`` unless
    given), and which reaches ``registry`` over plain http, or, with ``hosts``, as that
    hosts dir (read by both, as on a node) says: an https registry's CA."""
    settings = {} if hosts is None else {"hosts_dir": str(hosts)}
    plain_http = [registry.host] if hosts is None else []
    with AgentProcess(
        tmp_path / "agent",
        plain_http=plain_http,
        settings=settings,
        extra_args=["--no-background-fill"],
        env=env,
    ) as agent:
        lazy = containerd_factory(
            snapshotter=ACCELD_SNAPSHOTTER,
            acceld_socket=agent.socket,
            env=env if containerd_env is None else containerd_env,
            hosts_dir=hosts,
        )
        if hosts is None:
            lazy.allow_insecure_registry(registry.host)
        yield agent, lazy


def _reference_tree(
    containerd: ContainerdServer, reference: str, top: str, at: Path, *pull_options: str
) -> dict[str, FileFacts]:
    """The image's root file system as containerd's own pull and overlayfs make it."""
    containerd.ctr("images", "pull", *pull_options, reference)
    return view_tree(containerd, top, at)


def _lazy_tree(lazy: ContainerdServer, reference: str, top: str, at: Path) -> dict[str, FileFacts]:
    """The same through a CRI pull with the acceld snapshotter."""
    lazy.cri_pull_image(reference)
    return view_tree(lazy, top, at, ACCELD_SNAPSHOTTER, CRI_NAMESPACE)


def _run_busybox(lazy: ContainerdServer, reference: str) -> str:
    """What busybox says when started lazily (pulled through CRI first)."""
    lazy.cri_pull_image(reference)
    out = lazy.run_container(
        reference,
        f"proxy-{uuid.uuid4().hex[:8]}",
        snapshotter=ACCELD_SNAPSHOTTER,
        namespace=CRI_NAMESPACE,
    )
    return str(out.stdout).strip()


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
    expected = await asyncio.to_thread(
        _reference_tree, containerd, pushed.reference, top, tmp_path / "reference", "--plain-http"
    )
    env = _node_env(http_proxy)
    layer_digests = {layer.digest for layer in built_features.layers}
    since = len(registry.requests())
    with _node(tmp_path, registry, containerd_factory, env) as (agent, lazy):
        actual = await asyncio.to_thread(_lazy_tree, lazy, pushed.reference, top, tmp_path / "lazy")
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
        assert await asyncio.to_thread(_run_busybox, lazy, pushed.reference) == "hello from acceld"
        assert agent.metric("acceld_fallbacks_total") == 0
        assert agent.metric("acceld_range_requests_total") > 0
        assert '"event": "registry.proxy"' in agent.log_path.read_text()
    assert http_proxy.requests() == []
    # The proxy was there and logging all along: one request sent through it shows.
    _control_request(http_proxy, registry)
    assert _through(http_proxy, registry) == [("GET", "/v2/")]


# --- an https registry whose CA the node trusts only through its hosts.toml: HTTPS_PROXY
# and CONNECT tunnels, from the real agent and containerd


def _connects(proxy: HttpProxy, registry: RegistryServer) -> list[ProxiedRequest]:
    """Every request the proxy was asked for the registry's address."""
    return [r for r in proxy.requests() if r.authority == registry.host]


async def _publish_https(
    tmp_path: Path, registry: RegistryServer, built: BuiltImage
) -> tuple[Path, str]:
    """A hosts dir in which the node trusts ``registry``'s CA (and nowhere else), and the
    reference of ``built`` with its index-only form, published there through it."""
    hosts = tmp_path / "certs.d"
    write_https_hosts(hosts, registry)
    return hosts, await _publish(hosts, built, registry)


async def test_a_lazy_start_from_an_https_registry_goes_through_connect_tunnels(
    tls_registry: RegistryServer,
    built_features: Any,
    containerd: ContainerdServer,
    containerd_factory: Any,
    http_proxy: HttpProxy,
    tmp_path: Path,
) -> None:
    hosts, reference = await _publish_https(tmp_path, tls_registry, built_features)
    top = image_chain_id(built_features.config_bytes)
    expected = await asyncio.to_thread(
        _reference_tree,
        containerd,
        reference,
        top,
        tmp_path / "reference",
        "--hosts-dir",
        str(hosts),
    )
    # containerd gets a proxy of its own, so that each proxy's log speaks for one process.
    with running(_new_proxy(tmp_path / "containerd-proxy")) as containerd_proxy:
        node = _node(
            tmp_path,
            tls_registry,
            containerd_factory,
            _node_env(http_proxy),
            hosts=hosts,
            containerd_env=_node_env(containerd_proxy),
        )
        with node as (agent, lazy):
            since = len(tls_registry.requests())
            actual = await asyncio.to_thread(_lazy_tree, lazy, reference, top, tmp_path / "lazy")
            assert tree_differences(expected, actual) == []
            assert agent.metric("acceld_fallbacks_total") == 0
            assert agent.metric("acceld_range_requests_total") > 0
        by_containerd = _connects(containerd_proxy, tls_registry)
    by_agent = _connects(http_proxy, tls_registry)
    # The agent's range reads and containerd's manifest reads each went through a
    # CONNECT tunnel to the registry's address, and only that way: nothing was sent to
    # either proxy as a plain request.
    assert len(by_agent) > 0
    assert len(by_containerd) > 0
    assert {r.method for r in by_agent + by_containerd} == {"CONNECT"}
    ranged = [
        r
        for r in tls_registry.requests()[since:]
        if r.status == 206 and r.user_agent.startswith("acceld")
    ]
    assert ranged, "the layers were not read by range over HTTPS"


async def test_no_proxy_naming_the_https_registry_bypasses_the_proxy(
    tls_registry: RegistryServer,
    built_busybox: Any,
    containerd_factory: Any,
    http_proxy: HttpProxy,
    tmp_path: Path,
) -> None:
    hosts, reference = await _publish_https(tmp_path, tls_registry, built_busybox)
    env = _node_env(http_proxy, no_proxy=tls_registry.bind_host)
    with _node(tmp_path, tls_registry, containerd_factory, env, hosts=hosts) as (agent, lazy):
        assert await asyncio.to_thread(_run_busybox, lazy, reference) == "hello from acceld"
        assert agent.metric("acceld_fallbacks_total") == 0
        assert agent.metric("acceld_range_requests_total") > 0
        assert '"event": "registry.proxy"' in agent.log_path.read_text()
    assert _connects(http_proxy, tls_registry) == []
    # The proxy was there and logging all along: one tunnel asked of it shows.
    _control_request(http_proxy, tls_registry)
    assert [r.method for r in _connects(http_proxy, tls_registry)] == ["CONNECT"]


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
