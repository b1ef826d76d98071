"""The agent under registry faults and its own crash: correct bytes or a clean error,
never wrong bytes and never a hang; state survives a restart."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfig
from converter.convert import ConvertOptions, convert_image
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from rig.agent_process import AgentProcess
from rig.containerd import ACCELD_SNAPSHOTTER, CRI_NAMESPACE
from rig.fault_proxy import Fault, FaultProxy

SMALL: dict[str, Any] = {"chunk_size": 256 << 10, "span": 1 << 20}
BUSYBOX_MD5 = hashlib.md5(Path("/bin/busybox").read_bytes()).hexdigest()


@pytest.fixture
def proxy(registry):
    with FaultProxy(registry.url) as fault_proxy:
        yield fault_proxy


@pytest.fixture
def agent(tmp_path):
    with AgentProcess(tmp_path / "agent", extra_args=["--no-background-fill"]) as process:
        yield process


@pytest.fixture
def lazy_containerd(containerd_factory, agent):
    return containerd_factory(snapshotter=ACCELD_SNAPSHOTTER, acceld_socket=agent.socket)


async def _converted(image_pusher, built, mode: str, proxy: FaultProxy) -> str:
    pushed = await image_pusher.push(built)
    async with RegistryClient() as client:
        await convert_image(
            client, ImageReference.parse(pushed.reference), ConvertOptions(mode=mode, **SMALL)
        )
    repository = ImageReference.parse(pushed.reference).repository
    return f"{proxy.host}/{repository}:latest"


def _run(containerd, image: str, *command: str, check: bool = True):
    return containerd.run_container(
        image,
        f"c-{uuid.uuid4().hex[:8]}",
        *command,
        snapshotter=ACCELD_SNAPSHOTTER,
        namespace=CRI_NAMESPACE,
        check=check,
        timeout=120,
    )


def _log_shows(agent: AgentProcess, event: str, timeout: float = 10.0) -> bool:
    """The agent logs asynchronously to the reply it sends; give the line a moment."""
    deadline = time.monotonic() + timeout
    while event not in agent.log_path.read_text(errors="replace"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _mounted(agent: AgentProcess, digest: str) -> Path:
    """Where the agent's FUSE mount serves the layer with blob ``digest``."""
    (found,) = agent.mountpoint.glob(f"*-{digest.replace(':', '-')}-*")
    return found


# Half the agent's own deadline for a read: an EIO that came only from that deadline,
# after a fetch that hung, would come too late.
READ_BOUND = AgentConfig().demand_timeout / 2


def _cat(path: Path) -> subprocess.CompletedProcess[bytes]:
    """Read a file through the mount as any program would (a hang fails the test)."""
    return subprocess.run(["cat", str(path)], capture_output=True, timeout=READ_BOUND)


async def test_an_oversized_header_line_gives_eio_and_the_agent_serves_on(
    image_pusher, built_busybox, proxy, agent, lazy_containerd
):
    """Issue 21, item 3: a registry answering a range request with an oversized header
    line raised an exception of the HTTP library's own, which escaped the read handler
    and left `cat` blocked. The read fails with EIO as a registry error, not through the
    handler's last-resort catch; reads of other layers go on being served, and the same
    read succeeds once the registry answers properly again."""
    image = await _converted(image_pusher, built_busybox, "index", proxy)
    await asyncio.to_thread(lazy_containerd.cri_pull_image, image)
    busybox_layer, hello_layer = (layer.digest for layer in built_busybox.layers)
    busybox = _mounted(agent, busybox_layer) / "bin" / "busybox"
    hello = _mounted(agent, hello_layer) / "etc" / "hello.txt"
    fault = proxy.add(Fault("header", path_contains=busybox_layer, times=10_000))

    broken = await asyncio.to_thread(_cat, busybox)
    assert broken.returncode != 0
    assert b"Input/output error" in broken.stderr
    assert fault.hits >= 1
    assert (await asyncio.to_thread(_cat, hello)).stdout == b"hello from acceld\n"
    assert await asyncio.to_thread(_log_shows, agent, "fs.read_failed")
    assert agent.metric("acceld_fuse_internal_errors_total") == 0

    proxy.clear()
    healed = await asyncio.to_thread(_cat, busybox)
    assert hashlib.md5(healed.stdout).hexdigest() == BUSYBOX_MD5


