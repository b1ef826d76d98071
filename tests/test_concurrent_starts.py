"""Several containers starting together on one node: no hang, no wrong byte.

Real containerd (CRI pulls, as the kubelet does), real registry, the agent as its own
process with background fill on, and its cache on the same file system as the
containers' writable layers, as on a node. Each container creates a directory in every
lazily served data directory (an overlayfs copy-up that asks FUSE for the lower
directory's xattrs while holding the file system's rename lock) and reads the files
there, while the agent fetches and caches chunks. A cache that renamed chunks into
place across directories while holding the lock its FUSE reads take deadlocked the
whole node this way.

``ACCELD_CONCURRENT_ROUNDS`` repeats the start on a fresh agent and containerd (one
round by default; the regression was proven with 20).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
import uuid
from pathlib import Path

import pytest

from converter.convert import ConvertOptions, convert_image
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from formats.accelerated import accelerated_tag
from rig.agent_process import AgentProcess
from rig.chaos import CheckableImage, directory_tree_image, parse_md5sum, verdict
from rig.containerd import ACCELD_SNAPSHOTTER, CRI_NAMESPACE, ContainerdServer
from rig.hangs import abort_fuse, as_json, d_state_processes, thread_stacks
from rig.images import build_image

ROUNDS = int(os.environ.get("ACCELD_CONCURRENT_ROUNDS", "1"))
CONTAINERS = 4
START_BOUND_S = 120.0
"""Far beyond a healthy start here (seconds): past it, a container counts as hung."""
CHUNK_SIZE = 64 << 10
SPAN = 64 << 10
"""Small chunks and spans: many cache writes while the containers start."""


def _start_together(
    containerd: ContainerdServer, references: list[str]
) -> list[subprocess.CompletedProcess[str] | None]:
    """Run one container of each image, all released at once; None for one that did
    not finish within START_BOUND_S."""
    barrier = threading.Barrier(len(references))
    results: list[subprocess.CompletedProcess[str] | None] = [None] * len(references)

    def start(index: int, reference: str) -> None:
        barrier.wait()
        try:
            results[index] = containerd.run_container(
                reference,
                f"tree-{index}-{uuid.uuid4().hex[:8]}",
                snapshotter=ACCELD_SNAPSHOTTER,
                namespace=CRI_NAMESPACE,
                timeout=START_BOUND_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            results[index] = None

    threads = [
        threading.Thread(target=start, args=(i, ref), daemon=True)
        for i, ref in enumerate(references)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(START_BOUND_S + 60)
    return results


def _describe(image: CheckableImage, run: subprocess.CompletedProcess[str] | None) -> str:
    """Why a start that ended was not correct: its exit, and what it printed."""
    if run is None:
        return "hung"
    seen = parse_md5sum(run.stdout)
    wrong = sorted(path for path, md5 in seen.items() if image.expected.get(path) != md5)
    missing = len(image.expected) - len(seen)
    return (
        f"exit {run.returncode}, {len(seen)} files checked, {missing} missing, wrong: {wrong[:5]}"
        f"\nstdout tail: {run.stdout[-300:]}\nstderr: {run.stderr[-1500:]}"
    )


def _hang_report(agent: AgentProcess) -> str:
    """What the kernel shows of a hung start (kept in the failure message), then the
    FUSE connection is aborted so the stuck processes wake and teardown can run."""
    report = {
        "agent_threads": as_json(thread_stacks(agent.pid)),
        "d_state": as_json(d_state_processes()),
    }
    abort_fuse(agent.mountpoint)
    return json.dumps(report, indent=1)[:20000]


@pytest.mark.parametrize("mode", ["index", "full"])
async def test_containers_making_directories_while_chunks_are_cached_never_hang(
    mode: str, registry, image_pusher, containerd_factory, tmp_path: Path
) -> None:
    seed = 100 if mode == "index" else 200
    images: list[CheckableImage] = [directory_tree_image(seed + i) for i in range(CONTAINERS)]
    references: list[str] = []
    async with RegistryClient() as client:
        for image in images:
            built = await asyncio.to_thread(
                build_image, image.spec, tmp_path / "layout", f"tree-{len(references)}"
            )
            pushed = await image_pusher.push(built)
            await convert_image(
                client,
                ImageReference.parse(pushed.reference),
                ConvertOptions(mode=mode, chunk_size=CHUNK_SIZE, span=SPAN),
            )
            references.append(
                pushed.reference if mode == "index" else accelerated_tag(pushed.reference)
            )
    for round_number in range(ROUNDS):
        agent = AgentProcess(
            tmp_path / f"agent-{round_number}",
            plain_http=[registry.host],
            settings={"background_fill_delay_s": 0.0, "record_profiles": False},
        )
        with agent:
            containerd = containerd_factory(
                snapshotter=ACCELD_SNAPSHOTTER, acceld_socket=agent.socket
            )
            await asyncio.gather(
                *(asyncio.to_thread(containerd.cri_pull_image, ref) for ref in references)
            )
            runs = await asyncio.to_thread(_start_together, containerd, references)
            hung = [ref for ref, run in zip(references, runs, strict=True) if run is None]
            if hung:
                pytest.fail(
                    f"round {round_number}: {len(hung)} of {len(runs)} starts hung "
                    f"({mode}):\n{_hang_report(agent)}\n{agent.log_tail()}"
                )
            verdicts = [verdict(i.expected, r) for i, r in zip(images, runs, strict=True)]
            assert verdicts == ["correct"] * len(images), f"round {round_number}: " + "\n".join(
                _describe(image, run)
                for image, run, seen in zip(images, runs, verdicts, strict=True)
                if seen != "correct"
            )
            assert agent.metric("acceld_fallbacks_total") == 0
            assert agent.metric("acceld_layers_total") >= len(images)
            containerd.stop()
