"""Can this node run the eBPF tracer, and if not, why not.

Nodes differ (no BTF, no root, no bcc, tracefs not mounted, no uapi headers), and the
agent must keep serving images without a tracer: it asks here first and logs the one
reason instead of failing somewhere inside libbcc with a compiler dump.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tracer.btf_offsets import VMLINUX_BTF
from tracer.headers import UAPI_ARCH_INCLUDE, UAPI_INCLUDE

TRACEFS = Path("/sys/kernel/tracing")

# Tracepoints the program cannot work without (sys_exit_open is optional: x86-64 only).
REQUIRED_TRACEPOINTS = (
    "sched/sched_process_exec",
    "sched/sched_process_fork",
    "sched/sched_process_exit",
    "syscalls/sys_exit_openat",
    "syscalls/sys_exit_openat2",
    "syscalls/sys_enter_read",
    "syscalls/sys_enter_pread64",
    "syscalls/sys_enter_readv",
    "syscalls/sys_enter_preadv",
    "syscalls/sys_enter_sendfile64",
    "syscalls/sys_enter_copy_file_range",
    "syscalls/sys_enter_splice",
    "syscalls/sys_enter_mmap",
)


class TracerUnavailable(Exception):
    """eBPF tracing cannot run on this node; `reason` says why in one sentence, and
    `details` carries the compiler/verifier output when the program itself failed."""

    def __init__(self, reason: str, details: str = "") -> None:
        super().__init__(f"eBPF unavailable on this node because {reason}")
        self.reason = reason
        self.details = details


def ensure_tracefs() -> Path:
    """Mount tracefs if nobody has: BCC reads tracepoint formats and ids from it."""
    if (TRACEFS / "events").is_dir():
        return TRACEFS
    proc = subprocess.run(
        ["mount", "-t", "tracefs", "nodev", str(TRACEFS)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0 or not (TRACEFS / "events").is_dir():
        raise TracerUnavailable(f"tracefs is not mounted and mounting it failed: {proc.stderr}")
    return TRACEFS


def check_available() -> None:
    """Raise TracerUnavailable naming the first missing prerequisite."""
    if os.geteuid() != 0:
        raise TracerUnavailable("the tracer must run as root (loading BPF programs)")
    if not VMLINUX_BTF.is_file():
        raise TracerUnavailable(f"the kernel has no BTF ({VMLINUX_BTF} missing)")
    try:
        import bcc  # noqa: F401
    except ImportError as exc:
        raise TracerUnavailable(f"the bcc Python module is missing ({exc})") from exc
    if not (UAPI_INCLUDE / "linux" / "bpf.h").is_file() or not (UAPI_ARCH_INCLUDE / "asm").is_dir():
        raise TracerUnavailable("linux-libc-dev (kernel uapi headers) is not installed")
    events = ensure_tracefs() / "events"
    missing = [tp for tp in REQUIRED_TRACEPOINTS if not (events / tp).is_dir()]
    if missing:
        raise TracerUnavailable(f"the kernel lacks tracepoints {', '.join(missing)}")
