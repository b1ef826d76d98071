"""The benchmark suite behind `accelctl bench`: every image, every mode, one run.

`bench.startup` answers "how much faster is one image?"; the suite answers the question
the README has to: across realistic applications, how does a lazy start compare with a
full pull, what does a learned profile add, and how far is each from what the link
physically allows? Per image it publishes and converts both accelerated forms once
into the bench registry behind the shaped link, LEARNS a startup profile per lazy form
(fresh agents record `learn_starts` starts and push them; the profiles from earlier
suite runs are forgotten first, so every figure comes from this run), then measures,
``repeat`` times with the mode order rotating, each from a cold node:

* ``overlayfs`` / ``overlayfs-warm``   full CRI pull then start / the image already local;
* ``lazy-index`` / ``lazy-full``       acceld without profiles (neither read nor recorded);
* ``lazy-<form>+profile``              acceld prefetching the learned profile (not recording);
* ``stargz`` / ``stargz-optimized``    the peer, stargz-snapshotter, on its own eStargz and
                                       optimized images (`bench.stargz_peer`; skipped when
                                       its daemon is not installed).

Bytes read by the application come from the learned profile: the median, over its
recorded starts, of the bytes each start read (eBPF read/mmap ranges plus the reads that
reached FUSE, per file union). The physical limit of an image is the time a start
cannot beat on this link: the local (warm) start plus the compressed bytes that hold
exactly those ranges (per form, at the finest granularity its format allows:
bench/compressed_limit.py) at link bandwidth. The first limit, the same bytes
uncompressed, is reported beside it for a while. Each lazy run's bytes before readiness
are split by cause (bench/overfetch.py), and the agent's CPU seconds per start are
reported: on two cores the agent competes with the application it serves.

With ``new_versions``, each image that has later versions in `bench.catalog` then goes
through `bench.new_versions` (a new digest's first starts, with a predecessor's profile,
with none and with its own), on the same link and registry, after its own modes: it
needs their learned profile and local start.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bench.catalog import CATALOG, ImageVersion
from bench.chart import Bar, Panel, stacked_bars
from bench.compressed_limit import RangeCost
from bench.learning import (
    PROFILE_SUFFIX,
    Learned,
    ProgressCallback,
    done_with,
    form_costing,
    learn_profile,
    run_dir,
)
from bench.new_versions import (
    VERSION_MODES,
    ScenarioOutcome,
    VersionRow,
    measure_versions,
    version_panels,
    version_rows,
    versions_summary,
    versions_table,
)
from bench.overfetch import OverFetch, over_fetch
from bench.report import markdown_table, write_results
from bench.stargz_peer import PEER_MODES, STARGZ_OPTIMIZED, peer_available, run_peer
from bench.startup import (
    SYNTHETIC,
    ImageUnderTest,
    ModeSummary,
    RunResult,
    Setup,
    catalog_image,
    lazy_node,
    lazy_reference,
    physical_limit_seconds,
    publish,
    run_overlayfs,
    shaped_registry,
    summarize,
    synthetic_image,
    timed_lazy_start,
)
from common.logging import get_logger
from rig.shaped_link import ShapedLink

log = get_logger(__name__)

DEFAULT_IMAGES = ("python-scipy", "python-fat-api", "node-http", "gcc-hello", "postgres")
QUICK_IMAGES = ("python-scipy",)
FORMS = ("index", "full")
DOCS_DIR = Path(__file__).resolve().parent.parent / "docs" / "bench"
DOCS_STEM = "startup-suite"
VERSIONS_HEADING = "#### New versions: a new digest's first starts"
VERSIONS_INTRO = (
    "Each version pushed next to v1 in its repositories (v2: the app changed, every other"
    " layer v1's by digest; v3: the base rebuilt, every layer new). inherited = profiles"
    " and inheritance on, the version's own profile unlisted (v1's learned in this run);"
    " no profile = profiles off; own profile = the version's own, learned in this run."
    " Limit = v1's local start + the bytes the version's own profile read, at link"
    " bandwidth. Cold node per run, none recording."
)
OVER_FETCH_HEADING = "#### Bytes before ready, by cause"
OVER_FETCH_INTRO = (
    "Median MB per lazy mode; the causes add up to the bytes before ready"
    " (bench/overfetch.py). limit: compressed bytes holding what the app read;"
    " granularity: acceld's spans, pieces or members around them; read-ahead: chunks"
    " reads touched beyond those (kernel read-ahead, reads the learning start did not"
    " make); prefetch/fill unread: fetched, untouched at readiness; coalescing gaps:"
    " bytes between chunks fetched in one request; the rest: manifests, indexes, TOCs,"
    " HTTP."
)
APP_BYTES_SOURCE = (
    "learned profile: median over its recorded starts of the bytes each start read "
    "(eBPF read/mmap ranges + reads that reached FUSE, union per file)"
)


@dataclass(frozen=True)
class SuiteOptions:
    """What to measure, and where the state lives."""

    images: tuple[str, ...] = DEFAULT_IMAGES
    repeat: int = 3
    rate_mbit: float = 300.0
    rtt_ms: float = 5.0
    forms: tuple[str, ...] = FORMS
    profiles: bool = True
    learn_starts: int = 1
    background_fill: bool = True
    timeout: float = 600.0
    synthetic_mb: int = 64
    cache_dir: Path = Path("/var/tmp/acceld-bench/cache")
    workdir: Path = Path("/var/tmp/acceld-bench/work")
    keep_runs: bool = False
    """Keep every run's agent and containerd logs (normally only a failed run's)."""
    new_versions: bool = False
    """Also run the new-version scenario on the images that have versions."""

    def versions(self, image: str) -> tuple[ImageVersion, ...]:
        """The later versions the scenario measures for ``image`` (none if it is off)."""
        if not self.new_versions or image not in CATALOG:
            return ()
        return CATALOG[image].versions

    def rotation(self) -> list[str]:
        """The measured modes in first-repetition order (overlayfs also yields the
        warm run)."""
        modes = ["overlayfs", *(f"lazy-{form}" for form in self.forms)]
        if self.profiles:
            modes += [f"lazy-{form}{PROFILE_SUFFIX}" for form in self.forms]
        if peer_available():
            modes += PEER_MODES
        return modes

    def modes(self) -> list[str]:
        """Every mode that gets a table row, in table order."""
        rotation = self.rotation()
        return [rotation[0], "overlayfs-warm", *rotation[1:]]

    def steps(self) -> int:
        """Steps shown by the progress display: publish, learn starts, measured runs."""
        # Per form: the exact-reads start, then the learning ones.
        learn = len(self.forms) * (1 + self.learn_starts) if self.profiles else 0
        steps = len(self.images) * (1 + learn + self.repeat * len(self.rotation()))
        for image in self.images:
            per_form = self.learn_starts + self.repeat * len(VERSION_MODES)
            steps += len(self.versions(image)) * (1 + len(self.forms) * per_form)
        return steps


@dataclass
class ImageOutcome:
    """Everything measured for one image."""

    name: str
    compressed_bytes: int
    conversions: dict[str, dict[str, float]]
    learned: dict[str, Learned]
    runs: list[RunResult]
    new_versions: ScenarioOutcome | None = None

    @property
    def app_read_bytes(self) -> int | None:
        """Bytes the application read at startup, as the learned profiles saw it."""
        values = [learned.app_read_bytes for learned in self.learned.values()]
        return int(statistics.median(values)) if values else None

    def cost(self, mode: str) -> RangeCost | None:
        """What the ranges the app read cost in the form ``mode`` fetches from (the
        original layers for the index-only form and for overlayfs)."""
        form = "full" if mode.startswith("lazy-full") else "index"
        learned = self.learned.get(form)
        return None if learned is None else learned.cost


@dataclass(frozen=True)
class SuiteRow:
    """One image x mode line of the table."""

    image: str
    mode: str
    runs: int
    pull_seconds: float
    ready_seconds: float
    ready_min: float
    ready_max: float
    mb_before_ready: float
    mb_read_by_app: float | None
    speedup: float
    times_limit: float | None
    """Median ready time over the compressed-bytes limit (1.0 would be perfect)."""
    mb_limit: float | None = None
    """Compressed MB holding the ranges the app read, in this mode's form."""
    limit_seconds: float | None = None
    times_limit_old: float | None = None
    """Over the first limit (bytes read, uncompressed)."""
    agent_cpu_seconds: float | None = None
    """Median user + system CPU of the agent over the start (lazy modes)."""
    over_fetch_mb: dict[str, float] | None = None
    """Median MB before readiness per cause (bench/overfetch.py; lazy modes)."""
    steal_seconds: float | None = None
    """Median seconds the host took from this machine's vCPUs during a start."""


