"""User-space side of the tracer: targets in, an ordered access trace out.

One Tracer (one ~2 s compile) serves any number of containers: user space only fills
the target maps that the kernel side filters on, then drains the ring buffer for a
startup window that ends when the container has gone quiet or at a deadline.
"""

from __future__ import annotations

import ctypes
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from common.logging import get_logger
from tracer.program import load_program

log = get_logger(__name__)

Kind = Literal["exec", "open", "read", "mmap"]
EndedBy = Literal["quiet", "deadline", "stopped"]
"""Why a window closed: the container went quiet, the deadline passed, or the caller's
``stop`` condition came true (e.g. the container printed its readiness line)."""
_KINDS: dict[int, Kind] = {1: "exec", 2: "open", 3: "read", 4: "mmap"}
_KIND_EXIT = 5

# struct event_t up to path[] (see bpf_program.c).
_HEADER = struct.Struct("<QQQQIIIIII")
_EV_PATH = 1
_EV_DIR = 2
_EV_TRUNCATED = 4
_EV_DETACHED = 8


@dataclass(frozen=True)
class AccessEvent:
    """One access by a traced process, in the order the kernel saw it."""

    ts_ns: int  # CLOCK_MONOTONIC
    pid: int
    kind: Kind
    path: str  # absolute inside the process's root (the container's rootfs)
    offset: int  # read/mmap: first byte; exec/open: 0
    length: int  # read: bytes returned; mmap: bytes mapped; exec/open: 0
    mntns_id: int
    is_dir: bool = False
    outside_root: bool = False  # reached through an fd or mount outside the process root


@dataclass
class Trace:
    """The outcome of one startup window."""

    events: list[AccessEvent] = field(default_factory=list)
    dropped: int = 0  # events the kernel could not queue (ring buffer full)
    unresolved: int = 0  # events whose file's path never arrived (dropped first sighting)
    ended_by: EndedBy = "deadline"
    exits: dict[int, int] = field(default_factory=dict)
    """Watched processes (`Tracer.watch_exit`) that ended: pid -> wait(2)-style status."""

    def paths(self) -> list[str]:
        """Files in order of first access; what a prefetch list is built from."""
        return list(dict.fromkeys(e.path for e in self.events))


@dataclass(frozen=True)
class _FileInfo:
    path: str
    flags: int


def mntns_of(pid: int) -> int:
    """The mount namespace id the kernel side filters on (the inode of /proc/PID/ns/mnt)."""
    return os.stat(f"/proc/{pid}/ns/mnt").st_ino


def container_init(pid: int) -> int:
    """The outermost ancestor of `pid` in the same mount namespace: a container's first
    process, whose exit status says how the container's start ended."""
    mntns = mntns_of(pid)
    while True:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            parent = int(stat.rpartition(")")[2].split()[1])
            if parent <= 1 or mntns_of(parent) != mntns:
                return pid
        except (OSError, ValueError, IndexError):
            return pid
        pid = parent


def cgroup_id_of(pid: int) -> int | None:
    """The cgroup v2 id of a process (the inode of its cgroup directory), or None where
    no cgroup2 hierarchy is mounted, as on pure v1 hosts."""
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    roots = [line.split()[1] for line in mounts if line.split()[2] == "cgroup2"]
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        hierarchy, _, rest = line.partition(":")
        if hierarchy == "0" and roots:
            return os.stat(roots[0] + rest.partition(":")[2]).st_ino
    return None


def _decode_path(raw: bytes) -> str:
    """Components arrive leaf first, each NUL-terminated."""
    parts = [p.decode(errors="surrogateescape") for p in raw.split(b"\0") if p]
    return "/" + "/".join(reversed(parts))


