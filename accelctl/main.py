"""Entry point of `accelctl`: a click group whose commands live in their own modules."""

from __future__ import annotations

import click

from accelctl.bench_command import bench
from accelctl.convert_cmd import convert
from accelctl.convert_server_cmd import convert_server
from accelctl.demo import demo
from accelctl.inspect_image import inspect_image
from accelctl.profile_cmd import profile
from accelctl.pull_run import pull, run
from accelctl.webhook.command import webhook
from common.logging import configure_logging
from common.version import VERSION
from fetcher.proxy_env import ProxyConfigError, process_proxies


@click.group()
@click.version_option(VERSION, prog_name="accelctl")
@click.option("--log-level", default="INFO", show_default=True, help="DEBUG, INFO, WARNING...")
def cli(log_level: str) -> None:
    """Operate acceld: inspect, convert and lazily pull container images."""
    configure_logging(log_level)
    try:
        process_proxies()
    except ProxyConfigError as exc:
        raise click.ClickException(str(exc)) from None


cli.add_command(inspect_image)
cli.add_command(demo)
cli.add_command(convert)
cli.add_command(convert_server)
cli.add_command(pull)
cli.add_command(run)
cli.add_command(profile)
cli.add_command(webhook)
cli.add_command(bench)


def main() -> None:
    """Console-script entry point."""
    cli()
