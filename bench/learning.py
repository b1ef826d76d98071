"""Learning an image's startup profile inside a benchmark run, and where runs live.

Shared by the suite's modes and its new-version scenario: both learn a profile per lazy
form on fresh agents that record (after forgetting what earlier runs learned, so every
figure comes from this run), and both give each cold node a short directory of its own.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.compressed_limit import RangeCost, full_form_cost, index_form_cost
from bench.profile_state import LearnError, forget_profiles, wait_for_profile
from bench.startup import RunResult, Setup, lazy_node, lazy_reference, timed_lazy_start
from common.logging import get_logger
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from profiles.format import Profile

log = get_logger(__name__)

PROFILE_SUFFIX = "+profile"
PROFILE_SETTLE_S = 60.0
"""Time for a recorded start's profile to reach the registry once its trace window
closes at the latest (the window's quiet period, the merge and the push)."""

ProgressCallback = Callable[[str], None]
"""Told the label of each step as it begins (``bench_command`` shows it with rich)."""
Costing = Callable[[Profile], RangeCost]
"""What the ranges a learned profile records cost on the link (bench/compressed_limit.py)."""


def form_costing(setup: Setup, form: str) -> Costing:
    """How to price a learned profile's ranges in ``form``: the original layers are in
    the bench's image cache; the eStargz TOCs come from the bench registry."""
    if form == "index":
        return lambda profile: index_form_cost(setup.image.built, profile)

    async def full(profile: Profile) -> RangeCost:
        async with RegistryClient(plain_http_hosts={setup.registry_host}) as client:
            reference = ImageReference.parse(lazy_reference(setup, "full"))
            return await full_form_cost(client, reference, profile)

    return lambda profile: asyncio.run(full(profile))


@dataclass
class Learned:
    """The profile one lazy form learned in this suite run."""

    form: str
    profile_runs: int
    files: int
    app_read_bytes: int
    sources: dict[str, int]
    seconds: float
    recording_runs: list[RunResult] = field(default_factory=list)
    """The recorded starts themselves (timed, but not part of the summary)."""
    cost: RangeCost | None = None
    """What the ranges the profile records cost, compressed (None: not asked for)."""


def run_dir(setup: Setup, image_number: int, label: str) -> Path:
    """Where one cold node of image ``image_number`` lives (``label`` names the run)."""
    # containerd's and the agent's sockets live below: the path must stay short.
    return setup.workdir / f"i{image_number}{label.replace(PROFILE_SUFFIX, '-p')}"


def done_with(path: Path, keep: bool) -> None:
    """Remove a finished run's directory unless its logs are to be kept."""
    if not keep:
        shutil.rmtree(path, ignore_errors=True)


def learn_profile(
    setup: Setup,
    form: str,
    *,
    starts: int,
    keep_runs: bool,
    image_number: int,
    progress: ProgressCallback,
    version: str = "",
    costing: Costing | None = None,
) -> Learned:
    """Forget earlier profiles, then record ``starts`` starts on fresh agents.

    ``version`` (a tag) only labels the steps and run directories of a later version.
    ``costing``, when given, prices for the compressed limit the ranges one more start,
    made first with the kernel's read-ahead off, read: a profile records what reached
    FUSE too, so with read-ahead on it holds whole read-ahead windows (a mapped library
    faults them in), which are over-fetch, not what the application read.
    """
    reference = lazy_reference(setup, form)
    started = time.monotonic()
    name = f"{setup.image.name} {version}".rstrip()
    cost = None
    if costing is not None:
        progress(f"{name}: exact reads of lazy-{form} (read-ahead off)")
        path = run_dir(setup, image_number, f"{version}exact-{form}")
        exact = _recorded_start(setup, reference, path, f"lazy-{form}:exact", 1, read_ahead_kib=0)
        cost = costing(exact[1])
        done_with(path, keep_runs)
    recorded: list[RunResult] = []
    profile: Profile | None = None
    for start in range(1, starts + 1):
        progress(f"{name}: learn lazy-{form} ({start}/{starts})")
        path = run_dir(setup, image_number, f"{version}learn{start}-{form}")
        run, profile = _recorded_start(setup, reference, path, f"lazy-{form}:learn", start)
        recorded.append(run)
        done_with(path, keep_runs)
    if profile is None:
        raise ValueError("starts must be at least 1")
    return Learned(
        form,
        profile.runs.count,
        len(profile.files),
        int(statistics.median(value for _, value in profile.runs.bytes_read)),
        dict(profile.runs.sources),
        round(time.monotonic() - started, 2),
        recorded,
        cost,
    )


def _recorded_start(
    setup: Setup,
    reference: str,
    path: Path,
    mode: str,
    start: int,
    read_ahead_kib: int | None = None,
) -> tuple[RunResult, Profile]:
    """One start on a fresh recording agent, and the profile once it holds ``start``
    runs (the earlier ones recorded by earlier calls since profiles were forgotten)."""
    if start == 1:
        forgotten = asyncio.run(forget_profiles(setup.registry_host, reference))
        log.info("bench.profiles_forgotten", reference=reference, artifacts=forgotten)
    with lazy_node(
        setup, path, use_profiles=False, record_profiles=True, read_ahead_kib=read_ahead_kib
    ) as node:
        run = timed_lazy_start(setup, node, reference, mode, start)
        try:
            profile = asyncio.run(
                # The window closes by the bench's timeout at the latest (lazy_node).
                wait_for_profile(
                    setup.registry_host, reference, start, setup.timeout + PROFILE_SETTLE_S
                )
            )
        except LearnError:
            log.error("bench.learn_failed", agent_log=str(node[0].log_path))
            raise
    return run, profile