@dataclass
class SuiteReport:
    """The suite's outcome: per image measurements, table rows and the summary."""

    options: SuiteOptions
    images: list[ImageOutcome]
    rows: list[SuiteRow]
    limits: dict[str, float | None]
    """Per image, the compressed-bytes limit of its original layers (seconds)."""
    summary_line: str
    version_rows: list[VersionRow] = field(default_factory=list)
    versions_summary: str = ""
    """The new-version scenario's line (empty when it did not run)."""
    limits_old: dict[str, float | None] = field(default_factory=dict)
    """Per image, the first limit: the bytes read, uncompressed."""


# -- measuring ------------------------------------------------------------------------


def _lazy_run(setup: Setup, mode: str, repetition: int, run_dir: Path) -> RunResult:
    with_profile = mode.endswith(PROFILE_SUFFIX)
    form = mode.removesuffix(PROFILE_SUFFIX).removeprefix("lazy-")
    with lazy_node(setup, run_dir, use_profiles=with_profile, record_profiles=False) as node:
        return timed_lazy_start(setup, node, lazy_reference(setup, form), mode, repetition)


def measure_image(
    setup: Setup, options: SuiteOptions, image_number: int, progress: ProgressCallback
) -> tuple[dict[str, Learned], list[RunResult]]:
    """Learn (if profiles are on), then every mode ``repeat`` times, order rotating."""
    learned = {}
    if options.profiles:
        for form in options.forms:
            learned[form] = learn_profile(
                setup,
                form,
                starts=options.learn_starts,
                keep_runs=options.keep_runs,
                image_number=image_number,
                progress=progress,
                costing=form_costing(setup, form),
            )
    order = options.rotation()
    runs: list[RunResult] = []
    for repetition in range(1, options.repeat + 1):
        for mode in order:
            progress(f"{setup.image.name} {repetition}/{options.repeat}: {mode}")
            path = run_dir(setup, image_number, f"r{repetition}-{mode}")
            if mode == "overlayfs":
                runs += run_overlayfs(setup, repetition, path)
            elif mode in PEER_MODES:
                runs.append(run_peer(setup, mode, repetition, path))
            else:
                runs.append(_lazy_run(setup, mode, repetition, path))
            done_with(path, options.keep_runs)
            log.info("bench.done", image=setup.image.name, **asdict(runs[-1]))
        order = order[1:] + order[:1]
    return learned, runs


