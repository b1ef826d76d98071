"""What this node can do for acceld, checked on the node itself.

Lazy loading needs FUSE and overlayfs; learning needs eBPF with BTF; both need
containerd and runc. Operators (and the DaemonSet's init step) run `acceld check` to
see at once which capability is missing instead of discovering it from a failed pull.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Check:
    """One capability: whether it is present and what that means."""

    name: str
    ok: bool
    detail: str
    needed_for: str


def _filesystems() -> set[str]:
    try:
        lines = Path("/proc/filesystems").read_text().splitlines()
    except OSError:
        return set()
    return {line.split()[-1] for line in lines if line.strip()}


def run_checks() -> list[Check]:
    """Probe the node; never raises, every failure becomes a Check with ok=False."""
    fs = _filesystems()
    fuse_dev = Path("/dev/fuse")
    btf = Path("/sys/kernel/btf/vmlinux")
    checks = [
        Check(
            "fuse device",
            fuse_dev.exists() and os.access(fuse_dev, os.R_OK | os.W_OK),
            str(fuse_dev),
            "lazy layers",
        ),
        Check("fuse filesystem", "fuse" in fs, "fuse in /proc/filesystems", "lazy layers"),
        Check("overlayfs", "overlay" in fs, "overlay in /proc/filesystems", "containers"),
        Check(
            "fusermount3",
            shutil.which("fusermount3") is not None,
            shutil.which("fusermount3") or "not on PATH",
            "unmounting as non-root",
        ),
        Check(
            "containerd",
            shutil.which("containerd") is not None,
            shutil.which("containerd") or "not on PATH",
            "containers",
        ),
        Check(
            "runc",
            shutil.which("runc") is not None,
            shutil.which("runc") or "not on PATH",
            "containers",
        ),
        Check("kernel BTF", btf.exists(), str(btf), "startup tracing (eBPF)"),
        Check(
            "bcc",
            importlib.util.find_spec("bcc") is not None,
            "python bcc module (Debian python3-bpfcc)",
            "startup tracing (eBPF)",
        ),
        Check("root", os.geteuid() == 0, f"euid {os.geteuid()}", "mounts and eBPF"),
    ]
    return checks
