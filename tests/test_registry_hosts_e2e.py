"""Lazy starts from registries configured only through containerd's hosts.toml, end to
end: real containerd (CRI pull) and the agent reading the same hosts directory, real
distribution registries on HTTPS with a rig CA, with client certificates, and a
pull-through cache (distribution in proxy mode) as a mirror that is killed mid-start."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfig
from converter.convert import ConvertOptions, convert_image
from fetcher.errors import RangeNotSupportedError
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from rig.agent_process import AgentProcess
from rig.containerd import ACCELD_SNAPSHOTTER, CRI_NAMESPACE, ContainerdError, ContainerdServer
from rig.delay_proxy import BackgroundDelayProxy
from rig.hosts_toml import write_hosts_toml, write_https_hosts
from rig.images import BuiltImage, push_image
from rig.registry import RegistryServer
from rig.rootfs_digest import describe_tree, tree_differences
from rig.snapshot_view import image_chain_id, mounted_view
from tests.fixtures.registry import running

SMALL = ConvertOptions(mode="index", chunk_size=256 << 10, span=1 << 20)


async def _publish(hosts: Path, built: BuiltImage, registry: RegistryServer) -> str:
    """Push ``built`` and its index-only accelerated form through the hosts dir."""
    reference = f"{registry.host}/rig/hosts-{uuid.uuid4().hex[:10]}:latest"
    async with RegistryClient(hosts_dir=str(hosts)) as client:
        await push_image(client, reference, built)
        await convert_image(client, ImageReference.parse(reference), SMALL)
    return reference


@contextlib.contextmanager
def _lazy_node(
    workdir: Path, hosts: Path, containerd_factory: Any, containerd_hosts: Path | None = None
) -> Iterator[tuple[AgentProcess, ContainerdServer]]:
    """An agent and a containerd that pulls with it, reading ``hosts`` (containerd
    ``containerd_hosts`` instead, when given)."""
    with AgentProcess(
        workdir, settings={"hosts_dir": str(hosts)}, extra_args=["--no-background-fill"]
    ) as agent:
        lazy = containerd_factory(
            snapshotter=ACCELD_SNAPSHOTTER,
            acceld_socket=agent.socket,
            hosts_dir=containerd_hosts or hosts,
        )
        yield agent, lazy


async def _expected_tree(
    containerd: ContainerdServer, hosts: Path, built: BuiltImage, reference: str, at: Path
) -> tuple[str, dict[str, Any]]:
    """The top layer's chain ID and the tree containerd's own pull makes of it."""
    top = image_chain_id(built.config_bytes)
    return top, await asyncio.to_thread(_reference_tree, containerd, hosts, reference, top, at)


def _samples(agent: AgentProcess, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample of series ``name``: labels (sorted pairs) -> value."""
    found = {}
    for line in agent.metrics().splitlines():
        match = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if match:
            labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', match[1])))
            found[labels] = float(match[2])
    return found


def _served(agent: AgentProcess, host: str, role: str) -> float:
    return _samples(agent, "acceld_registry_requests_total").get(
        (("host", host), ("role", role)), 0.0
    )


def _skips(agent: AgentProcess, host: str) -> dict[str, float]:
    return {
        dict(labels)["reason"]: value
        for labels, value in _samples(agent, "acceld_registry_host_skips_total").items()
        if dict(labels)["host"] == host
    }


def _reference_tree(
    containerd: ContainerdServer, hosts: Path, reference: str, top: str, at: Path
) -> dict[str, Any]:
    """The image's root file system as containerd's own pull and overlayfs make it."""
    containerd.ctr("images", "pull", "--hosts-dir", str(hosts), reference)
    with mounted_view(containerd, top, at) as root:
        return describe_tree(root)


def _lazy_tree(lazy: ContainerdServer, reference: str, top: str, at: Path) -> dict[str, Any]:
    """The same through a CRI pull with the acceld snapshotter, read whole."""
    lazy.cri_pull_image(reference)
    with mounted_view(
        lazy, top, at, snapshotter=ACCELD_SNAPSHOTTER, namespace=CRI_NAMESPACE
    ) as root:
        return describe_tree(root)