def load_image(name: str, options: SuiteOptions) -> ImageUnderTest:
    """A catalog image (built on first use) or the synthetic one."""
    if name == SYNTHETIC:
        return synthetic_image(options.cache_dir, options.synthetic_mb)
    return catalog_image(name, options.cache_dir)


def run_suite(options: SuiteOptions, progress: ProgressCallback) -> SuiteReport:
    """Measure every image behind one shaped link and one bench registry."""
    if options.repeat < 1 or options.learn_starts < 1:
        raise ValueError("repeat and learn_starts must be at least 1")
    unknown = set(options.forms) - set(FORMS)
    if unknown or not options.forms:
        raise ValueError(f"forms must be among {FORMS}, got {options.forms}")
    if options.new_versions and not options.profiles:
        raise ValueError("the new-version scenario needs profiles (v1's is what is inherited)")
    options.workdir.mkdir(parents=True, exist_ok=True)
    outcomes: list[ImageOutcome] = []
    with (
        ShapedLink(rate_mbit=options.rate_mbit, rtt_ms=options.rtt_ms) as link,
        shaped_registry(link, options.cache_dir, options.workdir) as (registry, host),
    ):
        for number, name in enumerate(options.images, 1):
            progress(f"{name}: build, publish and convert")
            image = load_image(name, options)
            try:
                published = asyncio.run(publish(image, host))
                setup = Setup(
                    link,
                    host,
                    image,
                    published,
                    options.workdir,
                    options.background_fill,
                    options.timeout,
                )
                learned, runs = measure_image(setup, options, number, progress)
                scenario = None
                if options.versions(name):
                    scenario = measure_versions(
                        setup,
                        options.versions(name),
                        forms=options.forms,
                        repeat=options.repeat,
                        learn_starts=options.learn_starts,
                        keep_runs=options.keep_runs,
                        cache_dir=options.cache_dir,
                        image_number=number,
                        progress=progress,
                    )
            except Exception:
                log.error(
                    "bench.failed",
                    image=name,
                    workdir=str(options.workdir),
                    registry_log=str(registry.log_path),
                )
                raise
            outcomes.append(
                ImageOutcome(
                    image.name,
                    image.compressed_bytes,
                    published.conversions,
                    learned,
                    runs,
                    scenario,
                )
            )
    return build_report(options, outcomes)


