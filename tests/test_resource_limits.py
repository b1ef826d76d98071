"""The agent within its resource limits, end to end with the real registry, containerd
and agent process: the cache cap holds while many images come and go, a full disk costs
caching but not correctness, memory does not grow with the file served, and many
containers of one image share each chunk's fetch."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.layers.discovery import LayerDiscovery
from bench.memory import (
    PreparedImage,
    agent_config,
    disk_usage,
    expected_ranges,
    huge_file,
    peak_rss,
    prepared_image,
    sha256_of,
    spread_ranges,
)
from bench.startup import drop_page_caches
from converter.convert import ConvertOptions, convert_image
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from rig.agent_process import AgentProcess
from rig.containerd import ACCELD_SNAPSHOTTER, CRI_NAMESPACE, ContainerdServer
from rig.images import BuiltImage, ImageConfig, ImageSpec, build_image, busybox_image_spec
from rig.layers import Directory, File, LayerSpec, SparseishFile
from rig.registry import RegistryServer
from tests.fixtures.images import ImagePusher
from tests.fixtures.registry import RedirectingRegistry

SPAN = 1 << 20
DATA_PATH = "/data/blob.bin"
AgentFactory = Callable[..., AgentProcess]


@pytest.fixture
def agent_factory(tmp_path: Path) -> Iterator[AgentFactory]:
    """Agents with AgentConfig settings; stopped after the test (after its containerds,
    which are torn down first because tests request this fixture before them)."""
    with ExitStack() as stack:

        def start(name: str = "agent", **settings: object) -> AgentProcess:
            agent = agent_config(tmp_path / name, **settings)
            print(f"agent log: {agent.log_path}")  # shown with a failure's captured output
            return stack.enter_context(agent)

        yield start


@dataclass(frozen=True)
class DataImage:
    """A converted busybox image with one file of random bytes in its own layer."""

    reference: str
    manifest_digest: str
    data_layer: str
    busybox_layer: str
    data_sha256: str


def _data_spec(seed: int, size: int, command: str) -> tuple[ImageSpec, SparseishFile]:
    content = SparseishFile(size, seed=seed, data_every=4096)  # every block random
    base = busybox_image_spec()
    data = LayerSpec([Directory("data"), File(DATA_PATH, content)], created_by=f"data {seed}")
    spec = ImageSpec(
        layers=(base.layers[0], data),
        platform=base.platform,
        config=ImageConfig(cmd=("/bin/sh", "-c", command)),
    )
    return spec, content


async def _data_image(
    image_pusher: ImagePusher,
    layout: Path,
    seed: int,
    size: int,
    command: str = f"sha256sum {DATA_PATH}",
    host: str | None = None,
) -> DataImage:
    """Build, push and convert (index mode); ``host`` renames the result (a proxy)."""
    spec, content = _data_spec(seed, size, command)
    built: BuiltImage = await asyncio.to_thread(build_image, spec, layout, f"data-{seed}")
    pushed = await image_pusher.push(built)
    ref = ImageReference.parse(pushed.reference)
    async with RegistryClient() as client:
        await convert_image(
            client, ref, ConvertOptions(mode="index", chunk_size=256 << 10, span=SPAN)
        )
    reference = f"{host}/{ref.repository}:latest" if host else pushed.reference
    return DataImage(
        reference,
        pushed.digest,
        built.layers[1].digest,
        built.layers[0].digest,
        content.sha256().split(":", 1)[1],
    )


def _run(containerd: ContainerdServer, image: str) -> str:
    return containerd.run_container(
        image,
        f"c-{uuid.uuid4().hex[:8]}",
        snapshotter=ACCELD_SNAPSHOTTER,
        namespace=CRI_NAMESPACE,
        timeout=120,
    ).stdout


def _layer_gets(registry: RegistryServer, digest: str, since: int) -> int:
    return sum(1 for r in registry.requests()[since:] if r.method == "GET" and digest in r.path)


def _chunk_files(cache: Path) -> dict[str, bytes]:
    """``<layer hex>/<chunk key>`` -> content of every chunk file in a cache."""
    return {
        f"{p.parent.name}/{p.name}": p.read_bytes()
        for p in (cache / "sha256").glob("*/*")
        if p.is_file()
    }


# -- 1. cache cap under churn ------------------------------------------------------------


async def test_cache_cap_holds_while_images_come_and_go(
    agent_factory, containerd_factory, registry, image_pusher, image_layout
):
    """Six images in a row, each reading ~5 MiB through an 8 MiB cache: all their layers
    stay pinned (their images stay pulled), and the cap holds anyway."""
    cap = 8 << 20
    agent = agent_factory(cache_max_bytes=cap)
    containerd = containerd_factory(snapshotter=ACCELD_SNAPSHOTTER, acceld_socket=agent.socket)
    images = [
        await _data_image(image_pusher, image_layout, seed=100 + n, size=3 << 20) for n in range(6)
    ]
    cache = agent.root / "cache"
    usage = []
    for image in images:
        await asyncio.to_thread(containerd.cri_pull_image, image.reference)
        out = await asyncio.to_thread(_run, containerd, image.reference)
        assert out.split()[0] == image.data_sha256
        await asyncio.to_thread(agent.wait_cache_settled)
        usage.append(disk_usage(cache))
    print("cache on disk after each start (MiB):", [round(u / 2**20, 2) for u in usage])
    assert max(usage) <= cap + SPAN, usage
    assert sum(usage) > cap  # the images together did need more than the cap

    first = images[0]
    drop_page_caches()  # or the kernel answers from pages FUSE served before
    before = len(registry.requests())
    out = await asyncio.to_thread(_run, containerd, first.reference)
    assert out.split()[0] == first.data_sha256
    assert _layer_gets(registry, first.data_layer, before) > 0, "evicted chunks not refetched"
    assert disk_usage(cache) <= cap + SPAN


# -- 2. disk full ------------------------------------------------------------------------


@pytest.fixture
def small_tmpfs_cache(tmp_path: Path) -> Iterator[Path]:
    """The agent's cache directory on a real 3 MiB tmpfs, so the kernel answers ENOSPC."""
    cache = tmp_path / "agent" / "root" / "cache"
    cache.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(cache)], check=True)
    try:
        yield cache
    finally:
        subprocess.run(["umount", "-l", str(cache)], check=False)


