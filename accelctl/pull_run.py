"""`accelctl pull` and `accelctl run`: lazy pulls for people without Kubernetes.

`pull` asks containerd's CRI plugin to pull, as the kubelet would, so acceld's
snapshotter is offered each layer with the labels it needs to serve it lazily.
`run` then starts a container with containerd's own `ctr`, on acceld's snapshots.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path

import click

from accelctl.cri.client import CRI_NAMESPACE, DEFAULT_CONTAINERD, CRIError, CRIImageClient
from accelctl.registry_options import credential_options
from fetcher.credentials import CredentialStore


def lazy_pull(address: str, image: str, credentials: CredentialStore) -> tuple[str, float]:
    """CRI-pull ``image``; returns (image id, seconds)."""
    started = time.monotonic()
    with CRIImageClient(address) as cri:
        image_id = cri.pull(image, credentials)
    return image_id, time.monotonic() - started


address_option = click.option(
    "--address", default=DEFAULT_CONTAINERD, show_default=True, help="containerd's socket."
)


@click.command("pull")
@click.argument("image")
@address_option
@credential_options
def pull(
    image: str, address: str, docker_config: Path | None, pull_secret: tuple[Path, ...]
) -> None:
    """Pull IMAGE into containerd through CRI (lazily, where acceld can serve it)."""
    try:
        image_id, seconds = lazy_pull(
            address, image, CredentialStore.from_files(docker_config, pull_secret)
        )
    except CRIError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"pulled {image} ({image_id}) in {seconds:.2f}s")


@click.command("run", context_settings={"ignore_unknown_options": True})
@click.argument("image")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@address_option
@credential_options
@click.option("--snapshotter", default="acceld", show_default=True)
def run(
    image: str,
    command: tuple[str, ...],
    address: str,
    docker_config: Path | None,
    pull_secret: tuple[Path, ...],
    snapshotter: str,
) -> None:
    """Pull IMAGE lazily and run it to completion (optionally with COMMAND)."""
    try:
        _, seconds = lazy_pull(
            address, image, CredentialStore.from_files(docker_config, pull_secret)
        )
    except CRIError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"pulled {image} in {seconds:.2f}s", err=True)
    container = f"accelctl-{uuid.uuid4().hex[:12]}"
    result = subprocess.run(
        [
            "ctr",
            "--address",
            address,
            "--namespace",
            CRI_NAMESPACE,
            "run",
            "--rm",
            "--snapshotter",
            snapshotter,
            image,
            container,
            *command,
        ],
        check=False,
    )
    raise SystemExit(result.returncode)