# -- summarizing ----------------------------------------------------------------------


def physical_limit(outcome: ImageOutcome, rate_mbit: float) -> float | None:
    """The first limit: local start + bytes the application reads, uncompressed, at link
    bandwidth (None without a learned profile to say how many bytes that is)."""
    return physical_limit_seconds(_warm_seconds(outcome), outcome.app_read_bytes, rate_mbit)


def compressed_limit(outcome: ImageOutcome, mode: str, rate_mbit: float) -> float | None:
    """Local start + the compressed bytes holding the ranges read, in ``mode``'s form, at
    link bandwidth (None without a priced profile)."""
    cost = outcome.cost(mode)
    limit_bytes = None if cost is None else cost.limit_bytes
    return physical_limit_seconds(_warm_seconds(outcome), limit_bytes, rate_mbit)


def run_over_fetch(outcome: ImageOutcome, run: RunResult) -> OverFetch | None:
    """A lazy run's bytes before readiness by cause (None for overlayfs or unpriced)."""
    cost = outcome.cost(run.mode)
    if cost is None or not run.mode.startswith("lazy-"):
        return None
    return over_fetch(run, cost, planned=run.mode.endswith(PROFILE_SUFFIX))


def _warm_seconds(outcome: ImageOutcome) -> list[float]:
    return [r.ready_seconds for r in outcome.runs if r.mode == "overlayfs-warm"]


def _app_mb(outcome: ImageOutcome, mode: str) -> float | None:
    """What the app read: exactly (read-ahead off) where that start was made, else as
    the learned profile saw it (with read-ahead windows)."""
    cost = outcome.cost(mode)
    if cost is not None:
        return cost.read_bytes / 1e6
    form = mode.removesuffix(PROFILE_SUFFIX).removeprefix("lazy-")
    learned = outcome.learned.get(form)
    if learned is not None:
        return learned.app_read_bytes / 1e6
    app_bytes = outcome.app_read_bytes
    return None if app_bytes is None else app_bytes / 1e6


def _mode_figures(outcome: ImageOutcome, mode: str) -> tuple[float | None, dict[str, float] | None]:
    """Median agent CPU seconds and median MB per over-fetch cause of ``mode``'s runs."""
    runs = [r for r in outcome.runs if r.mode == mode and r.agent_stats]
    if not runs:
        return None, None
    stats = [r.agent_stats for r in runs]
    cpu = statistics.median(
        s.get("agent_user_seconds", 0.0) + s.get("agent_system_seconds", 0.0) for s in stats
    )
    splits = [split for r in runs if (split := run_over_fetch(outcome, r)) is not None]
    if not splits:
        return cpu, None
    causes = {
        name: statistics.median(getattr(split, name) for split in splits) / 1e6
        for name in OverFetch.__dataclass_fields__
    }
    return cpu, causes


