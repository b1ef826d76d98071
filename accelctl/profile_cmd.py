"""`accelctl profile show|pull|push|merge`: look at and manage learned startup profiles."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from accelctl.registry_options import make_client, registry_options
from fetcher.errors import RegistryError
from fetcher.reference import ImageReference
from profiles.coverage import size_of
from profiles.format import Profile, ProfileFormatError, parse, serialize
from profiles.learn import merge_all
from profiles.plan import median_first_access, prefetch_plan
from profiles.registry_sync import fetch_profile, push_run_profile


def render_profile(console: Console, profile: Profile) -> None:
    """The plan as a table: what startup reads, in the order it reads it."""
    stats = {(s.layer, "/" + s.path.lstrip("/")): s for s in profile.files}
    runs = profile.runs
    console.print(
        f"image {profile.image}: {runs.count} run(s) on {len(runs.nodes)} node(s), "
        f"sources {', '.join(f'{n} ({c})' for n, c in runs.sources) or '-'}"
        + (f", {runs.page_cache_blind} blind to page-cache hits" if runs.page_cache_blind else "")
    )
    table = Table("#", "first access", "layer", "path", "bytes", "runs")
    total = 0
    for number, entry in enumerate(prefetch_plan(profile), 1):
        stat = stats.get((entry.layer or "", entry.path))
        size = size_of(entry.ranges) if entry.ranges else 0
        total += size
        when = f"{median_first_access(stat) / 1e6:.1f} ms" if stat else "pinned"
        table.add_row(
            str(number),
            when,
            (entry.layer or "(merged view)")[:19],
            entry.path,
            f"{size:,}" if entry.ranges else "whole",
            str(stat.runs) if stat else "-",
        )
    console.print(table)
    console.print(f"{total:,} bytes to prefetch")


async def _fetch(
    ctx_options: dict[str, object], image: str
) -> tuple[ImageReference, Profile | None]:
    ref = ImageReference.parse(image)
    async with make_client(**ctx_options) as client:  # type: ignore[arg-type]
        resolved = await client.resolve(ref)
        return ref, await fetch_profile(client, ref, resolved.manifest_digest)


@click.group("profile")
def profile() -> None:
    """Learned startup profiles of images."""


@profile.command("show")
@click.argument("image")
@registry_options
def show(image: str, **options: object) -> None:
    """Print what IMAGE's startup reads, as the fleet learned it."""
    try:
        _, found = asyncio.run(_fetch(options, image))
    except (RegistryError, ProfileFormatError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    if found is None:
        raise click.ClickException(f"no profile has been learned for {image} yet")
    render_profile(Console(), found)


@profile.command("pull")
@click.argument("image")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True)
@registry_options
def pull(image: str, output: Path, **options: object) -> None:
    """Save IMAGE's merged profile (msgpack) to a file."""
    try:
        _, found = asyncio.run(_fetch(options, image))
    except (RegistryError, ProfileFormatError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    if found is None:
        raise click.ClickException(f"no profile has been learned for {image} yet")
    output.write_bytes(serialize(found))
    click.echo(f"wrote {output} ({found.runs.count} runs)")


@profile.command("merge")
@click.argument(
    "inputs", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True)
def merge(inputs: tuple[Path, ...], output: Path) -> None:
    """Merge profile files of the same image into one."""
    try:
        merged = merge_all(parse(path.read_bytes()) for path in inputs)
    except (ProfileFormatError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    output.write_bytes(serialize(merged))
    click.echo(f"wrote {output} ({merged.runs.count} runs)")


@profile.command("push")
@click.argument("image")
@click.argument("profile_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@registry_options
def push(image: str, profile_file: Path, **options: object) -> None:
    """Share a profile file with the fleet as a referrer of IMAGE."""

    async def run() -> str:
        ref = ImageReference.parse(image)
        async with make_client(**options) as client:  # type: ignore[arg-type]
            published = await push_run_profile(client, ref, parse(profile_file.read_bytes()))
            return published.digest

    try:
        digest = asyncio.run(run())
    except (RegistryError, ProfileFormatError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"pushed {digest}")
