"""The chunk fetcher against the real registry, through the rig's fault proxy.

Blobs are concatenated gzip members, one per chunk, decoded by inflating and checking
each member's sha256: the same shape as eStargz chunks. Requests are counted where the
proxy saw them, so single flight and coalescing are measured on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import os
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from agent.layers.lazy_layer import ChunkSlice
from fetcher.chunk_cache import ChunkCache
from fetcher.chunks import (
    BlobSource,
    ChunkSpec,
    CorruptChunkError,
    FetcherClosedError,
    FetchTimeoutError,
    Priority,
)
from fetcher.coalesce import RangeQueue
from fetcher.errors import NotFoundError, RegistryUnavailableError
from fetcher.memory_budget import DEFAULT_BYTES, MemoryBudget
from fetcher.read_path import ReadPath
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from fetcher.retry import RetryPolicy
from fetcher.scheduler import DEMAND_SPARE_CONNECTIONS
from formats.estargz_toc import ChunkDigestError
from rig.fault_proxy import Fault, FaultProxy

FAST_RETRY = RetryPolicy(attempts=3, base_delay=0.02, max_delay=0.1)


class Layer(NamedTuple):
    """A pushed blob as the fetcher sees it, with what each chunk must decode to."""

    blob: BlobSource
    chunks: list[ChunkSpec]
    contents: list[bytes]


def _decode_member(expected_sha256: str, raw: bytes) -> bytes:
    """Inflate one gzip member (bytes after it are ignored) and verify it."""
    inflater = zlib.decompressobj(wbits=31)
    try:
        content = inflater.decompress(raw)
    except zlib.error as exc:
        raise ChunkDigestError(f"corrupt gzip member: {exc}") from None
    if not inflater.eof:
        raise ChunkDigestError("gzip member is truncated")
    if hashlib.sha256(content).hexdigest() != expected_sha256:
        raise ChunkDigestError("chunk content does not match its digest")
    return content


def _chunked_blob(count: int, size: int, overlap: bool = False) -> tuple[bytes, list[Any]]:
    """``count`` gzip members of random data, and (start, end, content) for each.

    With ``overlap`` every range also takes the next member's first byte, as
    index-only spans that end mid-byte do."""
    parts, layout, offset = [], [], 0
    for _ in range(count):
        content = os.urandom(size)
        member = gzip.compress(content, mtime=0)
        parts.append(member)
        layout.append((offset, offset + len(member), content))
        offset += len(member)
    if overlap:
        layout = [(s, min(e + 1, offset), c) for s, e, c in layout]
    return b"".join(parts), layout


@pytest.fixture(scope="module")
def proxy(registry) -> Iterator[FaultProxy]:
    with FaultProxy(registry.url) as server:
        yield server


@pytest.fixture
def fault_proxy(proxy: FaultProxy):
    yield proxy
    proxy.clear()


@pytest.fixture
async def client() -> AsyncIterator[RegistryClient]:
    async with RegistryClient(retry=FAST_RETRY) as registry_client:
        yield registry_client


@pytest.fixture
def push(registry, fault_proxy: FaultProxy, repo_name: str, client: RegistryClient):
    """Push a chunked blob straight to the registry; read it back through the proxy."""

    async def push_layer(count: int, size: int = 16 << 10, overlap: bool = False) -> Layer:
        data, layout = _chunked_blob(count, size, overlap)
        digest = await client.push_blob(ImageReference.parse(f"{registry.host}/{repo_name}"), data)
        ref = ImageReference.parse(f"{fault_proxy.host}/{repo_name}")
        chunks = [
            ChunkSpec(
                f"c{i:06d}",
                start,
                end,
                len(c),
                partial(_decode_member, hashlib.sha256(c).hexdigest()),
            )
            for i, (start, end, c) in enumerate(layout)
        ]
        return Layer(BlobSource(ref, digest, len(data)), chunks, [c for _, _, c in layout])

    return push_layer


@pytest.fixture
async def make_fetcher(
    client: RegistryClient, tmp_path: Path
) -> AsyncIterator[Callable[..., ReadPath]]:
    made: list[ReadPath] = []

    def make(memory_bytes: int = DEFAULT_BYTES, **options: Any) -> ReadPath:
        memory = MemoryBudget(memory_bytes)
        cache = ChunkCache(tmp_path / f"cache-{len(made)}", max_bytes=256 << 20, memory=memory)
        parts = ReadPath.build(client, cache, **options)
        made.append(parts)
        return parts

    yield make
    for parts in made:
        await parts.close()


async def _read(parts: ReadPath, blob: BlobSource, *chunks: ChunkSpec) -> list[bytes]:
    """Whole chunks as a read asks for them (the cache first, then a fetch)."""
    return await parts.reader.read(blob, [ChunkSlice(c, 0, c.decoded_size) for c in chunks])


async def _read_one(parts: ReadPath, blob: BlobSource, chunk: ChunkSpec) -> bytes:
    (content,) = await _read(parts, blob, chunk)
    return content


def _cached(parts: ReadPath, blob: BlobSource, chunk: ChunkSpec) -> bool:
    """Whether the chunk is on disk (not merely held for writing)."""
    return parts.cache.contains(blob.digest, chunk.key)


def _range_gets(proxy: FaultProxy, digest: str) -> int:
    return sum(1 for method, path, _ in proxy.requests if method == "GET" and digest in path)


async def test_chunks_arrive_verified_and_are_served_from_cache_after(
    push, make_fetcher, fault_proxy
):
    layer = await push(8)
    parts = make_fetcher()
    fetcher = parts.fetcher
    for chunk, content in zip(layer.chunks, layer.contents, strict=True):
        assert await _read_one(parts, layer.blob, chunk) == content
        await fetcher.wait_idle()  # the reader has its bytes before they are on disk
        assert _cached(parts, layer.blob, chunk)
    fetched = _range_gets(fault_proxy, layer.blob.digest)
    assert fetched == 8
    assert await _read_one(parts, layer.blob, layer.chunks[3]) == layer.contents[3]
    assert _range_gets(fault_proxy, layer.blob.digest) == fetched
    assert fetcher.stats.cache_hits == 1
    assert fetcher.stats.bytes_fetched[Priority.DEMAND] == layer.blob.size


async def test_a_reader_arriving_while_a_chunk_is_cached_shares_it(push, make_fetcher, fault_proxy):
    layer = await push(4)
    parts = make_fetcher()
    fetcher = parts.fetcher
    assert await _read_one(parts, layer.blob, layer.chunks[1]) == layer.contents[1]
    # Served before the cache write finished: the second reader must not refetch.
    assert await _read_one(parts, layer.blob, layer.chunks[1]) == layer.contents[1]
    await fetcher.wait_idle()
    assert _range_gets(fault_proxy, layer.blob.digest) == 1
    assert fetcher.stats.cache_hits + fetcher.stats.shared_fetches == 1
    assert _cached(parts, layer.blob, layer.chunks[1])


async def test_concurrent_gets_of_one_chunk_share_one_request(push, make_fetcher, fault_proxy):
    layer = await push(6)
    parts = make_fetcher()
    fetcher = parts.fetcher
    readers = (_read_one(parts, layer.blob, layer.chunks[4]) for _ in range(10))
    results = await asyncio.gather(*readers)
    assert results == [layer.contents[4]] * 10
    assert _range_gets(fault_proxy, layer.blob.digest) == 1
    assert fetcher.stats.shared_fetches == 9


async def test_queued_neighbours_are_fetched_with_few_requests(push, make_fetcher, fault_proxy):
    layer = await push(20, overlap=True)
    parts = make_fetcher()
    fetcher = parts.fetcher
    fetcher.enqueue(layer.blob, layer.chunks, Priority.PREFETCH)
    await fetcher.wait_idle()
    assert _range_gets(fault_proxy, layer.blob.digest) == 1
    for chunk, content in zip(layer.chunks, layer.contents, strict=True):
        assert await _read_one(parts, layer.blob, chunk) == content
    assert fetcher.stats.requests[Priority.PREFETCH] == 1
    assert fetcher.stats.chunks_fetched[Priority.PREFETCH] == 20


async def test_one_read_spanning_chunks_is_one_request(push, make_fetcher, fault_proxy):
    layer = await push(8)
    parts = make_fetcher()
    fetcher = parts.fetcher
    assert await fetcher.get(layer.blob, layer.chunks[2]) == layer.contents[2]
    await fetcher.wait_idle()
    wanted = layer.chunks[1:6]
    assert await _read(parts, layer.blob, *wanted) == layer.contents[1:6]
    assert _range_gets(fault_proxy, layer.blob.digest) == 2  # chunk 2 came from the cache
    assert fetcher.stats.cache_hits == 1


async def test_request_size_cap_splits_a_run(push, make_fetcher, fault_proxy):
    layer = await push(20)
    longest = max(c.fetch_length for c in layer.chunks)
    parts = make_fetcher(max_request_bytes=4 * longest)
    fetcher = parts.fetcher
    fetcher.enqueue(layer.blob, layer.chunks, Priority.BACKGROUND)
    await fetcher.wait_idle()
    assert _range_gets(fault_proxy, layer.blob.digest) == 5
    assert all(_cached(parts, layer.blob, c) for c in layer.chunks)


@pytest.mark.parametrize(("gap", "expected"), [(0, 10), (64 << 10, 1)])
async def test_holes_wider_than_the_gap_split_requests(
    push, make_fetcher, fault_proxy, gap, expected
):
    layer = await push(20)
    parts = make_fetcher(coalesce_gap=gap)
    fetcher = parts.fetcher
    fetcher.enqueue(layer.blob, layer.chunks[::2], Priority.PREFETCH)
    await fetcher.wait_idle()
    assert _range_gets(fault_proxy, layer.blob.digest) == expected
    assert [_cached(parts, layer.blob, c) for c in layer.chunks] == [True, False] * 10


async def test_demand_reads_overtake_queued_background_fill(push, make_fetcher):
    background = await push(50, size=4 << 10)
    other = await push(2, size=4 << 10)
    parts = make_fetcher(max_connections_per_registry=1, max_request_bytes=1)
    fetcher = parts.fetcher
    order: list[Priority] = []
    fetcher.stats.add_observer(lambda priority, nbytes, seconds: order.append(priority))
    fetcher.enqueue(background.blob, background.chunks, Priority.BACKGROUND)
    upgraded, fresh = await asyncio.gather(
        fetcher.get(background.blob, background.chunks[45]),
        fetcher.get(other.blob, other.chunks[1]),
    )
    assert (upgraded, fresh) == (background.contents[45], other.contents[1])
    await fetcher.wait_idle()
    assert len(order) == 51
    # Only the one request already on the wire may finish before the demand reads.
    assert [i for i, p in enumerate(order) if p == Priority.DEMAND] == [1, 2]
    assert fetcher.stats.priority_upgrades == 1


async def test_background_fill_waits_for_a_quiet_link(push, make_fetcher):
    """Fill shares the link and CPUs with a starting container: none of it starts while
    prefetch (or demand) requests run, nor until they have been quiet for fill_idle_s;
    then it may use every connection but the one kept for demand reads."""
    prefetch = await push(16, size=32 << 10)
    background = await push(24, size=32 << 10)
    parts = make_fetcher(max_connections_per_registry=4, fill_idle_s=0.2, max_request_bytes=1)
    fetcher = parts.fetcher
    samples: list[dict[Priority, int]] = []
    prefetch_ends: list[float] = []
    background_starts: list[float] = []
    loop = asyncio.get_running_loop()

    def observe(priority: Priority, nbytes: int, seconds: float) -> None:
        samples.append(dict(fetcher.stats.in_flight))
        if priority == Priority.PREFETCH:
            prefetch_ends.append(loop.time())
        else:
            background_starts.append(loop.time() - seconds)

    fetcher.stats.add_observer(observe)
    fetcher.enqueue(prefetch.blob, prefetch.chunks, Priority.PREFETCH)
    fetcher.enqueue(background.blob, background.chunks, Priority.BACKGROUND)
    await fetcher.wait_idle()
    assert len(samples) == 40
    assert all(s[Priority.BACKGROUND] == 0 for s in samples if s[Priority.PREFETCH])
    assert max(s[Priority.BACKGROUND] for s in samples) == 4 - DEMAND_SPARE_CONNECTIONS
    assert min(background_starts) >= max(prefetch_ends) + 0.15
    assert all(_cached(parts, background.blob, c) for c in background.chunks)


async def test_a_demand_read_never_waits_for_a_connection_behind_prefetch(
    push, make_fetcher, fault_proxy
):
    """Prefetch leaves a connection free: a read that arrives while stalled prefetch
    requests hold the others goes on the wire at once, and prefetch never takes it."""
    ahead = await push(12, size=32 << 10)
    wanted = await push(2, size=32 << 10)
    parts = make_fetcher(max_connections_per_registry=3, max_request_bytes=1)
    fetcher = parts.fetcher
    fault_proxy.add(
        Fault("stall", path_contains=ahead.blob.digest, after_bytes=0, stall_seconds=1.5, times=12)
    )
    fetcher.enqueue(ahead.blob, ahead.chunks, Priority.PREFETCH)
    await _until_in_flight(parts, Priority.PREFETCH)
    await asyncio.sleep(0.1)  # every request prefetch may start is on the wire
    assert fetcher.stats.in_flight[Priority.PREFETCH] == 3 - DEMAND_SPARE_CONNECTIONS
    started = time.monotonic()
    content = await _read_one(parts, wanted.blob, wanted.chunks[1])
    assert content == wanted.contents[1]
    assert time.monotonic() - started < 1.0
    await fetcher.wait_idle()


async def _until_in_flight(parts: ReadPath, priority: Priority) -> None:
    for _ in range(2000):
        if parts.fetcher.stats.in_flight[priority]:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"no {priority.name} request went on the wire")


async def test_a_background_stream_runs_only_while_the_link_is_quiet(
    push, make_fetcher, fault_proxy
):
    """A fill audit streams a whole blob outside the queues: it must not begin while a
    demand request is on the wire, nor before the link has been quiet for fill_idle_s,
    and it pauses while a later demand request runs; it still delivers the whole blob,
    counted as fill."""
    demand = await push(4, size=32 << 10)
    streamed = await push(48, size=64 << 10)
    parts = make_fetcher(fill_idle_s=0.3)
    fetcher = parts.fetcher
    loop = asyncio.get_running_loop()
    stall = partial(
        Fault, "stall", path_contains=demand.blob.digest, after_bytes=0, stall_seconds=0.8
    )
    demand_ends: list[float] = []

    async def demand_read(chunk: ChunkSpec) -> None:
        await _read_one(parts, demand.blob, chunk)
        demand_ends.append(loop.time())

    fault_proxy.add(stall())
    first = asyncio.create_task(demand_read(demand.chunks[0]))
    await _until_in_flight(parts, Priority.DEMAND)
    arrivals: list[float] = []
    received = 0
    second: asyncio.Task[None] | None = None
    paused_from = 0.0
    async with contextlib.aclosing(fetcher.background_stream(streamed.blob)) as stream:
        async for data in stream:
            arrivals.append(loop.time())
            received += len(data)
            if second is None:
                fault_proxy.add(stall())
                second = asyncio.create_task(demand_read(demand.chunks[2]))
                await _until_in_flight(parts, Priority.DEMAND)
                paused_from = loop.time()
    assert second is not None
    await asyncio.gather(first, second)
    assert received == streamed.blob.size
    assert len(arrivals) > 2
    assert arrivals[0] >= demand_ends[0] + 0.25, (arrivals[0], demand_ends)
    # Nothing more arrived while the second demand read was on the wire, nor until the
    # link had been quiet again.
    resumed = arrivals[1]
    assert resumed >= demand_ends[1] + 0.25 > paused_from + 0.5, (resumed, demand_ends)
    assert fetcher.stats.stream_bytes[Priority.BACKGROUND] == streamed.blob.size


class _FedMember:
    """A streaming decoder for the test members that notes what it was fed, so a test
    can tell the streaming path ran (and restarted after a dropped body)."""

    def __init__(self, expected_sha256: str, log: list[str]) -> None:
        self._expected = expected_sha256
        self._received: list[bytes] = []
        self._log = log
        log.append("start")

    def feed(self, data: bytes) -> None:
        self._received.append(data)

    def finish(self) -> bytes:
        self._log.append(f"finish:{len(self._received)}")
        return _decode_member(self._expected, b"".join(self._received))

    def close(self) -> None:
        self._log.append("close")


def _streaming(layer: Layer, log: list[str]) -> list[ChunkSpec]:
    return [
        replace(
            chunk,
            streaming=partial(_FedMember, hashlib.sha256(content).hexdigest(), log),
        )
        for chunk, content in zip(layer.chunks, layer.contents, strict=True)
    ]


async def test_demand_chunks_are_decoded_as_they_arrive_and_restart_with_a_retry(
    push, make_fetcher, fault_proxy
):
    layer = await push(3, size=256 << 10)
    log: list[str] = []
    chunks = _streaming(layer, log)
    fault_proxy.add(Fault("reset", path_contains=layer.blob.digest, after_bytes=70_000))
    parts = make_fetcher()
    fetcher = parts.fetcher
    assert await fetcher.get(layer.blob, chunks[1]) == layer.contents[1]
    assert _range_gets(fault_proxy, layer.blob.digest) == 2
    assert log[:3] == ["start", "close", "start"]  # the dropped body's decoder is let go
    assert log[3].startswith("finish:")
    # Prefetch does not stream (its decoding must not queue ahead of a demand chunk's).
    await fetcher.get(layer.blob, chunks[2], Priority.PREFETCH)
    assert len(log) == 4


async def test_a_streamed_chunk_that_fails_its_check_is_refetched(push, make_fetcher, fault_proxy):
    layer = await push(3)
    log: list[str] = []
    chunks = _streaming(layer, log)
    fault_proxy.add(Fault("flip", path_contains=layer.blob.digest, after_bytes=100))
    parts = make_fetcher()
    fetcher = parts.fetcher
    assert await fetcher.get(layer.blob, chunks[0]) == layer.contents[0]
    assert (fetcher.stats.corrupt_refetches, fetcher.stats.corrupt_chunks) == (1, 0)
    assert [event.split(":")[0] for event in log] == ["start", "finish", "start", "finish"]


async def test_prefetch_waits_while_a_layer_index_downloads_but_demand_does_not(
    push, make_fetcher, fault_proxy
):
    layer = await push(4)
    parts = make_fetcher()
    fetcher = parts.fetcher
    with fetcher.demand_only():
        fetcher.enqueue(layer.blob, layer.chunks[:2], Priority.PREFETCH)
        await asyncio.sleep(0.2)
        assert _range_gets(fault_proxy, layer.blob.digest) == 0
        assert await fetcher.get(layer.blob, layer.chunks[3]) == layer.contents[3]
        assert _range_gets(fault_proxy, layer.blob.digest) == 1
    await asyncio.wait_for(fetcher.wait_idle(), 10)
    assert all(_cached(parts, layer.blob, chunk) for chunk in layer.chunks[:2])


async def test_warmed_bytes_serve_the_chunks_they_cover_without_a_request(
    push, make_fetcher, fault_proxy
):
    layer = await push(6)
    parts = make_fetcher()
    fetcher = parts.fetcher
    # Warming runs while a TOC is parsed: demand_only holds prefetch back, not it.
    with fetcher.demand_only():
        fetcher.warm(layer.blob, [(c.fetch_start, c.fetch_end) for c in layer.chunks[1:4]])
        fetcher.enqueue(layer.blob, layer.chunks[1:3], Priority.PREFETCH)
        await asyncio.sleep(0.2)
    warmed = _range_gets(fault_proxy, layer.blob.digest)
    assert warmed == 1  # neighbouring extents coalesce into one request
    await asyncio.wait_for(fetcher.wait_idle(), 10)
    for index in (1, 2, 3):
        assert await _read_one(parts, layer.blob, layer.chunks[index]) == layer.contents[index]
    assert _range_gets(fault_proxy, layer.blob.digest) == warmed
    # Bytes no warmed range covers whole still come from the registry.
    assert await _read_one(parts, layer.blob, layer.chunks[4]) == layer.contents[4]
    assert _range_gets(fault_proxy, layer.blob.digest) == warmed + 1


async def test_warmed_bytes_that_fail_the_check_are_fetched_again(push, make_fetcher, fault_proxy):
    layer = await push(3)
    flips = fault_proxy.add(Fault("flip", path_contains=layer.blob.digest, after_bytes=100))
    parts = make_fetcher()
    fetcher = parts.fetcher
    chunk = layer.chunks[1]
    fetcher.warm(layer.blob, [(chunk.fetch_start, chunk.fetch_end)])
    assert await fetcher.get(layer.blob, chunk) == layer.contents[1]
    assert flips.hits == 1 and _range_gets(fault_proxy, layer.blob.digest) == 2
    assert (fetcher.stats.corrupt_refetches, fetcher.stats.corrupt_chunks) == (1, 0)


async def test_a_failed_warm_leaves_the_chunk_to_its_own_fetch(push, make_fetcher, fault_proxy):
    layer = await push(3)
    fault_proxy.add(Fault("status", path_contains=layer.blob.digest, status=404, times=1))
    parts = make_fetcher()
    fetcher = parts.fetcher
    chunk = layer.chunks[2]
    fetcher.warm(layer.blob, [(chunk.fetch_start, chunk.fetch_end)])
    await asyncio.sleep(0.2)
    assert await fetcher.get(layer.blob, chunk) == layer.contents[2]
    assert fetcher.stats.request_errors == 1


async def test_chunks_are_written_to_the_cache_once_the_link_is_quiet(
    push, make_fetcher, fault_proxy
):
    layer = await push(3)
    parts = make_fetcher(fill_idle_s=0.3)
    fetcher = parts.fetcher
    first, second = layer.chunks[0], layer.chunks[1]
    assert await _read_one(parts, layer.blob, first) == layer.contents[0]
    # Held in memory, not written yet: readable without another request.
    assert not _cached(parts, layer.blob, first)
    assert parts.store.pending(layer.blob.digest, first.key) == layer.contents[0]
    assert await _read_one(parts, layer.blob, first) == layer.contents[0]
    assert _range_gets(fault_proxy, layer.blob.digest) == 1
    await asyncio.wait_for(fetcher.wait_idle(), 5)
    assert _cached(parts, layer.blob, first)
    assert parts.store.pending(layer.blob.digest, first.key) is None
    # Closing writes what is still held.
    await _read_one(parts, layer.blob, second)
    assert parts.store.pending(layer.blob.digest, second.key) == layer.contents[1]
    await parts.close()
    assert _cached(parts, layer.blob, second)


async def test_a_corrupted_response_is_refetched(push, make_fetcher, fault_proxy):
    layer = await push(3)
    fault_proxy.add(Fault("flip", path_contains=layer.blob.digest, after_bytes=100))
    parts = make_fetcher()
    fetcher = parts.fetcher
    assert await fetcher.get(layer.blob, layer.chunks[1]) == layer.contents[1]
    assert _range_gets(fault_proxy, layer.blob.digest) == 2
    assert (fetcher.stats.corrupt_refetches, fetcher.stats.corrupt_chunks) == (1, 0)


async def test_persistent_corruption_fails_clearly_and_caches_nothing(
    push, make_fetcher, fault_proxy
):
    layer = await push(3)
    flips = fault_proxy.add(
        Fault("flip", path_contains=layer.blob.digest, after_bytes=100, times=2)
    )
    parts = make_fetcher()
    fetcher = parts.fetcher
    with pytest.raises(CorruptChunkError) as caught:
        await fetcher.get(layer.blob, layer.chunks[2])
    message = str(caught.value)
    assert layer.blob.digest in message and layer.chunks[2].key in message
    assert "ChunkDigestError" in message
    assert flips.hits == 2 and _range_gets(fault_proxy, layer.blob.digest) == 2
    assert not _cached(parts, layer.blob, layer.chunks[2])
    assert fetcher.stats.corrupt_chunks == 1
    assert await fetcher.get(layer.blob, layer.chunks[2]) == layer.contents[2]


async def test_registry_errors_reach_every_waiter_with_their_own_type(
    push, make_fetcher, fault_proxy
):
    layer = await push(2)
    missing = BlobSource(layer.blob.ref, "sha256:" + "0" * 64, layer.blob.size)
    parts = make_fetcher()
    fetcher = parts.fetcher
    fetcher.enqueue(missing, layer.chunks, Priority.BACKGROUND)
    with pytest.raises(NotFoundError):
        await fetcher.get(missing, layer.chunks[0])
    await fetcher.wait_idle()
    assert not _cached(parts, missing, layer.chunks[1])

    fault_proxy.add(Fault("status", path_contains=layer.blob.digest, status=503, times=3))
    results = await asyncio.gather(
        *(fetcher.get(layer.blob, layer.chunks[0]) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, RegistryUnavailableError) for r in results)
    assert fetcher.stats.request_errors == 2


async def test_a_stalled_demand_read_times_out_but_the_fetch_completes(
    push, make_fetcher, fault_proxy
):
    layer = await push(2)
    fault_proxy.add(Fault("stall", path_contains=layer.blob.digest, stall_seconds=1.0))
    parts = make_fetcher(demand_timeout=0.3)
    fetcher = parts.fetcher
    began = time.monotonic()
    with pytest.raises(FetchTimeoutError) as caught:
        await fetcher.get(layer.blob, layer.chunks[0])
    assert time.monotonic() - began < 0.9
    assert layer.chunks[0].key in str(caught.value)
    assert fetcher.stats.demand_timeouts == 1
    await fetcher.wait_idle()
    assert _cached(parts, layer.blob, layer.chunks[0])


async def test_close_releases_waiting_readers(push, make_fetcher, fault_proxy):
    layer = await push(2)
    stall = fault_proxy.add(Fault("stall", path_contains=layer.blob.digest, stall_seconds=0.5))
    parts = make_fetcher()
    fetcher = parts.fetcher
    reader = asyncio.create_task(fetcher.get(layer.blob, layer.chunks[1]))
    await asyncio.sleep(0.2)
    assert stall.hits == 1, "the request should be stalled in the proxy by now"
    await parts.close()
    with pytest.raises(FetcherClosedError):
        await reader
    with pytest.raises(FetcherClosedError):
        fetcher.enqueue(layer.blob, layer.chunks, Priority.PREFETCH)


@dataclass(eq=False)
class _Range:
    fetch_start: int
    fetch_end: int
    priority: int


def test_only_same_priority_neighbours_grow_a_run() -> None:
    queue: RangeQueue[_Range] = RangeQueue()
    items = [
        _Range(0, 100, 1),
        _Range(100, 200, 0),  # lead
        _Range(150, 180, 2),  # inside the final run: rides along
        _Range(200, 300, 2),  # lower priority: does not grow the run, but ends up inside
        _Range(210, 400, 0),  # same priority, within the gap of the lead
        _Range(1000, 1100, 0),  # beyond the gap
    ]
    for item in items:
        queue.add(item)
    run = queue.take_run(items[1], gap=20, max_bytes=10_000)
    assert run == [items[1], items[2], items[3], items[4]]
    assert len(queue) == 2
    assert queue.take_run(items[5], gap=20, max_bytes=10_000) == [items[5]]
    assert queue.take_run(items[0], gap=1000, max_bytes=50) == [items[0]]
    assert len(queue) == 0


# -- the read path's one lookup and the shared memory budget ------------------------


async def _until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``condition`` (work the test cannot await) until it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_a_chunk_held_for_the_cache_is_read_and_prefetched_without_a_fetch(
    push, make_fetcher, fault_proxy
):
    layer = await push(3)
    parts = make_fetcher(fill_idle_s=30)  # held chunks stay unwritten for the test
    chunk = layer.chunks[1]
    assert await _read_one(parts, layer.blob, chunk) == layer.contents[1]
    # The miss looked on disk once: the fetcher does not look again (it used to, so
    # the cache counted two misses for one read).
    assert parts.cache.stats().misses == 1
    assert parts.store.pending(layer.blob.digest, chunk.key) == layer.contents[1]
    assert not _cached(parts, layer.blob, chunk)
    # A slice of it, as a read(2) asks: answered by the one lookup, no request.
    (piece,) = await parts.reader.read(layer.blob, [ChunkSlice(chunk, 100, 50)])
    assert piece == layer.contents[1][100:150]
    parts.fetcher.enqueue(layer.blob, [chunk], Priority.PREFETCH)
    await asyncio.sleep(0.1)
    assert _range_gets(fault_proxy, layer.blob.digest) == 1
    assert (parts.stats.cache_hits, parts.stats.cache_misses) == (1, 1)


async def test_a_spent_budget_makes_holding_write_through_and_warming_skip(
    push, make_fetcher, fault_proxy
):
    layer = await push(6)
    warmed = layer.chunks[0].fetch_length + layer.chunks[1].fetch_length
    parts = make_fetcher(fill_idle_s=30, memory_bytes=warmed + 1024)
    fetcher = parts.fetcher
    # Warming the first two chunks takes the budget (until their fetches take them).
    fetcher.warm(layer.blob, [(c.fetch_start, c.fetch_end) for c in layer.chunks[:2]])
    await _until(lambda: fetcher.stats.requests[Priority.PREFETCH] == 1)
    requests = _range_gets(fault_proxy, layer.blob.digest)
    assert requests == 1
    # No room to hold a demand chunk: it is written now, not when the link is quiet.
    assert await _read_one(parts, layer.blob, layer.chunks[4]) == layer.contents[4]
    await asyncio.wait_for(parts.store.wait_idle(), 5)
    assert _cached(parts, layer.blob, layer.chunks[4])
    # No room to warm: the range is not requested, and its chunk is fetched when asked.
    fetcher.warm(layer.blob, [(layer.chunks[3].fetch_start, layer.chunks[3].fetch_end)])
    await asyncio.sleep(0.2)
    assert _range_gets(fault_proxy, layer.blob.digest) == requests + 1
    assert await _read_one(parts, layer.blob, layer.chunks[3]) == layer.contents[3]
    assert _range_gets(fault_proxy, layer.blob.digest) == requests + 2


async def test_nothing_held_is_lost_at_close_and_the_budget_is_given_back(
    push, make_fetcher, fault_proxy
):
    layer = await push(8)
    parts = make_fetcher(fill_idle_s=30)
    fetcher = parts.fetcher
    fetcher.warm(layer.blob, [(layer.chunks[7].fetch_start, layer.chunks[7].fetch_end)])
    assert await _read(parts, layer.blob, *layer.chunks[:3]) == layer.contents[:3]
    fetcher.enqueue(layer.blob, layer.chunks[3:6], Priority.PREFETCH)
    await _until(
        lambda: all(parts.store.pending(layer.blob.digest, c.key) for c in layer.chunks[:6])
    )
    assert not any(_cached(parts, layer.blob, c) for c in layer.chunks[:6])
    await parts.close()
    assert all(_cached(parts, layer.blob, c) for c in layer.chunks[:6])
    assert parts.cache.memory.used == 0
