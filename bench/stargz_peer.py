"""The peer, side by side: stargz-snapshotter's own lazy pulling in the startup suite.

acceld's figures mean more next to the system it re-creates. This module gives the suite
two more modes, each measured exactly like acceld's lazy modes (a cold node per run: a
fresh containerd on a fresh tmpfs root and a fresh snapshotter with an empty root, page
caches dropped, CRI pull then `ctr run` until the image's readiness line, bytes counted
on the shaped link):

* ``stargz``            the image converted by the peer's own tool
                        (``ctr-remote image convert --oci --estargz``), no prefetch;
* ``stargz-optimized``  the image optimized by the peer's own tool
                        (``ctr-remote image optimize --oci``): it runs the image's own
                        command once under a fanotify tracer and puts the files read
                        first in each layer, which the peer prefetches at mount time.

The peer's daemon is our own build of Debian's stargz-snapshotter 0.12 library
(`rig.stargz_process`, installed by ``./install.sh --bench-peer``); without it the suite
skips these modes and says so once. Both conversions run once per image on a private
containerd and are pushed next to the image in the bench registry, tagged with the
source manifest's digest, so a later suite run reuses them: like acceld's own
conversions (and unlike acceld's profiles, which the suite learns anew every run), the
peer's optimization is a build step, done once per image version.
"""

from __future__ import annotations

import asyncio
import functools
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.startup import (
    RunResult,
    Setup,
    cold_start,
)
from common.logging import get_logger
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from rig.containerd import STARGZ_SNAPSHOTTER, ContainerdError, ContainerdServer
from rig.stargz_process import StargzDaemon, missing_binary_message

log = get_logger(__name__)

STARGZ = "stargz"
STARGZ_OPTIMIZED = "stargz-optimized"
PEER_MODES = (STARGZ, STARGZ_OPTIMIZED)
"""The suite's modes for the peer, in rotation order."""
_CTR_REMOTE = "ctr-remote"
_KILL_GRACE_S = 30.0


@functools.cache
def peer_available() -> bool:
    """Whether the peer's daemon is installed. When it is not, says so once (log and
    stderr): which binary was looked for and the command that installs it."""
    problem = missing_binary_message()
    if problem is None:
        return True
    log.warning("bench.peer_skipped", modes=list(PEER_MODES), reason=problem)
    print(f"skipping modes {', '.join(PEER_MODES)}: {problem}", file=sys.stderr)
    return False


@dataclass(frozen=True)
class PeerImages:
    """References (as containerd sees them) of the peer's two forms of one image."""

    estargz: str
    optimized: str

    def reference(self, mode: str) -> str:
        """What a run of ``mode`` pulls."""
        if mode == STARGZ:
            return self.estargz
        if mode == STARGZ_OPTIMIZED:
            return self.optimized
        raise ValueError(f"not a peer mode: {mode!r}")


_published: dict[tuple[str, str], PeerImages] = {}
"""Conversions made (or found) in this process, per (registry host, source image)."""


def peer_images(setup: Setup) -> PeerImages:
    """The peer's forms of the setup's image, converted on first use in this process.

    Their conversion figures are added to ``setup.published.conversions`` (under
    ``stargz`` and ``stargz-optimized``), so the suite's JSON records them next to
    acceld's own.
    """
    key = (setup.registry_host, setup.published.original)
    if key not in _published:
        _published[key] = _convert(setup)
    return _published[key]


def _convert(setup: Setup) -> PeerImages:
    source = ImageReference.parse(setup.published.original)
    suffix = f"{source.tag or 'latest'}-{setup.image.built.digest.split(':')[1][:12]}"
    repository = f"{setup.registry_host}/bench/{setup.image.name}-stargz"
    images = PeerImages(f"{repository}:esgz-{suffix}", f"{repository}:esgzopt-{suffix}")
    missing = [
        (mode, images.reference(mode))
        for mode in PEER_MODES
        if asyncio.run(_manifest_digest(images.reference(mode), setup.registry_host)) is None
    ]
    figures = {mode: {"seconds": 0.0, "skipped_existing": 1.0} for mode in PEER_MODES}
    if missing:
        with ContainerdServer(setup.workdir / "peer-convert") as server:
            _ctr_remote(server, ["images", "pull", "--plain-http", str(source)], setup.timeout)
            for mode, target in missing:
                started = time.monotonic()
                if mode == STARGZ:
                    convert = ["images", "convert", "--oci", "--estargz", str(source), target]
                    _ctr_remote(server, convert, setup.timeout)
                else:
                    figures[mode]["recorded_files"] = float(
                        _optimize(server, setup, str(source), target)
                    )
                _ctr_remote(server, ["images", "push", "--plain-http", target], setup.timeout)
                figures[mode].update(
                    seconds=round(time.monotonic() - started, 2), skipped_existing=0.0
                )
                log.info("bench.peer_converted", mode=mode, target=target, **figures[mode])
    for mode in PEER_MODES:
        sizes = asyncio.run(_layer_sizes(images.reference(mode), setup.registry_host))
        figures[mode]["output_bytes"] = float(sum(sizes))
        setup.published.conversions[mode] = figures[mode]
    return images


