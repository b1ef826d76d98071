"""Learned profiles end to end: a node records a lazy start, pushes its profile; a
second node with an empty cache fetches it and prefetches, so its start demands far
fewer bytes from the registry synchronously."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from accelctl.main import cli
from converter.convert import ConvertOptions, convert_image
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from profiles.plan import prefetch_plan
from profiles.registry_sync import fetch_profile
from rig.agent_process import AgentProcess
from rig.containerd import ACCELD_SNAPSHOTTER, CRI_NAMESPACE
from rig.images import ImageConfig, ImageSpec, build_image, busybox_image_spec
from rig.layers import Directory, File, LayerSpec, SparseishFile

APP_FILES = ("app/a.bin", "app/b.bin")


def app_image_spec(
    command: str = "cat /app/a.bin /app/b.bin >/dev/null; echo started",
) -> ImageSpec:
    base = busybox_image_spec()
    data: list[Directory | File] = [
        Directory("app"),
        File("app/a.bin", SparseishFile(3 << 20, seed=1, data_every=4096)),
        File("app/b.bin", SparseishFile(2 << 20, seed=2, data_every=4096)),
        File("app/unused.bin", SparseishFile(24 << 20, seed=3, data_every=4096)),
    ]
    return ImageSpec(
        layers=(*base.layers, LayerSpec(data, created_by="app data")),
        platform=base.platform,
        config=ImageConfig(cmd=("/bin/sh", "-c", command)),
    )


def _agent(path: Path, **settings: object) -> AgentProcess:
    defaults = {"background_fill": False, "record_starts": 1, "trace_quiet_s": 2.0}
    return AgentProcess(path, settings={**defaults, **settings})


def _demand_bytes(agent: AgentProcess) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in agent.metrics().splitlines()
        if line.startswith('acceld_fetch_bytes_total{priority="demand"}')
    )


def _prefetch_bytes(agent: AgentProcess) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in agent.metrics().splitlines()
        if line.startswith('acceld_fetch_bytes_total{priority="prefetch"}')
    )


def _wait_for_prefetch(agent: AgentProcess, nbytes: float, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while _prefetch_bytes(agent) < nbytes and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1)


@pytest.mark.parametrize("mode", ["index", "full"])
async def test_profile_learned_on_one_node_speeds_up_the_next(
    registry, tmp_path, containerd_factory, mode
):
    """Either form: index-only spans are found in the decoded index, full mode's
    members in the decoded TOC (warmed while it is validated) or the mounted tree."""
    built = build_image(app_image_spec(), tmp_path / "layout", "v1")
    from rig.images import push_image

    reference = f"{registry.host}/rig/profiled-{uuid.uuid4().hex[:8]}:v1"
    async with RegistryClient() as client:
        await push_image(client, reference, built)
        await convert_image(
            client, ImageReference.parse(reference), ConvertOptions(mode=mode, span=1 << 20)
        )

    first = _agent(tmp_path / "node-a").start()
    try:
        node_a = containerd_factory(snapshotter=ACCELD_SNAPSHOTTER, acceld_socket=first.socket)
        await asyncio.to_thread(node_a.cri_pull_image, reference)
        out = await asyncio.to_thread(
            node_a.run_container,
            reference,
            "learn",
            snapshotter=ACCELD_SNAPSHOTTER,
            namespace=CRI_NAMESPACE,
        )
        assert out.stdout.strip() == "started"
        demanded_a = _demand_bytes(first)
        async with RegistryClient() as client:
            deadline = time.monotonic() + 60
            profile = None
            while profile is None and time.monotonic() < deadline:
                profile = await fetch_profile(client, reference, built.digest)
                await asyncio.sleep(1)
        assert profile is not None, first.log_tail(80)
        paths = {entry.path for entry in prefetch_plan(profile)}
        assert {"/" + p for p in APP_FILES} <= paths
        assert "/app/unused.bin" not in paths
        shown = await asyncio.to_thread(
            CliRunner(env={"COLUMNS": "250"}).invoke,
            cli,
            ["profile", "show", reference],
            catch_exceptions=False,
        )
        assert shown.exit_code == 0, shown.output
        assert "/app/a.bin" in shown.output and "1 run(s)" in shown.output
    finally:
        first.stop()

    second = _agent(tmp_path / "node-b", record_profiles=False).start()
    try:
        node_b = containerd_factory(snapshotter=ACCELD_SNAPSHOTTER, acceld_socket=second.socket)
        await asyncio.to_thread(node_b.cri_pull_image, reference)
        await asyncio.to_thread(_wait_for_prefetch, second, 5e6)
        out = await asyncio.to_thread(
            node_b.run_container,
            reference,
            "reuse",
            snapshotter=ACCELD_SNAPSHOTTER,
            namespace=CRI_NAMESPACE,
        )
        assert out.stdout.strip() == "started"
        demanded_b = _demand_bytes(second)
    finally:
        second.stop()
    assert demanded_a > 4e6
    print(f"demand bytes: first node {demanded_a:.0f}, second node {demanded_b:.0f}")
    assert demanded_b < 0.2 * demanded_a, (demanded_a, demanded_b)


async def test_a_crashed_start_teaches_nothing(registry, tmp_path, containerd_factory):
    """The app reads its files, then fails: the node sees the container's first process
    exit with status 3 (eBPF) and shares nothing, so a broken start's reads never become
    the fleet's plan."""
    built = build_image(app_image_spec("cat /app/a.bin >/dev/null; exit 3"), tmp_path / "app", "v1")
    from rig.images import push_image

    reference = f"{registry.host}/rig/crashing-{uuid.uuid4().hex[:8]}:v1"
    async with RegistryClient() as client:
        await push_image(client, reference, built)
        await convert_image(client, ImageReference.parse(reference), ConvertOptions(mode="index"))
    agent = _agent(tmp_path / "node").start()
    try:
        # The exit status comes from eBPF: wait until the program is compiled and loaded
        # (seconds after the agent starts) so this ms-long start cannot outrun it.
        await asyncio.to_thread(_wait_for_log, agent, "tracer.loaded")
        node = containerd_factory(snapshotter=ACCELD_SNAPSHOTTER, acceld_socket=agent.socket)
        await asyncio.to_thread(node.cri_pull_image, reference)
        out = await asyncio.to_thread(
            node.run_container,
            reference,
            "crash",
            snapshotter=ACCELD_SNAPSHOTTER,
            namespace=CRI_NAMESPACE,
            check=False,
        )
        assert out.returncode == 3
        await asyncio.to_thread(_wait_for_log, agent, "recorder.run_discarded")
    finally:
        agent.stop()
    discarded = [
        json.loads(line)
        for line in agent.log_path.read_text().splitlines()
        if "recorder.run_discarded" in line
    ]
    assert [(d["outcome"], d["files"] > 0) for d in discarded] == [("crashed", True)]
    async with RegistryClient() as client:
        assert await fetch_profile(client, reference, built.digest) is None


def _wait_for_log(agent: AgentProcess, event: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while event not in agent.log_path.read_text():
        assert time.monotonic() < deadline, agent.log_tail(40)
        time.sleep(0.2)
