"""Converter benchmark: both modes on a real image, against the tools they compete with.

Usage: python -m bench.convert [--image python-scipy] [--quick] [--repeat N]

A conversion's cost only means something next to what the same machine needs for the
work that cannot be avoided: index-only mode must inflate every layer once, so its
yardstick is one plain ``gzip -dc`` pass over the same blobs; full mode must also
compress everything again, so its yardstick is one ``pigz`` pass over the uncompressed
layers. Both yardsticks are measured in the same run, on the same bytes, interleaved
with the conversions, so a busy or throttled machine moves both sides alike.

The conversions are the real ones: the image is pushed to a real registry
(`rig.registry.RegistryServer`) and `converter.convert.convert_image` streams it from
there and publishes the result, as the CLI and the convert-server do.
"""

from __future__ import annotations

import asyncio
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click

from bench import catalog
from bench.report import RESULTS_DIR, markdown_table, write_results
from common.logging import configure_logging, get_logger
from converter.convert import ConversionResult, ConvertOptions, convert_image
from converter.progress import LayerProgress
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from formats import layer_index_codec
from rig.images import BuiltImage, push_image
from rig.registry import RegistryServer

log = get_logger(__name__)

DEFAULT_IMAGE = "python-scipy"
QUICK_IMAGE = "minbase"
DEFAULT_WORKDIR = Path("/var/tmp/acceld-bench/work")
GB = 1e9

INDEX_MAX_PERCENT = 0.5
INDEX_MAX_RATIO = 1.5
FULL_MAX_PERCENT = 105.0
FULL_MAX_RATIO = 1.5


@dataclass(frozen=True)
class Timing:
    """Wall seconds and the CPU seconds spent for it (ours or the child tool's)."""

    wall: float
    cpu: float


