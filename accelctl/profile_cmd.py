"""`accelctl profile show|record|pull|push|merge`: look at and manage learned startup profiles."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from accelctl.cri.client import CRI_NAMESPACE, CRIError
from accelctl.pull_run import address_option, lazy_pull
from accelctl.registry_options import make_client, registry_options
from fetcher.credentials import CredentialStore
from fetcher.errors import RegistryError
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient, ResolvedImage
from formats.plan_path import PlanPath
from profiles.coverage import size_of
from profiles.format import Profile, ProfileFormatError, parse, serialize
from profiles.learn import from_trace, merge_all
from profiles.plan import median_first_access, prefetch_plan
from profiles.predecessors import Inheritance, ProfileInheritance
from profiles.provenance import conversion_runs
from profiles.registry_sync import fetch_profile, push_run_profile
from profiles.trace import Outcome
from tracer.availability import TracerUnavailable
from tracer.containerd_start import (
    Containerd,
    RecordError,
    image_chain_id,
    run_trace,
    traced_run,
)
from tracer.trace import Tracer


def render_profile(console: Console, profile: Profile) -> None:
    """The plan as a table: what startup reads, in the order it reads it."""
    stats = {(s.layer, str(PlanPath(s.path, False))): s for s in profile.files}
    runs = profile.runs
    at_conversion = conversion_runs(profile)
    console.print(
        f"image {profile.image}: {runs.count} run(s) on {len(runs.nodes)} node(s), "
        f"sources {', '.join(f'{n} ({c})' for n, c in runs.sources) or '-'}"
        + (f", {runs.page_cache_blind} blind to page-cache hits" if runs.page_cache_blind else "")
    )
    console.print(
        "origin: own profile"
        + (f", {at_conversion} run(s) recorded at conversion" if at_conversion else "")
    )
    table = Table("#", "first access", "layer", "path", "bytes", "runs")
    total = 0
    for number, entry in enumerate(prefetch_plan(profile), 1):
        stat = stats[(entry.layer or "", entry.path)]  # every learned entry is a file's
        size = size_of(entry.ranges or ())
        total += size
        table.add_row(
            str(number),
            f"{median_first_access(stat) / 1e6:.1f} ms",
            (entry.layer or "")[:19],
            entry.path,
            f"{size:,}",
            str(stat.runs),
        )
    console.print(table)
    console.print(f"{total:,} bytes to prefetch")


def render_inherited(console: Console, image: str, found: Inheritance) -> None:
    """An inherited plan: where it comes from, what the mapping kept, in fetch order."""
    plan = found.plan
    console.print(
        f"image {image}: no profile of its own\n"
        f"origin: inherited from {found.reference} ({plan.shared_layers} shared layer(s)): "
        f"{plan.exact} entries exact, {plan.by_path} by path, {plan.dropped} dropped "
        f"(layers not shared), {plan.cut} over the byte bound"
    )
    table = Table("#", "layer", "path", "bytes")
    for number, entry in enumerate(plan.entries, 1):
        layer = entry.layer[:19] if entry.layer else "(by path)"
        table.add_row(str(number), layer, entry.path, f"{size_of(entry.ranges or ()):,}")
    console.print(table)
    console.print(f"{plan.planned_bytes:,} bytes to prefetch")


def _learned(options: dict[str, object], image: str) -> Profile:
    """IMAGE's merged profile from the registry, or a clear error for the command."""
    found = _lookup(options, image, inherit=False)
    if not isinstance(found, Profile):
        raise click.ClickException(f"no profile has been learned for {image} yet")
    return found


