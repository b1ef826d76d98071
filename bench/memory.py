"""Peak memory of the agent while it serves one huge file, against the file's size.

A node agent that held a layer's index, chunks or responses in memory in proportion to
the layer would be killed by its DaemonSet's memory limit on the first big image (a
model, a database), so its peak RSS must not grow with the file it serves. This
benchmark publishes one-layer images holding a sparse-ish file of each size asked for
(zeros with a random 4 KiB block per MiB: the gzip blob stays small, the tar is huge),
converts them (index mode) into a registry whose storage is cached on disk, pulls each
through containerd's CRI onto a fresh agent, reads the whole file through the agent's
FUSE mount checking its sha256, and reports the agent's VmHWM (peak resident set) and
the size of its chunk cache. Building and converting a 10 GiB image takes ~3 minutes
and happens once per machine. The resource-limit tests share these pieces.

Usage: ``python -m bench.memory [--size-gb 1 --size-gb 10] [--cache-max-mb 1024]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from bench.catalog import DEFAULT_CACHE
from common.logging import configure_logging, get_logger
from converter.convert import ConvertOptions, convert_image
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from rig.agent_process import AgentProcess
from rig.containerd import ACCELD_SNAPSHOTTER, ContainerdServer
from rig.images import BuiltImage, ImageSpec, build_image, push_image
from rig.layers import Directory, File, LayerSpec, SparseishFile
from rig.registry import RegistryServer

log = get_logger(__name__)

FILE_PATH = "data/huge.bin"
REPOSITORY = "bench/memory"
READ_BLOCK = 1 << 20
_FORMAT = 1
"""Part of the cache key: bump it when a change here alters the image or its conversion."""
_SEED = 20_240_611


def huge_file(size: int) -> SparseishFile:
    """The served file: compresses ~1000:1, so a 10 GiB tar is a ~60 MiB blob."""
    return SparseishFile(size, seed=_SEED)


@dataclass(frozen=True)
class PreparedImage:
    """A converted image in a cached registry storage directory."""

    size: int
    storage: Path
    repository: str
    layer_digest: str
    content_sha256: str
    """hex sha256 of the file's bytes (computed once, when the image was built)."""

    def reference(self, registry_host: str) -> str:
        """The image's name in a registry serving ``storage``."""
        return f"{registry_host}/{self.repository}:latest"

    def file_in(self, agent: AgentProcess) -> Path:
        """Where the file appears in the agent's FUSE mount once its layer is prepared
        (the layer's directory also names its index, which this bench does not know)."""
        prefix = f"index-{self.layer_digest.replace(':', '-')}-"
        mounted = [p for p in agent.mountpoint.iterdir() if p.name.startswith(prefix)]
        if len(mounted) != 1:
            raise RuntimeError(f"expected one mounted layer {prefix}*, found {mounted}")
        return mounted[0] / FILE_PATH


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One builder at a time: a test and a benchmark started together share the work."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def prepared_image(size: int, cache_dir: Path = DEFAULT_CACHE) -> PreparedImage:
    """The image with a ``size``-byte file, built and converted on first use.

    The cache is a registry storage directory keyed by everything that decides its
    bytes; it is renamed into place only when complete, so a killed build is redone.
    """
    root = cache_dir / "memory"
    key = hashlib.sha256(json.dumps([_FORMAT, size, _SEED]).encode()).hexdigest()[:16]
    final = root / f"{size >> 20}m-{key}"
    with _locked(root):
        if not (final / "image.json").exists():
            _build(size, final)
    facts = json.loads((final / "image.json").read_text())
    return PreparedImage(
        size, final / "storage", REPOSITORY, facts["layer_digest"], facts["content_sha256"]
    )