def _cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _timed_tool(argv: Sequence[str], source: Path, dest: Path) -> Timing:
    cpu_before = _cpu_seconds(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with source.open("rb") as stdin, dest.open("wb") as stdout:
        subprocess.run(argv, stdin=stdin, stdout=stdout, check=True)
    return Timing(
        time.perf_counter() - started, _cpu_seconds(resource.RUSAGE_CHILDREN) - cpu_before
    )


def _sum(timings: Sequence[Timing]) -> Timing:
    return Timing(sum(t.wall for t in timings), sum(t.cpu for t in timings))


def gzip_decompress_pass(blobs: Sequence[Path]) -> Timing:
    """One ``gzip -dc`` over every layer blob, one after the other, output discarded."""
    return _sum([_timed_tool(["gzip", "-dc"], blob, Path("/dev/null")) for blob in blobs])


def pigz_compress_pass(tars: Sequence[Path], out_dir: Path) -> tuple[Timing, int]:
    """One ``pigz`` (default level, all cores) over every uncompressed layer, written to
    disk as full mode writes its eStargz blobs; returns the time and the bytes written."""
    timings, written = [], 0
    for tar in tars:
        out = out_dir / f"{tar.stem}.gz"
        timings.append(_timed_tool(["pigz", "-c"], tar, out))
        written += out.stat().st_size
        out.unlink()
    return _sum(timings), written


def decompress_layers(blobs: Sequence[Path], out_dir: Path) -> list[Path]:
    """The plain tars the pigz yardstick compresses (made once, outside any timing)."""
    tars = []
    for blob in blobs:
        tar = out_dir / f"{blob.name}.tar"
        with blob.open("rb") as stdin, tar.open("wb") as stdout:
            subprocess.run(["gzip", "-dc"], stdin=stdin, stdout=stdout, check=True)
        tars.append(tar)
    return tars


@dataclass(frozen=True)
class ConversionRun:
    """One conversion as measured here; ``checkpoints`` counts index-mode resume points."""

    mode: str
    wall: float
    cpu: float
    source_bytes: int
    output_bytes: int
    layer_seconds: list[float]
    checkpoints: int


def _checkpoints(result: ConversionResult) -> int:
    return sum(
        len(layer_index_codec.parse(layer.index_blob).checkpoints)
        for platform in result.platforms
        for layer in platform.layers
        if layer.index_blob is not None
    )


async def convert_once(
    client: RegistryClient, reference: ImageReference, mode: str, workdir: Path
) -> ConversionRun:
    """Convert (forced, so repeats do real work) and publish, timed from start to tag."""
    cpu_before = _cpu_seconds(resource.RUSAGE_SELF)
    started = time.perf_counter()
    result = await convert_image(
        client,
        reference,
        ConvertOptions(mode=mode, force=True, workdir=workdir),
        LayerProgress(interactive=False),
    )
    wall = time.perf_counter() - started
    return ConversionRun(
        mode=mode,
        wall=wall,
        cpu=_cpu_seconds(resource.RUSAGE_SELF) - cpu_before,
        source_bytes=result.source_bytes,
        output_bytes=result.output_bytes,
        layer_seconds=[layer.seconds for p in result.platforms for layer in p.layers],
        checkpoints=_checkpoints(result),
    )


@dataclass
class Measurements:
    """Everything one benchmark run measured, repetition by repetition."""

    image: str
    layers: int
    compressed_bytes: int
    uncompressed_bytes: int
    gzip_pass: list[Timing]
    pigz_pass: list[Timing]
    pigz_bytes: int
    index: list[ConversionRun]
    full: list[ConversionRun]


async def measure(built: BuiltImage, name: str, repeat: int, workdir: Path) -> Measurements:
    """Push ``built`` to a fresh registry, then alternate yardsticks and conversions."""
    blobs = [built.blob_path(layer.digest) for layer in built.layers]
    tars_dir = workdir / "tars"
    tars_dir.mkdir()
    tars = decompress_layers(blobs, tars_dir)
    gzip_runs: list[Timing] = []
    pigz_runs: list[Timing] = []
    index_runs: list[ConversionRun] = []
    full_runs: list[ConversionRun] = []
    pigz_bytes = 0
    with RegistryServer(workdir / "registry") as registry:
        log.info("bench.registry", url=registry.url, logs=str(registry.work_dir))
        reference = f"{registry.host}/bench/{name}:v1"
        async with RegistryClient() as client:
            await push_image(client, reference, built)
            ref = ImageReference.parse(reference)
            for repetition in range(repeat):
                log.info("bench.repetition", number=repetition + 1, of=repeat)
                gzip_runs.append(gzip_decompress_pass(blobs))
                index_runs.append(await convert_once(client, ref, "index", workdir))
                timing, pigz_bytes = pigz_compress_pass(tars, workdir)
                pigz_runs.append(timing)
                full_runs.append(await convert_once(client, ref, "full", workdir))
    return Measurements(
        image=name,
        layers=len(blobs),
        compressed_bytes=sum(layer.size for layer in built.layers),
        uncompressed_bytes=sum(tar.stat().st_size for tar in tars),
        gzip_pass=gzip_runs,
        pigz_pass=pigz_runs,
        pigz_bytes=pigz_bytes,
        index=index_runs,
        full=full_runs,
    )


# -- summary --------------------------------------------------------------------------


@dataclass(frozen=True)
class ModeSummary:
    """Medians over the repetitions of one mode, next to its yardstick and targets.

    ``ratio`` compares wall time (what the targets are about); ``cpu_ratio`` compares
    CPU seconds, which a machine shared with other work disturbs far less.
    """

    mode: str
    seconds: float
    cpu_seconds: float
    seconds_per_gb: float
    output_bytes: int
    percent_of_base: float
    baseline: str
    baseline_seconds: float
    ratio: float
    cpu_ratio: float
    max_percent: float
    max_ratio: float
    checkpoints: int

    @property
    def size_met(self) -> bool:
        """Whether the output size meets its target."""
        return self.percent_of_base <= self.max_percent

    @property
    def time_met(self) -> bool:
        """Whether the conversion time meets its target against the yardstick."""
        return self.ratio <= self.max_ratio


def _median(values: Sequence[float]) -> float:
    return statistics.median(values)


def summarize(m: Measurements) -> list[ModeSummary]:
    """One row per mode: median time, size share of the base image, ratio to yardstick."""
    rows = []
    plan = (
        ("index", m.index, "gzip -dc", m.gzip_pass, INDEX_MAX_PERCENT, INDEX_MAX_RATIO),
        ("full", m.full, "pigz", m.pigz_pass, FULL_MAX_PERCENT, FULL_MAX_RATIO),
    )
    for mode, runs, baseline, yardstick, max_percent, max_ratio in plan:
        seconds = _median([r.wall for r in runs])
        baseline_seconds = _median([t.wall for t in yardstick])
        cpu_seconds = _median([r.cpu for r in runs])
        output = runs[-1].output_bytes
        rows.append(
            ModeSummary(
                mode=mode,
                seconds=seconds,
                cpu_seconds=cpu_seconds,
                seconds_per_gb=seconds / (m.compressed_bytes / GB),
                output_bytes=output,
                percent_of_base=100.0 * output / m.compressed_bytes,
                baseline=baseline,
                baseline_seconds=baseline_seconds,
                ratio=seconds / baseline_seconds,
                cpu_ratio=cpu_seconds / _median([t.cpu for t in yardstick]),
                max_percent=max_percent,
                max_ratio=max_ratio,
                checkpoints=runs[-1].checkpoints,
            )
        )
    return rows


def _verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def render(m: Measurements, summaries: Sequence[ModeSummary]) -> str:
    """The markdown table (plus a line naming the image) printed and saved."""
    headers = [
        "mode",
        "s",
        "s/GB",
        "output MB",
        "% of base",
        "target %",
        "yardstick",
        "yardstick s",
        "x yardstick",
        "target x",
        "CPU x yardstick",
    ]
    rows = [
        [
            s.mode,
            f"{s.seconds:.2f}",
            f"{s.seconds_per_gb:.1f}",
            f"{s.output_bytes / 1e6:.2f}",
            f"{s.percent_of_base:.3f}",
            f"<= {s.max_percent:g} ({_verdict(s.size_met)})",
            s.baseline,
            f"{s.baseline_seconds:.2f}",
            f"{s.ratio:.2f}",
            f"<= {s.max_ratio:g} ({_verdict(s.time_met)})",
            f"{s.cpu_ratio:.2f}",
        ]
        for s in summaries
    ]
    runs = len(m.index)
    heading = (
        f"Image `{m.image}`: {m.layers} layers, {m.compressed_bytes / 1e6:.1f} MB gzip, "
        f"{m.uncompressed_bytes / 1e6:.1f} MB uncompressed; median of {runs} run(s); "
        f"pigz output {m.pigz_bytes / 1e6:.1f} MB; index checkpoints {m.index[-1].checkpoints}."
    )
    return heading + "\n\n" + markdown_table(headers, rows)


def _document(m: Measurements, summaries: Sequence[ModeSummary], table: str) -> dict[str, Any]:
    return {
        "measurements": asdict(m),
        "summary": [
            asdict(s) | {"size_met": s.size_met, "time_met": s.time_met} for s in summaries
        ],
        "table": table,
    }


def run_benchmark(
    image: str, repeat: int, cache_dir: Path, workdir: Path, results_dir: Path, keep: bool
) -> tuple[str, Path]:
    """Build, measure, summarize, save; returns the table and the JSON path."""
    built = catalog.build(image, cache_dir)
    workdir.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="convert-", dir=workdir))
    try:
        measured = asyncio.run(measure(built, image, repeat, run_dir))
    except BaseException:
        log.error("bench.failed", kept=str(run_dir), registry_logs=str(run_dir / "registry"))
        raise
    if not keep:
        shutil.rmtree(run_dir)
    summaries = summarize(measured)
    table = render(measured, summaries)
    return table, write_results(
        "convert", _document(measured, summaries, table), table, results_dir
    )


