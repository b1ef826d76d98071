"""`accelctl convert-server`: convert images when the registry says they were pushed."""

from __future__ import annotations

from pathlib import Path

import click

from converter.push_events import ServerConfig, ServerConfigError
from converter.server import serve


@click.command("convert-server")
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help=(
        "YAML: listen, token_file, registry or allowed_registries, queue_size, "
        "repositories[{match, mode, prefetch_list, record_profile}], containerd, webhook, "
        "hosts_dir."
    ),
)
def convert_server(config_path: Path) -> None:
    """Receive registry push notifications (POST /events) and convert pushed tags."""
    try:
        config = ServerConfig.load(config_path)
        config.check_servable()
    except ServerConfigError as exc:
        raise click.ClickException(str(exc)) from None
    serve(config)
