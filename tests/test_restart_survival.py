"""Running containers survive the agent: crashes and restarts are a pause, not an error.

The keeper (`agent.fs.keeper`) holds the FUSE connection while no agent serves it; a
restarted agent resumes it. A container that reads and checksums its lazily served
files in a loop sees every read answered with the image's bytes while the agent is
SIGKILLed and restarted again and again. Real registry, containerd (CRI), runc, agent
process, keeper and FUSE; the host drops its caches now and then, so that the
container's reads and lookups reach the agent instead of the page cache.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from agent.fs.mount import is_mounted
from converter.convert import ConvertOptions, convert_image
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from rig.agent_process import AgentProcess
from rig.chaos import CheckableImage, checkable_image
from rig.containerd import ACCELD_SNAPSHOTTER, CRI_NAMESPACE
from rig.images import build_image, push_image
from rig.ports import free_port
from rig.registry import RegistryServer

ROUNDS = 1000
"""md5sum passes of the container over its four files."""


async def _publish(registry, tmp_path: Path, seed: int = 31) -> tuple[CheckableImage, str]:
    image = checkable_image(seed, files=4, size=2 << 20)
    built = build_image(image.spec, tmp_path / f"layout-{seed}", "v1")
    reference = f"{registry.host}/rig/survive-{uuid.uuid4().hex[:8]}:v1"
    async with RegistryClient() as client:
        await push_image(client, reference, built)
        await convert_image(
            client, ImageReference.parse(reference), ConvertOptions(mode="index", span=1 << 20)
        )
    return image, reference


def _agent(tmp_path: Path, **settings: object) -> AgentProcess:
    defaults = {"record_profiles": False, "background_fill": False, "keeper_grace_s": 60.0}
    return AgentProcess(tmp_path / "agent", settings={**defaults, **settings})


def _drop_caches_until(stop: threading.Event) -> None:
    while not stop.wait(0.3):
        with open("/proc/sys/vm/drop_caches", "w") as knob:
            knob.write("3")


def _reading_container(containerd, reference: str, prefix: str) -> asyncio.Future[Any]:
    """A container that md5sums its data files ``ROUNDS`` times, running meanwhile."""
    loop = f"i=0; while [ $i -lt {ROUNDS} ]; do md5sum /data/*.bin; i=$((i+1)); done"
    return asyncio.ensure_future(
        asyncio.to_thread(
            containerd.run_container,
            reference,
            f"{prefix}-{uuid.uuid4().hex[:8]}",
            "/bin/sh",
            "-c",
            loop,
            snapshotter=ACCELD_SNAPSHOTTER,
            namespace=CRI_NAMESPACE,
            check=False,
            timeout=600,
        )
    )


def _assert_every_sum_right(run: subprocess.CompletedProcess[str], image: CheckableImage) -> None:
    """The container ran all its rounds, every read answered with the image's bytes."""
    assert run.returncode == 0, run.stdout[-2000:]
    sums = _sums(run.stdout)
    assert len(sums) == ROUNDS * len(image.expected)
    assert [(path, digest) for path, digest in sums if image.expected[path] != digest] == []


def _sums(output: str) -> list[tuple[str, str]]:
    """(path, md5) of each line md5sum printed; anything else fails the test."""
    lines = [line.split() for line in output.splitlines() if line.strip()]
    assert all(len(line) == 2 for line in lines), output[-2000:]
    return [(path, digest) for digest, path in lines]


async def test_a_container_reading_in_a_loop_never_notices_twenty_agent_crashes(
    registry, tmp_path, containerd_factory
):
    """SIGKILL at random points: while the container's first reads fetch and the
    background fill fetches and writes the cache, while it only reads the cache, and
    while a restarted agent is still restoring its layers (every fourth kill). Every
    sum is right, and afterwards a new image still starts lazily."""
    image, reference = await _publish(registry, tmp_path)
    later, later_reference = await _publish(registry, tmp_path, seed=32)
    fill = {"background_fill": True, "background_fill_delay_s": 0.5}
    agent = _agent(tmp_path, **fill).start()
    containerd = containerd_factory(snapshotter=ACCELD_SNAPSHOTTER, acceld_socket=agent.socket)
    await asyncio.to_thread(containerd.cri_pull_image, reference)
    stop = threading.Event()
    dropper = threading.Thread(target=_drop_caches_until, args=(stop,), daemon=True)
    dropper.start()
    rng = random.Random(23)
    try:
        running = _reading_container(containerd, reference, "survive")
        kills = 0
        while kills < 20 and not running.done():
            await asyncio.sleep(rng.uniform(0.05, 1.2))
            agent.kill()
            kills += 1
            if kills % 4 == 0:  # the next one dies while restoring its layers
                agent = _agent(tmp_path, **fill).launch()
                await asyncio.sleep(rng.uniform(0.3, 1.0))
                agent.kill()
            await asyncio.sleep(rng.uniform(0.0, 0.5))  # readers wait meanwhile
            agent = await asyncio.to_thread(_agent(tmp_path, **fill).start)
        assert kills == 20, "the container finished before the agent was killed 20 times"
        run = await running
        assert agent.metric("acceld_fuse_resumes_total") == 1  # this agent's own resume
        await asyncio.to_thread(containerd.cri_pull_image, later_reference)
        fresh = await asyncio.to_thread(
            containerd.run_container,
            later_reference,
            f"later-{uuid.uuid4().hex[:8]}",
            snapshotter=ACCELD_SNAPSHOTTER,
            namespace=CRI_NAMESPACE,
        )
        assert agent.metric('acceld_layers_total{mode="lazy"}') >= 1
    finally:
        stop.set()
        agent.stop()
    _assert_every_sum_right(run, image)
    assert dict(_sums(fresh.stdout)) == later.expected