@pytest.mark.parametrize("mode", ["index", "full"])
async def test_resets_503s_and_stalls_still_give_a_correct_container(
    mode, image_pusher, built_busybox, proxy, agent, lazy_containerd
):
    image = await _converted(image_pusher, built_busybox, mode, proxy)
    proxy.add(Fault("reset", path_contains="/blobs/", after_bytes=500, times=3))
    proxy.add(Fault("status", path_contains="/blobs/", status=503, retry_after="0", times=3))
    proxy.add(Fault("stall", path_contains="/blobs/", after_bytes=100, stall_seconds=2, times=1))
    await asyncio.to_thread(lazy_containerd.cri_pull_image, image)
    out = await asyncio.to_thread(_run, lazy_containerd, image, "md5sum", "/bin/busybox")
    assert out.stdout.split()[0] == BUSYBOX_MD5
    assert sum(f.hits for f in proxy.faults) >= 4
    assert agent.metric("acceld_fallbacks_total") == 0
    # containerd fetches the config blob through the proxy too, so not every hit is ours
    assert agent.metric("acceld_registry_retries_total") >= 1


async def test_corrupt_chunk_is_refused_then_served_once_the_registry_heals(
    image_pusher, built_busybox, proxy, agent, lazy_containerd
):
    image = await _converted(image_pusher, built_busybox, "index", proxy)
    await asyncio.to_thread(lazy_containerd.cri_pull_image, image)
    busybox_layer = built_busybox.layers[0].digest
    proxy.add(Fault("flip", path_contains=busybox_layer, after_bytes=100, times=10_000))
    broken = await asyncio.to_thread(
        _run, lazy_containerd, image, "md5sum", "/bin/busybox", check=False
    )
    assert broken.returncode != 0 or BUSYBOX_MD5 not in broken.stdout
    assert BUSYBOX_MD5 not in broken.stdout  # wrong bytes are never served
    assert agent.metric("acceld_corrupt_chunks_total") >= 1
    assert await asyncio.to_thread(_log_shows, agent, "fs.read_failed")
    proxy.clear()
    healed = await asyncio.to_thread(_run, lazy_containerd, image, "md5sum", "/bin/busybox")
    assert healed.stdout.split()[0] == BUSYBOX_MD5


async def test_agent_killed_and_restarted_keeps_snapshots_and_cache(
    image_pusher, built_busybox, proxy, tmp_path, containerd_factory
):
    image = await _converted(image_pusher, built_busybox, "index", proxy)
    first = AgentProcess(tmp_path / "agent", extra_args=["--no-background-fill"]).start()
    containerd = containerd_factory(snapshotter=ACCELD_SNAPSHOTTER, acceld_socket=first.socket)
    try:
        await asyncio.to_thread(containerd.cri_pull_image, image)
        out = await asyncio.to_thread(_run, containerd, image, "md5sum", "/bin/busybox")
        assert out.stdout.split()[0] == BUSYBOX_MD5
        await asyncio.to_thread(first.wait_cache_settled)
        cached = sorted(p.name for p in (first.root / "cache").rglob("*") if p.is_file())
        assert cached
        first.kill()
    finally:
        first.kill()
    second = AgentProcess(tmp_path / "agent", extra_args=["--no-background-fill"]).start()
    try:
        await asyncio.to_thread(containerd.wait_for_snapshotter)
        assert sorted(p.name for p in (second.root / "cache").rglob("*") if p.is_file()) == cached
        requests_before = len(proxy.requests)
        out = await asyncio.to_thread(_run, containerd, image, "md5sum", "/bin/busybox")
        assert out.stdout.split()[0] == BUSYBOX_MD5
        layer_gets = [
            p
            for m, p, _ in proxy.requests[requests_before:]
            if m == "GET" and built_busybox.layers[0].digest in p
        ]
        assert layer_gets == [], "cached chunks were fetched again after the restart"
        listed = containerd.ctr(
            "snapshots", "--snapshotter", ACCELD_SNAPSHOTTER, "ls", namespace=CRI_NAMESPACE
        ).stdout
        assert "Committed" in listed
    finally:
        second.stop()