def _row(
    outcome: ImageOutcome, summary: ModeSummary, old_limit: float | None, rate_mbit: float
) -> SuiteRow:
    limit = compressed_limit(outcome, summary.mode, rate_mbit)
    cost = outcome.cost(summary.mode)
    cpu, causes = _mode_figures(outcome, summary.mode)
    runs = [r for r in outcome.runs if r.mode == summary.mode]
    return SuiteRow(
        outcome.name,
        summary.mode,
        summary.runs,
        summary.pull_seconds,
        summary.ready_seconds,
        summary.ready_min,
        summary.ready_max,
        summary.mb_before_ready,
        _app_mb(outcome, summary.mode),
        summary.speedup,
        None if limit is None else summary.ready_seconds / limit,
        None if cost is None else cost.limit_bytes / 1e6,
        limit,
        None if old_limit is None else summary.ready_seconds / old_limit,
        cpu,
        causes,
        statistics.median(r.steal_seconds for r in runs) if runs else None,
    )


def build_report(options: SuiteOptions, outcomes: list[ImageOutcome]) -> SuiteReport:
    """Per image x mode medians, each image's physical limit and the summary line."""
    rows: list[SuiteRow] = []
    limits: dict[str, float | None] = {}
    limits_old: dict[str, float | None] = {}
    version_rows_: list[VersionRow] = []
    for outcome in outcomes:
        old = physical_limit(outcome, options.rate_mbit)
        limits_old[outcome.name] = old
        limits[outcome.name] = compressed_limit(outcome, "overlayfs", options.rate_mbit)
        rows += [
            _row(outcome, s, old, options.rate_mbit)
            for s in summarize(outcome.runs, options.modes())
        ]
        if outcome.new_versions is not None:
            version_rows_ += version_rows(
                outcome.name,
                outcome.new_versions.versions,
                _warm_seconds(outcome),
                outcome.new_versions.first_digests,
                options.rate_mbit,
            )
    return SuiteReport(
        options,
        outcomes,
        rows,
        limits,
        summary_line(rows, len(outcomes)),
        version_rows_,
        versions_summary(version_rows_) if version_rows_ else "",
        limits_old,
    )


def summary_line(rows: Sequence[SuiteRow], images: int) -> str:
    """Median speedup (and distance to the physical limit) per mode across images."""
    parts = []
    for mode in dict.fromkeys(row.mode for row in rows):
        if mode == "overlayfs":
            continue
        of_mode = [row for row in rows if row.mode == mode]
        part = f"{mode} {statistics.median(r.speedup for r in of_mode):.1f}x"
        ratios = [r.times_limit for r in of_mode if r.times_limit is not None]
        old = [r.times_limit_old for r in of_mode if r.times_limit_old is not None]
        if ratios:
            part += f" ({statistics.median(ratios):.2f}x the limit"
            part += f", {statistics.median(old):.2f}x the first)" if old else ")"
        parts.append(part)
    return (
        f"median time-to-ready speedup vs full pull over {images} image(s): "
        + ", ".join(parts)
        + "; limit = local start + the compressed bytes holding what the app read"
        " / link bandwidth (first limit: those bytes uncompressed); agent CPU = the lazy"
        " daemon's, from the pull's start to readiness; host steal = CPU time the host"
        " took from this virtual machine over a start (seconds of it slow a start for the"
        " host's reasons)" + _versus_peer(rows)
    )


