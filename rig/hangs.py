"""What a hung node looks like from outside, and how to get it moving again.

A FUSE server that stops answering leaves every process that touched its mount asleep
in the kernel (waiting for the answer, or in state D on the locks those waiters hold),
and the daemons above them (runc, containerd's shims) waiting on those processes: a
benchmark or test that just times out and moves on leaves a node that hangs its next
run too. The evidence worth keeping is in the kernel: where each of the server's
threads sleeps, and which threads on the machine are stuck, on what. `abort_fuse` then
does what `umount -f` would, for one connection: the kernel fails every queued and
future request of that mount with ENOTCONN, the stuck readers wake up with an error,
and the rest of the teardown (`rig.containerd.ContainerdServer.stop`,
`rig.agent_process.AgentProcess.stop`) can run. Everything here reads /proc and /sys
only (root needed for the stacks), so it never blocks on the hung mount itself: a
`stat` of the mountpoint could.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from common.kernel_threads import PROC, KernelThread, threads_of
from common.logging import get_logger

log = get_logger(__name__)

FUSECTL = Path("/sys/fs/fuse/connections")


def thread_stacks(pid: int) -> list[KernelThread]:
    """The kernel stack of every thread of ``pid`` (empty if it is gone)."""
    return threads_of(pid)


def _threads_where(stuck: Callable[[KernelThread], bool]) -> list[KernelThread]:
    found = []
    for proc in PROC.iterdir():
        if proc.name.isdigit():
            found += [thread for thread in threads_of(int(proc.name)) if stuck(thread)]
    return found


def d_state_processes() -> list[KernelThread]:
    """Every thread on the machine in uninterruptible sleep (state D), with its kernel
    stack. Threads, not just processes: a multithreaded reader (an interpreter,
    containerd) often has one thread stuck while its main thread sleeps elsewhere."""
    return _threads_where(lambda thread: thread.state == "D")


def blocked_threads() -> list[KernelThread]:
    """`d_state_processes`, plus every thread waiting for a FUSE server's answer: that
    wait starts as an interruptible sleep (state S, in ``request_wait_answer``), so a
    reader of a hung mount is often not in D itself while the threads queued behind
    its locks are."""
    return _threads_where(lambda thread: thread.state == "D" or "fuse_" in (thread.stack or ""))


def mount_device(mountpoint: Path) -> tuple[int, int] | None:
    """(major, minor) of the file system mounted at ``mountpoint``, from mountinfo (the
    topmost mount there; None if nothing is mounted)."""
    wanted = str(mountpoint)
    device = None
    for line in (PROC / "self" / "mountinfo").read_text().splitlines():
        fields = line.split(" ")
        point = fields[4].encode().decode("unicode_escape").encode("latin-1").decode()
        if point == wanted:
            major, minor = fields[2].split(":")
            device = (int(major), int(minor))
    return device


def fuse_connection(mountpoint: Path) -> Path | None:
    """The fusectl directory of the FUSE connection mounted at ``mountpoint``.

    fusectl names a connection by the device number of its super block; FUSE mounts get
    an anonymous device (major 0), whose number is then its minor.
    """
    device = mount_device(mountpoint)
    if device is None or device[0] != 0:
        return None
    _ensure_fusectl()
    path = FUSECTL / str(device[1])
    return path if path.is_dir() else None


def _ensure_fusectl() -> None:
    """Mount fusectl if nobody has (the agent's node has no systemd to do it)."""
    with contextlib.suppress(OSError):
        if any(FUSECTL.iterdir()):
            return
    subprocess.run(
        ["mount", "-t", "fusectl", "fusectl", str(FUSECTL)], capture_output=True, check=False
    )


def fuse_waiting(mountpoint: Path) -> int | None:
    """Requests queued on the mount's FUSE connection that its server has not answered."""
    connection = fuse_connection(mountpoint)
    if connection is None:
        return None
    try:
        return int((connection / "waiting").read_text())
    except (OSError, ValueError):
        return None


def abort_fuse(mountpoint: Path) -> bool:
    """Abort the FUSE connection mounted at ``mountpoint``; True if one was aborted.

    Every pending and later request on it fails with ENOTCONN, so processes stuck in
    it wake up; the mount stays (dead) until it is unmounted.
    """
    connection = fuse_connection(mountpoint)
    if connection is None:
        return False
    try:
        (connection / "abort").write_text("1")
    except OSError as exc:
        log.warning("hangs.fuse_abort_failed", connection=str(connection), error=str(exc))
        return False
    log.warning("hangs.fuse_aborted", mountpoint=str(mountpoint), connection=connection.name)
    return True


def as_json(stacks: list[KernelThread]) -> list[dict[str, Any]]:
    """Stacks as plain dicts, for a results document."""
    return [asdict(stack) for stack in stacks]
