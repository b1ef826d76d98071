"""Learn what a container's startup reads, and share it with the fleet.

A recording starts at the first open a container makes in an image's lazy layers (the
FUSE request names the opening process, hence its mount namespace). From then until the
startup window closes (a quiet period, or a deadline) two sources are gathered: the eBPF
tracer, which sees every read including page-cache hits, and the FUSE demand log, which
sees only reads that reached us (the only source where eBPF is unavailable; the profile
then says it was blind to cached reads). Paths are mapped to the topmost image layer
that holds them, learned into a run profile and pushed to the registry. A node records
the first `record_starts` starts of an image, then a `sample_rate` share of them.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time
from dataclasses import dataclass, field

from agent.fs.operations import MountedLayer
from agent.image_sessions import ImageSession, ImageSessions
from common.logging import get_logger
from fetcher.errors import RegistryError
from fetcher.registry import RegistryClient
from formats.plan_path import root_name
from formats.toc import TocEntry
from profiles.learn import from_trace
from profiles.registry_sync import push_run_profile
from profiles.trace import Outcome, RunTrace, TraceError, file_accesses, run_outcome
from tracer.availability import TracerUnavailable
from tracer.trace import Tracer, container_init, mntns_of

log = get_logger(__name__)


@dataclass
class _Window:
    """One recording in progress."""

    session: ImageSession
    started_ns: int
    wall_ns: int
    last_event_ns: int
    fuse: list[tuple[int, str, str, int, int]] = field(default_factory=list)
    """(monotonic ns, image layer digest, path, offset, length) of demanded reads."""
    mapped: list[tuple[int, str, str, int, int]] = field(default_factory=list)
    """mmap(2) of files in the image, as eBPF saw them (same fields as ``fuse``)."""
    outcome: Outcome = Outcome.OK


@dataclass(frozen=True)
class RecorderSettings:
    """When and how long to record."""

    record_starts: int = 3
    sample_rate: float = 0.1
    quiet_s: float = 3.0
    deadline_s: float = 60.0
    use_ebpf: bool = True


def _node_mount_namespaces() -> frozenset[int]:
    """The host's and the agent's own mount namespaces (the agent may run in a pod)."""
    found = set()
    for pid in (1, os.getpid()):
        try:
            found.add(mntns_of(pid))
        except OSError:
            continue
    return frozenset(found)


class StartupRecorder:
    """Records startups of images served here and pushes their run profiles."""

    def __init__(
        self,
        client: RegistryClient,
        sessions: ImageSessions,
        settings: RecorderSettings | None = None,
        node: str | None = None,
    ) -> None:
        """``sessions``: the images served here, to tell which use a layer a file of
        which was opened or read (the recorder is the file system's listener)."""
        self.client = client
        self.sessions = sessions
        self.settings = settings or RecorderSettings()
        self.node = node or socket.gethostname()
        self._windows: dict[str, _Window] = {}
        self._tracer: Tracer | None = None
        self._tracer_failed = not self.settings.use_ebpf
        self._tracer_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self.pushed: list[str] = []
        self._node_namespaces = _node_mount_namespaces()

    def preload(self) -> None:
        """Start compiling the eBPF program now (seconds) rather than at the first start."""
        task = asyncio.get_running_loop().create_task(self._load_tracer_quietly())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _load_tracer_quietly(self) -> None:
        await self._load_tracer()

    def _wanted(self, session: ImageSession) -> bool:
        if session.recording:
            return False
        if session.starts_recorded < self.settings.record_starts:
            return True
        return random.random() < self.settings.sample_rate

    def opened(self, mounted: MountedLayer, entry: TocEntry, pid: int) -> None:
        """FUSE listener: a container process opened a file (may start a recording)."""
        self.on_open(self.sessions.using(mounted.name), pid)

    def read(self, mounted: MountedLayer, entry: TocEntry, offset: int, size: int) -> None:
        """FUSE listener: a read reached FUSE (the FUSE side of a startup trace)."""
        self.on_demand(self.sessions.using(mounted.name), mounted.name, entry.name, offset, size)

    def on_open(self, sessions: list[ImageSession], pid: int) -> None:
        """A process opened a file in these images' layers: maybe start recording.

        Only a process in a mount namespace of its own is a container starting: the
        runtime and containerd also open files in a fresh rootfs (e.g. /etc/passwd and
        /etc/group to resolve the user) from the node's namespace, and a window opened on
        them would trace the whole node and never see the container's exit.
        """
        try:  # now, while the process surely exists; eBPF may take seconds to load
            mntns: int | None = mntns_of(pid)
            init: int | None = container_init(pid)
        except OSError:
            mntns = init = None
        if mntns is not None and mntns in self._node_namespaces:
            return
        for session in sessions:
            if len(session.mounted) < len(session.layer_order) or not self._wanted(session):
                continue
            session.recording = True
            now = time.monotonic_ns()
            window = _Window(session, now, time.time_ns(), now)
            self._windows[session.manifest_digest] = window
            log.info(
                "recorder.started", image=str(session.reference), pid=pid, init=init, mntns=mntns
            )
            task = asyncio.get_running_loop().create_task(self._record(window, mntns, init))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def on_demand(
        self, sessions: list[ImageSession], layer_name: str, path: str, offset: int, length: int
    ) -> None:
        """A read reached FUSE: add it to every recording of an image using that layer
        (cache hit or not: the profile is about what startup reads, not what it missed)."""
        now = time.monotonic_ns()
        for session in sessions:
            window = self._windows.get(session.manifest_digest)
            if window is None:
                continue
            digest = next((d for d, m in session.mounted.items() if m.name == layer_name), None)
            if digest is not None:
                window.fuse.append((now, digest, path, offset, length))
                window.last_event_ns = now

    async def _load_tracer(self) -> Tracer | None:
        async with self._tracer_lock:
            if self._tracer is None and not self._tracer_failed:
                try:
                    self._tracer = await asyncio.to_thread(Tracer)
                except TracerUnavailable as exc:
                    log.warning("recorder.ebpf_unavailable", reason=str(exc))
                    self._tracer_failed = True
            return self._tracer

    async def _record(self, window: _Window, mntns: int | None, init: int | None) -> None:
        session = window.session
        ebpf_events: list[tuple[int, str, str, int, int]] = []
        try:
            tracer = await self._load_tracer() if mntns is not None else None
            if tracer is not None and mntns is not None and init is not None:
                ebpf_events = await self._trace_with_ebpf(tracer, window, mntns, init)
            else:
                # Without eBPF the window sees no exit status: only a timeout is told.
                window.outcome = run_outcome(None, await self._wait_quiet(window))
            trace = self._run_trace(window, ebpf_events, tracer is not None)
            if trace is None:
                return
            if trace.outcome is not Outcome.OK:
                # What a broken or endless start read is no plan for the next one.
                log.warning(
                    "recorder.run_discarded",
                    image=str(session.reference),
                    outcome=str(trace.outcome),
                    files=len(trace.accesses),
                )
                return
            published = await push_run_profile(self.client, session.reference, from_trace(trace))
            session.starts_recorded += 1
            self.pushed.append(published.digest)
            log.info(
                "recorder.profile_pushed",
                image=str(session.reference),
                files=len(trace.accesses),
                sources=sorted(trace.sources),
                outcome=str(trace.outcome),
                digest=published.digest,
            )
        except (RegistryError, TraceError, OSError, ValueError) as exc:
            log.warning("recorder.failed", image=str(session.reference), error=str(exc))
        finally:
            self._windows.pop(session.manifest_digest, None)
            session.recording = False

    async def _trace_with_ebpf(
        self, tracer: Tracer, window: _Window, mntns: int, init: int
    ) -> list[tuple[int, str, str, int, int]]:
        tracer.add_target(mntns_id=mntns)
        tracer.watch_exit(init)
        try:
            trace = await asyncio.to_thread(
                tracer.collect,
                quiet_s=self.settings.quiet_s,
                deadline_s=self.settings.deadline_s,
                activity=lambda: window.last_event_ns / 1e9,
            )
        finally:
            tracer.remove_target(mntns_id=mntns)
            tracer.unwatch_exit(init)
            tracer.forget_files()
        window.outcome = run_outcome(trace.exits.get(init), trace.ended_by == "deadline")
        events = []
        for event in trace.events:
            if event.is_dir or event.outside_root or (event.kind == "exec" and not event.path):
                continue
            path = root_name(event.path)
            found = None if path is None else window.session.topmost(path)
            if path is None or found is None:
                continue
            length = event.length if event.kind in ("read", "mmap") else 0
            if event.kind == "mmap":
                window.mapped.append((event.ts_ns, found[0], path, event.offset, length))
            else:
                events.append((event.ts_ns, found[0], path, event.offset, length))
        return events

    async def _wait_quiet(self, window: _Window) -> bool:
        """Wait for the window to close; True when it was the deadline that closed it."""
        deadline = window.started_ns + int(self.settings.deadline_s * 1e9)
        quiet = int(self.settings.quiet_s * 1e9)
        while True:
            now = time.monotonic_ns()
            if now - window.last_event_ns >= quiet:
                return False
            if now >= deadline:
                return True
            await asyncio.sleep(0.2)

    def _run_trace(
        self, window: _Window, ebpf: list[tuple[int, str, str, int, int]], ebpf_used: bool
    ) -> RunTrace | None:
        session = window.session
        # A mapping says which bytes a process may touch, not which it did: where FUSE
        # saw the faults of a mapped file (this start's first reads of it), those are the
        # bytes; only mappings FUSE never saw keep their whole range.
        faulted = {(layer, path) for _, layer, path, _, length in window.fuse if length > 0}
        mapped = [
            (ts, layer, path, offset, 0 if (layer, path) in faulted else length)
            for ts, layer, path, offset, length in window.mapped
        ]
        accesses = file_accesses([*window.fuse, *ebpf, *mapped], window.started_ns)
        if not accesses:
            return None
        sources = {"fuse"} | ({"ebpf"} if ebpf_used else set())
        return RunTrace(
            image=session.manifest_digest,
            layers=tuple(session.layer_order),
            accesses=accesses,
            outcome=window.outcome,
            node=self.node,
            sources=frozenset(sources),
            page_cache_visible=ebpf_used,
            started_at_ns=window.wall_ns,
        )

    async def close(self) -> None:
        """Finish recordings in flight (bounded by their deadlines) and unload eBPF."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._tracer is not None:
            self._tracer.close()
