"""Every registry fault, during a container's start and during background fill, and the
agent killed at random points: the container reads exactly the image's bytes or fails
cleanly within a bound; never wrong bytes, never a hang.

The images print the md5 of each data file they read (`rig.chaos`), so a wrong byte
anywhere in a served chunk changes a sum the test knows in advance.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from converter.convert import ConvertOptions, convert_image
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from rig.agent_process import AgentProcess
from rig.chaos import TRANSIENT_FAULTS, CheckableImage, checkable_image, verdict
from rig.containerd import ACCELD_SNAPSHOTTER, CRI_NAMESPACE, ContainerdError
from rig.fault_proxy import Fault, FaultProxy
from rig.images import build_image, push_image

SMALL = {"chunk_size": 256 << 10, "span": 1 << 20}
DEMAND_TIMEOUT = 4.0
FOREVER = 10**6


@pytest.fixture
def proxy(registry):
    with FaultProxy(registry.url) as fault_proxy:
        yield fault_proxy


async def _publish(registry, proxy: FaultProxy, tmp_path: Path, seed: int, mode: str):
    image = checkable_image(seed)
    built = build_image(image.spec, tmp_path / f"layout-{seed}", "v1")
    repository = f"rig/chaos-{seed}-{uuid.uuid4().hex[:8]}"
    async with RegistryClient() as client:
        await push_image(client, f"{registry.host}/{repository}:v1", built)
        await convert_image(
            client,
            ImageReference.parse(f"{registry.host}/{repository}:v1"),
            ConvertOptions(mode=mode, **SMALL),  # type: ignore[arg-type]
        )
    return image, f"{proxy.host}/{repository}:v1"


def _start(containerd, image: str, timeout: float = 90.0):
    """One start to completion; None when it did not end within ``timeout`` (a hang)."""
    name = f"chaos-{uuid.uuid4().hex[:8]}"
    try:
        return containerd.run_container(
            image,
            name,
            snapshotter=ACCELD_SNAPSHOTTER,
            namespace=CRI_NAMESPACE,
            check=False,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return None


def _agent(tmp_path: Path, name: str = "agent", **settings: object) -> AgentProcess:
    defaults = {"demand_timeout": DEMAND_TIMEOUT, "record_profiles": False}
    return AgentProcess(tmp_path / name, settings={**defaults, **settings})


def _wait_for_fill(agent: AgentProcess, timeout: float = 60.0) -> None:
    """Until background fill has fetched something and then stayed still for 2 s."""
    deadline = time.monotonic() + timeout
    last, since = -1.0, time.monotonic()
    while time.monotonic() < deadline:
        now = agent.metric('acceld_fetch_bytes_total{priority="background"}')
        if now != last:
            last, since = now, time.monotonic()
        elif now > 0 and time.monotonic() - since > 2.0:
            return
        time.sleep(0.3)
    raise AssertionError(f"background fill did not settle: {agent.log_tail(20)}")


def _slower_than(agent: AgentProcess, bucket: str) -> float:
    """Range requests that took longer than the latency bucket ``bucket``, any priority."""
    total = 0.0
    for family in text_string_to_metric_families(agent.metrics()):
        for sample in family.samples:
            if sample.name == "acceld_range_request_seconds_count":
                total += sample.value
            elif sample.name == "acceld_range_request_seconds_bucket":
                total -= sample.value if sample.labels["le"] == bucket else 0.0
    return total


@pytest.mark.parametrize("fault", sorted(TRANSIENT_FAULTS))
async def test_fault_during_startup_gives_exact_bytes(
    fault, registry, proxy, tmp_path, containerd_factory
):
    image, reference = await _publish(registry, proxy, tmp_path, 1, "index")
    with _agent(tmp_path, background_fill=False) as agent:
        containerd = containerd_factory(snapshotter=ACCELD_SNAPSHOTTER, acceld_socket=agent.socket)
        await asyncio.to_thread(containerd.cri_pull_image, reference)
        rule = proxy.add(TRANSIENT_FAULTS[fault]())
        run = await asyncio.to_thread(_start, containerd, reference)
        logged = agent.log_path.read_text()
        slow = _slower_than(agent, "2.5")
    assert verdict(image.expected, run) == "correct", run
    assert rule.hits > 0
    if fault == "stall":
        # Shorter than the demand timeout: only slow, which the latency histogram shows.
        assert slow >= 1
    else:
        # The logs say what happened: a retry in the client, or a refetch by the fetcher.
        told = ("registry.retry", "registry.range_retry", "fetcher.range_failed", "fetcher.corrupt")
        assert any(event in logged for event in told), logged[-2000:]


@pytest.mark.parametrize("fault", ["reset", "stall", "truncate", "flip"])
async def test_fault_during_background_fill_leaves_a_complete_exact_cache(
    fault, registry, proxy, tmp_path, containerd_factory
):
    """Fill runs through the fault; then the registry goes away for good and the
    container must still read every byte, from the cache, exactly."""
    image, reference = await _publish(registry, proxy, tmp_path, 2, "full")
    with _agent(tmp_path, background_fill=True, background_fill_delay_s=0) as agent:
        containerd = containerd_factory(snapshotter=ACCELD_SNAPSHOTTER, acceld_socket=agent.socket)
        rule = proxy.add(TRANSIENT_FAULTS[fault]())
        await asyncio.to_thread(containerd.cri_pull_image, reference)
        await asyncio.to_thread(_wait_for_fill, agent)
        proxy.add(Fault("status", path_contains="/blobs/", status=503, times=FOREVER))
        run = await asyncio.to_thread(_start, containerd, reference)
    assert rule.hits > 0
    assert verdict(image.expected, run) == "correct", run


@pytest.mark.parametrize(
    "outage",
    [
        Fault("stall", path_contains="/blobs/", after_bytes=0, stall_seconds=600, times=FOREVER),
        Fault("status", path_contains="/blobs/", status=503, retry_after="0", times=FOREVER),
        Fault("reset", path_contains="/blobs/", after_bytes=0, times=FOREVER),
    ],
    ids=["stalled", "503-forever", "reset-forever"],
)
async def test_a_registry_that_never_recovers_gives_eio_within_the_bound(
    outage, registry, proxy, tmp_path, containerd_factory
):
    image, reference = await _publish(registry, proxy, tmp_path, 3, "index")
    with _agent(tmp_path, background_fill=False) as agent:
        containerd = containerd_factory(snapshotter=ACCELD_SNAPSHOTTER, acceld_socket=agent.socket)
        await asyncio.to_thread(containerd.cri_pull_image, reference)
        proxy.add(outage)
        started = time.monotonic()
        run = await asyncio.to_thread(_start, containerd, reference)
        took = time.monotonic() - started
        logged = agent.log_path.read_text()
    assert verdict(image.expected, run) == "failed_cleanly", run
    assert run is not None and "input/output error" in (run.stdout + run.stderr).lower()
    # Each of the image's files fails on its own, each within the demand timeout.
    assert took < len(image.expected) * (DEMAND_TIMEOUT + 5) + 10, took
    assert "fs.read_failed" in logged


async def test_agent_killed_at_random_points_never_serves_a_torn_chunk(
    registry, proxy, tmp_path, containerd_factory
):
    """SIGKILL during pulls, demand fetches, fill and cache writes, again and again;
    after each restart the snapshots containerd knows are all there and a new
    container reads exact bytes (a torn cached chunk would change a sum)."""
    rng = random.Random(7)
    images: list[tuple[CheckableImage, str]] = [
        await _publish(registry, proxy, tmp_path, seed, mode)
        for seed, mode in ((4, "index"), (5, "full"))
    ]
    settings = {"background_fill": True, "background_fill_delay_s": 0}
    agent = _agent(tmp_path, **settings).start()
    containerd = containerd_factory(snapshotter=ACCELD_SNAPSHOTTER, acceld_socket=agent.socket)
    try:
        for round_ in range(4):
            _, reference = images[round_ % len(images)]
            proxy.add(Fault("stall", path_contains="/blobs/", stall_seconds=1, times=1))
            starting = asyncio.ensure_future(
                asyncio.to_thread(_start_after_pull, containerd, reference)
            )
            await asyncio.sleep(rng.uniform(0.2, 2.5))
            agent.kill()
            await starting  # whatever it got: the agent died under it
            agent = _agent(tmp_path, **settings).start()
            await asyncio.to_thread(containerd.wait_for_snapshotter)
            leftovers = list((agent.root / "cache" / "tmp").glob("*"))
            assert leftovers == [], "partial chunk files survived a restart"
            _assert_snapshots_consistent(containerd)
            for expected, ref in images:
                await asyncio.to_thread(_pull_once_redialled, containerd, ref)
                run = await asyncio.to_thread(_start, containerd, ref)
                assert verdict(expected.expected, run) == "correct", (round_, run)
    finally:
        agent.stop()


def _start_after_pull(containerd, reference: str) -> None:
    try:
        containerd.cri_pull_image(reference, timeout=60)
        _start(containerd, reference, timeout=60)
    except ContainerdError:
        pass  # the agent was killed under the pull


def _pull_once_redialled(containerd, reference: str, timeout: float = 30.0) -> None:
    """containerd redials a restarted proxy snapshotter with a backoff of its own: a
    pull right after the restart may still find the old connection refused."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            containerd.cri_pull_image(reference)
            return
        except ContainerdError as exc:
            if "connection refused" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(1)


def _assert_snapshots_consistent(containerd) -> None:
    """Every snapshot containerd's metadata lists is one the agent can Stat."""
    listed = containerd.ctr(
        "snapshots", "--snapshotter", ACCELD_SNAPSHOTTER, "ls", namespace=CRI_NAMESPACE
    ).stdout.splitlines()[1:]
    for line in listed:
        key = line.split()[0]
        info = containerd.ctr(
            "snapshots",
            "--snapshotter",
            ACCELD_SNAPSHOTTER,
            "info",
            key,
            namespace=CRI_NAMESPACE,
            check=False,
        )
        assert info.returncode == 0, (key, info.stderr)
