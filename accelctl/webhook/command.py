"""`accelctl webhook`: serve the mutating admission webhook until SIGTERM."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import click

from accelctl.registry_options import make_client, registry_options
from accelctl.webhook.lookup import AcceleratedImageLookup
from accelctl.webhook.mutation import PodMutator
from accelctl.webhook.server import WebhookServer, tls_context
from fetcher.registry import RegistryClient


async def serve(
    client: RegistryClient,
    host: str,
    port: int,
    cert: Path,
    key: Path,
    cache_ttl: float,
    timeout: float,
) -> None:
    """Run the webhook with ``client`` until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with client:
        mutator = PodMutator(AcceleratedImageLookup(client, ttl=cache_ttl), timeout=timeout)
        server = WebhookServer(mutator, host, port, tls_context(cert, key))
        await server.start()
        try:
            await stop.wait()
        finally:
            await server.stop()


@click.command("webhook")
@click.option(
    "--cert",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="TLS certificate (PEM) the API server trusts through caBundle.",
)
@click.option("--key", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--listen", default="0.0.0.0:8443", show_default=True, help="host:port to serve.")
@click.option(
    "--cache-ttl", default=60.0, show_default=True, help="Seconds a registry answer is reused."
)
@click.option(
    "--timeout",
    default=3.0,
    show_default=True,
    help="Seconds to wait for the registry before admitting a pod unchanged.",
)
@registry_options
def webhook(
    cert: Path,
    key: Path,
    listen: str,
    cache_ttl: float,
    timeout: float,
    docker_config: Path | None,
    pull_secret: tuple[Path, ...],
    plain_http: tuple[str, ...],
    hosts_dir: str,
) -> None:
    """Mutating admission webhook: switch opted-in pods to `_accelerated` images."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise click.BadParameter("expected host:port", param_hint="--listen")
    client = make_client(docker_config, pull_secret, plain_http, hosts_dir)
    asyncio.run(serve(client, host or "0.0.0.0", int(port), cert, key, cache_ttl, timeout))
