"""Scale-up: N containers of mixed images started together on a cold node (issue 20).

When a node joins a cluster, or a Deployment scales out, the kubelet starts many pods at
once. Every other benchmark here starts one container at a time, so none of them saw
how a node copes when N pulls and N starts share the agent's event loop, FUSE, the
chunk cache, the link and two cores; a deadlock that needs several starts at once went
unseen. This benchmark starts N containers together and reports:

* per container, the seconds from the common start to its readiness line, and for the
  trial the seconds until the last one was ready (all-ready);
* bytes over the shaped link (veth counters) and the agent's fetched bytes, the agent's
  CPU seconds (its own utime + stime, children excluded) and peak RSS (VmHWM; a fresh
  agent per trial), and the agent watchdog's worst event-loop stall where the agent
  exports it (``n/a`` otherwise);
* hangs: a container not ready by the trial's deadline. The node's state is captured
  while it is still stuck (the agent's /healthz, the kernel stacks of its threads and
  of every thread on the machine stuck in D state or on a FUSE answer, the requests
  its FUSE connection has not answered, the agent's log tail), then the node is
  unwedged (tasks killed, the agent's FUSE connection aborted, agent and containerd
  stopped; `rig.hangs`) so the next trial runs on a healthy machine;
* wrong bytes: once every container is ready, each one still running lists the files
  its processes have mapped (programs, shared libraries: bytes its start surely read);
  then page caches are dropped and, per container, a second container of the same
  image prints the md5 of those files and of a few chosen ones, all with sums known
  from the image's layers (`bench.file_sums`), judged like the soak's
  (`rig.chaos.verdict`). containerd's overlayfs is checked the same way, as a control
  of the expected sums themselves.

A trial follows `bench.startup`'s cold-node procedure (fresh containerd on a fresh
tmpfs root, fresh agent and chunk cache, page caches dropped, registry behind
`rig.shaped_link`, both accelerated forms published by `bench.startup.publish`). Each
container is pulled through CRI, then run with `ctr run`, as `bench.startup` does for
one; one thread per container, released together by a barrier. Pulls run in parallel,
as a kubelet does with ``serializeImagePulls: false``.

Modes: ``overlayfs`` (containerd's own, full pull), ``lazy-index`` (acceld, original
image from its index-only artifact) and ``lazy-full`` (acceld, the eStargz
`<tag>_accelerated` twin); no learned profiles are read or recorded. Images cycle
through ``--images``, so N beyond the list starts replicas, as a scaled-out Deployment
does. The command exits 1 if any trial hung or read wrong bytes.

Usage: ``python -m bench.scaleup [--n 1,3,6] [--repeat 3] [--images a,b] [--quick]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import click
from prometheus_client.parser import text_string_to_metric_families

from bench import catalog
from bench.chart import Line, Point, lines_with_ranges
from bench.file_sums import SAFE_PATH, ImageFiles, image_files
from bench.memory import peak_rss
from bench.readiness import LogLineProbe, ReadinessProbe
from bench.report import NOT_AVAILABLE, RESULTS_DIR, markdown_table, write_results
from bench.startup import (
    ImageUnderTest,
    LinkCounter,
    Setup,
    agent_figures,
    catalog_image,
    cpu_seconds,
    ctr_run_command,
    drop_page_caches,
    lazy_node,
    lazy_reference,
    publish,
    shaped_registry,
)
from common.logging import configure_logging, get_logger
from rig import hangs
from rig.agent_process import AgentProcess
from rig.chaos import DATA_DIR, checkable_image, verdict
from rig.containerd import ACCELD_SNAPSHOTTER, CRI_NAMESPACE, ContainerdServer
from rig.images import build_image
from rig.shaped_link import ShapedLink

log = get_logger(__name__)

MODES = ("overlayfs", "lazy-index", "lazy-full")
DEFAULT_IMAGES = ("python-fat-api", "node-http", "postgres", "gcc-hello", "python-scipy")
"""A service mix: a fat Python API, a Node front end and a database at N=3; a build job
and a data-science job join at N=6, with a second replica of the API. About 1 GB of
gzip for overlayfs to pull at N=6: ~30 s of a 300 Mbit/s link, plus unpacking."""
DEFAULT_NS = (1, 3, 6)
QUICK_IMAGES = ("checkable-1", "checkable-2")
"""Tiny busybox images (`rig.chaos.checkable_image`) whose start reads 12 MiB of data."""
QUICK_NS = (1, 2)
CHECKABLE_PREFIX = "checkable-"
DEFAULT_DEADLINE_S = 180.0
QUICK_DEADLINE_S = 60.0
VERIFY_TIMEOUT_S = 60.0
MAPPED_LIMIT = 48
"""Most mapped files checked per container (a Python service maps a few dozen)."""
"""A check container not done by then counts as a hang of its container."""
PROBE_TIMEOUT_S = 2.0
"""How long /healthz or /metrics may take: a healthy agent answers in milliseconds."""
STOP_TIMEOUT_S = 15.0
_LATE_S = 0.5
"""A start that failed this close to the deadline failed because of it: a hang."""
DEFAULT_WORKDIR = Path("/var/tmp/acceld-bench/scaleup")
WATCHDOG_SERIES = {
    "acceld_watchdog_worst_loop_stall_seconds": "worst_loop_stall_seconds",
    "acceld_watchdog_worst_loop_lag_seconds": "worst_loop_lag_seconds",
    "acceld_watchdog_loop_stalls_total": "loop_stalls",
    "acceld_watchdog_stalled_fuse_requests_total": "stalled_fuse_requests",
    "acceld_watchdog_oldest_fuse_request_seconds": "oldest_fuse_request_seconds",
}
"""The agent watchdog's series (sample name -> key in the results), read when exported."""


