"""Makes a hung agent say so: event-loop stalls and FUSE requests that never end.

FUSE handlers, the snapshotter and most of the agent share one asyncio loop. When that
loop blocked inside a syscall or a lock in the field, the log went silent and nothing
showed the hang. So the watcher is a thread of its own: the loop stamps a heartbeat,
the thread notices when the stamps stop, and it reads the in-flight FUSE table to
notice a request that is stuck while the loop is fine (an await that never returns).
Each finding is logged once, as one record with every thread's Python and kernel stack
(what an operator needs to tell a FUSE deadlock from a slow registry), and counted in
Prometheus series that the metrics thread serves even while the loop is stuck.

The thread needs the GIL: a hang inside C code that holds it (rare: blocking calls
release it) stops the watcher as well.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypedDict

from agent import metrics
from agent.fs.in_flight import FuseRequest, InFlightRequests
from agent.thread_stacks import ThreadStack, all_thread_stacks, await_stack
from common.logging import get_logger

log = get_logger(__name__)

LOOP_STALL = "loop_stall"
FUSE_REQUEST = "fuse_request"
_AWAIT_STACK_WAIT_S = 1.0
"""How long the thread waits for the (running) loop to show a stuck request's awaits."""


@dataclass(frozen=True)
class StallReport:
    """One finding, as logged."""

    kind: str
    age_s: float
    threads: list[ThreadStack]
    op: str | None = None
    inode: int | None = None
    request_id: int | None = None
    await_stack: str | None = None
    """Where the handler of a stuck FUSE request waits."""

    def log_fields(self) -> dict[str, object]:
        """The record's fields (unknown parts omitted)."""
        fields: dict[str, object] = {"kind": self.kind, "age_s": round(self.age_s, 3)}
        for name in ("op", "inode", "request_id", "await_stack"):
            value = getattr(self, name)
            if value is not None:
                fields[name] = value
        fields["threads"] = [thread.as_dict() for thread in self.threads]
        return fields


class WatchdogStatus(TypedDict):
    """What /healthz answers."""

    status: str
    """"ok", or "stalled" while the event loop is stuck past the threshold."""
    loop_lag_s: float
    worst_loop_stall_s: float
    worst_loop_lag_s: float
    """Longest a heartbeat ran late, stalls below the threshold included."""
    loop_stalls: int
    fuse_requests_in_flight: int
    oldest_fuse_request_s: float
    stalled_fuse_requests: int


@dataclass
class _State:
    """What the thread found, read by ``status()`` from the HTTP thread."""

    stall_beat: float | None = None
    """The heartbeat the ongoing stall began after; None while the loop runs."""
    loop_stalls: int = 0
    worst_stall_s: float = 0.0
    stalled_requests: int = 0
    reported: dict[int, FuseRequest] = field(default_factory=dict)


