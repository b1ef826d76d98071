"""Time-to-ready of a container: full pull with containerd's overlayfs vs acceld lazy.

The figure acceld exists for. One run builds (or takes from its cache) an image, serves
it from a real registry inside a shaped network namespace (`rig.shaped_link`: default
300 Mbit/s and 5 ms RTT, so pulling costs what it costs on a real link), converts it
with the real converter in both accelerated forms, then measures, alternating modes
and each time from a cold node (fresh containerd on a fresh tmpfs root, fresh agent
and chunk cache, page caches dropped):

* ``overlayfs``       CRI pull of the original image (fetch + unpack), then run;
* ``overlayfs-warm``  the same node again: the image is local, only the run is timed;
* ``lazy-index``      CRI pull through acceld of the original image, served from its
                      index-only artifact (the original gzip layers read in place);
* ``lazy-full``       CRI pull through acceld of the eStargz `<tag>_accelerated` image.

Time runs from the pull request to the readiness probe firing (a line the container
prints, seen on the `ctr run` output stream, as a kubelet's probe would see it). Bytes
are what crossed the link from the registry's namespace by then (veth counters, so
TCP/IP headers included); for lazy runs the agent's own per-priority fetch counters are
recorded too. Usage: ``python -m bench.startup [--quick] [--repeat N] ...``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click
from prometheus_client.parser import text_string_to_metric_families

from accelctl.demo import demo_image_spec
from bench import catalog
from bench.readiness import LogLineProbe, NotReadyError, ReadinessProbe
from bench.report import RESULTS_DIR, markdown_table, write_results
from common.logging import configure_logging, get_logger
from converter.convert import ConvertOptions, convert_image
from converter.progress import LayerProgress
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from formats.accelerated import accelerated_tag
from rig.agent_process import AgentProcess
from rig.containerd import ACCELD_SNAPSHOTTER, CRI_NAMESPACE, ContainerdServer
from rig.images import BuiltImage, build_image, push_image
from rig.registry import RegistryServer
from rig.shaped_link import ShapedLink

log = get_logger(__name__)

DEFAULT_CACHE = catalog.DEFAULT_CACHE
DEFAULT_WORKDIR = Path("/var/tmp/acceld-bench/work")
TARGET_SPEEDUP = 5.0
SYNTHETIC = "synthetic"
MODES = ("overlayfs", "overlayfs-warm", "lazy-index", "lazy-full")
_TAG = "v1"


def drop_page_caches() -> None:
    """Write back and drop the page cache, dentries and inodes: the next read hits disk."""
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


# -- the image under test ---------------------------------------------------------------


@dataclass(frozen=True)
class ImageUnderTest:
    """An image plus how to tell that a container started from it is ready."""

    name: str
    built: BuiltImage
    probe: ReadinessProbe

    @property
    def compressed_bytes(self) -> int:
        """Sum of the layer blobs: what a full pull must download."""
        return sum(layer.size for layer in self.built.layers)


def synthetic_image(cache_dir: Path, data_mb: int) -> ImageUnderTest:
    """The demo image (busybox plus ``data_mb`` MiB of random data its start never reads)."""
    layout = cache_dir / "layouts" / f"{SYNTHETIC}-{data_mb}"
    built = build_image(demo_image_spec(data_mb), layout, _TAG)
    return ImageUnderTest(f"{SYNTHETIC}-{data_mb}m", built, LogLineProbe(r"demo app ready"))


def catalog_image(name: str, cache_dir: Path) -> ImageUnderTest:
    """An image from `bench.catalog`, built once into ``cache_dir``."""
    entry = catalog.CATALOG[name]
    built = catalog.build(name, cache_dir)
    return ImageUnderTest(name, built, LogLineProbe(entry.ready_pattern))


# -- registry, link and published forms ---------------------------------------------------


@dataclass(frozen=True)
class Published:
    """References (as containerd sees them, through the link's proxy) of each form."""

    original: str
    estargz: str
    conversions: dict[str, dict[str, float]]


async def publish(image: ImageUnderTest, host: str, tag: str = _TAG) -> Published:
    """Push the image twice as ``tag`` and convert one copy per mode.

    Two repositories, because the agent prefers a full-mode twin `<tag>_accelerated`
    over an index artifact: with both in one repository, ``lazy-index`` would silently
    measure the eStargz form. Versions of one image share the two repositories.
    """
    original = f"{host}/bench/{image.name}:{tag}"
    twin = f"{host}/bench/{image.name}-estargz:{tag}"
    conversions: dict[str, dict[str, float]] = {}
    async with RegistryClient(plain_http_hosts={host}) as client:
        for reference, mode in ((original, "index"), (twin, "full")):
            await push_image(client, reference, image.built)
            result = await convert_image(
                client,
                ImageReference.parse(reference),
                ConvertOptions(mode=mode),
                LayerProgress(interactive=False),
            )
            conversions[mode] = {
                "seconds": round(result.seconds, 2),
                "skipped_existing": float(result.skipped),
                "output_bytes": float(result.output_bytes),
            }
    estargz = str(ImageReference.parse(twin).with_tag(accelerated_tag(tag)))
    return Published(original, estargz, conversions)


class LinkCounter:
    """Bytes that crossed the shaped link towards the host (registry -> clients)."""

    def __init__(self, link: ShapedLink) -> None:
        self._path = Path(f"/sys/class/net/{link.netns.host_veth}/statistics/rx_bytes")
        self._start = self._read()

    def _read(self) -> int:
        return int(self._path.read_text())

    def since_start(self) -> int:
        """Bytes received since this counter was made."""
        return self._read() - self._start


# -- one measured run ---------------------------------------------------------------------


@dataclass
class RunResult:
    """One cold (or, for overlayfs-warm, warm) start of the image in one mode."""

    mode: str
    repetition: int
    pull_seconds: float
    ready_seconds: float
    link_bytes_before_ready: int
    agent_fetch_bytes: dict[str, float] = field(default_factory=dict)
    lazy_layers: float = 0.0
    fallback_layers: float = 0.0
    agent_stats: dict[str, float] = field(default_factory=dict)
    profile_origin: str | None = None
    """Whose profile the agent's plan came from ("own", "inherited", "none"), as its
    ``profile.loaded`` record says; None when it logged none or no origin."""
    inherited_from: str | None = None
    """For an inherited profile, the manifest digest it was taken from."""
    profile_entries: int | None = None
    """Entries of the plan the agent made of that profile (None: it loaded none)."""
    steal_seconds: float = 0.0
    """CPU time the host took from this machine's vCPUs during the start (`steal_seconds`)."""


def ctr_run_command(
    server: ContainerdServer, image: str, container_id: str, snapshotter: str
) -> list[str]:
    """`ctr run --rm` of a CRI-pulled image, with runc state and IO FIFOs in the server's
    work dir: run from a Popen, so a probe can watch its output while it runs."""
    return [
        "ctr", "--address", str(server.address), "--namespace", CRI_NAMESPACE,
        "run", "--rm", "--runc-root", str(server.runc_root), "--fifo-dir", str(server.fifo_dir),
        "--snapshotter", snapshotter, image, container_id,
    ]  # fmt: skip


def start_until_ready(
    server: ContainerdServer,
    image: str,
    snapshotter: str,
    probe: ReadinessProbe,
    timeout: float,
    at_ready: Callable[[], None] | None = None,
) -> float:
    """`ctr run` the image and return when ``probe`` fires; the container is then stopped.

    A server never exits by itself, so after readiness the task is killed; `--rm` then
    removes the container, and `ContainerdServer.stop` sweeps anything left.
    ``at_ready`` is called as the probe fires, before the stop (which takes seconds).
    """
    container_id = f"bench-{uuid.uuid4().hex[:10]}"
    command = ctr_run_command(server, image, container_id, snapshotter)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as process:
        try:
            ready = probe.wait(process, time.monotonic() + timeout)
            if at_ready is not None:
                at_ready()
        except NotReadyError as exc:
            raise NotReadyError(f"{' '.join(command)}: {exc}") from None
        finally:
            _stop_container(server, process, container_id)
    return ready


def _stop_container(
    server: ContainerdServer, process: subprocess.Popen[bytes], container_id: str
) -> None:
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        server.ctr(
            "tasks", "kill", "-s", "SIGKILL", container_id, namespace=CRI_NAMESPACE, check=False
        )
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass(frozen=True)
class Setup:
    """What every run shares: the link, the published image and how long to wait."""

    link: ShapedLink
    registry_host: str
    image: ImageUnderTest
    published: Published
    workdir: Path
    background_fill: bool
    timeout: float
    profiles: bool = False


@dataclass(frozen=True)
class ColdStart:
    """One start timed from its CRI pull: every cold mode, acceld's and the peer's."""

    pull_seconds: float
    ready_seconds: float
    link_bytes: int
    """Bytes the link carried from the pull's start to readiness."""
    daemon_cpu: tuple[float, float] = (0.0, 0.0)
    """User and system CPU seconds the lazy daemon spent from the pull's start to
    readiness: its start-up (imports, eBPF compile) and the container's stop are
    another matter than what serving this start cost."""
    steal_seconds: float = 0.0
    """Steal over the same span (`steal_seconds`)."""


def cold_start(
    server: ContainerdServer,
    reference: str,
    snapshotter: str,
    setup: Setup,
    daemon_pid: int | None = None,
) -> ColdStart:
    """CRI pull of ``reference`` with the page caches dropped first, then run it with
    ``snapshotter`` until the image's readiness probe fires; ``daemon_pid``'s CPU is
    counted over that span."""
    drop_page_caches()
    counter = LinkCounter(setup.link)
    spent: list[tuple[float, float]] = []
    stolen: list[float] = []

    def sample() -> None:
        stolen.append(steal_seconds())
        if daemon_pid is not None:
            spent.append(cpu_seconds(daemon_pid))

    sample()
    started = time.monotonic()
    server.cri_pull_image(reference, timeout=setup.timeout)
    pulled = time.monotonic()
    ready = start_until_ready(
        server, reference, snapshotter, setup.image.probe, setup.timeout, sample
    )
    cpu = (0.0, 0.0)
    if len(spent) == 2:
        cpu = (spent[1][0] - spent[0][0], spent[1][1] - spent[0][1])
    steal = stolen[-1] - stolen[0]
    return ColdStart(pulled - started, ready - started, counter.since_start(), cpu, steal)


def run_overlayfs(setup: Setup, repetition: int, run_dir: Path) -> list[RunResult]:
    """Full pull with containerd's overlayfs, then a second start with the image local."""
    reference = setup.published.original
    with ContainerdServer(run_dir / "ctrd", snapshotter="overlayfs") as server:
        first = cold_start(server, reference, "overlayfs", setup)
        cold = RunResult(
            "overlayfs",
            repetition,
            first.pull_seconds,
            first.ready_seconds,
            first.link_bytes,
            steal_seconds=first.steal_seconds,
        )
        drop_page_caches()
        counter = LinkCounter(setup.link)
        stolen = steal_seconds()
        started = time.monotonic()
        ready = start_until_ready(server, reference, "overlayfs", setup.image.probe, setup.timeout)
        warm = RunResult(
            "overlayfs-warm",
            repetition,
            0.0,
            ready - started,
            counter.since_start(),
            steal_seconds=steal_seconds() - stolen,
        )
    return [cold, warm]


def lazy_reference(setup: Setup, form: str) -> str:
    """What containerd pulls for a lazy ``form``: the original image (served from its
    index-only artifact) for ``index``, the eStargz twin for ``full``."""
    if form not in ("index", "full"):
        raise ValueError(f"unknown lazy form {form!r}")
    return setup.published.original if form == "index" else setup.published.estargz


@contextlib.contextmanager
def lazy_node(
    setup: Setup,
    run_dir: Path,
    *,
    use_profiles: bool,
    record_profiles: bool,
    inherit_profiles: bool = False,
    read_ahead_kib: int | None = None,
) -> Iterator[tuple[AgentProcess, ContainerdServer]]:
    """A cold node: a fresh acceld agent (empty cache) and a containerd that uses it.

    Learned profiles live in the (cached) bench registry and would turn "no profile"
    runs into profile runs: whether the agent reads them, whether it takes a
    predecessor's when the image has none (``inherit_profiles``; off unless asked, so a
    "+profile" run measures the image's own) and whether it records new ones, is
    always stated explicitly. ``read_ahead_kib`` overrides the mount's read-ahead (0:
    every read reaches FUSE as the application made it).
    """
    settings: dict[str, object] = {
        "profiles": use_profiles,
        "profile_inheritance": inherit_profiles,
        "record_profiles": record_profiles,
        "background_fill": setup.background_fill,
    }
    if record_profiles:
        # A recording must cover the whole start however long it takes here (a start
        # with read-ahead off on a big image outlasts the agent's default window);
        # a window cut at the deadline teaches nothing.
        settings["trace_deadline_s"] = setup.timeout
    if read_ahead_kib is not None:
        settings["read_ahead_kib"] = read_ahead_kib
    with (
        AgentProcess(
            run_dir / "agent", plain_http=[setup.registry_host], settings=settings
        ) as agent,
        ContainerdServer(
            run_dir / "ctrd", snapshotter=ACCELD_SNAPSHOTTER, acceld_socket=agent.socket
        ) as server,
    ):
        yield agent, server


def timed_lazy_start(
    setup: Setup,
    node: tuple[AgentProcess, ContainerdServer],
    reference: str,
    mode: str,
    repetition: int,
) -> RunResult:
    """CRI pull of ``reference`` through the node's agent, then run until ready."""
    agent, server = node
    try:
        start = cold_start(server, reference, ACCELD_SNAPSHOTTER, setup, agent.pid)
    except Exception:
        log.error("bench.lazy_run_failed", agent_log=str(agent.log_path))
        raise
    fallbacks = agent.metric("acceld_fallbacks_total")
    fetched, stats = agent_figures(agent)
    stats["agent_user_seconds"], stats["agent_system_seconds"] = start.daemon_cpu
    loaded = profile_loaded(agent.log_path)
    return RunResult(
        mode,
        repetition,
        start.pull_seconds,
        start.ready_seconds,
        start.link_bytes,
        fetched,
        agent.metric("acceld_layers_total") - fallbacks,
        fallbacks,
        stats,
        loaded.origin,
        loaded.inherited_from,
        loaded.entries,
        start.steal_seconds,
    )


@dataclass(frozen=True)
class ProfileLoaded:
    """What the agent's last ``profile.loaded`` record said (all None without one)."""

    origin: str | None = None
    inherited_from: str | None = None
    entries: int | None = None


def profile_loaded(agent_log: Path) -> ProfileLoaded:
    """The last profile the agent loaded, from its (JSON) log.

    A run's figures mean little without knowing whether the plan was the image's own,
    a predecessor's or none; a field the agent does not log (yet) stays None.
    """
    found = ProfileLoaded()
    try:
        lines = agent_log.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return found
    for line in lines:
        if '"profile.loaded"' not in line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == "profile.loaded":
            origin, source, entries = (
                record.get("origin"),
                record.get("inherited_from"),
                record.get("entries"),
            )
            found = ProfileLoaded(
                origin if isinstance(origin, str) else None,
                source if isinstance(source, str) else None,
                entries if isinstance(entries, int) else None,
            )
    return found


def run_lazy(setup: Setup, mode: str, repetition: int, run_dir: Path) -> RunResult:
    """One cold lazy start (``mode`` lazy-index or lazy-full); profiles per ``setup``."""
    form = mode.removeprefix("lazy-")
    profiles = setup.profiles
    with lazy_node(setup, run_dir, use_profiles=profiles, record_profiles=profiles) as node:
        return timed_lazy_start(setup, node, lazy_reference(setup, form), mode, repetition)


_AGENT_STATS = {
    "acceld_range_requests_total": "range_requests_{priority}",
    "acceld_range_request_seconds_sum": "range_seconds_{priority}",
    "acceld_fuse_ops_total": "fuse_{op}_ops",
    "acceld_fuse_op_seconds_sum": "fuse_{op}_seconds",
    "acceld_fuse_errors_total": "fuse_{op}_{errno}",
    "acceld_fetch_chunk_bytes_total": "chunk_bytes_{priority}",
    "acceld_unread_chunk_bytes": "unread_bytes_{priority}",
    "acceld_stream_bytes_open": "stream_open_{priority}",
    "acceld_stream_bytes_total": "stream_bytes_{priority}",
    "acceld_cache_hits_total": "cache_hits",
    "acceld_cache_misses_total": "cache_misses",
}
"""The agent's series kept per run, and the key each sample is kept under (its labels
filled in)."""


def agent_figures(agent: AgentProcess) -> tuple[dict[str, float], dict[str, float]]:
    """Compressed bytes fetched by priority, and where a lazy start's time went: round
    trips by priority, time FUSE reads waited; and the chunk bytes fetched and not yet
    read, by priority, which bench/overfetch.py splits by cause.

    These explain a ready time (a start is usually bound by sequential demand round
    trips, not bandwidth), so they are kept in the JSON next to it.
    """
    fetched: dict[str, float] = {}
    stats: dict[str, float] = {}
    for family in text_string_to_metric_families(agent.metrics()):
        for sample in family.samples:
            if sample.name == "acceld_fetch_bytes_total":
                fetched[sample.labels["priority"]] = sample.value
            elif sample.name in _AGENT_STATS:
                stats[_AGENT_STATS[sample.name].format(**sample.labels)] = sample.value
    return fetched, stats


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU time of a process so far: on two cores the agent competes with
    the application it serves, so its CPU cost is part of a start's critical path."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def steal_seconds() -> float:
    """CPU time the host has taken from this virtual machine's vCPUs so far (all of
    them): seconds of it during a start slow the start for reasons of the host's, not
    acceld's, so the suite reports them beside each time."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK")


def measure(setup: Setup, repeat: int) -> list[RunResult]:
    """Every mode ``repeat`` times; the mode order rotates so no mode always goes first."""
    order = ["overlayfs", "lazy-index", "lazy-full"]
    results: list[RunResult] = []
    for repetition in range(1, repeat + 1):
        for mode in order:
            run_dir = setup.workdir / f"r{repetition}-{mode}"
            log.info("bench.run", mode=mode, repetition=repetition, dir=str(run_dir))
            if mode == "overlayfs":
                results += run_overlayfs(setup, repetition, run_dir)
            else:
                results.append(run_lazy(setup, mode, repetition, run_dir))
            shutil.rmtree(run_dir, ignore_errors=True)
            log.info("bench.done", **asdict(results[-1]))
        order = order[1:] + order[:1]
    return results


# -- reporting ------------------------------------------------------------------------


@dataclass
class ModeSummary:
    """Medians over the repetitions of one mode."""

    mode: str
    runs: int
    pull_seconds: float
    ready_seconds: float
    ready_min: float
    ready_max: float
    mb_before_ready: float
    speedup: float


def summarize(results: list[RunResult], modes: Sequence[str] = MODES) -> list[ModeSummary]:
    """Per-mode medians (in ``modes`` order); speedup is the overlayfs cold median over
    this mode's median."""
    by_mode = {mode: [r for r in results if r.mode == mode] for mode in modes}
    baseline = statistics.median(r.ready_seconds for r in by_mode["overlayfs"])
    summaries = []
    for mode, runs in by_mode.items():
        if not runs:
            continue
        ready = [r.ready_seconds for r in runs]
        summaries.append(
            ModeSummary(
                mode,
                len(runs),
                statistics.median(r.pull_seconds for r in runs),
                statistics.median(ready),
                min(ready),
                max(ready),
                statistics.median(r.link_bytes_before_ready for r in runs) / 1e6,
                baseline / statistics.median(ready),
            )
        )
    return summaries


def physical_limit_seconds(
    warm_seconds: Sequence[float], app_bytes: int | None, rate_mbit: float
) -> float | None:
    """The start no loader can beat on this link: the local (warm) start's median plus
    the bytes the application reads at link bandwidth (None without either)."""
    if not warm_seconds or app_bytes is None:
        return None
    return statistics.median(warm_seconds) + app_bytes * 8 / (rate_mbit * 1e6)


def summary_table(summaries: list[ModeSummary]) -> str:
    """The table printed at the end and saved next to the JSON."""
    headers = [
        "mode",
        "runs",
        "pull s",
        "ready s (median)",
        "ready s (min-max)",
        "MB before ready",
        "speedup vs full pull",
    ]
    rows = [
        [
            s.mode,
            str(s.runs),
            f"{s.pull_seconds:.2f}",
            f"{s.ready_seconds:.2f}",
            f"{s.ready_min:.2f}-{s.ready_max:.2f}",
            f"{s.mb_before_ready:.1f}",
            f"{s.speedup:.1f}x",
        ]
        for s in summaries
    ]
    return markdown_table(headers, rows)


def summary_line(summaries: list[ModeSummary]) -> str:
    """One line: the lazy speedups against the target."""
    lazy = [s for s in summaries if s.mode.startswith("lazy-")]
    best = max(s.speedup for s in lazy)
    verdict = "MET" if best >= TARGET_SPEEDUP else "MISSED"
    parts = ", ".join(f"{s.mode} {s.speedup:.1f}x" for s in lazy)
    return (
        f"time-to-ready speedup of lazy vs full pull: {parts} "
        f"(target >= {TARGET_SPEEDUP:.0f}x: {verdict})"
    )


# -- the command ----------------------------------------------------------------------


@contextlib.contextmanager
def shaped_registry(
    link: ShapedLink, cache_dir: Path, workdir: Path
) -> Iterator[tuple[RegistryServer, str]]:
    """A registry inside the link's namespace; yields it and the host clients use.

    Its storage lives in the cache so pushes and conversions are reused across bench
    invocations (the converter skips a conversion already published for the source).
    """
    registry = RegistryServer(
        workdir / "registry",
        host=link.ns_address,
        command_prefix=link.command_prefix,
        storage_dir=cache_dir / "registry-storage",
    )
    with registry:
        host, port = link.client_endpoint(registry.port)
        yield registry, f"{host}:{port}"


def run_benchmark(
    image: ImageUnderTest,
    *,
    repeat: int,
    rate_mbit: float,
    rtt_ms: float,
    cache_dir: Path,
    workdir: Path,
    background_fill: bool,
    timeout: float,
    profiles: bool = False,
) -> tuple[dict[str, object], list[ModeSummary]]:
    """Publish, measure and summarize; returns the JSON document and the summaries."""
    workdir.mkdir(parents=True, exist_ok=True)
    with (
        ShapedLink(rate_mbit=rate_mbit, rtt_ms=rtt_ms) as link,
        shaped_registry(link, cache_dir, workdir) as (registry, host),
    ):
        published = asyncio.run(publish(image, host))
        setup = Setup(link, host, image, published, workdir, background_fill, timeout, profiles)
        try:
            results = measure(setup, repeat)
        except Exception:
            log.error("bench.failed", workdir=str(workdir), registry_log=str(registry.log_path))
            raise
    summaries = summarize(results)
    document = {
        "image": image.name,
        "image_compressed_bytes": image.compressed_bytes,
        "link": {"rate_mbit": rate_mbit, "rtt_ms": rtt_ms},
        "background_fill": background_fill,
        "profiles": profiles,
        "conversions": published.conversions,
        "runs": [asdict(r) for r in results],
        "summary": [asdict(s) for s in summaries],
        "summary_line": summary_line(summaries),
    }
    return document, summaries


@click.command()
@click.option(
    "--image",
    "image_name",
    help=f"A bench.catalog image (default python-scipy), or '{SYNTHETIC}' "
    "(busybox + --data-mb MiB of random data its start never reads).",
)
@click.option("--quick", is_flag=True, help=f"One repetition; the image defaults to '{SYNTHETIC}'.")
@click.option("--repeat", default=3, show_default=True, help="Repetitions per mode.")
@click.option("--rate-mbit", default=300.0, show_default=True, help="Link bandwidth.")
@click.option("--rtt-ms", default=5.0, show_default=True, help="Link round-trip time.")
@click.option("--data-mb", default=64, show_default=True, help="Synthetic image data size.")
@click.option(
    "--background-fill/--no-background-fill",
    default=True,
    show_default=True,
    help="Let the agent fetch whole layers in the background (its default).",
)
@click.option(
    "--profiles/--no-profiles",
    default=False,
    show_default=True,
    help="Let the agents use (and record) learned profiles from the bench registry.",
)
@click.option("--timeout", default=600.0, show_default=True, help="Seconds per pull or start.")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_CACHE,
    show_default=True,
    help="Built images, registry storage.",
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_WORKDIR,
    show_default=True,
    help="Per-run state (kept on failure).",
)
@click.option(
    "--results-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=RESULTS_DIR,
    show_default=True,
)
def main(
    image_name: str | None,
    quick: bool,
    repeat: int,
    rate_mbit: float,
    rtt_ms: float,
    data_mb: int,
    background_fill: bool,
    profiles: bool,
    timeout: float,
    cache_dir: Path,
    workdir: Path,
    results_dir: Path,
) -> None:
    """Measure time-to-ready: full pull (overlayfs) vs acceld lazy (index and eStargz)."""
    configure_logging()
    if quick:
        repeat = 1
    image_name = image_name or (SYNTHETIC if quick else "python-scipy")
    if image_name == SYNTHETIC:
        image = synthetic_image(cache_dir, data_mb)
    else:
        image = catalog_image(image_name, cache_dir)
    document, summaries = run_benchmark(
        image,
        repeat=repeat,
        rate_mbit=rate_mbit,
        rtt_ms=rtt_ms,
        cache_dir=cache_dir,
        workdir=workdir / time.strftime("%Y%m%d-%H%M%S"),
        background_fill=background_fill,
        timeout=timeout,
        profiles=profiles,
    )
    table = summary_table(summaries)
    path = write_results("startup", document, table, results_dir)
    click.echo(
        f"\nimage {image.name}: {image.compressed_bytes / 1e6:.1f} MB compressed, link "
        f"{rate_mbit:g} Mbit/s, {rtt_ms:g} ms RTT\n"
    )
    click.echo(table)
    click.echo(f"\n{document['summary_line']}\nresults: {path}")


if __name__ == "__main__":
    main()