@click.command(help=__doc__)
@click.option("--image", default=None, help=f"catalog image (default {DEFAULT_IMAGE}).")
@click.option("--quick", is_flag=True, help=f"use the small '{QUICK_IMAGE}' image (~1 min).")
@click.option("--repeat", default=1, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--cache-dir", default=catalog.DEFAULT_CACHE, show_default=True, type=click.Path(path_type=Path)
)
@click.option(
    "--workdir", default=DEFAULT_WORKDIR, show_default=True, type=click.Path(path_type=Path)
)
@click.option(
    "--results-dir", default=RESULTS_DIR, show_default=True, type=click.Path(path_type=Path)
)
@click.option("--keep", is_flag=True, help="keep the registry, its logs and the tars.")
def main(
    image: str | None,
    quick: bool,
    repeat: int,
    cache_dir: Path,
    workdir: Path,
    results_dir: Path,
    keep: bool,
) -> None:
    """Entry point of ``python -m bench.convert``."""
    configure_logging()
    if image and quick:
        raise click.UsageError("--quick picks the image itself; give either --image or --quick")
    name = image or (QUICK_IMAGE if quick else DEFAULT_IMAGE)
    if name not in catalog.CATALOG:
        raise click.UsageError(f"unknown image {name!r}; known: {', '.join(catalog.CATALOG)}")
    table, path = run_benchmark(name, repeat, cache_dir, workdir, results_dir, keep)
    click.echo(table)
    click.echo(f"\nresults: {path}")


if __name__ == "__main__":
    main()