# -- images ---------------------------------------------------------------------------


def checkable(seed: int, cache_dir: Path, pause_s: int = 0) -> ImageUnderTest:
    """A `rig.chaos` checkable image (busybox + four 3 MiB data files; distinct per seed)
    whose start reads its data, then prints ``ready``; with ``pause_s``, it sleeps that
    long before reading (a test then has time to freeze the agent under it)."""
    image = checkable_image(seed)
    script = f"md5sum /{DATA_DIR}/*.bin && echo ready"
    if pause_s:
        script = f"sleep {pause_s} && {script}"
    spec = replace(image.spec, config=replace(image.spec.config, cmd=("/bin/sh", "-c", script)))
    name = f"{CHECKABLE_PREFIX}{seed}" + (f"-pause{pause_s}" if pause_s else "")
    built = build_image(spec, cache_dir / "layouts" / name, "v1")
    return ImageUnderTest(name, built, LogLineProbe(r"^ready$"))


def load_image(name: str, cache_dir: Path) -> ImageUnderTest:
    """``checkable-<seed>``, or a `bench.catalog` image (built on first use)."""
    if name.startswith(CHECKABLE_PREFIX):
        return checkable(int(name.removeprefix(CHECKABLE_PREFIX)), cache_dir)
    return catalog_image(name, cache_dir)


@dataclass(frozen=True)
class Target:
    """One published image: how to pull it in each mode, and the sums a check expects."""

    setup: Setup
    files: ImageFiles

    @property
    def name(self) -> str:
        """The image's name."""
        return self.setup.image.name

    @property
    def probe(self) -> ReadinessProbe:
        """How to tell that its container is ready."""
        return self.setup.image.probe

    def reference(self, mode: str) -> str:
        """What containerd pulls in ``mode``."""
        if mode == "overlayfs":
            return self.setup.published.original
        return lazy_reference(self.setup, mode.removeprefix("lazy-"))


@dataclass(frozen=True)
class Plan:
    """What every trial shares."""

    targets: tuple[Target, ...]
    deadline: float
    workdir: Path
    keep_runs: bool

    def for_trial(self, n: int) -> list[Target]:
        """The images of N containers: the list, cycled."""
        return [self.targets[i % len(self.targets)] for i in range(n)]


# -- one container --------------------------------------------------------------------


@dataclass
class ContainerRun:
    """One container of a trial: how far it got, and when."""

    slot: int
    image: str
    reference: str
    container_id: str
    outcome: str = "pending"
    """``ready``, ``failed`` (an error before the deadline) or ``hang``."""
    stage: str = "waiting"
    """Where it was last: waiting, pulling, starting, ready (or verifying, for a check
    that hung)."""
    pull_seconds: float | None = None
    ready_seconds: float | None = None
    check: str | None = None
    """The md5 check's `rig.chaos.Verdict` (None when the container never got ready)."""
    files_checked: int = 0
    mapped_checked: int = 0
    """Of the files checked, those the running container had mapped."""
    error: str = ""


class _Clock:
    """The common start of a trial, set by the barrier that releases every container."""

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self.started = 0.0

    def start(self) -> None:
        self.started = time.monotonic()

    @property
    def deadline(self) -> float:
        return self.started + self.budget

    def since_start(self) -> float:
        return round(time.monotonic() - self.started, 3)


