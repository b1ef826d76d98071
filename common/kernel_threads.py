"""How the kernel sees a thread: its name, state, wait channel and kernel stack.

Both the agent's watchdog (its own threads) and the test rig (a hung node's threads,
every process in D state) need this, and it must come from /proc alone: a hang on a
FUSE mount would block anything that touched the mount. Anything unreadable (a thread
that exited, no root, no CONFIG_STACKTRACE) reads as None, never fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
STACK_LIMIT = 4000
"""Characters kept of one kernel stack (they are ~10-30 frames, well below this)."""


@dataclass(frozen=True)
class KernelThread:
    """One thread of one process, as /proc/<pid>/task/<tid> shows it."""

    pid: int
    tid: int
    comm: str | None
    state: str | None
    """The state letter: R, S, D (uninterruptible: what a hang looks like), ..."""
    wchan: str | None
    stack: str | None


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")[:STACK_LIMIT].strip() or None
    except OSError:
        return None


def state_of(stat_text: str | None) -> str | None:
    """The state letter of a /proc stat line (the field after ``(comm)``, which may
    itself hold spaces and parentheses)."""
    if stat_text is None or ")" not in stat_text:
        return None
    fields = stat_text[stat_text.rindex(")") + 1 :].split()
    return fields[0] if fields else None


def kernel_thread(pid: int, tid: int) -> KernelThread:
    """Thread ``tid`` of process ``pid``."""
    task = PROC / str(pid) / "task" / str(tid)
    return KernelThread(
        pid=pid,
        tid=tid,
        comm=_read(task / "comm"),
        state=state_of(_read(task / "stat")),
        wchan=_read(task / "wchan"),
        stack=_read(task / "stack"),
    )


def thread_ids(pid: int) -> list[int]:
    """The thread ids of ``pid``, ascending (empty if it is gone)."""
    try:
        tasks = (PROC / str(pid) / "task").iterdir()
        return sorted(int(task.name) for task in tasks if task.name.isdigit())
    except OSError:
        return []


def threads_of(pid: int) -> list[KernelThread]:
    """Every thread of ``pid``."""
    return [kernel_thread(pid, tid) for tid in thread_ids(pid)]