async def test_running_container_when_the_agent_dies(
    image_pusher, built_busybox, proxy, tmp_path, containerd_factory
):
    """A running container across the agent's death: a command it runs while no agent
    serves waits (the keeper holds the FUSE connection), and once an agent is back it
    gets the right bytes, for files read before and never read before; new containers
    start as usual. (Before issue 23 every lookup in lazy layers failed from the kill
    on, also after the restart.)"""
    image = await _converted(image_pusher, built_busybox, "index", proxy)
    agent = AgentProcess(tmp_path / "agent", extra_args=["--no-background-fill"]).start()
    containerd = containerd_factory(snapshotter=ACCELD_SNAPSHOTTER, acceld_socket=agent.socket)
    name = f"long-{uuid.uuid4().hex[:8]}"
    try:
        await asyncio.to_thread(containerd.cri_pull_image, image)
        containerd.ctr(
            "run",
            "-d",
            "--snapshotter",
            ACCELD_SNAPSHOTTER,
            "--runc-root",
            str(containerd.runc_root),
            "--fifo-dir",
            str(containerd.fifo_dir),
            image,
            name,
            "sleep",
            "300",
            namespace=CRI_NAMESPACE,
        )

        def exec_in(*command: str):
            return containerd.ctr(
                "task",
                "exec",
                "--exec-id",
                uuid.uuid4().hex[:8],
                name,
                *command,
                namespace=CRI_NAMESPACE,
                check=False,
                timeout=60,
            )

        before = await asyncio.to_thread(exec_in, "md5sum", "/bin/busybox")
        assert before.stdout.split()[0] == BUSYBOX_MD5
        agent.kill()
        unread = asyncio.ensure_future(asyncio.to_thread(exec_in, "cat", "/etc/hello.txt"))
        await asyncio.sleep(1.5)
        assert not unread.done(), "a read answered while no agent ran"
        agent = AgentProcess(tmp_path / "agent", extra_args=["--no-background-fill"]).start()
        waited = await unread
        await asyncio.to_thread(containerd.wait_for_snapshotter)
        read_again = await asyncio.to_thread(exec_in, "md5sum", "/bin/busybox")
        fresh = await asyncio.to_thread(_run, containerd, image)
    finally:
        containerd.ctr("task", "kill", "-s", "KILL", name, namespace=CRI_NAMESPACE, check=False)
        agent.stop()
    assert (waited.returncode, waited.stdout.strip()) == (0, "hello from acceld"), waited
    assert read_again.stdout.split()[0] == BUSYBOX_MD5
    assert fresh.stdout.strip() == "hello from acceld"


async def test_a_registry_that_never_finishes_answering_discovery_means_a_plain_pull(
    image_pusher, built_busybox, proxy, tmp_path, containerd_factory
):
    """Each read of the registry has its own timeouts, which a registry that trickles or
    stalls its answer renews or outlasts; the lookup of a layer's accelerated form has
    a deadline of its own, past which the layer falls back to containerd's pull."""
    image = await _converted(image_pusher, built_busybox, "index", proxy)
    settings = {"discovery_timeout_s": 2.0, "background_fill": False}
    with AgentProcess(tmp_path / "slow", settings=settings) as agent:
        lazy = containerd_factory(snapshotter=ACCELD_SNAPSHOTTER, acceld_socket=agent.socket)
        # The referrers list (tag schema): only the agent asks for it, and reads its body.
        referrers = "/manifests/sha256-"
        proxy.add(
            Fault("stall", path_contains=referrers, after_bytes=10, stall_seconds=60, times=10_000)
        )
        started = time.monotonic()
        await asyncio.to_thread(lazy.cri_pull_image, image)
        assert time.monotonic() - started < 30
        out = await asyncio.to_thread(_run, lazy, image, "md5sum", "/bin/busybox")
        assert out.stdout.split()[0] == BUSYBOX_MD5
        assert agent.metric('acceld_fallbacks_total{reason="discovery-timeout"}') >= 1
        proxy.clear()
