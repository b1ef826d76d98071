"""The compressed-bytes limit on synthetic layers whose answer is known by construction.

The index-only case builds a gzip layer as a chain of members, one per 32 KiB of tar
stream: deflate can be entered at each member start and nowhere else that a 32 KiB
index would use, so the compressed bytes holding a range are exactly the members it
touches. The eStargz case walks the blob's members with plain zlib, apart from the TOC,
and expects the members that hold the read chunks.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import zlib
from pathlib import Path

from bench.compressed_limit import (
    FINEST_SPAN,
    RangeCost,
    estargz_layer_cost,
    gzip_layer_cost,
    union_bytes,
)
from bench.overfetch import over_fetch
from bench.startup import RunResult
from fetcher.chunks import Priority
from fetcher.fetch_stats import FetchStats
from formats.estargz_reader import parse_toc
from formats.estargz_toc import FOOTER_SIZE, parse_footer
from formats.estargz_writer import write_estargz
from formats.media_types import GZIP_LAYERS

FILES = {"app/a.bin": 100_000, "app/b.bin": 300_000, "app/c.bin": 50_000}
GZIP_LAYER = sorted(GZIP_LAYERS)[0]


def _tar(files: dict[str, int]) -> tuple[bytes, dict[str, int]]:
    """A tar of random files, and where each file's data starts in it."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, size in files.items():
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, io.BytesIO(os.urandom(size)))
    data = buffer.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        offsets = {info.name: info.offset_data for info in tar.getmembers()}
    return data, offsets


def _member_chain(stream: bytes, piece: int) -> tuple[bytes, list[int]]:
    """``stream`` gzipped as one member per ``piece`` bytes, and each member's size."""
    members = [gzip.compress(stream[i : i + piece], mtime=0) for i in range(0, len(stream), piece)]
    return b"".join(members), [len(m) for m in members]


def test_union_counts_overlaps_once() -> None:
    assert union_bytes([(10, 20), (0, 5), (15, 30), (30, 31), (40, 40)]) == 26
    assert union_bytes([]) == 0