def _lookup(options: dict[str, object], image: str, inherit: bool) -> Profile | Inheritance | None:
    """IMAGE's own merged profile; without one (and ``inherit``), what the agent would
    inherit for it (`profiles.predecessors`)."""

    async def fetch() -> Profile | Inheritance | None:
        ref = ImageReference.parse(image)
        async with make_client(**options) as client:  # type: ignore[arg-type]
            resolved = await client.resolve(ref)
            own = await fetch_profile(client, ref, resolved.manifest_digest)
            if own is not None or not inherit:
                return own
            inheritance = ProfileInheritance(client)
            return await inheritance.find(ref, resolved.manifest_digest, resolved.manifest)

    try:
        return asyncio.run(fetch())
    except (RegistryError, ProfileFormatError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None


@click.group("profile")
def profile() -> None:
    """Learned startup profiles of images."""


@profile.command("show")
@click.argument("image")
@registry_options
def show(image: str, **options: object) -> None:
    """Print what IMAGE's startup reads, as the fleet learned it, and where that came
    from: its own profile (and how many runs were recorded at conversion), or without
    one the predecessor's that a node would inherit."""
    found = _lookup(options, image, inherit=True)
    if found is None:
        raise click.ClickException(
            f"no profile has been learned for {image} yet, and no predecessor has one"
        )
    if isinstance(found, Profile):
        render_profile(Console(), found)
    else:
        render_inherited(Console(), image, found)


@profile.command("pull")
@click.argument("image")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True)
@registry_options
def pull(image: str, output: Path, **options: object) -> None:
    """Save IMAGE's merged profile (msgpack) to a file."""
    found = _learned(options, image)
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


@profile.command("record", context_settings={"ignore_unknown_options": True})
@click.argument("image")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@address_option
@click.option("--snapshotter", default="acceld", show_default=True)
@click.option("--quiet", default=3.0, show_default=True, help="Idle seconds that end the start.")
@click.option("--deadline", default=60.0, show_default=True, help="Longest start recorded (s).")
@click.option("--push/--no-push", default=True, show_default=True, help="Share it as a referrer.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path))
@registry_options
def record(
    image: str,
    command: tuple[str, ...],
    address: str,
    snapshotter: str,
    quiet: float,
    deadline: float,
    push: bool,
    output: Path | None,
    docker_config: Path | None,
    pull_secret: tuple[Path, ...],
    plain_http: tuple[str, ...],
    hosts_dir: str,
) -> None:
    """Start IMAGE once on this node under the eBPF tracer and learn what it reads.

    The container runs through containerd (pulled through CRI first, lazily where acceld
    serves it) until it has been idle for --quiet seconds or --deadline passes; a start
    that fails (non-zero exit, crash signal) or times out teaches nothing.
    """

    def client() -> RegistryClient:
        return make_client(docker_config, pull_secret, plain_http, hosts_dir)

    async def resolve(ref: ImageReference) -> tuple[ResolvedImage, str]:
        async with client() as registry:
            resolved = await registry.resolve(ref)
            return resolved, await image_chain_id(registry, resolved)

    try:
        ref = ImageReference.parse(image)
        # eBPF first: a node that cannot trace should say so before anything is pulled.
        with Tracer() as tracer:
            resolved, top = asyncio.run(resolve(ref))
            lazy_pull(address, image, CredentialStore.from_files(docker_config, pull_secret))
            containerd = Containerd(address, CRI_NAMESPACE, snapshotter)
            dirs = containerd.rootfs_layers(top)
            trace, run = traced_run(tracer, containerd, image, command, quiet, deadline)
        recorded = run_trace(resolved, trace, run, dirs)
    except (RegistryError, CRIError, RecordError, TracerUnavailable, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(run.output, nl=False, err=True)
    if recorded.outcome is not Outcome.OK:
        raise click.ClickException(
            f"the start {recorded.outcome} (exit code {run.returncode}): nothing learned"
        )
    learned = from_trace(recorded)
    render_profile(Console(), learned)
    if output is not None:
        output.write_bytes(serialize(learned))
        click.echo(f"wrote {output}")
    if push:

        async def share() -> str:
            async with client() as registry:
                return (await push_run_profile(registry, ref, learned)).digest

        try:
            click.echo(f"pushed {asyncio.run(share())}")
        except RegistryError as exc:
            raise click.ClickException(str(exc)) from None