async def _verify_chunks(files: dict[str, bytes], images: list[DataImage]) -> None:
    """Every cached chunk equals the chunk fetched and decoded (digest-checked) afresh."""
    async with RegistryClient() as client:
        discovery = LayerDiscovery(client)
        specs = {}
        for image in images:
            for digest in (image.busybox_layer, image.data_layer):
                found = await discovery.discover(image.reference, image.manifest_digest, digest)
                for spec in found.layer.all_chunks():
                    specs[f"{digest.split(':', 1)[1]}/{spec.key}"] = (found.layer.blob, spec)
        for name, content in files.items():
            blob, spec = specs[name]
            raw = await client.get_range(
                blob.ref, blob.digest, spec.fetch_start, spec.fetch_end - spec.fetch_start
            )
            assert spec.decode(raw) == content, f"cached chunk {name} is not the verified one"


async def test_full_disk_serves_correct_bytes_uncached_and_keeps_the_cache_sound(
    small_tmpfs_cache,
    agent_factory,
    containerd_factory,
    registry,
    image_pusher,
    image_layout,
):
    small = await _data_image(image_pusher, image_layout, seed=200, size=256 << 10)
    large = await _data_image(image_pusher, image_layout, seed=201, size=8 << 20)
    agent = agent_factory()
    containerd = containerd_factory(snapshotter=ACCELD_SNAPSHOTTER, acceld_socket=agent.socket)
    await asyncio.to_thread(containerd.cri_pull_image, small.reference)
    assert (await asyncio.to_thread(_run, containerd, small.reference)).split()[0] == (
        small.data_sha256
    )
    await asyncio.to_thread(agent.wait_cache_settled)
    cached_before = _chunk_files(small_tmpfs_cache)
    assert cached_before

    await asyncio.to_thread(containerd.cri_pull_image, large.reference)
    first_fetch = len(registry.requests())
    out = await asyncio.to_thread(_run, containerd, large.reference)
    assert out.split()[0] == large.data_sha256  # served from memory, not EIO
    spans = (8 << 20) // SPAN + 1
    # Uncached chunks wait in memory for the next reads of them instead of each read
    # fetching its chunk again (~4 times per span here before that buffer).
    assert _layer_gets(registry, large.data_layer, first_fetch) <= spans
    await asyncio.to_thread(agent.wait_cache_settled)
    assert agent.metric("acceld_cache_write_errors_total") >= 1
    assert "cache_write_failed" in agent.log_path.read_text(errors="replace")
    cached_after = _chunk_files(small_tmpfs_cache)
    assert {k: v for k, v in cached_after.items() if k in cached_before} == cached_before
    assert list((small_tmpfs_cache / "tmp").iterdir()) == []
    await _verify_chunks(cached_after, [small, large])
    agent.stop()

    later = agent_factory()  # the same root: its cache is the tmpfs the first one filled
    await asyncio.to_thread(containerd.wait_for_snapshotter)
    before = len(registry.requests())
    out = await asyncio.to_thread(_run, containerd, large.reference)
    assert out.split()[0] == large.data_sha256
    assert _layer_gets(registry, large.busybox_layer, before) == 0, "cached chunks were lost"
    assert later.metric("acceld_corrupt_chunks_total") == 0


# -- 3. memory while serving a huge file ------------------------------------------------

MEMORY_BOUND = 400 << 20
"""The agent idles at ~80 MiB (Python, grpc, aiohttp, pyfuse3, prometheus) and peaked at
150-180 MiB reading 1 GiB and 10 GiB files whole (bench/memory.py). What serving adds is
bounded by the fetcher, not the file: at most 8 Range GETs in flight, each <= 16 MiB
compressed plus its decoded 4 MiB spans, one span of read-ahead, and the chunks held
for the cache until the reads pause (the shared MemoryBudget, 128 MiB)."""