def _build(size: int, final: Path) -> None:
    work = final.with_name(f"{final.name}.partial-{uuid.uuid4().hex[:8]}")
    work.mkdir(parents=True)
    try:
        started = time.monotonic()
        spec = ImageSpec(layers=(LayerSpec([Directory("data"), File(FILE_PATH, huge_file(size))]),))
        built = build_image(spec, work / "layout", "latest")
        with RegistryServer(work / "registry", storage_dir=work / "storage") as registry:
            asyncio.run(_publish(f"{registry.host}/{REPOSITORY}:latest", built))
        facts = {
            "layer_digest": built.layers[0].digest,
            "content_sha256": huge_file(size).sha256().split(":", 1)[1],
        }
        shutil.rmtree(work / "layout")
        shutil.rmtree(work / "registry")
        (work / "image.json").write_text(json.dumps(facts))
        os.rename(work, final)
        log.info("memory.image_built", size=size, seconds=round(time.monotonic() - started, 1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def _publish(reference: str, built: BuiltImage) -> None:
    async with RegistryClient() as client:
        await push_image(client, reference, built)
        await convert_image(client, ImageReference.parse(reference), ConvertOptions(mode="index"))


# -- measuring -------------------------------------------------------------------------


def peak_rss(pid: int) -> int:
    """Bytes of the process's peak resident set (VmHWM): the kernel tracks the maximum,
    so no sampling interval can miss a short spike."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise LookupError(f"/proc/{pid}/status has no VmHWM")


def disk_usage(directory: Path) -> int:
    """Bytes the files under ``directory`` occupy on disk (allocated blocks, like du).
    Safe while the agent evicts: vanished files and directories are skipped."""
    total = 0
    for root, _, files in os.walk(directory):  # os.walk ignores directories that vanish
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def sha256_of(path: Path) -> str:
    """hex sha256 of a file read front to back in 1 MiB reads."""
    hasher = hashlib.sha256()
    with path.open("rb", buffering=0) as handle:
        while block := handle.read(READ_BLOCK):
            hasher.update(block)
    return hasher.hexdigest()


def spread_ranges(size: int, count: int, length: int, seed: int = 7) -> list[tuple[int, int]]:
    """Head, tail and ``count`` random (offset, length) ranges over a ``size``-byte file."""
    rng = random.Random(seed)
    ranges = [(0, length), (size - length, length)]
    ranges += [(rng.randrange(size - length), length) for _ in range(count)]
    return sorted(ranges)


def expected_ranges(content: SparseishFile, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
    """The bytes of each (offset, length) of ``content``, from one pass over it."""
    wanted = sorted(range(len(ranges)), key=lambda i: ranges[i][0])
    found = [bytearray() for _ in ranges]
    position = 0
    for piece in content.chunks():
        end = position + len(piece)
        for i in wanted:
            start, length = ranges[i]
            lo, hi = max(start, position), min(start + length, end)
            if lo < hi:
                found[i] += piece[lo - position : hi - position]
        position = end
        if all(len(found[i]) == ranges[i][1] for i in wanted):
            break
    return [bytes(data) for data in found]


def agent_config(workdir: Path, **settings: object) -> AgentProcess:
    """An agent with ``settings`` (AgentConfig keys) over the measuring defaults: no
    background fill (only the reader decides what is fetched) and no startup recording
    (its eBPF compiler would dominate the peak and vary between runs)."""
    defaults = {"background_fill": False, "record_profiles": False}
    return AgentProcess(workdir, settings={**defaults, **settings})


@dataclass
class MemoryResult:
    """One file size served through one fresh agent."""

    file_bytes: int
    read_seconds: float
    peak_rss_bytes: int
    idle_rss_bytes: int
    cache_disk_bytes: int
    cache_max_bytes: int


def measure(image: PreparedImage, workdir: Path, cache_max_bytes: int) -> MemoryResult:
    """Serve ``image`` through a fresh registry, containerd and agent; read it all."""
    with contextlib.ExitStack() as stack:
        registry = stack.enter_context(
            RegistryServer(workdir / "registry", storage_dir=image.storage)
        )
        agent = stack.enter_context(
            agent_config(workdir / "agent", cache_max_bytes=cache_max_bytes)
        )
        # Under /tmp: containerd's socket paths must stay under 108 bytes.
        containerd_dir = Path(tempfile.mkdtemp(prefix="ctrd-", dir="/tmp"))
        stack.callback(shutil.rmtree, containerd_dir, ignore_errors=True)
        containerd = stack.enter_context(
            ContainerdServer(
                containerd_dir,
                snapshotter=ACCELD_SNAPSHOTTER,
                acceld_socket=agent.socket,
            )
        )
        pid = agent.pid
        containerd.cri_pull_image(image.reference(registry.host))
        idle = peak_rss(pid)
        started = time.monotonic()
        digest = sha256_of(image.file_in(agent))
        seconds = time.monotonic() - started
        if digest != image.content_sha256:
            raise RuntimeError(f"read {digest}, expected {image.content_sha256}")
        return MemoryResult(
            image.size,
            seconds,
            peak_rss(pid),
            idle,
            disk_usage(agent.root / "cache"),
            cache_max_bytes,
        )


@click.command()
@click.option("--size-gb", "sizes", type=float, multiple=True, default=(1.0, 10.0))
@click.option("--cache-max-mb", type=int, default=1024, show_default=True)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("/var/tmp/acceld-bench/memory"),
    show_default=True,
)
def main(sizes: tuple[float, ...], cache_max_mb: int, workdir: Path) -> None:
    """Print the agent's peak RSS while serving files of each size."""
    configure_logging()
    results = []
    for size_gb in sizes:
        image = prepared_image(int(size_gb * (1 << 30)))
        run_dir = workdir / f"{time.strftime('%Y%m%d-%H%M%S')}-{image.size >> 20}m"
        results.append(measure(image, run_dir, cache_max_mb << 20))
        shutil.rmtree(run_dir, ignore_errors=True)
    print("| file | read s | MB/s | idle RSS MiB | peak RSS MiB | cache on disk MiB |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r.file_bytes / (1 << 30):.1f} GiB | {r.read_seconds:.1f} "
            f"| {r.file_bytes / r.read_seconds / 1e6:.0f} | {r.idle_rss_bytes >> 20} "
            f"| {r.peak_rss_bytes >> 20} | {r.cache_disk_bytes >> 20} |"
        )
    print(json.dumps([asdict(r) for r in results]))


if __name__ == "__main__":
    main()