def test_gzip_limit_is_the_members_holding_the_ranges(tmp_path: Path) -> None:
    tar_bytes, offsets = _tar(FILES)
    blob, sizes = _member_chain(tar_bytes, FINEST_SPAN)
    path = tmp_path / "layer.tar.gz"
    path.write_bytes(blob)

    def members(start: int, end: int) -> set[int]:
        return set(range(start // FINEST_SPAN, (end - 1) // FINEST_SPAN + 1))

    # b.bin: its first byte, and a range across a member boundary; a.bin's last 10 bytes.
    b, a = offsets["app/b.bin"], offsets["app/a.bin"]
    ranges = {"app/b.bin": [(0, 1), (70_000, 140_000)], "app/a.bin": [(99_990, 100_000)]}
    touched = (
        members(b, b + 1) | members(b + 70_000, b + 140_000) | members(a + 99_990, a + 100_000)
    )
    assert max(touched) < len(sizes) - 1  # the last member's end is the blob's: not used

    cost = gzip_layer_cost(path, GZIP_LAYER, ranges, span=4 * FINEST_SPAN, piece=FINEST_SPAN)

    assert cost.read_bytes == 1 + 70_000 + 10
    assert cost.limit_bytes == sum(sizes[i] for i in touched)
    spans = {i // 4 for i in touched}
    whole = {i for i in range(len(sizes)) if i // 4 in spans}
    assert cost.span_bytes == sum(sizes[i] for i in whole)
    assert cost.limit_bytes <= cost.piece_bytes <= cost.span_bytes
    # Compressed random data is a little larger than the bytes: the old limit was lower.
    assert cost.limit_bytes > cost.read_bytes


def test_gzip_limit_skips_what_the_layer_does_not_hold(tmp_path: Path) -> None:
    tar_bytes, _ = _tar({"x": 10_000})
    path = tmp_path / "layer.tar.gz"
    path.write_bytes(gzip.compress(tar_bytes))
    cost = gzip_layer_cost(path, GZIP_LAYER, {"missing": [(0, 10)], "x": [(9_990, 20_000)]})
    assert cost.read_bytes == 10  # clipped at the file's end
    assert 0 < cost.limit_bytes <= len(path.read_bytes())


def _walk_members(blob: bytes, end: int) -> list[tuple[int, int, bytes]]:
    """(start, end, inflated) of each gzip member in ``blob[:end]``, by plain zlib."""
    found = []
    position = 0
    while position < end:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        data = inflater.decompress(blob[position:end])
        size = end - position - len(inflater.unused_data)
        found.append((position, position + size, data))
        position += size
    return found


def test_estargz_limit_is_the_members_holding_the_read_chunks() -> None:
    tar_bytes, _ = _tar(FILES)
    out = io.BytesIO()
    chunk = 64 * 1024
    write_estargz(io.BytesIO(tar_bytes), out, chunk_size=chunk, workers=1)
    blob = out.getvalue()
    toc_offset = parse_footer(blob[-FOOTER_SIZE:], len(blob))
    toc = parse_toc(blob[toc_offset : len(blob) - FOOTER_SIZE], toc_offset)

    # b.bin's chunks 0 and 2 (bytes 10-20 and 140000-140001); c.bin is not read.
    cost = estargz_layer_cost(toc, {"app/b.bin": [(10, 20), (140_000, 140_001)]})

    walked = {start: (end, data) for start, end, data in _walk_members(blob, toc_offset)}
    entry = next(e for e in toc.entries if e.name == "app/b.bin")
    starts = sorted(c.blob_offset for c in toc.chunks.get(entry))
    expected = 0
    for number in (0, 2):
        end, data = walked[starts[number]]
        assert len(data) >= min(chunk, FILES["app/b.bin"] - number * chunk)
        expected += end - starts[number]
    assert cost.read_bytes == 11
    assert cost.limit_bytes == cost.span_bytes == cost.piece_bytes == expected


def test_over_fetch_causes_add_up_to_the_bytes_before_ready() -> None:
    cost = RangeCost(read_bytes=900, limit_bytes=1_000, span_bytes=4_000, piece_bytes=1_500)
    run = RunResult(
        "lazy-index+profile",
        1,
        0.1,
        1.0,
        link_bytes_before_ready=10_000,
        agent_fetch_bytes={"prefetch": 8_000, "demand": 500},
        agent_stats={
            "chunk_bytes_prefetch": 7_000,
            "chunk_bytes_demand": 500,
            "unread_bytes_prefetch": 2_000,
            "unread_bytes_background": 0,
        },
    )
    split = over_fetch(run, cost, planned=True)
    assert split.granularity == 500
    assert split.read_ahead == 7_500 - 2_000 - 1_500
    assert split.prefetch_unread == 2_000
    assert split.coalescing == 1_000
    assert split.protocol == 1_500
    parts = (
        split.limit,
        split.granularity,
        split.read_ahead,
        split.prefetch_unread,
        split.fill_unread,
        split.coalescing,
        split.protocol,
    )
    assert sum(parts) == split.before_ready
    assert over_fetch(run, cost, planned=False).granularity == 3_000


def test_a_plain_tar_layer_costs_its_bytes(tmp_path: Path) -> None:
    tar_bytes, _ = _tar({"x": 300_000})
    path = tmp_path / "layer.tar"
    path.write_bytes(tar_bytes)
    media = "application/vnd.oci.image.layer.v1.tar"
    cost = gzip_layer_cost(path, media, {"x": [(0, 5_000)]}, span=4 * FINEST_SPAN)
    assert cost.read_bytes == cost.limit_bytes == 5_000
    assert cost.span_bytes == cost.piece_bytes == 4 * FINEST_SPAN  # spans fetched whole


def test_a_running_fill_stream_counts_as_fill_not_protocol() -> None:
    """An index-only layer's audit streams the whole blob as one request, booked in the
    fetch bytes only when it ends; what it received by readiness is fill."""
    stats = FetchStats()
    stats.stream_received(Priority.BACKGROUND, 3_000)
    stats.stream_received(Priority.BACKGROUND, 2_000)
    stats.chunk_fetched("sha256:" + "a" * 64, "k", Priority.DEMAND, 1_000)
    stats.record_request(Priority.DEMAND, 1_000, 0.1)
    run = RunResult(
        "lazy-index",
        1,
        0.1,
        1.0,
        link_bytes_before_ready=7_000,
        agent_fetch_bytes={"demand": float(stats.bytes_fetched[Priority.DEMAND])},
        agent_stats={
            "chunk_bytes_demand": float(stats.chunk_bytes[Priority.DEMAND]),
            "stream_open_background": float(stats.streams_open[Priority.BACKGROUND]),
        },
    )
    cost = RangeCost(read_bytes=800, limit_bytes=600, span_bytes=1_000, piece_bytes=700)
    split = over_fetch(run, cost, planned=False)
    assert (split.fill_unread, split.coalescing, split.protocol) == (5_000, 0, 1_000)
    assert split.read_ahead == 0

    stats.stream_ended(Priority.BACKGROUND, 5_000, 0.5)
    assert stats.streams_open[Priority.BACKGROUND] == 0
    assert stats.stream_bytes[Priority.BACKGROUND] == 5_000
    assert stats.bytes_fetched[Priority.BACKGROUND] == 5_000


def test_a_hard_link_costs_its_targets_data(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("data")
        info.size = 50_000
        tar.addfile(info, io.BytesIO(os.urandom(info.size)))
        link = tarfile.TarInfo("alias")
        link.type, link.linkname = tarfile.LNKTYPE, "data"
        tar.addfile(link)
    path = tmp_path / "layer.tar.gz"
    path.write_bytes(gzip.compress(buffer.getvalue()))
    by_link = gzip_layer_cost(path, GZIP_LAYER, {"alias": [(0, 10_000)]})
    assert by_link == gzip_layer_cost(path, GZIP_LAYER, {"data": [(0, 10_000)]})
    assert by_link.read_bytes == 10_000 and by_link.limit_bytes > 0