async def test_a_new_agent_takes_over_from_a_running_one_and_the_reader_never_notices(
    registry, tmp_path, containerd_factory
):
    """A live upgrade: a second agent started beside the serving one asks the keeper
    for the connection; the first is told to drain (it stops serving, flushes its
    cache, closes its socket and exits), and the second resumes the connection, the
    snapshotter socket and the chunk cache, five times over."""
    image, reference = await _publish(registry, tmp_path)
    agent = _agent(tmp_path).start()
    containerd = containerd_factory(snapshotter=ACCELD_SNAPSHOTTER, acceld_socket=agent.socket)
    await asyncio.to_thread(containerd.cri_pull_image, reference)
    stop = threading.Event()
    dropper = threading.Thread(target=_drop_caches_until, args=(stop,), daemon=True)
    dropper.start()
    try:
        running = _reading_container(containerd, reference, "upgrade")
        stalls = []
        for _ in range(5):
            await asyncio.sleep(0.5)
            successor = await asyncio.to_thread(_agent(tmp_path).start)
            assert await asyncio.to_thread(agent.wait_exit) == 0
            agent = successor
            stalls.append(agent.metric("acceld_fuse_resume_gap_seconds"))
        print(f"longest read stall over 5 takeovers: {max(stalls):.3f} s (each: {stalls})")
        assert not running.done(), "the container finished before the last takeover"
        run = await running
        assert agent.metric("acceld_fuse_resumes_total") == 1
    finally:
        stop.set()
        agent.stop()
    _assert_every_sum_right(run, image)


async def test_without_an_agent_readers_get_eio_after_the_grace_period(
    registry, tmp_path, containerd_factory
):
    """The keeper waits ``keeper_grace_s`` for an agent; then it aborts the connection:
    a reader waiting meanwhile gets an error (not D state forever), and the mount is
    gone."""
    _, reference = await _publish(registry, tmp_path)
    agent = _agent(tmp_path, keeper_grace_s=2.0).start()
    containerd = containerd_factory(snapshotter=ACCELD_SNAPSHOTTER, acceld_socket=agent.socket)
    try:
        await asyncio.to_thread(containerd.cri_pull_image, reference)
        layers = [p for p in agent.mountpoint.iterdir() if p.is_dir()]
        assert layers
        data = next(p for layer in layers for p in layer.rglob("f0.bin"))
        agent.kill()
        started = time.monotonic()
        # A process of its own: one left in D state would not return at all.
        reader = await asyncio.to_thread(
            subprocess.run, ["cat", str(data)], capture_output=True, timeout=60, check=False
        )
        waited = time.monotonic() - started
        assert reader.returncode != 0 and not reader.stdout, reader
        assert 1.5 < waited < 2.0 + 5, waited  # the grace period plus a few seconds
        assert not is_mounted(agent.mountpoint)
    finally:
        agent.stop()


async def test_layers_not_restored_while_the_registry_was_down_come_back_when_it_does(
    tmp_path, containerd_factory
):
    """The agent restarts while the registry is down, so it cannot serve the pulled
    image's lazy layers again. A container of the image then fails with the reason
    (not containerd's bare "no such file or directory"); once the registry is back,
    the next container starts with the image's bytes, with no new pull."""
    with RegistryServer(tmp_path / "registry", port=free_port()) as registry:
        image, reference = await _publish(registry, tmp_path)
        agent = _agent(tmp_path).start()
        containerd = containerd_factory(snapshotter=ACCELD_SNAPSHOTTER, acceld_socket=agent.socket)
        try:
            await asyncio.to_thread(containerd.cri_pull_image, reference)
            agent.stop()
            registry.stop()
            agent = await asyncio.to_thread(_agent(tmp_path).start)
            await asyncio.to_thread(containerd.wait_for_snapshotter)
            refused = await asyncio.to_thread(
                containerd.run_container,
                reference,
                f"down-{uuid.uuid4().hex[:8]}",
                snapshotter=ACCELD_SNAPSHOTTER,
                namespace=CRI_NAMESPACE,
                check=False,
            )
            assert refused.returncode != 0
            assert "is not served: the agent could not serve it again" in refused.stderr
            registry.start()
            run = await asyncio.to_thread(
                containerd.run_container,
                reference,
                f"back-{uuid.uuid4().hex[:8]}",
                "md5sum",
                *sorted(image.expected),
                snapshotter=ACCELD_SNAPSHOTTER,
                namespace=CRI_NAMESPACE,
            )
        finally:
            agent.stop()
    assert dict(_sums(run.stdout)) == image.expected
    assert "snapshotter.remote_restored" in agent.log_tail(400)
