"""`accelctl convert`: make the accelerated form of an image, by hand."""

from __future__ import annotations

import asyncio
import shlex
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from accelctl.pull_run import address_option
from accelctl.registry_options import make_client, registry_options
from converter.convert import ConversionResult, ConvertOptions, convert_image
from converter.errors import ConversionError
from converter.prefetch import PrefetchList, PrefetchListError
from converter.record_at_conversion import (
    RECORD_FAILURES,
    ContainerdTarget,
    Recorded,
    RecordSettings,
    RecordSettingsError,
    record_at_conversion,
)
from fetcher.credentials import CredentialStore
from fetcher.errors import RegistryError
from fetcher.manifest import Platform
from fetcher.reference import ImageReference
from formats.accelerated import MODE_FULL, MODE_INDEX
from profiles.trace import Outcome


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
    "--chunk-size",
    default=ConvertOptions.chunk_size,
    show_default=True,
    help="eStargz chunk size (full mode).",
)
@click.option(
    "--estargz-min-chunk-size",
    "min_chunk_size",
    default=ConvertOptions.min_chunk_size,
    show_default=True,
    help="Small files share gzip members up to this size (0: one member per file, for "
    "stargz-snapshotter older than 0.13).",
)
@click.option(
    "--span",
    default=ConvertOptions.span,
    show_default=True,
    help="Uncompressed bytes between gzip checkpoints (index mode).",
)
@click.option("--parallel", default=2, show_default=True, help="Layers converted at once.")
@click.option("--force", is_flag=True, help="Convert even if already converted.")
@click.option(
    "--record-profile",
    is_flag=True,
    help="Then start the image once in a sandbox (no network, read-only root, limits) "
    "under the eBPF tracer and publish its startup profile (see docs/conversion-profiles.md).",
)
@click.option(
    "--record-command", help="Command line of that start (default: the image's own command)."
)
@click.option("--ready-pattern", help="Regex on the start's output lines that completes it.")
@click.option("--record-timeout", default=60.0, show_default=True, help="Time limit (s).")
@click.option(
    "--record-quiet", default=3.0, show_default=True, help="Idle s that complete it (no pattern)."
)
@click.option("--record-memory-mb", default=512, show_default=True, help="Memory limit.")
@click.option("--record-cpus", default=1.0, show_default=True, help="CPU limit.")
@address_option
@click.option(
    "--snapshotter", default="overlayfs", show_default=True, help="containerd CRI's snapshotter."
)
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
    record_profile: bool,
    record_command: str | None,
    ready_pattern: str | None,
    record_timeout: float,
    record_quiet: float,
    record_memory_mb: int,
    record_cpus: float,
    address: str,
    snapshotter: str,
    docker_config: Path | None,
    pull_secret: tuple[Path, ...],
    plain_http: tuple[str, ...],
    hosts_dir: str,
) -> None:
    """Convert IMAGE and publish the result as <tag>_accelerated in the same repository."""
    settings = None
    try:
        if record_profile:
            settings = RecordSettings(
                command=tuple(shlex.split(record_command or "")),
                ready_pattern=ready_pattern,
                timeout_s=record_timeout,
                quiet_s=record_quiet,
                memory_mb=record_memory_mb,
                cpus=record_cpus,
            )
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
    except (PrefetchListError, RecordSettingsError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None

    async def run() -> ConversionResult:
        async with make_client(docker_config, pull_secret, plain_http, hosts_dir) as client:
            return await convert_image(client, ref, options)

    try:
        result = asyncio.run(run())
    except (ConversionError, RegistryError) as exc:
        raise click.ClickException(f"conversion refused, nothing pushed: {exc}") from None
    print_result(Console(), result)
    if settings is not None:
        target = ContainerdTarget(address, snapshotter)
        credentials = CredentialStore.from_files(docker_config, pull_secret)
        registry = (docker_config, pull_secret, plain_http, hosts_dir)
        _record(result, settings, target, credentials, registry)


def _record(
    result: ConversionResult,
    settings: RecordSettings,
    target: ContainerdTarget,
    credentials: CredentialStore,
    registry: tuple[Path | None, tuple[Path, ...], tuple[str, ...], str],
) -> None:
    """`--record-profile`: the start at conversion, reported; an error when nothing was
    published (the conversion itself stays published)."""

    async def run() -> Recorded:
        async with make_client(*registry) as client:
            return await record_at_conversion(client, result, settings, target, credentials)

    try:
        recorded = asyncio.run(run())
    except RECORD_FAILURES as exc:
        raise click.ClickException(f"no profile recorded at conversion: {exc}") from None
    click.echo(recorded.output, nl=False, err=True)
    if recorded.outcome is not Outcome.OK:
        raise click.ClickException(
            f"the start at conversion {recorded.outcome} (exit code {recorded.exit_code}): "
            "nothing published"
        )
    click.echo(
        f"profile recorded at conversion: {recorded.profile_digest} "
        f"({recorded.files} files) for {recorded.image}"
    )