def _versus_peer(rows: Sequence[SuiteRow]) -> str:
    """Per image, the best acceld +profile mode's median ready time over the peer's
    optimized one (below 1: acceld starts faster); empty when either is missing."""
    parts = []
    for image in dict.fromkeys(row.image for row in rows):
        of_image = [row for row in rows if row.image == image]
        ours = [
            r for r in of_image if r.mode.startswith("lazy-") and r.mode.endswith(PROFILE_SUFFIX)
        ]
        peer = [r for r in of_image if r.mode == STARGZ_OPTIMIZED]
        if ours and peer:
            best = min(ours, key=lambda r: r.ready_seconds)
            ratio = best.ready_seconds / peer[0].ready_seconds
            parts.append(f"{image} {ratio:.2f}x ({best.mode})")
    if not parts:
        return ""
    return (
        f"; acceld+profile vs {STARGZ_OPTIMIZED} (ready time ratio, below 1 = acceld faster): "
        + ", ".join(parts)
    )


def suite_table(rows: Sequence[SuiteRow]) -> str:
    """The markdown table: one row per image x mode."""
    headers = [
        "image",
        "mode",
        "runs",
        "pull s",
        "ready s",
        "ready s (min-max)",
        "MB before ready",
        "MB read by app",
        "MB limit (compressed)",
        "agent CPU s",
        "host steal s",
        "speedup vs full pull",
        "x first limit",
        "x limit",
    ]
    body = [
        [
            r.image,
            r.mode,
            str(r.runs),
            f"{r.pull_seconds:.2f}",
            f"{r.ready_seconds:.2f}",
            f"{r.ready_min:.2f}-{r.ready_max:.2f}",
            f"{r.mb_before_ready:.1f}",
            _figure(r.mb_read_by_app, ".1f"),
            _figure(r.mb_limit, ".1f"),
            _figure(r.agent_cpu_seconds, ".2f"),
            _figure(r.steal_seconds, ".2f"),
            f"{r.speedup:.1f}x",
            _figure(r.times_limit_old, ".2f", "x"),
            _figure(r.times_limit, ".2f", "x"),
        ]
        for r in rows
    ]
    return markdown_table(headers, body)