class Watchdog:
    """Watches one event loop and the FUSE requests it serves."""

    def __init__(
        self,
        requests: InFlightRequests,
        *,
        stall_threshold_s: float = 5.0,
        request_threshold_s: float = 30.0,
        heartbeat_s: float = 0.1,
        on_report: Callable[[StallReport], None] | None = None,
    ) -> None:
        if min(stall_threshold_s, request_threshold_s, heartbeat_s) <= 0:
            raise ValueError("watchdog thresholds and heartbeat must be positive")
        self._requests = requests
        self._stall_threshold = stall_threshold_s
        self._request_threshold = request_threshold_s
        self._heartbeat = heartbeat_s
        self._check_every = min(heartbeat_s, stall_threshold_s / 4, request_threshold_s / 4)
        self._on_report = on_report
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._state = _State()
        self._last_beat = time.monotonic()
        self._last_long_gap = 0.0
        self._worst_lag = 0.0
        """Longest a heartbeat ran late (written on the loop, read by the thread)."""

    # -- the loop's side --------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Begin the heartbeat on ``loop`` and the watching thread."""
        self._loop = loop
        self._last_beat = time.monotonic()
        loop.call_soon_threadsafe(self._beat)
        self._thread = threading.Thread(target=self._watch, name="acceld-watchdog", daemon=True)
        self._thread.start()
        log.info(
            "watchdog.started",
            stall_threshold_s=self._stall_threshold,
            request_threshold_s=self._request_threshold,
        )

    def stop(self) -> None:
        """Stop watching (called on the loop's thread)."""
        self._stopping.set()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._thread is not None:
            self._thread.join(timeout=2 * _AWAIT_STACK_WAIT_S)
            self._thread = None

    def _beat(self) -> None:
        if self._stopping.is_set() or self._loop is None:
            return
        now = time.monotonic()
        gap = now - self._last_beat
        self._worst_lag = max(self._worst_lag, gap - self._heartbeat)
        if gap > self._stall_threshold:
            self._last_long_gap = gap  # written before the beat, so the thread sees both
        self._last_beat = now
        self._timer = self._loop.call_later(self._heartbeat, self._beat)

    # -- the thread's side ------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stopping.wait(self._check_every):
            try:
                self._check_loop()
                self._check_requests()
            except Exception:
                log.exception("watchdog.check_failed")

    def _check_loop(self) -> None:
        beat = self._last_beat
        lag = time.monotonic() - beat
        metrics.WATCHDOG_LOOP_LAG.set(lag)
        metrics.WATCHDOG_WORST_LOOP_LAG.set(self._worst_lag)
        state = self._state
        if state.stall_beat is not None and beat != state.stall_beat:
            # The beat that ended the stall measured it whole (the thread saw only part).
            stalled = self._last_long_gap
            with self._lock:
                state.worst_stall_s = max(state.worst_stall_s, stalled)
                state.stall_beat = None
            metrics.WATCHDOG_WORST_LOOP_STALL.set(state.worst_stall_s)
            log.warning("watchdog.loop_recovered", kind=LOOP_STALL, stalled_s=round(stalled, 3))
        if lag <= self._stall_threshold:
            return
        with self._lock:
            state.worst_stall_s = max(state.worst_stall_s, lag)
            new_stall = state.stall_beat is None
            if new_stall:
                state.stall_beat = beat
                state.loop_stalls += 1
        metrics.WATCHDOG_WORST_LOOP_STALL.set(state.worst_stall_s)
        if new_stall:
            metrics.WATCHDOG_LOOP_STALLS.inc()
            self._report(StallReport(LOOP_STALL, lag, all_thread_stacks()))

    def _check_requests(self) -> None:
        now = time.monotonic()
        requests = self._requests.snapshot()
        metrics.WATCHDOG_OLDEST_FUSE_REQUEST.set(requests[0].age(now) if requests else 0.0)
        state = self._state
        live = {request.request_id for request in requests}
        for request_id in [r for r in state.reported if r not in live]:
            finished = state.reported.pop(request_id)
            log.warning(
                "watchdog.fuse_request_finished",
                kind=FUSE_REQUEST,
                op=finished.op,
                inode=finished.inode,
                request_id=request_id,
                age_s=round(finished.age(now), 3),
            )
        threads: list[ThreadStack] | None = None  # one snapshot for a burst of reports
        for request in requests:
            age = request.age(now)
            if age <= self._request_threshold:
                break  # oldest first: the rest are younger
            if request.request_id in state.reported:
                continue
            if threads is None:
                threads = all_thread_stacks()
            state.reported[request.request_id] = request
            with self._lock:
                state.stalled_requests += 1
            metrics.WATCHDOG_STALLED_FUSE_REQUESTS.labels(request.op).inc()
            report = StallReport(
                FUSE_REQUEST,
                age,
                threads,
                op=request.op,
                inode=request.inode,
                request_id=request.request_id,
                await_stack=self._await_stack(request),
            )
            self._report(report)

    def _await_stack(self, request: FuseRequest) -> str | None:
        """The stuck request's await chain, taken on the loop (a task's frames are only
        consistent there); None if the loop does not answer in time (it is stalled too)."""
        handler, loop = request.handler, self._loop
        if handler is None or loop is None or self._state.stall_beat is not None:
            return None
        answer: concurrent.futures.Future[str] = concurrent.futures.Future()

        def take() -> None:
            try:
                answer.set_result(await_stack(handler))
            except Exception as exc:
                answer.set_exception(exc)

        try:
            loop.call_soon_threadsafe(take)
            return answer.result(timeout=_AWAIT_STACK_WAIT_S)
        except Exception:  # loop closed or stuck, a chain that would not format
            return None

    def _report(self, report: StallReport) -> None:
        log.error("watchdog.stall", **report.log_fields())
        if self._on_report is not None:
            try:
                self._on_report(report)
            except Exception:
                log.exception("watchdog.report_hook_failed")

    # -- for /healthz -----------------------------------------------------------------

    def status(self) -> WatchdogStatus:
        """A snapshot for /healthz: "stalled" while the loop is stuck past the threshold
        (a stuck FUSE request alone is listed, not fatal: a slow registry makes those)."""
        now = time.monotonic()
        requests = self._requests.snapshot()
        with self._lock:
            state = self._state
            lag = now - self._last_beat
            stalled = state.stall_beat is not None or (
                self._thread is not None and lag > self._stall_threshold
            )
            return WatchdogStatus(
                status="stalled" if stalled else "ok",
                loop_lag_s=round(lag, 3),
                worst_loop_stall_s=round(max(state.worst_stall_s, lag if stalled else 0), 3),
                worst_loop_lag_s=round(max(self._worst_lag, lag - self._heartbeat), 3),
                loop_stalls=state.loop_stalls,
                fuse_requests_in_flight=len(requests),
                oldest_fuse_request_s=round(requests[0].age(now), 3) if requests else 0.0,
                stalled_fuse_requests=state.stalled_requests,
            )
