"""`python -m tracer`: trace one container (or process tree) by hand, JSON lines out.

For operators checking what a profile would be learned from, and for debugging the
tracer on a new kernel without the agent around it.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import click

from common.logging import configure_logging
from tracer.availability import TracerUnavailable
from tracer.trace import Tracer, mntns_of


@click.command()
@click.option("--pid", type=int, help="Trace this process's mount namespace.")
@click.option("--mntns", type=int, help="Trace this mount namespace id.")
@click.option("--cgroup", type=int, help="Trace this cgroup v2 id.")
@click.option("--tree", type=int, help="Trace everything this process starts from now on.")
@click.option("--quiet", default=1.0, show_default=True, help="Seconds of silence ending it.")
@click.option("--deadline", default=30.0, show_default=True, help="Longest window, seconds.")
def main(
    pid: int | None,
    mntns: int | None,
    cgroup: int | None,
    tree: int | None,
    quiet: float,
    deadline: float,
) -> None:
    configure_logging()
    if pid is not None:
        mntns = mntns_of(pid)
    if mntns is None and cgroup is None and tree is None:
        raise click.UsageError("give --pid, --mntns, --cgroup or --tree")
    try:
        tracer = Tracer()
    except TracerUnavailable as exc:
        click.echo(str(exc), err=True)
        sys.exit(2)
    with tracer:
        tracer.add_target(mntns_id=mntns, cgroup_id=cgroup, pid=tree)
        trace = tracer.collect(quiet_s=quiet, deadline_s=deadline)
    for event in trace.events:
        click.echo(json.dumps(dataclasses.asdict(event)))
    click.echo(
        f"{len(trace.events)} events, {len(trace.paths())} files, ended by {trace.ended_by}, "
        f"{trace.dropped} dropped",
        err=True,
    )
