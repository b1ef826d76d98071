"""Entry point of `acceld`, the node agent."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from agent.config import AgentConfig, ConfigError
from agent.daemon import run
from agent.node_check import run_checks
from common.logging import configure_logging
from common.version import VERSION
from fetcher.proxy_env import ProxyConfigError, process_proxies


@click.group()
@click.version_option(VERSION, prog_name="acceld")
def cli() -> None:
    """acceld node agent: serves container image layers lazily to containerd."""
    configure_logging()


@cli.command()
def check() -> None:
    """Report which node capabilities acceld needs are present; exit 1 if any is missing."""
    checks = run_checks()
    table = Table("capability", "ok", "detail", "needed for")
    for item in checks:
        table.add_row(
            item.name, "yes" if item.ok else "[red]NO[/red]", item.detail, item.needed_for
        )
    Console().print(table)
    sys.exit(0 if all(item.ok for item in checks) else 1)


@cli.command("run")
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="YAML configuration file.",
)
@click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    help="State directory (snapshots, cache, mount).",
)
@click.option(
    "--socket",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Snapshotter socket containerd's proxy plugin dials.",
)
@click.option("--metrics-address", help="host:port of the Prometheus endpoint.")
@click.option("--cache-max-bytes", type=int, help="Chunk cache size cap.")
@click.option("--plain-http", multiple=True, help="Registry host reached over plain HTTP.")
@click.option(
    "--hosts-dir",
    help="containerd's registry config_path (hosts.toml per registry; ':' between roots).",
)
@click.option(
    "--no-background-fill",
    is_flag=True,
    default=None,
    help="Fetch only what is read or prefetched.",
)
def run_agent(
    config_path: Path | None,
    root: Path | None,
    socket: Path | None,
    metrics_address: str | None,
    cache_max_bytes: int | None,
    plain_http: tuple[str, ...],
    hosts_dir: str | None,
    no_background_fill: bool | None,
) -> None:
    """Serve lazy layers to containerd until SIGTERM."""
    overrides = {
        "root": root,
        "socket": socket,
        "metrics_address": metrics_address,
        "cache_max_bytes": cache_max_bytes,
        "plain_http": plain_http or None,
        "hosts_dir": hosts_dir,
        "background_fill": False if no_background_fill else None,
    }
    try:
        config = AgentConfig.load(config_path, overrides)
        process_proxies()
    except (ConfigError, ProxyConfigError) as exc:
        raise click.ClickException(str(exc)) from None
    run(config)


def main() -> None:
    """Console-script entry point."""
    cli()


if __name__ == "__main__":
    main()