@pytest.fixture(scope="module")
def huge_images() -> tuple[PreparedImage, PreparedImage]:
    """1 GiB and 10 GiB images (built and converted once per machine: ~3 minutes)."""
    return prepared_image(1 << 30), prepared_image(10 << 30)


async def test_memory_does_not_grow_with_the_file_served(
    huge_images, agent_factory, containerd_factory, make_registry, tmp_path
):
    one_gib, ten_gib = huge_images
    peaks = {}
    cache_cap = 256 << 20
    for image in (one_gib, ten_gib):
        name = f"agent-{image.size >> 20}m"
        registry = make_registry(storage_dir=image.storage)
        agent = agent_factory(name, cache_max_bytes=cache_cap)
        containerd = containerd_factory(snapshotter=ACCELD_SNAPSHOTTER, acceld_socket=agent.socket)
        await asyncio.to_thread(containerd.cri_pull_image, image.reference(registry.host))
        path = image.file_in(agent)
        assert path.stat().st_size == image.size
        if image is one_gib:
            assert await asyncio.to_thread(sha256_of, path) == image.content_sha256
        else:
            ranges = spread_ranges(image.size, count=24, length=8 << 20)
            expected = await asyncio.to_thread(expected_ranges, huge_file(image.size), ranges)
            got = await asyncio.to_thread(_read_ranges, path, ranges)
            assert got == expected
        peaks[image.size] = peak_rss(agent.pid)
        assert disk_usage(agent.root / "cache") <= cache_cap + (16 << 20)
    print("agent peak RSS MiB:", {k >> 20: v >> 20 for k, v in peaks.items()})
    assert max(peaks.values()) < MEMORY_BOUND
    assert peaks[ten_gib.size] < peaks[one_gib.size] + (64 << 20)


def _read_ranges(path: Path, ranges: list[tuple[int, int]]) -> list[bytes]:
    out = []
    with path.open("rb", buffering=0) as handle:
        for offset, length in ranges:
            handle.seek(offset)
            data = b""
            while len(data) < length:
                piece = handle.read(length - len(data))
                if not piece:
                    break
                data += piece
            out.append(data)
    return out


# -- 4. many containers of one image at once --------------------------------------------


@pytest.fixture
def recorded_registry(make_redirecting_registry) -> RedirectingRegistry:
    """Blob GETs redirect to a CDN that records each Range header, behind a 40 ms delay
    so that fetches are still in flight when other readers come."""
    return make_redirecting_registry(cdn_delay_ms=40)


def _ranges_of(requests: list[tuple[str, str, str | None]], digest: str) -> list[tuple[int, int]]:
    """(first, last) byte of every Range GET of the blob among CDN ``requests``."""
    hexpart = digest.split(":", 1)[1]
    found = []
    for method, path, header in requests:
        if method == "GET" and hexpart in path and header:
            first, last = header.removeprefix("bytes=").split("-")
            found.append((int(first), int(last)))
    return sorted(found)


async def test_concurrent_containers_of_one_image_fetch_each_chunk_once(
    agent_factory, containerd_factory, recorded_registry, image_layout
):
    pusher = ImagePusher(recorded_registry.registry)
    image = await _data_image(pusher, image_layout, seed=300, size=12 << 20)
    agent = agent_factory()
    containerd = containerd_factory(snapshotter=ACCELD_SNAPSHOTTER, acceld_socket=agent.socket)
    await asyncio.to_thread(containerd.cri_pull_image, image.reference)
    since = len(recorded_registry.cdn.requests)

    outputs: list[str] = []
    errors: list[BaseException] = []
    gate = threading.Barrier(5)

    def one_container() -> None:
        try:
            gate.wait()
            outputs.append(_run(containerd, image.reference))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one_container) for _ in range(5)]
    for thread in threads:
        thread.start()
    await asyncio.to_thread(lambda: [t.join(180) for t in threads])
    assert errors == []
    assert [out.split()[0] for out in outputs] == [image.data_sha256] * 5

    for digest in (image.busybox_layer, image.data_layer):
        ranges = _ranges_of(recorded_registry.cdn.requests[since:], digest)
        assert ranges, f"no Range GETs of {digest} reached the CDN"
        print(f"{digest}: {len(ranges)} Range GETs")
        overlaps = [(a, b) for a, b in itertools.pairwise(ranges) if b[0] <= a[1] - 16]
        # Neighbouring index spans share at most the few bytes around a checkpoint's
        # bit offset; a chunk fetched twice overlaps by a whole span.
        assert overlaps == [], f"{digest}: byte ranges fetched more than once: {overlaps}"
    shared = agent.metric("acceld_shared_fetches_total")
    print(f"reads that joined a fetch in flight: {shared:.0f}")
    assert shared >= 1, "the containers never overlapped"