async def test_lazy_start_from_https_registry_known_only_through_hosts_toml(
    tls_registry, built_features, containerd, containerd_factory, tmp_path
):
    hosts = tmp_path / "certs.d"
    write_https_hosts(hosts, tls_registry)
    reference = await _publish(hosts, built_features, tls_registry)
    top, expected = await _expected_tree(
        containerd, hosts, built_features, reference, tmp_path / "reference"
    )
    with _lazy_node(tmp_path / "agent", hosts, containerd_factory) as (agent, lazy):
        before = len(tls_registry.requests())
        actual = await asyncio.to_thread(_lazy_tree, lazy, reference, top, tmp_path / "lazy")
        assert tree_differences(expected, actual) == []
        assert agent.metric("acceld_fallbacks_total") == 0
        assert agent.metric("acceld_layers_total") >= len(built_features.layers)
        assert _served(agent, tls_registry.host, "server") > 0
    ranged = [
        r
        for r in tls_registry.requests()[before:]
        if r.status == 206 and r.user_agent.startswith("acceld")
    ]
    assert ranged, "the layers were not read by range over HTTPS"


def _mtls_hosts(hosts: Path, registry: RegistryServer, client: bool) -> Path:
    write_https_hosts(hosts, registry, client=client)
    return hosts


async def test_client_certificates_lazy_start_and_clean_fallback_without_them(
    mtls_registry, built_busybox, containerd_factory, tmp_path
):
    with_pair = _mtls_hosts(tmp_path / "with-pair", mtls_registry, client=True)
    without = _mtls_hosts(tmp_path / "without-pair", mtls_registry, client=False)
    reference = await _publish(with_pair, built_busybox, mtls_registry)

    def run(lazy: ContainerdServer) -> str:
        lazy.cri_pull_image(reference)
        name = f"mtls-{uuid.uuid4().hex[:8]}"
        out = lazy.run_container(
            reference, name, snapshotter=ACCELD_SNAPSHOTTER, namespace=CRI_NAMESPACE
        )
        return str(out.stdout).strip()

    # Both read the pair: served lazily.
    with _lazy_node(tmp_path / "agent-a", with_pair, containerd_factory) as (agent, lazy):
        assert await asyncio.to_thread(run, lazy) == "hello from acceld"
        assert agent.metric("acceld_fallbacks_total") == 0
        assert _served(agent, mtls_registry.host, "server") > 0

    # The agent lacks the pair, containerd has it: the agent declines each layer with
    # the TLS error in its log, and containerd's own pull is what runs.
    node = _lazy_node(tmp_path / "agent-b", without, containerd_factory, with_pair)
    with node as (agent, lazy):
        assert await asyncio.to_thread(run, lazy) == "hello from acceld"
        assert agent.metric("acceld_fallbacks_total") >= len(built_busybox.layers)
        assert re.search(r"BAD_CERTIFICATE|CERTIFICATE_REQUIRED", agent.log_tail(400))

    # Neither has it: containerd cannot pull either, and says why.
    node = _lazy_node(tmp_path / "agent-c", without, containerd_factory)
    with node as (_, lazy), pytest.raises(ContainerdError, match="certificate"):
        await asyncio.to_thread(lazy.cri_pull_image, reference)


async def _warm(mirror_host: str, built: BuiltImage, repository: str) -> None:
    """Have the pull-through cache store each layer: until it has, it answers a Range
    GET with the whole blob, and the agent passes it over for that blob."""
    ref = ImageReference.parse(f"{mirror_host}/{repository}:latest")
    async with RegistryClient() as client:
        for layer in built.layers:
            deadline = time.monotonic() + 30
            while True:
                try:
                    await client.get_range(ref, layer.digest, 0, 1)
                    break
                except RangeNotSupportedError:
                    assert time.monotonic() < deadline, "the mirror never stored the blob"
                    await asyncio.sleep(0.2)