def _ctr_remote(
    server: ContainerdServer, args: Sequence[str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run ``ctr-remote`` against ``server``; a failure raises with its output."""
    command = [_CTR_REMOTE, "--address", str(server.address), "--namespace", server.namespace]
    command += args
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise ContainerdError(
            f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-3000:]}"
        )
    return done


def _optimize(server: ContainerdServer, setup: Setup, source: str, target: str) -> int:
    """``ctr-remote image optimize`` with the image's own command, stopped at readiness.

    The tool runs the container until it exits or a period passes, and records every
    file opened meanwhile. A server never exits, and a fixed period would either cut a
    slow start short or record whatever it does after its start, so the container is
    killed as soon as the same readiness probe the runs use fires (files read after
    that do not delay a start, and are not what acceld's profile holds either).
    Returns the number of distinct files recorded.
    """
    record = setup.workdir / "peer-convert" / "optimize-record.json"
    command = [
        _CTR_REMOTE, "--address", str(server.address), "--namespace", server.namespace,
        "images", "optimize", "--oci", "--period", str(int(setup.timeout)),
        "--record-out", str(record), source, target,
    ]  # fmt: skip
    stderr_path = record.with_suffix(".log")
    with (
        stderr_path.open("wb") as stderr,
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr) as process,
    ):
        try:
            setup.image.probe.wait(process, time.monotonic() + setup.timeout)
        except Exception:
            process.kill()
            raise
        finally:
            _kill_tasks(server)
        process.communicate(timeout=setup.timeout)
    if process.returncode != 0:
        tail = stderr_path.read_text(errors="replace")[-3000:]
        raise ContainerdError(f"{' '.join(command)} exited {process.returncode}:\n{tail}")
    return len(_recorded_paths(record))


def _recorded_paths(record: Path) -> set[tuple[str, int]]:
    """(path, layer index) of each file in optimize's record: one JSON object per access,
    so a file read twice is there twice."""
    paths: set[tuple[str, int]] = set()
    try:
        lines = record.read_text().splitlines()
    except FileNotFoundError:
        return paths
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("path"), str):
            paths.add((entry["path"], int(entry.get("layerIndex", -1))))
    return paths


def _kill_tasks(server: ContainerdServer) -> None:
    """SIGKILL every task of the private conversion containerd (only optimize's runs)."""
    listed = server.ctr("tasks", "ls", "-q", check=False)
    for task in listed.stdout.split():
        server.ctr("tasks", "kill", "-s", "SIGKILL", task, check=False)


async def _manifest_digest(reference: str, host: str) -> str | None:
    async with RegistryClient(plain_http_hosts={host}) as client:
        return await client.manifest_digest(ImageReference.parse(reference))


async def _layer_sizes(reference: str, host: str) -> list[int]:
    async with RegistryClient(plain_http_hosts={host}) as client:
        resolved = await client.resolve(ImageReference.parse(reference))
    return [layer.size for layer in resolved.manifest.layers]


def run_peer(setup: Setup, mode: str, repetition: int, run_dir: Path) -> RunResult:
    """One cold start through stargz-snapshotter: a fresh daemon (empty root) and a
    containerd whose CRI snapshotter it is, then CRI pull and run until ready.

    ``lazy_layers`` / ``fallback_layers`` are the daemon's own per-layer verdicts (a
    fallback layer is downloaded and unpacked by containerd); ``agent_stats`` holds the
    daemon's CPU time over the start, as it holds acceld's for acceld's runs.
    """
    reference = peer_images(setup).reference(mode)
    fs_config = {"no_background_fetch": not setup.background_fill}
    with (
        StargzDaemon(
            run_dir / "stargz", plain_http=[setup.registry_host], fs_config=fs_config
        ) as daemon,
        ContainerdServer(
            run_dir / "ctrd", snapshotter=STARGZ_SNAPSHOTTER, stargz_socket=daemon.socket
        ) as server,
    ):
        try:
            start = cold_start(server, reference, STARGZ_SNAPSHOTTER, setup, daemon.pid)
        except Exception:
            log.error("bench.peer_run_failed", mode=mode, daemon_log=str(daemon.log_path))
            raise
        verdicts = daemon.remote_snapshots()
    if verdicts.fallback:
        log.warning("bench.peer_fallback_layers", mode=mode, layers=verdicts.fallback)
    return RunResult(
        mode,
        repetition,
        start.pull_seconds,
        start.ready_seconds,
        start.link_bytes,
        lazy_layers=float(verdicts.lazy),
        fallback_layers=float(verdicts.fallback),
        agent_stats=dict(
            zip(("agent_user_seconds", "agent_system_seconds"), start.daemon_cpu, strict=True)
        ),
        steal_seconds=start.steal_seconds,
    )