def _figure(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


OVER_FETCH_HEADINGS = {
    "before_ready": "MB before ready",
    "limit": "limit",
    "granularity": "granularity",
    "read_ahead": "read-ahead",
    "prefetch_unread": "prefetch unread",
    "fill_unread": "fill unread",
    "coalescing": "coalescing gaps",
    "protocol": "metadata + protocol",
}


def over_fetch_table(rows: Sequence[SuiteRow]) -> str:
    """Per lazy mode, the median MB before readiness split by cause."""
    headers = ["image", "mode", *OVER_FETCH_HEADINGS.values(), "before ready / limit"]
    body = []
    for r in rows:
        if r.over_fetch_mb is None:
            continue
        causes = r.over_fetch_mb
        ratio = causes["before_ready"] / causes["limit"] if causes["limit"] else None
        body.append(
            [
                r.image,
                r.mode,
                *(f"{causes[name]:.1f}" for name in OVER_FETCH_HEADINGS),
                _figure(ratio, ".2f", "x"),
            ]
        )
    return markdown_table(headers, body)


def _link_text(options: SuiteOptions) -> str:
    return f"{options.rate_mbit:g} Mbit/s, {options.rtt_ms:g} ms RTT"


def suite_chart(report: SuiteReport, path: Path) -> Path:
    """Stacked pull + start bars per mode, one panel per image; below them, one panel
    per image version of the new-version scenario, if it ran."""
    panels = [
        Panel(
            outcome.name,
            [
                Bar(r.mode, r.pull_seconds, r.ready_seconds)
                for r in report.rows
                if r.image == outcome.name
            ],
            report.limits[outcome.name],
        )
        for outcome in report.images
    ]
    title = (
        f"time to ready (median of {report.options.repeat}), link "
        f"{_link_text(report.options)}, cold node per run"
    )
    versions = [
        panel
        for outcome in report.images
        if outcome.new_versions is not None
        for panel in version_panels(
            outcome.name, outcome.new_versions.versions, report.version_rows
        )
    ]
    return stacked_bars([panels, versions], path, title)


def document(report: SuiteReport, command: str) -> dict[str, Any]:
    """The JSON record: inputs, every run, the rows and the summary."""
    options = asdict(report.options)
    options["cache_dir"] = str(report.options.cache_dir)
    options["workdir"] = str(report.options.workdir)
    return {
        "command": command,
        "link": {"rate_mbit": report.options.rate_mbit, "rtt_ms": report.options.rtt_ms},
        "options": options,
        "app_read_bytes_source": APP_BYTES_SOURCE,
        "images": [
            {
                "name": o.name,
                "compressed_bytes": o.compressed_bytes,
                "app_read_bytes": o.app_read_bytes,
                "physical_limit_seconds": report.limits[o.name],
                "first_limit_seconds": report.limits_old.get(o.name),
                "conversions": o.conversions,
                "learned": {form: asdict(learned) for form, learned in o.learned.items()},
                "runs": [asdict(run) for run in o.runs],
                "new_versions": None if o.new_versions is None else asdict(o.new_versions),
            }
            for o in report.images
        ],
        "rows": [asdict(row) for row in report.rows],
        "summary_line": report.summary_line,
        "version_rows": [asdict(row) for row in report.version_rows],
        "versions_summary": report.versions_summary,
    }


def markdown(report: SuiteReport, command: str) -> str:
    """What goes into the README: the command, the link, the table and the summary."""
    sizes = ", ".join(f"{o.name} {o.compressed_bytes / 1e6:.0f} MB" for o in report.images)
    text = (
        f"`{command}` — link {_link_text(report.options)}, images (compressed) {sizes}\n\n"
        f"{suite_table(report.rows)}\n\n{report.summary_line}\n\n"
        f"{OVER_FETCH_HEADING}\n\n{OVER_FETCH_INTRO}\n\n{over_fetch_table(report.rows)}\n"
    )
    if report.version_rows:
        text += (
            f"\n{VERSIONS_HEADING}\n\n{VERSIONS_INTRO}\n\n"
            f"{versions_table(report.version_rows)}\n\n{report.versions_summary}\n"
        )
    return text


@dataclass(frozen=True)
class Outputs:
    """Where the results went."""

    json: Path
    markdown: Path
    chart: Path
    docs: tuple[Path, ...]


def write_outputs(
    report: SuiteReport, command: str, results_dir: Path, docs_dir: Path | None
) -> Outputs:
    """JSON, markdown and PNG into ``results_dir``; all three copied to ``docs_dir`` (the
    README embeds the chart) when given."""
    text = markdown(report, command)
    path = write_results("suite", document(report, command), text.rstrip("\n"), results_dir)
    chart = suite_chart(report, path.with_suffix(".png"))
    docs: tuple[Path, ...] = ()
    if docs_dir is not None:
        docs_dir.mkdir(parents=True, exist_ok=True)
        docs = tuple(docs_dir / f"{DOCS_STEM}{suffix}" for suffix in (".png", ".md", ".json"))
        shutil.copyfile(chart, docs[0])
        shutil.copyfile(path.with_suffix(".md"), docs[1])
        shutil.copyfile(path, docs[2])
    return Outputs(path, path.with_suffix(".md"), chart, docs)


@contextmanager
def rich_progress(total: int, console: Console) -> Iterator[ProgressCallback]:
    """A progress bar (k of n steps, what is running, elapsed) fed by the suite."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("starting", total=total)
        started = False

        def step(label: str) -> None:
            nonlocal started
            if started:
                progress.advance(task)
            started = True
            progress.update(task, description=label)
            progress.console.log(label)

        yield step
        progress.update(task, completed=total, description="done")


def quick_options(options: SuiteOptions) -> SuiteOptions:
    """The few-minute variant: one image unless chosen, one repetition, the index form."""
    images = options.images if options.images != DEFAULT_IMAGES else QUICK_IMAGES
    return replace(options, images=images, repeat=1, forms=("index",))
