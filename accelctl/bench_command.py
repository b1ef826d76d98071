"""`accelctl bench`: the startup benchmark suite whose table and chart the README shows.

A command rather than a script so that anyone holding the tool can reproduce the
README's figures on their own machine, with the link they care about.
"""

from __future__ import annotations

import shlex
import shutil
import time
from pathlib import Path

import click
from rich.console import Console

from bench.catalog import CATALOG
from bench.report import RESULTS_DIR
from bench.startup import SYNTHETIC
from bench.suite import (
    DEFAULT_IMAGES,
    DOCS_DIR,
    FORMS,
    SuiteOptions,
    quick_options,
    rich_progress,
    run_suite,
    write_outputs,
)

_DIR = click.Path(file_okay=False, path_type=Path)


def _image_list(_ctx: click.Context, _param: click.Parameter, value: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    unknown = [n for n in names if n not in CATALOG and n != SYNTHETIC]
    if unknown or not names:
        known = ", ".join([*CATALOG, SYNTHETIC])
        raise click.BadParameter(
            f"unknown image(s) {', '.join(unknown) or '(none)'}; known: {known}"
        )
    return names


@click.command("bench")
@click.option(
    "--images",
    default=",".join(DEFAULT_IMAGES),
    show_default=True,
    callback=_image_list,
    help="Comma-separated bench.catalog images (or 'synthetic').",
)
@click.option(
    "--quick",
    is_flag=True,
    help="A few minutes: python-scipy (unless --images), one repetition, index form only, "
    "results not copied to docs/.",
)
@click.option("--repeat", default=3, show_default=True, help="Repetitions per mode.")
@click.option("--rate-mbit", default=300.0, show_default=True, help="Link bandwidth.")
@click.option("--rtt-ms", default=5.0, show_default=True, help="Link round-trip time.")
@click.option(
    "--forms",
    default=",".join(FORMS),
    show_default=True,
    help="Lazy forms to measure: index, full or both.",
)
@click.option(
    "--profiles/--no-profiles",
    default=True,
    show_default=True,
    help="Learn a profile per lazy form and measure the +profile modes.",
)
@click.option("--learn-starts", default=1, show_default=True, help="Recorded starts per profile.")
@click.option(
    "--new-versions",
    is_flag=True,
    help="Also measure the new-version scenario on the images that have versions "
    f"({', '.join(n for n, i in CATALOG.items() if i.versions)}): v2 (app changed) and v3 "
    "(base rebuilt) pushed next to v1, started with v1's profile inherited, with none and "
    "with their own. Needs --profiles.",
)
@click.option("--synthetic-mb", default=64, show_default=True, help="Synthetic image data size.")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds per pull or start.")
@click.option("--cache-dir", type=_DIR, default=SuiteOptions.cache_dir, show_default=True)
@click.option("--workdir", type=_DIR, default=SuiteOptions.workdir, show_default=True)
@click.option("--results-dir", type=_DIR, default=RESULTS_DIR, show_default=True)
@click.option(
    "--keep-runs",
    is_flag=True,
    help="Keep every run's agent and containerd logs under --workdir (diagnosis).",
)
@click.option(
    "--docs-dir",
    type=_DIR,
    help=f"Where the README's chart and table copies go [default: {DOCS_DIR}; none with --quick].",
)
def bench(
    images: tuple[str, ...],
    quick: bool,
    repeat: int,
    rate_mbit: float,
    rtt_ms: float,
    forms: str,
    profiles: bool,
    learn_starts: int,
    new_versions: bool,
    synthetic_mb: int,
    timeout: float,
    cache_dir: Path,
    workdir: Path,
    results_dir: Path,
    keep_runs: bool,
    docs_dir: Path | None,
) -> None:
    """Time to ready of real applications: full pull vs acceld lazy, with and without
    learned profiles, behind a shaped link. Needs root (namespaces, containerd, FUSE)."""
    options = SuiteOptions(
        images=images,
        repeat=repeat,
        rate_mbit=rate_mbit,
        rtt_ms=rtt_ms,
        forms=tuple(form.strip() for form in forms.split(",") if form.strip()),
        profiles=profiles,
        learn_starts=learn_starts,
        timeout=timeout,
        synthetic_mb=synthetic_mb,
        cache_dir=cache_dir,
        workdir=workdir / time.strftime("%Y%m%d-%H%M%S"),
        keep_runs=keep_runs,
        new_versions=new_versions,
    )
    if quick:
        options = quick_options(options)
    elif docs_dir is None:
        docs_dir = DOCS_DIR
    command = canonical_command(options, quick)
    console = Console(stderr=True, log_path=False)
    try:
        with rich_progress(options.steps(), console) as progress:
            report = run_suite(options, progress)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    if not keep_runs:
        shutil.rmtree(options.workdir, ignore_errors=True)  # kept only when a run failed
    outputs = write_outputs(report, command, results_dir, docs_dir)
    click.echo("\n" + outputs.markdown.read_text())
    click.echo(f"results: {outputs.json} {outputs.markdown} {outputs.chart}")
    if outputs.docs:
        click.echo(f"README copies: {' '.join(str(p) for p in outputs.docs)}")


def canonical_command(options: SuiteOptions, quick: bool) -> str:
    """The command line that reproduces this run, every figure-changing option spelled
    out (recorded next to the results and shown above the README table)."""
    words = ["accelctl", "bench", "--images", ",".join(options.images)]
    words += ["--repeat", str(options.repeat), "--rate-mbit", f"{options.rate_mbit:g}"]
    words += ["--rtt-ms", f"{options.rtt_ms:g}", "--forms", ",".join(options.forms)]
    words.append("--profiles" if options.profiles else "--no-profiles")
    words += ["--learn-starts", str(options.learn_starts)]
    if SYNTHETIC in options.images:
        words += ["--synthetic-mb", str(options.synthetic_mb)]
    if options.new_versions:
        words.append("--new-versions")
    return shlex.join(words + (["--quick"] if quick else []))