class Launch:
    """One container's thread: CRI pull, `ctr run`, wait for its readiness line.

    The thread never cleans up: when a node hangs, the evidence must be taken before
    anything is killed, so the trial owns the teardown. After readiness the thread
    keeps reading the container's output (a server that logs on must not block on a
    full pipe) until the trial kills it.
    """

    def __init__(
        self,
        run: ContainerRun,
        probe: ReadinessProbe,
        server: ContainerdServer,
        snapshotter: str,
        clock: _Clock,
    ) -> None:
        self.run = run
        self.probe = probe
        self.server = server
        self.snapshotter = snapshotter
        self.clock = clock
        self.done = threading.Event()
        self.late = False
        self.process: subprocess.Popen[bytes] | None = None
        self.thread = threading.Thread(target=self._main, name=f"scaleup-{run.slot}", daemon=True)
        self.barrier: threading.Barrier | None = None

    def begin(self, barrier: threading.Barrier) -> None:
        """Start the thread; it waits at ``barrier`` until every container may start."""
        self.barrier = barrier
        self.thread.start()

    def _main(self) -> None:
        assert self.barrier is not None
        try:
            self.barrier.wait()
        except threading.BrokenBarrierError:
            self.run.error = "the trial never released the start"
            self.done.set()
            return
        deadline = self.clock.deadline
        try:
            self._start(deadline)
        except Exception as exc:  # the thread must report any failure, never die silently
            self.late = time.monotonic() >= deadline - _LATE_S
            self.run.error = f"{type(exc).__name__}: {exc}"[-3000:]
            log.info(
                "scaleup.container_not_ready",
                slot=self.run.slot,
                stage=self.run.stage,
                late=self.late,
                error=self.run.error[-300:],
            )
        finally:
            self.done.set()
        self._drain()

    def _start(self, deadline: float) -> None:
        run = self.run
        run.stage = "pulling"
        self.server.cri_pull_image(run.reference, timeout=max(1.0, deadline - time.monotonic()))
        run.pull_seconds = self.clock.since_start()
        run.stage = "starting"
        command = ctr_run_command(self.server, run.reference, run.container_id, self.snapshotter)
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        ready = self.probe.wait(self.process, deadline)
        run.ready_seconds = round(ready - self.clock.started, 3)
        run.stage = "ready"

    def _drain(self) -> None:
        if self.process is None or self.process.stdout is None:
            return
        with contextlib.suppress(OSError, ValueError):
            while os.read(self.process.stdout.fileno(), 65536):
                pass
        self.process.stdout.close()

    def settle(self) -> None:
        """Decide the outcome once the deadline (plus a grace) has passed."""
        if not self.done.is_set() or self.late:
            self.run.outcome = "hang"
        elif self.run.stage == "ready":
            self.run.outcome = "ready"
        else:
            self.run.outcome = "failed"

    @property
    def running(self) -> bool:
        """Whether its `ctr run` is still attached to the container."""
        return self.process is not None and self.process.poll() is None


# -- one trial ------------------------------------------------------------------------


@dataclass
class TrialResult:
    """N containers started together on one cold node."""

    mode: str
    n: int
    repetition: int
    containers: list[ContainerRun]
    all_ready_seconds: float | None
    """Until the last container was ready (None if any hung or failed)."""
    link_bytes: int
    """Over the link from the common start until all were ready (or the deadline)."""
    agent_fetched_bytes: float | None = None
    agent_cpu_seconds: float | None = None
    agent_peak_rss_bytes: int | None = None
    lazy_layers: float | None = None
    fallback_layers: float | None = None
    watchdog: dict[str, float] | None = None
    hangs: int = 0
    failures: int = 0
    wrong_bytes: int = 0
    diagnostics: dict[str, Any] | None = None
    seconds: float = 0.0
    error: str = ""
    """Why the trial itself broke off (a node that would not start, ...), if it did."""


