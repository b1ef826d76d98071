"""`accelctl inspect IMAGE`: what the registry says an image is made of."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from accelctl.registry_options import make_client, registry_options
from fetcher.errors import RegistryError
from fetcher.manifest import Platform
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient, ResolvedImage


async def describe_image(
    client: RegistryClient, ref: ImageReference, platform: Platform | None
) -> tuple[ResolvedImage, dict[str, object]]:
    """Resolve ``ref`` and load its config, verifying both against their digests."""
    resolved = await client.resolve(ref, platform)
    config = json.loads(await client.get_blob(ref, resolved.manifest.config.digest))
    return resolved, config


def render(console: Console, resolved: ResolvedImage, config: dict[str, object]) -> None:
    """Print a human summary of a resolved image."""
    manifest = resolved.manifest
    console.print(f"[bold]{resolved.reference}[/bold]")
    if resolved.index_digest:
        console.print(f"  index     {resolved.index_digest}")
    console.print(f"  manifest  {resolved.manifest_digest} ({manifest.media_type})")
    console.print(f"  platform  {config.get('os')}/{config.get('architecture')}")
    table = Table("#", "digest", "media type", "size", title="layers")
    for i, layer in enumerate(manifest.layers):
        table.add_row(str(i), layer.digest[:19], layer.media_type, f"{layer.size:,}")
    console.print(table)
    total = sum(layer.size for layer in manifest.layers)
    console.print(f"  {len(manifest.layers)} layers, {total:,} bytes compressed")


@click.command("inspect")
@click.argument("image")
@click.option("--platform", help="os/arch[/variant] (default: this machine's).")
@registry_options
def inspect_image(
    image: str,
    platform: str | None,
    docker_config: Path | None,
    pull_secret: tuple[Path, ...],
    plain_http: tuple[str, ...],
    hosts_dir: str,
) -> None:
    """Resolve IMAGE in its registry and list its layers."""

    async def run() -> tuple[ResolvedImage, dict[str, object]]:
        async with make_client(docker_config, pull_secret, plain_http, hosts_dir) as client:
            return await describe_image(
                client, ImageReference.parse(image), Platform.parse(platform) if platform else None
            )

    try:
        resolved, config = asyncio.run(run())
    except (RegistryError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    render(Console(), resolved, config)
