"""Measure the index-only build on a real gzip layer against one plain `gzip -dc` pass.

Usage: python -m bench.gzip_index_probe LAYER.tar.gz [--span BYTES] [--reads N]

Wall and CPU time are both reported because the build overlaps inflating and tar
walking on two threads: on a busy machine the wall-time ratio moves, the CPU cost not.
"""

from __future__ import annotations

import argparse
import random
import resource
import subprocess
import time
from pathlib import Path

from formats.gzip_index import DEFAULT_SPAN
from formats.layer_index_builder import build_layer_index
from formats.layer_index_codec import parse, serialize
from formats.media_types import OCI_LAYER_GZIP


def _cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _gzip_pass(path: Path) -> tuple[float, float]:
    cpu_before = _cpu_seconds(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with path.open("rb") as source:
        subprocess.run(["gzip", "-dc"], stdin=source, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started, _cpu_seconds(resource.RUSAGE_CHILDREN) - cpu_before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("layer", type=Path)
    parser.add_argument("--span", type=int, default=DEFAULT_SPAN)
    parser.add_argument("--reads", type=int, default=200)
    args = parser.parse_args()
    layer: Path = args.layer

    gzip_wall, gzip_cpu = _gzip_pass(layer)
    cpu_before = _cpu_seconds(resource.RUSAGE_SELF)
    started = time.perf_counter()
    with layer.open("rb") as source:
        index = build_layer_index(
            source, layer_digest="sha256:" + "0" * 64, media_type=OCI_LAYER_GZIP, span=args.span
        )
    build_wall = time.perf_counter() - started
    build_cpu = _cpu_seconds(resource.RUSAGE_SELF) - cpu_before
    blob = serialize(index)
    started = time.perf_counter()
    parse(blob)
    parse_wall = time.perf_counter() - started

    compressed = layer.read_bytes()
    rnd = random.Random(0)
    fetched = 0
    started = time.perf_counter()
    for _ in range(args.reads):
        offset = rnd.randrange(index.uncompressed_size - 4096)
        plan = index.plan_read(offset, 4096)
        fetched += plan.fetch_end - plan.fetch_start
        index.read(plan, compressed[plan.fetch_start : plan.fetch_end], offset, 4096)
    read_wall = (time.perf_counter() - started) / args.reads

    windows = sum(len(w) for w in index.windows)
    print(f"layer          {index.compressed_size:,} B gzip, {index.uncompressed_size:,} B tar")
    print(f"entries        {len(index.entries):,}; checkpoints {len(index.checkpoints)}")
    print(f"gzip -dc       {gzip_wall:.2f} s wall, {gzip_cpu:.2f} s cpu")
    print(
        f"build          {build_wall:.2f} s wall ({build_wall / gzip_wall:.2f}x), "
        f"{build_cpu:.2f} s cpu ({build_cpu / gzip_cpu:.2f}x)"
    )
    print(
        f"index          {len(blob):,} B = {100 * len(blob) / index.compressed_size:.3f}% "
        f"(windows {windows:,} B = {100 * windows / index.compressed_size:.3f}%); "
        f"parse {parse_wall * 1000:.0f} ms"
    )
    print(
        f"4 KiB read     {read_wall * 1000:.1f} ms, {fetched / args.reads / 1024:.0f} KiB fetched"
    )


if __name__ == "__main__":
    main()
