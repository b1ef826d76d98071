"""One container start as the tracer and the FUSE demand log report it: the learner's input.

Two producers write traces and each sees a different slice of reality: the eBPF tracer
sees every read, including those the page cache answers, while the FUSE layer only sees
reads that reach it (page-cache hits never do). The trace says which producer(s) made it
so the profile can record how much of its evidence is blind to cached reads. Traces are
validated on construction because a wrong one silently teaches every node a bad order.
"""

from __future__ import annotations

import enum
import signal
from collections.abc import Iterable
from dataclasses import dataclass

from common.digest import InvalidDigestError, validate_digest
from formats.plan_path import root_name

SOURCES = frozenset({"ebpf", "fuse"})
FIRST_PAGE = 4096
"""What an open without a read is counted as: the kernel reads ahead at least a page."""
MAX_FILE_OFFSET = 1 << 62


class TraceError(ValueError):
    """A run trace that breaks its contract (bad digest, range, path, source...)."""


class Outcome(enum.StrEnum):
    """How the traced start ended; only OK runs teach the profile anything."""

    OK = "ok"
    CRASHED = "crashed"
    TIMED_OUT = "timed_out"


CRASH_SIGNALS = frozenset(
    {signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGILL, signal.SIGFPE, signal.SIGSYS}
)
"""Deaths that mean the program broke. SIGTERM/SIGKILL/SIGINT come from outside (a
stop, an eviction): the start was cut short, but what it read so far was real."""


def run_outcome(exit_status: int | None, hit_deadline: bool) -> Outcome:
    """How a traced start ended, from its first process's wait(2)-style status (None:
    still running, or unknown) and whether the window closed on its deadline rather
    than on a quiet period."""
    if exit_status is not None:
        killed_by, code = exit_status & 0x7F, (exit_status >> 8) & 0xFF
        if (killed_by == 0 and code != 0) or killed_by in CRASH_SIGNALS:
            return Outcome.CRASHED
    return Outcome.TIMED_OUT if hit_deadline else Outcome.OK


@dataclass(frozen=True)
class FileAccess:
    """One file of one layer as a run used it: ``ranges`` are [start, end) byte ranges."""

    layer: str
    path: str
    ranges: tuple[tuple[int, int], ...]
    first_access_ns: int


@dataclass(frozen=True)
class RunTrace:
    """Everything one container start read, per layer of the (accelerated) image.

    ``started_at_ns`` is the wall-clock start (ns since the epoch): it decides which
    samples count as "recent" once a profile keeps only the latest K of them, and it
    makes two runs with identical reads different profiles (so content addressing in
    the registry never folds two runs into one).
    """

    image: str
    layers: tuple[str, ...]
    accesses: tuple[FileAccess, ...]
    outcome: Outcome
    node: str
    sources: frozenset[str]
    page_cache_visible: bool
    started_at_ns: int

    def __post_init__(self) -> None:
        try:
            validate_digest(self.image)
            for layer in self.layers:
                validate_digest(layer)
        except InvalidDigestError as exc:
            raise TraceError(f"trace of {self.image!r}: {exc}") from None
        if len(set(self.layers)) != len(self.layers):
            raise TraceError("trace lists a layer twice")
        if not isinstance(self.outcome, Outcome):
            raise TraceError(f"unknown run outcome {self.outcome!r}")
        if not self.node or len(self.node) > 253:
            raise TraceError(f"invalid node name {self.node!r}")
        if not self.sources or not self.sources <= SOURCES:
            raise TraceError(f"trace sources must be a non-empty subset of {sorted(SOURCES)}")
        if self.page_cache_visible and "ebpf" not in self.sources:
            raise TraceError("a FUSE-only trace cannot see page-cache hits")
        if self.started_at_ns < 0:
            raise TraceError("started_at_ns must not be negative")
        known = set(self.layers)
        for access in self.accesses:
            _check_access(access, known)


def access_name(access: FileAccess) -> str:
    """The access's path in the TOC's form (relative, no `.` or `//`), so profiles from
    tracers that report `/etc/x` and FUSE logs that report `etc/x` agree."""
    name = root_name(access.path)
    if name is None:
        raise TraceError(f"{access.path!r} escapes the root file system (or is no name)")
    return name


def _check_access(access: FileAccess, layers: set[str]) -> None:
    if access.layer not in layers:
        raise TraceError(f"access to {access.path!r} names layer {access.layer} not in the image")
    if not access_name(access):
        raise TraceError("the root directory is not a file a run can read")
    if access.first_access_ns < 0:
        raise TraceError(f"{access.path!r}: negative first access time")
    for start, end in access.ranges:
        if not 0 <= start < end <= MAX_FILE_OFFSET:
            raise TraceError(f"{access.path!r}: invalid byte range [{start}, {end})")


def file_accesses(
    events: Iterable[tuple[int, str, str, int, int]], started_ns: int
) -> tuple[FileAccess, ...]:
    """Per-file accesses from raw observations (monotonic ns, layer digest, path relative
    to the root, offset, length; length 0 for an open or exec): first access relative to
    ``started_ns`` and every byte range read."""
    first: dict[tuple[str, str], int] = {}
    ranges: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for ts, layer, path, offset, length in events:
        key = (layer, path)
        first[key] = min(first.get(key, ts), ts)
        if length > 0:
            ranges.setdefault(key, []).append((offset, offset + length))
    return tuple(
        FileAccess(
            layer,
            "/" + path,
            tuple(sorted(ranges.get((layer, path)) or [(0, FIRST_PAGE)])),
            max(0, ts - started_ns),
        )
        for (layer, path), ts in first.items()
    )
