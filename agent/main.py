"""Entry point of `acceld`, the node agent."""

from __future__ import annotations

import sys

import click
from rich.console import Console
from rich.table import Table

from agent.node_check import run_checks
from common.logging import configure_logging
from common.version import VERSION


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


def main() -> None:
    """Console-script entry point."""
    cli()
