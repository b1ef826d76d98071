"""`accelctl convert`: make the accelerated form of an image, by hand."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from accelctl.registry_options import make_client, registry_options
from converter.convert import ConversionResult, ConvertOptions, convert_image
from converter.errors import ConversionError
from converter.prefetch import PrefetchList, PrefetchListError
from fetcher.errors import RegistryError
from fetcher.manifest import Platform
from fetcher.reference import ImageReference
from formats.accelerated import MODE_FULL, MODE_INDEX


def print_result(console: Console, result: ConversionResult) -> None:
    """Summarize a conversion: per-layer sizes and times, and the published digest."""
    if result.skipped:
        console.print(
            f"{result.target} already converted from {result.source_digest} "
            f"-> {result.result_digest} (nothing to do)"
        )
        return
    table = Table(
        "platform",
        "layer",
        "source bytes",
        "output bytes",
        "output %",
        "seconds",
        title=f"{result.source} -> {result.target} ({result.mode} mode)",
    )
    for platform in result.platforms:
        for layer in platform.layers:
            pct = 100.0 * layer.output_size / max(layer.source.size, 1)
            table.add_row(
                str(platform.platform or "-"),
                layer.source.digest[:19],
                f"{layer.source.size:,}",
                f"{layer.output_size:,}",
                f"{pct:.2f}",
                f"{layer.seconds:.2f}",
            )
    console.print(table)
    for platform in result.platforms:
        if platform.missing_prefetch:
            console.print(
                f"[yellow]warning[/yellow]: prefetch paths not in the image "
                f"({platform.platform or 'image'}): " + ", ".join(platform.missing_prefetch)
            )
    total_pct = 100.0 * result.output_bytes / max(result.source_bytes, 1)
    console.print(
        f"published {result.target}@{result.result_digest} in "
        f"{result.seconds:.1f}s; output {total_pct:.2f}% of source"
    )


@click.command("convert")
@click.argument("image")
@click.option(
    "--mode",
    type=click.Choice([MODE_FULL, MODE_INDEX]),
    default=MODE_INDEX,
    show_default=True,
    help="full: eStargz image; index: index-only artifact.",
)
@click.option(
    "--prefetch-list",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Absolute paths (trailing / = directory) that startup reads.",
)
@click.option(
    "--platform",
    "platforms",
    multiple=True,
    help="os/arch[/variant] to convert (repeatable; default: all in an index).",
)
@click.option(
    "--chunk-size", default=4 << 20, show_default=True, help="eStargz chunk size (full mode)."
)
@click.option(
    "--estargz-min-chunk-size",
    "min_chunk_size",
    default=64 << 10,
    show_default=True,
    help="Small files share gzip members up to this size (0: one member per file, for "
    "stargz-snapshotter older than 0.13).",
)
@click.option(
    "--span",
    default=4 << 20,
    show_default=True,
    help="Uncompressed bytes between gzip checkpoints (index mode).",
)
@click.option("--parallel", default=2, show_default=True, help="Layers converted at once.")
@click.option("--force", is_flag=True, help="Convert even if already converted.")
@registry_options
def convert(
    image: str,
    mode: str,
    prefetch_list: Path | None,
    platforms: tuple[str, ...],
    chunk_size: int,
    min_chunk_size: int,
    span: int,
    parallel: int,
    force: bool,
    docker_config: Path | None,
    pull_secret: tuple[Path, ...],
    plain_http: tuple[str, ...],
) -> None:
    """Convert IMAGE and publish the result as <tag>_accelerated in the same repository."""
    try:
        options = ConvertOptions(
            mode=mode,
            prefetch=PrefetchList.load(prefetch_list) if prefetch_list else PrefetchList(()),
            platforms=tuple(Platform.parse(p) for p in platforms),
            chunk_size=chunk_size,
            min_chunk_size=min_chunk_size,
            span=span,
            parallel_layers=parallel,
            force=force,
        )
        ref = ImageReference.parse(image)
    except (PrefetchListError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None

    async def run() -> ConversionResult:
        async with make_client(docker_config, pull_secret, plain_http) as client:
            return await convert_image(client, ref, options)

    try:
        result = asyncio.run(run())
    except (ConversionError, RegistryError) as exc:
        raise click.ClickException(f"conversion refused, nothing pushed: {exc}") from None
    print_result(Console(), result)