def http_text(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """GET ``url``'s body (an error status's body too, prefixed with the status), or
    None if nothing answers within ``timeout``. The agent's /healthz answers 503 with
    the watchdog's findings while its event loop is stalled: that body is the point."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return str(response.read().decode(errors="replace"))
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}: {exc.read().decode(errors='replace')}"
    except (OSError, ValueError):
        return None


def metrics_text(agent: AgentProcess) -> str | None:
    """The agent's Prometheus exposition, or None if /metrics does not answer 200 in
    time (it is served from a thread of its own, so a stalled event loop still answers;
    a frozen or dead agent does not)."""
    text = http_text(agent.metrics_url)
    return None if text is None or text.startswith("HTTP ") else text


def watchdog_figures(metrics_text: str) -> dict[str, float] | None:
    """The watchdog's series in an exposition, or None if the agent has no watchdog."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            key = WATCHDOG_SERIES.get(sample.name)
            if key is not None:
                found[key] = found.get(key, 0.0) + sample.value
    return found or None


def _read_agent(agent: AgentProcess, cpu_before: float, result: TrialResult) -> None:
    """The agent's figures for the trial; those behind /metrics stay None if it does not
    answer (a stalled event loop serves nothing)."""
    result.agent_cpu_seconds = round(sum(cpu_seconds(agent.pid)) - cpu_before, 3)
    result.agent_peak_rss_bytes = peak_rss(agent.pid)
    text = metrics_text(agent)
    if text is None:
        log.warning("scaleup.metrics_unanswered", url=agent.metrics_url)
        return
    with contextlib.suppress(OSError):
        fetched, _ = agent_figures(agent)
        result.agent_fetched_bytes = sum(fetched.values())
    layers = fallbacks = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "acceld_layers_total":
                layers += sample.value
            elif sample.name == "acceld_fallbacks_total":
                fallbacks += sample.value
    result.lazy_layers, result.fallback_layers = layers - fallbacks, fallbacks
    result.watchdog = watchdog_figures(text)


def capture_diagnostics(
    agent: AgentProcess | None,
    server: ContainerdServer,
    launches: Sequence[Launch],
    run_dir: Path,
) -> dict[str, Any]:
    """The stuck node's state, taken before anything is killed."""
    diagnostics: dict[str, Any] = {
        "run_dir": str(run_dir),
        "containerd_log": str(server.log_path),
        "stuck": [asdict(launch.run) for launch in launches if launch.run.outcome == "hang"],
        "blocked_threads": hangs.as_json(hangs.blocked_threads()),
    }
    if agent is not None:
        healthz = agent.metrics_url.removesuffix("/metrics") + "/healthz"
        answer = http_text(healthz)
        exposition = metrics_text(agent)
        diagnostics.update(
            agent_alive=Path(f"/proc/{agent.pid}").exists(),
            agent_healthz=answer if answer is not None else "(no answer within 2 s)",
            agent_watchdog=None if exposition is None else watchdog_figures(exposition),
            agent_threads=hangs.as_json(hangs.thread_stacks(agent.pid)),
            fuse_waiting_requests=hangs.fuse_waiting(agent.mountpoint),
            agent_log=str(agent.log_path),
            agent_log_tail=agent.log_tail(40),
        )
    log.warning(
        "scaleup.hang",
        stuck=[(run["slot"], run["image"], run["stage"]) for run in diagnostics["stuck"]],
        blocked=[(t["comm"], t["state"], t["wchan"]) for t in diagnostics["blocked_threads"]],
        healthz=diagnostics.get("agent_healthz"),
        fuse_waiting=diagnostics.get("fuse_waiting_requests"),
        run_dir=str(run_dir),
    )
    return diagnostics


def _kill_task(server: ContainerdServer, container_id: str) -> None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.ctr(
            "tasks",
            "kill",
            "-s",
            "SIGKILL",
            container_id,
            namespace=CRI_NAMESPACE,
            check=False,
            timeout=STOP_TIMEOUT_S,
        )


def unwedge(agent: AgentProcess | None, server: ContainerdServer, container_ids: list[str]) -> None:
    """Get a hung node moving, so the normal teardown (containerd's and the agent's
    `stop`) can run: abort the agent's FUSE connection (processes asleep in it wake up
    with ENOTCONN), kill the agent, then the containers' tasks."""
    if agent is not None:
        hangs.abort_fuse(agent.mountpoint)
        with contextlib.suppress(subprocess.TimeoutExpired):
            agent.kill()
    for container_id in container_ids:
        _kill_task(server, container_id)


def stop_containers(server: ContainerdServer, launches: Sequence[Launch]) -> None:
    """Kill every started container; `ctr run --rm` then removes each."""
    running = [launch for launch in launches if launch.running]
    for launch in running:
        _kill_task(server, launch.run.container_id)
    for launch in running:
        assert launch.process is not None
        try:
            launch.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            launch.process.kill()
            launch.process.wait()
    for launch in launches:
        launch.thread.join(STOP_TIMEOUT_S)


def mapped_files(server: ContainerdServer, container_id: str) -> list[str]:
    """Files the running container's processes have mapped (their programs and shared
    libraries, whose bytes the start surely read), from /proc/*/maps inside it."""
    listed = server.ctr(
        "tasks",
        "exec",
        "--exec-id",
        f"maps-{uuid.uuid4().hex[:8]}",
        "--fifo-dir",
        str(server.fifo_dir),
        container_id,
        "sh",
        "-c",
        "cat /proc/[0-9]*/maps",
        namespace=CRI_NAMESPACE,
        check=False,
        timeout=VERIFY_TIMEOUT_S,
    )
    paths = set()
    for line in listed.stdout.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and SAFE_PATH.match(fields[5]):
            paths.add(fields[5])
    return sorted(paths)


def _files_to_check(server: ContainerdServer, launch: Launch, target: Target) -> dict[str, str]:
    """The image's chosen files, plus what a still running container has mapped."""
    expected = dict(target.files.chosen)
    if launch.running:
        mapped = [
            p for p in mapped_files(server, launch.run.container_id) if p in target.files.every
        ]
        expected.update((path, target.files.every[path]) for path in mapped[:MAPPED_LIMIT])
        launch.run.mapped_checked = min(len(mapped), MAPPED_LIMIT)
    launch.run.files_checked = len(expected)
    return expected


def check_bytes(
    server: ContainerdServer,
    snapshotter: str,
    launches: Sequence[Launch],
    targets: Sequence[Target],
) -> Launch | None:
    """Per ready container, a second container of its image prints the md5 of the
    image's chosen files and of the files the container has mapped, page caches
    dropped first so the bytes come through the snapshotter again. Returns the launch
    whose check hung, if one did (the rest are then left unchecked: the node is
    stuck)."""
    checks = []
    for launch, target in zip(launches, targets, strict=True):
        if launch.run.outcome != "ready":
            continue
        try:
            checks.append((launch, _files_to_check(server, launch, target)))
        except subprocess.TimeoutExpired:
            launch.run.outcome, launch.run.stage, launch.run.check = "hang", "verifying", "hang"
            launch.run.error = "listing the container's mapped files did not end in time"
            return launch
    drop_page_caches()
    for launch, expected in checks:
        run = launch.run
        check_id = f"{run.container_id}-check"
        try:
            result = server.run_container(
                run.reference,
                check_id,
                "md5sum",
                *sorted(expected),
                snapshotter=snapshotter,
                namespace=CRI_NAMESPACE,
                check=False,
                timeout=VERIFY_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            run.outcome, run.stage, run.check = "hang", "verifying", "hang"
            run.error = f"the md5 check container ({check_id}) did not end in time"
            return launch
        run.check = verdict(expected, result)
        if run.check != "correct":
            run.error = f"md5 check {run.check}: {result.stdout[-800:]}{result.stderr[-800:]}"
            log.warning("scaleup.check_failed", slot=run.slot, image=run.image, error=run.error)
    return None


@contextlib.contextmanager
def cold_node(
    plan: Plan, mode: str, run_dir: Path
) -> Iterator[tuple[AgentProcess | None, ContainerdServer]]:
    """A fresh containerd (and for lazy modes a fresh agent, no profiles). If the body
    fails, the node is unwedged first, so a stuck FUSE mount cannot hang the teardown."""
    with contextlib.ExitStack() as stack:
        agent: AgentProcess | None = None
        if mode == "overlayfs":
            server = stack.enter_context(ContainerdServer(run_dir / "ctrd"))
        else:
            # Node settings (registry host, background fill) are the same in every
            # target's setup.
            node = lazy_node(
                plan.targets[0].setup, run_dir, use_profiles=False, record_profiles=False
            )
            agent, server = stack.enter_context(node)
        try:
            yield agent, server
        except BaseException:
            unwedge(agent, server, [])
            raise


def run_trial(plan: Plan, mode: str, n: int, repetition: int) -> TrialResult:
    """Start N containers together on a cold node, check their bytes, tear it down."""
    run_dir = plan.workdir / f"r{repetition}n{n}-{mode}"
    began = time.monotonic()
    with cold_node(plan, mode, run_dir) as (agent, server):
        result = _trial_on_node(plan, mode, n, repetition, agent, server, run_dir)
    result.seconds = round(time.monotonic() - began, 1)
    if result.hangs == 0 and not plan.keep_runs:
        shutil.rmtree(run_dir, ignore_errors=True)
    return result


def _trial_on_node(
    plan: Plan,
    mode: str,
    n: int,
    repetition: int,
    agent: AgentProcess | None,
    server: ContainerdServer,
    run_dir: Path,
) -> TrialResult:
    snapshotter = "overlayfs" if mode == "overlayfs" else ACCELD_SNAPSHOTTER
    targets = plan.for_trial(n)
    clock = _Clock(plan.deadline)
    tag = uuid.uuid4().hex[:6]
    launches = [
        Launch(
            ContainerRun(slot, t.name, t.reference(mode), f"scale-{tag}-{slot}"),
            t.probe,
            server,
            snapshotter,
            clock,
        )
        for slot, t in enumerate(targets)
    ]
    barrier = threading.Barrier(n + 1, action=clock.start)
    drop_page_caches()
    counter = LinkCounter(targets[0].setup.link)
    cpu_before = sum(cpu_seconds(agent.pid)) if agent is not None else 0.0
    for launch in launches:
        launch.begin(barrier)
    barrier.wait(timeout=60.0)
    for launch in launches:
        launch.done.wait(max(0.0, clock.deadline + 2.0 - time.monotonic()))
    for launch in launches:
        launch.settle()
    runs = [launch.run for launch in launches]
    ready = [r.ready_seconds for r in runs if r.outcome == "ready" and r.ready_seconds is not None]
    all_ready = max(ready) if len(ready) == n else None
    result = TrialResult(mode, n, repetition, runs, all_ready, counter.since_start())
    if agent is not None:
        _read_agent(agent, cpu_before, result)
    stuck = [launch for launch in launches if launch.run.outcome == "hang"]
    if not stuck:
        hung_check = check_bytes(server, snapshotter, launches, targets)
        if hung_check is not None:
            stuck.append(hung_check)
    if stuck:
        result.diagnostics = capture_diagnostics(agent, server, launches, run_dir)
        ids = [launch.run.container_id for launch in launches]
        unwedge(agent, server, ids + [f"{i}-check" for i in ids])
    stop_containers(server, launches)
    result.hangs = sum(run.outcome == "hang" for run in runs)
    result.failures = sum(run.outcome == "failed" or run.check == "failed_cleanly" for run in runs)
    result.wrong_bytes = sum(run.check == "wrong_bytes" for run in runs)
    return result


def measure(plan: Plan, modes: Sequence[str], ns: Sequence[int], repeat: int) -> list[TrialResult]:
    """Every N in every mode, ``repeat`` times; the mode order rotates per repetition so
    no mode always runs first (or right after the heavy overlayfs trial)."""
    order = list(modes)
    trials: list[TrialResult] = []
    for repetition in range(1, repeat + 1):
        for n in ns:
            for mode in order:
                log.info("scaleup.trial", mode=mode, n=n, repetition=repetition)
                try:
                    trial = run_trial(plan, mode, n, repetition)
                except Exception as exc:  # one broken trial must not end a long run
                    log.exception("scaleup.trial_broken", mode=mode, n=n, repetition=repetition)
                    trial = TrialResult(mode, n, repetition, [], None, 0, failures=n)
                    trial.error = f"{type(exc).__name__}: {exc}"[-3000:]
                trials.append(trial)
                log.info(
                    "scaleup.trial_done",
                    mode=mode,
                    n=n,
                    repetition=repetition,
                    all_ready_s=trial.all_ready_seconds,
                    ready_s=[run.ready_seconds for run in trial.containers],
                    hangs=trial.hangs,
                    failures=trial.failures,
                    wrong_bytes=trial.wrong_bytes,
                    link_mb=round(trial.link_bytes / 1e6, 1),
                    agent_cpu_s=trial.agent_cpu_seconds,
                    watchdog=trial.watchdog,
                    seconds=trial.seconds,
                )
        order = order[1:] + order[:1]
    return trials


# -- summarizing ----------------------------------------------------------------------


@dataclass(frozen=True)
class ScaleRow:
    """One mode at one N, over its repetitions."""

    mode: str
    n: int
    trials: int
    complete: int
    """Trials in which every container got ready (the only ones timed)."""
    all_ready_median: float | None
    all_ready_min: float | None
    all_ready_max: float | None
    container_ready_median: float | None
    speedup: float | None
    """overlayfs all-ready median / this mode's, at the same N."""
    hangs: int
    failures: int
    wrong_bytes: int
    link_mb: float
    fetched_mb: float | None
    agent_cpu_seconds: float | None
    peak_rss_mib: float | None
    worst_stall_seconds: float | None
    worst_lag_seconds: float | None


def _median(values: Sequence[float | int | None]) -> float | None:
    present = [float(v) for v in values if v is not None]
    return statistics.median(present) if present else None


def _max(values: Sequence[float | int | None]) -> float | None:
    present = [float(v) for v in values if v is not None]
    return max(present) if present else None


def _row(mode: str, n: int, trials: Sequence[TrialResult], baseline: float | None) -> ScaleRow:
    complete = [t.all_ready_seconds for t in trials if t.all_ready_seconds is not None]
    ready = [
        run.ready_seconds
        for t in trials
        for run in t.containers
        if run.outcome == "ready" and run.ready_seconds is not None
    ]
    median = _median(complete)
    stalls = [(t.watchdog or {}).get("worst_loop_stall_seconds") for t in trials]
    lags = [(t.watchdog or {}).get("worst_loop_lag_seconds") for t in trials]
    fetched = _median([t.agent_fetched_bytes for t in trials])
    rss = _max([t.agent_peak_rss_bytes for t in trials])
    return ScaleRow(
        mode=mode,
        n=n,
        trials=len(trials),
        complete=len(complete),
        all_ready_median=median,
        all_ready_min=min(complete) if complete else None,
        all_ready_max=max(complete) if complete else None,
        container_ready_median=_median(ready),
        speedup=baseline / median if baseline and median else None,
        hangs=sum(t.hangs for t in trials),
        failures=sum(t.failures for t in trials),
        wrong_bytes=sum(t.wrong_bytes for t in trials),
        link_mb=statistics.median(t.link_bytes for t in trials) / 1e6,
        fetched_mb=None if fetched is None else fetched / 1e6,
        agent_cpu_seconds=_median([t.agent_cpu_seconds for t in trials]),
        peak_rss_mib=None if rss is None else rss / 2**20,
        worst_stall_seconds=_max(stalls),
        worst_lag_seconds=_max(lags),
    )


def summarize(trials: Sequence[TrialResult]) -> list[ScaleRow]:
    """One row per N and mode (N first: the modes at one N are what is compared)."""
    rows = []
    for n in sorted({t.n for t in trials}):
        at_n = [t for t in trials if t.n == n]
        baseline = _median([t.all_ready_seconds for t in at_n if t.mode == "overlayfs"])
        for mode in dict.fromkeys(t.mode for t in sorted(at_n, key=lambda t: MODES.index(t.mode))):
            rows.append(_row(mode, n, [t for t in at_n if t.mode == mode], baseline))
    return rows


def _cell(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return NOT_AVAILABLE if value is None else f"{value:{spec}}{suffix}"


def scale_table(rows: Sequence[ScaleRow]) -> str:
    """The markdown table printed at the end and saved next to the JSON."""
    headers = [
        "mode",
        "N",
        "trials",
        "all ready s (median)",
        "all ready s (max)",
        "container ready s (median)",
        "speedup vs overlayfs",
        "hangs",
        "failed",
        "wrong bytes",
        "MB over link",
        "MB fetched by agent",
        "agent CPU s",
        "peak RSS MiB",
        "worst stall s",
        "worst loop lag s",
    ]
    body = [
        [
            r.mode,
            str(r.n),
            str(r.trials) if r.complete == r.trials else f"{r.trials} ({r.complete} complete)",
            _cell(r.all_ready_median),
            _cell(r.all_ready_max),
            _cell(r.container_ready_median),
            _cell(r.speedup, ".1f", "x"),
            str(r.hangs),
            str(r.failures),
            str(r.wrong_bytes),
            f"{r.link_mb:.1f}",
            _cell(r.fetched_mb, ".1f"),
            _cell(r.agent_cpu_seconds),
            _cell(r.peak_rss_mib, ".0f"),
            _cell(r.worst_stall_seconds, ".3f"),
            _cell(r.worst_lag_seconds, ".3f"),
        ]
        for r in rows
    ]
    return markdown_table(headers, body)


def summary_line(rows: Sequence[ScaleRow], trials: int) -> str:
    """Speed-ups at the largest N, and the hang and wrong-byte counts over every trial."""
    largest = max(row.n for row in rows)
    speedups = ", ".join(
        f"{row.mode} {_cell(row.speedup, '.1f', 'x')}"
        for row in rows
        if row.n == largest and row.mode != "overlayfs"
    )
    hung = sum(row.hangs for row in rows)
    wrong = sum(row.wrong_bytes for row in rows)
    return (
        f"all-ready speedup vs overlayfs at N={largest}: {speedups or 'n/a'}; "
        f"{hung} hung and {wrong} wrong-byte container(s) over {trials} trial(s)"
    )


def scale_chart(rows: Sequence[ScaleRow], path: Path, title: str) -> Path | None:
    """All-ready seconds against N, one line per mode (median, min-max bars); None when
    no trial got every container ready (nothing to draw)."""
    lines = [
        Line(
            mode,
            [
                Point(r.n, r.all_ready_median, r.all_ready_min or 0.0, r.all_ready_max or 0.0)
                for r in rows
                if r.mode == mode and r.all_ready_median is not None
            ],
        )
        for mode in dict.fromkeys(r.mode for r in rows)
    ]
    if not any(line.points for line in lines):
        return None
    return lines_with_ranges(
        lines, path, title, "containers started together (N)", "seconds until all ready"
    )


# -- the command ----------------------------------------------------------------------


@dataclass(frozen=True)
class ScaleOptions:
    """What to measure, and where."""

    images: tuple[str, ...]
    ns: tuple[int, ...]
    modes: tuple[str, ...] = MODES
    repeat: int = 3
    deadline: float = DEFAULT_DEADLINE_S
    rate_mbit: float = 300.0
    rtt_ms: float = 5.0
    background_fill: bool = True
    cache_dir: Path = catalog.DEFAULT_CACHE
    workdir: Path = DEFAULT_WORKDIR
    keep_runs: bool = False
    quick: bool = False

    def images_used(self) -> tuple[str, ...]:
        """The distinct images the largest N starts (only those are built)."""
        count = max(self.ns)
        return tuple(dict.fromkeys(self.images[i % len(self.images)] for i in range(count)))


def _validate(options: ScaleOptions) -> None:
    if options.repeat < 1 or not options.ns or min(options.ns) < 1 or not options.images:
        raise ValueError("repeat and every N must be at least 1, and images not empty")
    unknown = set(options.modes) - set(MODES)
    if unknown or not options.modes:
        raise ValueError(f"modes must be among {MODES}, got {options.modes}")


@contextlib.contextmanager
def published_plan(
    options: ScaleOptions, images: Sequence[ImageUnderTest] | None = None
) -> Iterator[Plan]:
    """The shaped link and bench registry, with every image published in both forms
    (``images``, or those ``options`` names, built on first use); yields the plan, valid
    while the link is up. Containers cycle through ``images`` in order when given."""
    _validate(options)
    if images is None:
        images = [load_image(name, options.cache_dir) for name in options.images_used()]
        order = [name for name in options.images if name in {i.name for i in images}]
    else:
        order = [image.name for image in images]
    options.workdir.mkdir(parents=True, exist_ok=True)
    with (
        ShapedLink(rate_mbit=options.rate_mbit, rtt_ms=options.rtt_ms) as link,
        shaped_registry(link, options.cache_dir, options.workdir) as (registry, host),
    ):
        by_name = {}
        for image in images:
            published = asyncio.run(publish(image, host))
            setup = Setup(
                link,
                host,
                image,
                published,
                options.workdir,
                options.background_fill,
                options.deadline,
            )
            by_name[image.name] = Target(setup, image_files(image.built, options.cache_dir))
        try:
            yield Plan(
                tuple(by_name[name] for name in order),
                options.deadline,
                options.workdir,
                options.keep_runs,
            )
        except Exception:
            log.error(
                "scaleup.failed", workdir=str(options.workdir), registry=str(registry.log_path)
            )
            raise


def run_scaleup(options: ScaleOptions) -> tuple[dict[str, Any], list[ScaleRow]]:
    """Build, publish and convert the images, then every trial; the JSON document and
    the rows."""
    with published_plan(options) as plan:
        trials = measure(plan, options.modes, options.ns, options.repeat)
        targets = list({t.name: t for t in plan.targets}.values())
    rows = summarize(trials)
    document = {
        "link": {"rate_mbit": options.rate_mbit, "rtt_ms": options.rtt_ms},
        "parameters": {
            "images": list(options.images),
            "n": list(options.ns),
            "modes": list(options.modes),
            "repeat": options.repeat,
            "deadline_s": options.deadline,
            "background_fill": options.background_fill,
            "quick": options.quick,
        },
        "images": [
            {
                "name": t.name,
                "compressed_bytes": t.setup.image.compressed_bytes,
                "conversions": t.setup.published.conversions,
                "checked_files": t.files.chosen,
            }
            for t in targets
        ],
        "trials": [asdict(trial) for trial in trials],
        "rows": [asdict(row) for row in rows],
        "summary_line": summary_line(rows, len(trials)),
    }
    return document, rows


def _numbers(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


@click.command()
@click.option("--n", "ns_text", help="Containers started together, per trial (default 1,3,6).")
@click.option(
    "--images",
    "images_text",
    help=f"Catalog images (or checkable-<seed>), cycled over the N containers "
    f"(default {','.join(DEFAULT_IMAGES)}).",
)
@click.option("--modes", "modes_text", default=",".join(MODES), show_default=True)
@click.option("--repeat", default=3, show_default=True, help="Trials per mode and N.")
@click.option(
    "--quick",
    is_flag=True,
    help=f"Smoke run: {','.join(QUICK_IMAGES)}, N={','.join(map(str, QUICK_NS))}, 1 repeat.",
)
@click.option("--deadline", type=float, help="Seconds until a container not ready is a hang.")
@click.option("--rate-mbit", default=300.0, show_default=True, help="Link bandwidth.")
@click.option("--rtt-ms", default=5.0, show_default=True, help="Link round-trip time.")
@click.option(
    "--background-fill/--no-background-fill",
    default=True,
    show_default=True,
    help="Let the agent fetch whole layers in the background (its default).",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=catalog.DEFAULT_CACHE,
    show_default=True,
    help="Built images, registry storage, expected sums.",
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_WORKDIR,
    show_default=True,
    help="Per-trial state (kept when a trial hangs).",
)
@click.option(
    "--results-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=RESULTS_DIR,
    show_default=True,
)
@click.option("--keep-runs", is_flag=True, help="Keep every trial's logs, not just hung ones'.")
def main(
    ns_text: str | None,
    images_text: str | None,
    modes_text: str,
    repeat: int,
    quick: bool,
    deadline: float | None,
    rate_mbit: float,
    rtt_ms: float,
    background_fill: bool,
    cache_dir: Path,
    workdir: Path,
    results_dir: Path,
    keep_runs: bool,
) -> None:
    """Start N containers of mixed images together on a cold node: time to all ready,
    hangs and wrong bytes, per mode. Needs root (namespaces, containerd, FUSE)."""
    configure_logging()
    if quick:
        repeat = 1
    options = ScaleOptions(
        images=_names(images_text) if images_text else QUICK_IMAGES if quick else DEFAULT_IMAGES,
        ns=_numbers(ns_text) if ns_text else QUICK_NS if quick else DEFAULT_NS,
        modes=_names(modes_text),
        repeat=repeat,
        deadline=deadline or (QUICK_DEADLINE_S if quick else DEFAULT_DEADLINE_S),
        rate_mbit=rate_mbit,
        rtt_ms=rtt_ms,
        background_fill=background_fill,
        cache_dir=cache_dir,
        workdir=workdir / time.strftime("%Y%m%d-%H%M%S"),
        keep_runs=keep_runs,
        quick=quick,
    )
    command = shlex.join(["python", "-m", "bench.scaleup", *sys.argv[1:]])
    document, rows = run_scaleup(options)
    document["command"] = command
    sizes = ", ".join(
        f"{image['name']} {image['compressed_bytes'] / 1e6:.0f} MB" for image in document["images"]
    )
    link = f"{rate_mbit:g} Mbit/s, {rtt_ms:g} ms RTT"
    table = scale_table(rows)
    text = (
        f"`{command}` — link {link}, images (compressed, cycled over N) {sizes}\n\n"
        f"{table}\n\n{document['summary_line']}"
    )
    path = write_results("scaleup", document, text, results_dir)
    chart = scale_chart(
        rows,
        path.with_suffix(".png"),
        f"N containers started together on a cold node\nlink {link}; "
        f"median of {options.repeat} (bars: min-max)",
    )
    click.echo(f"\n{text}\nresults: {path}\nchart: {chart}")
    if any(row.hangs or row.wrong_bytes for row in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
