"""A bounded soak: many container starts through one agent under injected registry faults.

The registry sits behind the rig's shaped link, and the rig's fault proxy between it
and the agent injects a random draw of transient faults (resets, 503s, 429s with
Retry-After, stalls, truncated and corrupted bodies) into each start. The cache is
capped well below what the images need together, so chunks are evicted and fetched
again, under faults, as the soak goes on; page caches are dropped before each start so
every start reads through FUSE. Each start's container prints the md5 of every data
file it reads (`rig.chaos`), so a wrong byte anywhere is counted.

Usage: ``python -m bench.soak [--starts 100] [--images 4] [--cache-max-mb 48] ...``
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from bench.memory import disk_usage, peak_rss
from bench.report import markdown_table, write_results
from bench.startup import drop_page_caches, shaped_registry
from common.logging import configure_logging, get_logger
from converter.convert import ConvertOptions, convert_image
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from rig.agent_process import AgentProcess
from rig.chaos import CheckableImage, Verdict, checkable_image, random_faults, verdict
from rig.containerd import ACCELD_SNAPSHOTTER, CRI_NAMESPACE, ContainerdError, ContainerdServer
from rig.fault_proxy import FaultProxy
from rig.images import build_image, push_image
from rig.shaped_link import ShapedLink

log = get_logger(__name__)

DEFAULT_WORKDIR = Path("/var/tmp/acceld-bench/soak")
HANG_SECONDS = 120.0
"""A start that has not ended by then counts as a hang (the demand timeout is 10 s)."""


@dataclass(frozen=True)
class SoakImage:
    """One image of the soak: its checkable content and its reference through the proxy."""

    image: CheckableImage
    reference: str
    mode: str


@dataclass
class StartRecord:
    """One start: which image, which faults, how it ended and how long it took."""

    image: str
    mode: str
    faults: list[str]
    verdict: Verdict
    seconds: float


async def publish(count: int, host: str, proxy_host: str, workdir: Path) -> list[SoakImage]:
    """Build, push and convert ``count`` images, alternating index-only and full mode."""
    images = []
    async with RegistryClient(plain_http_hosts={host}) as client:
        for seed in range(1, count + 1):
            image = checkable_image(seed)
            built = build_image(image.spec, workdir / "layouts" / f"soak-{seed}", "v1")
            mode = "index" if seed % 2 else "full"
            repository = f"soak/app-{seed}-{uuid.uuid4().hex[:6]}"
            await push_image(client, f"{host}/{repository}:v1", built)
            await convert_image(
                client,
                ImageReference.parse(f"{host}/{repository}:v1"),
                ConvertOptions(mode=mode, chunk_size=256 << 10, span=1 << 20),
            )
            images.append(SoakImage(image, f"{proxy_host}/{repository}:v1", mode))
    return images


def one_start(containerd: ContainerdServer, target: SoakImage) -> Verdict:
    """Pull (lazily; a no-op once pulled) and run to completion, within HANG_SECONDS."""
    deadline = time.monotonic() + HANG_SECONDS
    try:
        containerd.cri_pull_image(target.reference, timeout=HANG_SECONDS)
        left = max(1.0, deadline - time.monotonic())
        run = containerd.run_container(
            target.reference,
            f"soak-{uuid.uuid4().hex[:8]}",
            snapshotter=ACCELD_SNAPSHOTTER,
            namespace=CRI_NAMESPACE,
            check=False,
            timeout=left,
        )
    except subprocess.TimeoutExpired:
        return "hang"
    except ContainerdError as exc:
        log.warning("soak.pull_failed", image=target.reference, error=str(exc)[:300])
        return "failed_cleanly"
    return verdict(target.image.expected, run)


@dataclass(frozen=True)
class SoakSummary:
    """The figures the soak exists for."""

    starts: int
    correct: int
    failed_cleanly: int
    wrong_bytes: int
    hangs: int
    peak_agent_rss_mb: float
    peak_cache_mb: float
    cache_cap_mb: float
    faults_injected: int
    seconds: float


def summarize(
    records: list[StartRecord], peak_rss_bytes: int, peak_cache: int, cap: int, seconds: float
) -> SoakSummary:
    counts = Counter(r.verdict for r in records)
    return SoakSummary(
        starts=len(records),
        correct=counts["correct"],
        failed_cleanly=counts["failed_cleanly"],
        wrong_bytes=counts["wrong_bytes"],
        hangs=counts["hang"],
        peak_agent_rss_mb=round(peak_rss_bytes / 2**20, 1),
        peak_cache_mb=round(peak_cache / 2**20, 1),
        cache_cap_mb=round(cap / 2**20, 1),
        faults_injected=sum(len(r.faults) for r in records),
        seconds=round(seconds, 1),
    )


def summary_table(summary: SoakSummary) -> str:
    headers = [
        "starts",
        "correct",
        "failed cleanly",
        "wrong bytes",
        "hangs",
        "faults injected",
        "peak agent RSS MB",
        "peak cache MB (cap)",
        "seconds",
    ]
    row = [
        str(summary.starts),
        str(summary.correct),
        str(summary.failed_cleanly),
        str(summary.wrong_bytes),
        str(summary.hangs),
        str(summary.faults_injected),
        f"{summary.peak_agent_rss_mb:.1f}",
        f"{summary.peak_cache_mb:.1f} ({summary.cache_cap_mb:.0f})",
        f"{summary.seconds:.0f}",
    ]
    return markdown_table(headers, [row])


def run_soak(
    starts: int, image_count: int, cache_max_mb: int, rate_mbit: float, rtt_ms: float, seed: int
) -> tuple[SoakSummary, list[StartRecord]]:
    """Publish the images, then ``starts`` starts through one agent; the figures."""
    rng = random.Random(seed)
    workdir = DEFAULT_WORKDIR / time.strftime("%Y%m%d-%H%M%S")
    cap = cache_max_mb << 20
    records: list[StartRecord] = []
    peak_cache = 0
    with (
        ShapedLink(rate_mbit=rate_mbit, rtt_ms=rtt_ms) as link,
        shaped_registry(link, workdir / "cache", workdir) as (_, host),
        FaultProxy(f"http://{host}") as proxy,
    ):
        images = asyncio.run(publish(image_count, host, proxy.host, workdir))
        settings = {
            "cache_max_bytes": cap,
            "demand_timeout": 10.0,
            "background_fill_delay_s": 2.0,
            "record_profiles": False,
        }
        with (
            AgentProcess(workdir / "agent", settings=settings) as agent,
            ContainerdServer(
                workdir / "ctrd", snapshotter=ACCELD_SNAPSHOTTER, acceld_socket=agent.socket
            ) as containerd,
        ):
            started = time.monotonic()
            for number in range(1, starts + 1):
                target = rng.choice(images)
                faults = random_faults(rng)
                for _, fault in faults:
                    proxy.add(fault)
                drop_page_caches()
                began = time.monotonic()
                outcome = one_start(containerd, target)
                proxy.clear()
                peak_cache = max(peak_cache, disk_usage(agent.root / "cache"))
                record = StartRecord(
                    target.reference.rsplit("/", 1)[-1],
                    target.mode,
                    [name for name, _ in faults],
                    outcome,
                    round(time.monotonic() - began, 2),
                )
                records.append(record)
                log.info("soak.start", number=number, **asdict(record))
            summary = summarize(
                records, peak_rss(agent.pid), peak_cache, cap, time.monotonic() - started
            )
    return summary, records


@click.command()
@click.option("--starts", default=100, show_default=True, help="Container starts.")
@click.option("--images", "image_count", default=4, show_default=True, help="Distinct images.")
@click.option("--cache-max-mb", default=24, show_default=True, help="The agent's cache cap.")
@click.option("--rate-mbit", default=300.0, show_default=True, help="Link bandwidth.")
@click.option("--rtt-ms", default=5.0, show_default=True, help="Link round-trip time.")
@click.option("--seed", default=1, show_default=True, help="Seed of the fault draws.")
def main(
    starts: int, image_count: int, cache_max_mb: int, rate_mbit: float, rtt_ms: float, seed: int
) -> None:
    """Run the soak and print its table."""
    configure_logging("WARNING")
    summary, records = run_soak(starts, image_count, cache_max_mb, rate_mbit, rtt_ms, seed)
    table = summary_table(summary)
    document = {
        "parameters": {
            "starts": starts,
            "images": image_count,
            "cache_max_mb": cache_max_mb,
            "rate_mbit": rate_mbit,
            "rtt_ms": rtt_ms,
            "seed": seed,
        },
        "summary": asdict(summary),
        "starts": [asdict(r) for r in records],
    }
    path = write_results("soak", document, table)
    click.echo(table)
    click.echo(f"results: {path}")
    if summary.wrong_bytes or summary.hangs:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