@pytest.fixture
def pull_through(registry: RegistryServer, tmp_path: Path) -> Iterator[tuple[RegistryServer, str]]:
    """A distribution pull-through cache of ``registry``, behind a delay proxy (so a
    start takes long enough to kill the cache mid-way); (cache, host as dialled)."""
    cache = RegistryServer(tmp_path / "cache", extra_config={"proxy": {"remoteurl": registry.url}})
    with running(cache):
        proxy = BackgroundDelayProxy("127.0.0.1", ("127.0.0.1", cache.port), delay_ms=15)
        host, port = proxy.start()
        try:
            yield cache, f"{host}:{port}"
        finally:
            proxy.stop()


def _acceld_lines(registry: RegistryServer, since: int = 0) -> list[Any]:
    """What the agent asked ``registry`` (not containerd, nor the cache for itself)."""
    return [r for r in registry.requests()[since:] if r.user_agent.startswith("acceld")]


async def test_pull_through_cache_serves_range_reads_and_its_death_mid_start_is_survived(
    registry, pull_through, built_features, containerd, containerd_factory, tmp_path
):
    cache, mirror = pull_through
    hosts = tmp_path / "certs.d"
    write_hosts_toml(
        hosts,
        registry.host,
        {"server": registry.url, "host": {f"http://{mirror}": {"capabilities": ["pull"]}}},
    )
    reference = await _publish(hosts, built_features, registry)
    repository = ImageReference.parse(reference).repository
    await _warm(mirror, built_features, repository)
    top, expected = await _expected_tree(
        containerd, hosts, built_features, reference, tmp_path / "reference"
    )
    with _lazy_node(tmp_path / "agent", hosts, containerd_factory) as (agent, lazy):
        since, server_since = len(cache.requests()), len(registry.requests())
        await asyncio.to_thread(lazy.cri_pull_image, reference)
        pulled = _served(agent, mirror, "mirror")
        view = asyncio.create_task(asyncio.to_thread(_lazy_view_only, lazy, top, tmp_path / "lazy"))
        # Kill the cache once the container's first range reads have gone to it.
        deadline = time.monotonic() + 60
        while _served(agent, mirror, "mirror") < pulled + 3:
            assert time.monotonic() < deadline and not view.done(), "no reads reached the mirror"
            await asyncio.sleep(0.05)
        assert cache.pid is not None
        # What the server answered while the cache was alive: read before the kill, since
        # the agent turns to the server within milliseconds of it.
        before_kill = _acceld_lines(registry, server_since)
        os.killpg(cache.pid, signal.SIGKILL)
        killed_at = _served(agent, mirror, "mirror")
        # Until then every range read went to the cache, none to the server.
        assert not [r for r in before_kill if r.status == 206]
        actual = await view
        problems = tree_differences(expected, actual)
        assert problems == [], "\n".join(problems)
        assert agent.metric("acceld_fallbacks_total") == 0
        served_by_mirror = _served(agent, mirror, "mirror")
        skips = _skips(agent, mirror)
        assert _served(agent, registry.host, "server") > 0
    assert view.done()
    # The mirror is passed over once gone: at most a few requests more reached it.
    assert served_by_mirror - killed_at <= 8
    assert skips.get("connection", 0) + skips.get("body", 0) >= 1
    assert skips.get("down", 0) >= 1, skips
    lines = _acceld_lines(cache, since)
    ranged = [r for r in lines if r.status == 206]
    assert ranged, "the cache's log shows no range reads"
    # Its log and the agent's count agree: every answer it logged the agent counted;
    # what the agent counted and the log lacks is what the kill cut short, mid-body (a
    # "body" skip) or between a body's end and its log line, which distribution writes
    # after the response: at most one such request per connection the agent had open.
    answered = [r for r in lines if r.status < 400]
    assert len(answered) <= served_by_mirror
    unlogged = served_by_mirror - skips.get("body", 0) - len(answered)
    assert unlogged <= AgentConfig().max_connections_per_registry, (served_by_mirror, skips)


def _lazy_view_only(lazy: ContainerdServer, top: str, at: Path) -> dict[str, Any]:
    with mounted_view(
        lazy, top, at, snapshotter=ACCELD_SNAPSHOTTER, namespace=CRI_NAMESPACE
    ) as root:
        return describe_tree(root)
