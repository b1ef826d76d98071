"""Mounting and unmounting the node's FUSE file system inside the agent's event loop.

pyfuse3 serves one mount per process; it runs as an asyncio task next to the gRPC
server. A mount left behind by a crashed agent ("transport endpoint is not connected")
is lazily unmounted before mounting again, so a restart never needs manual cleanup.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from pathlib import Path

import pyfuse3
import pyfuse3.asyncio

from agent.fs.operations import LayerFS
from common.logging import get_logger

log = get_logger(__name__)

MOUNT_OPTIONS = frozenset(
    {
        "fsname=acceld",
        "subtype=acceld",
        "ro",
        "allow_other",
        "default_permissions",
    }
)


def is_mounted(path: Path) -> bool:
    """Whether ``path`` is a mount point (by /proc/self/mountinfo, which survives a dead
    FUSE server, unlike stat())."""
    target = str(path.resolve())
    with open("/proc/self/mountinfo") as info:
        return any(line.split()[4] == target for line in info)


def force_unmount(path: Path) -> None:
    """Detach whatever is mounted at ``path`` (stale or live)."""
    if not is_mounted(path):
        return
    result = subprocess.run(
        ["umount", "-l", str(path)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True, check=False)
    log.info("fs.stale_mount_removed", path=str(path))


class FuseMount:
    """The running mount: `start()` mounts and serves, `stop()` unmounts."""

    def __init__(self, ops: LayerFS, mountpoint: Path, debug: bool = False) -> None:
        self.ops = ops
        self.mountpoint = mountpoint
        self._options = set(MOUNT_OPTIONS) | ({"debug"} if debug else set())
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Mount at ``mountpoint`` and serve requests from this event loop."""
        pyfuse3.asyncio.enable()
        force_unmount(self.mountpoint)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        pyfuse3.init(self.ops, str(self.mountpoint), self._options)
        self._task = asyncio.create_task(pyfuse3.main(), name="fuse-main")
        log.info("fs.mounted", path=str(self.mountpoint))

    async def stop(self) -> None:
        """Stop serving and unmount (lazily if something still holds the mount busy)."""
        if self._task is None:
            return
        pyfuse3.terminate()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        try:
            pyfuse3.close(unmount=True)
        except OSError:
            pyfuse3.close(unmount=False)
        force_unmount(self.mountpoint)
        log.info("fs.unmounted", path=str(self.mountpoint))
