"""Read latency of a lazily served file while the agent is replaced (issue 23).

A reader reads 128 KiB at random offsets of a file of a lazily served layer, dropping
the file's pages before each read so that every read reaches the agent, while the
benchmark goes through three phases: steady, a takeover (a new agent started beside
the serving one, which drains), and a crash (SIGKILL, then a restart). For each phase
it prints the reads' p50, p99 and max latency, and their ratio to the steady p50: the
stall a running container sees in a hand-over. Reads that fail are counted (there must
be none). Real registry, containerd (for the CRI pull that mounts the layers), agent,
keeper and FUSE.

Usage: ``python -m bench.handover_latency [--seconds 5] [--size-mb 32]``.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from bench.report import RESULTS_DIR, markdown_table, write_results
from common.logging import configure_logging
from converter.convert import ConvertOptions, convert_image
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from rig.agent_process import AgentProcess
from rig.chaos import checkable_image
from rig.containerd import ACCELD_SNAPSHOTTER, ContainerdServer
from rig.images import build_image, push_image
from rig.registry import RegistryServer

DEFAULT_WORKDIR = Path("/var/tmp/acceld-bench/handover")
READ_SIZE = 128 << 10
PHASES = ("steady", "takeover", "crash")


@dataclass
class Reads:
    """Each read's latency (s) by phase, and the reads that failed."""

    latencies: dict[str, list[float]]
    failures: int = 0


def read_loop(path: Path, size: int, phase: list[str], stop: threading.Event, reads: Reads) -> None:
    """Read ``READ_SIZE`` at random offsets until ``stop``; file pages dropped first."""
    rng = random.Random(7)
    fd = os.open(path, os.O_RDONLY)
    try:
        while not stop.is_set():
            offset = rng.randrange(0, size - READ_SIZE)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            started = time.perf_counter()
            try:
                data = os.pread(fd, READ_SIZE, offset)
            except OSError:
                reads.failures += 1
                continue
            elapsed = time.perf_counter() - started
            if len(data) != READ_SIZE:
                reads.failures += 1
            reads.latencies[phase[0]].append(elapsed)
    finally:
        os.close(fd)


async def publish(host: str, workdir: Path, size: int) -> tuple[str, str]:
    """An index-only image with one large data file; (reference, the file's name)."""
    image = checkable_image(71, files=1, size=size)
    built = build_image(image.spec, workdir / "layout", "v1")
    reference = f"{host}/bench/handover:v1"
    async with RegistryClient() as client:
        await push_image(client, reference, built)
        await convert_image(client, ImageReference.parse(reference), ConvertOptions(mode="index"))
    return reference, next(iter(image.expected)).lstrip("/")


def run(seconds: float, size: int, workdir: Path) -> Reads:
    """The three phases; the reads they saw."""
    settings = {"record_profiles": False, "background_fill": False}
    reads = Reads({name: [] for name in PHASES})
    with RegistryServer(workdir / "registry") as registry:
        reference, name = asyncio.run(publish(registry.host, workdir, size))
        agent = AgentProcess(workdir / "agent", settings=settings).start()
        try:
            with ContainerdServer(
                workdir / "ctrd", snapshotter=ACCELD_SNAPSHOTTER, acceld_socket=agent.socket
            ) as containerd:
                containerd.cri_pull_image(reference)
                path = next(agent.mountpoint.glob(f"*/{name}"))
                phase, stop = ["steady"], threading.Event()
                reader = threading.Thread(target=read_loop, args=(path, size, phase, stop, reads))
                reader.start()
                try:
                    time.sleep(seconds)
                    phase[0] = "takeover"
                    successor = AgentProcess(workdir / "agent", settings=settings).start()
                    agent.wait_exit()
                    agent = successor
                    time.sleep(1.0)
                    phase[0] = "steady"
                    time.sleep(seconds)
                    phase[0] = "crash"
                    agent.kill()
                    agent = AgentProcess(workdir / "agent", settings=settings).start()
                    time.sleep(1.0)
                    phase[0] = "steady"
                    time.sleep(seconds)
                finally:
                    stop.set()
                    reader.join()
        finally:
            agent.stop()
    return reads


def summary_rows(reads: Reads) -> list[list[str]]:
    """p50, p99, max (ms) per phase, and p99 and max over the steady p50."""
    steady = float(np.percentile(reads.latencies["steady"], 50))
    rows = []
    for name in PHASES:
        values = np.array(reads.latencies[name])
        p50, p99, worst = (float(np.percentile(values, q)) for q in (50, 99, 100))
        rows.append(
            [
                name,
                str(len(values)),
                f"{p50 * 1e3:.2f}",
                f"{p99 * 1e3:.2f}",
                f"{worst * 1e3:.1f}",
                f"{p99 / steady:.1f}x",
                f"{worst / steady:.0f}x",
            ]
        )
    return rows


@click.command()
@click.option("--seconds", default=5.0, show_default=True, help="Steady reading per phase.")
@click.option("--size-mb", default=32, show_default=True, help="Size of the file read.")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_WORKDIR,
    show_default=True,
)
@click.option(
    "--results-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=RESULTS_DIR,
    show_default=True,
)
def main(seconds: float, size_mb: int, workdir: Path, results_dir: Path) -> None:
    """Print read latency across a takeover and a crash of the agent."""
    configure_logging()
    reads = run(seconds, size_mb << 20, workdir)
    headers = ["phase", "reads", "p50 ms", "p99 ms", "max ms", "p99/steady p50", "max/steady p50"]
    table = markdown_table(headers, summary_rows(reads))
    document = {
        "seconds": seconds,
        "size_mb": size_mb,
        "failed_reads": reads.failures,
        "latencies_s": reads.latencies,
    }
    path = write_results("handover-latency", document, table, results_dir)
    click.echo(table)
    click.echo(f"failed reads: {reads.failures}")
    click.echo(f"results: {path}")


if __name__ == "__main__":
    main()