class Tracer:
    """eBPF access tracer filtered in the kernel to the targets added."""

    def __init__(self, ring_buffer_mb: int = 64) -> None:
        pages = max(1, ring_buffer_mb * 1024 * 1024 // 4096)
        # The ring buffer size must be a power of two pages.
        self._bpf: Any = load_program(1 << (pages.bit_length() - 1))
        self._files: dict[tuple[int, int, int], _FileInfo] = {}
        self._pending: list[AccessEvent] = []
        self._unresolved = 0
        self._exits: dict[int, int] = {}
        self._bpf[b"events"].open_ring_buffer(self._on_event)
        log.info("tracer.loaded", ring_buffer_mb=ring_buffer_mb)

    def add_target(
        self, *, mntns_id: int | None = None, cgroup_id: int | None = None, pid: int | None = None
    ) -> None:
        """Trace processes in this mount namespace / cgroup v2, or started from `pid`.

        `pid` follows the process tree in the kernel from now on (forks after this call).
        """
        if mntns_id is not None:
            self._set("target_mntns", ctypes.c_uint32(mntns_id))
        if cgroup_id is not None:
            self._set("target_cgroup", ctypes.c_uint64(cgroup_id))
        if pid is not None:
            self._set("target_pids", ctypes.c_uint32(pid))

    def remove_target(
        self, *, mntns_id: int | None = None, cgroup_id: int | None = None, pid: int | None = None
    ) -> None:
        for name, key in (
            ("target_mntns", None if mntns_id is None else ctypes.c_uint32(mntns_id)),
            ("target_cgroup", None if cgroup_id is None else ctypes.c_uint64(cgroup_id)),
            ("target_pids", None if pid is None else ctypes.c_uint32(pid)),
        ):
            if key is not None:
                table = self._bpf[name.encode()]
                if key in table:
                    del table[key]

    def watch_exit(self, pid: int) -> None:
        """Report how process `pid` ends (its status lands in the next `Trace.exits`):
        a startup whose process crashed must not teach a profile."""
        self._set("watch_exit", ctypes.c_uint32(pid))

    def unwatch_exit(self, pid: int) -> None:
        """Stop watching `pid` (still running once its window closed): the map is small."""
        table = self._bpf[b"watch_exit"]
        key = ctypes.c_uint32(pid)
        if key in table:
            del table[key]

    def _set(self, table_name: str, key: ctypes._SimpleCData[int]) -> None:
        table = self._bpf[table_name.encode()]
        table[key] = table.Leaf(1)

    def _on_event(self, _ctx: Any, data: Any, size: int) -> None:
        raw = ctypes.string_at(data, size)
        ts, ino, offset, length, dev, mntns, pid, kind, flags, path_len = _HEADER.unpack_from(raw)
        if kind == _KIND_EXIT:
            self._exits[pid] = offset
            return
        key = (ino, dev, mntns)
        if flags & _EV_PATH:
            path_bytes = raw[_HEADER.size : _HEADER.size + path_len]
            self._files[key] = _FileInfo(_decode_path(path_bytes), flags)
        info = self._files.get(key)
        if info is None:
            self._unresolved += 1
            return
        self._pending.append(
            AccessEvent(
                ts_ns=ts,
                pid=pid,
                kind=_KINDS[kind],
                path=info.path,
                offset=offset,
                length=length,
                mntns_id=mntns,
                is_dir=bool(info.flags & _EV_DIR),
                outside_root=bool(info.flags & (_EV_DETACHED | _EV_TRUNCATED)),
            )
        )

    def poll(self, timeout_ms: int) -> int:
        """Consume what the kernel queued (waiting up to timeout_ms); returns new events."""
        before = len(self._pending)
        self._bpf.ring_buffer_poll(timeout_ms)
        return len(self._pending) - before

    def collect(
        self,
        *,
        quiet_s: float = 1.0,
        deadline_s: float = 30.0,
        activity: Callable[[], float | None] | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> Trace:
        """Gather one startup window.

        It ends `quiet_s` after the last event (the container has settled), or at
        `deadline_s` after the call. Before the first event only the deadline counts,
        so a container that is slow to start is still waited for, unless the caller saw
        activity itself: ``activity`` returns when it last did (time.monotonic()
        seconds, None for never), and is asked again each time the window could close.
        A program faulting in a mapped library makes no system call for as long as that
        takes; the reads that reach FUSE then are the only sign it is still starting,
        and without them a slow link would end the window mid-start. Likewise a start
        that ran while the program was still loading is not waited for until the
        deadline.
        With ``stop`` the window ends when it returns True (checked at least every
        100 ms) or at the deadline, never on a quiet period: a start that says itself
        when it is complete (a readiness line) may well pause before it says so.
        """
        start = time.monotonic()
        last_event: float | None = None
        ended_by: EndedBy = "deadline"
        while True:
            now = time.monotonic()
            seen = activity() if activity is not None else None
            if seen is not None and (last_event is None or seen > last_event):
                last_event = seen
            if stop is not None and stop():
                # Everything queued up to now belongs to this window. Read the ring
                # directly: its wake-up comes later (irq_work), so a poll can find it
                # "empty" while the container's last events sit in it.
                self._bpf.ring_buffer_consume()
                ended_by = "stopped"
                break
            if now - start >= deadline_s:
                break
            if stop is not None:
                self.poll(max(1, min(100, int((deadline_s - (now - start)) * 1000))))
                continue
            if last_event is not None and now - last_event >= quiet_s:
                ended_by = "quiet"
                break
            budget = deadline_s - (now - start)
            if last_event is not None:
                budget = min(budget, quiet_s - (now - last_event))
            if self.poll(max(1, min(100, int(budget * 1000)))):
                last_event = time.monotonic()
        return self._take(ended_by)

    def _take(self, ended_by: EndedBy) -> Trace:
        events = sorted(self._pending, key=lambda e: e.ts_ns)
        trace = Trace(
            events=events,
            dropped=self._take_dropped(),
            unresolved=self._unresolved,
            ended_by=ended_by,
            exits=self._exits,
        )
        self._exits = {}
        self._pending = []
        self._unresolved = 0
        if trace.dropped:
            log.warning("tracer.events_dropped", dropped=trace.dropped)
        return trace

    def _take_dropped(self) -> int:
        table = self._bpf[b"dropped"]
        zero = ctypes.c_int(0)
        count = int(table[zero].value)
        table[zero] = table.Leaf(0)
        return count

    def forget_files(self) -> None:
        """Start the next trace afresh: re-report first opens, read ranges and paths."""
        for name in (b"seen", b"extents"):
            self._bpf[name].clear()
        self._files.clear()

    def close(self) -> None:
        """Detach and unload; the kernel stops filtering and frees the maps."""
        self._bpf.cleanup()

    def __enter__(self) -> Tracer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
