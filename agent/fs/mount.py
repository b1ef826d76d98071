"""Serving the node's FUSE connection inside the agent's event loop.

pyfuse3 serves one connection per process; it runs as an asyncio task next to the
gRPC server. The connection itself is made and held elsewhere (`agent.fs.keeper`), so
that it can outlive this agent; a mount that nobody holds any more ("transport
endpoint is not connected") is lazily unmounted before a new one is made.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from pathlib import Path

import pyfuse3
import pyfuse3.asyncio

from agent.fs.fuse_connection import FuseConnection, detach, mount_connection
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
    target = os.path.abspath(path)
    with open("/proc/self/mountinfo") as info:
        return any(line.split()[4] == target for line in info)


def mount_device(path: Path) -> str | None:
    """`major:minor` of the file system mounted at ``path``, from mountinfo (a stat()
    would ask our own FUSE server, which may not be serving yet)."""
    target = os.path.abspath(path)
    with open("/proc/self/mountinfo") as info:
        for line in info:
            fields = line.split()
            if fields[4] == target:
                return fields[2]
    return None


def set_read_ahead(path: Path, kib: int) -> None:
    """Let the kernel read ahead ``kib`` KiB on our mount: with the default 128 KiB every
    sequential read costs a FUSE round trip per 128 KiB (`bench.fuse_throughput` prints
    both; docs/bench/design-figures.md)."""
    device = mount_device(path)
    if device is None:
        return
    knob = Path(f"/sys/class/bdi/{device}/read_ahead_kb")
    try:
        knob.write_text(str(kib))
    except OSError as exc:
        log.warning("fs.read_ahead_unchanged", device=device, error=str(exc))


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
    """Serves one FUSE connection (`agent.fs.fuse_connection`) from this event loop:
    `start()` serves, `stop()` stops serving, and detaches the mount unless the
    connection is ``lasting`` (held by the keeper for the next agent)."""

    def __init__(
        self,
        ops: LayerFS,
        mountpoint: Path,
        connection: FuseConnection,
        lasting: bool,
        debug: bool = False,
        read_ahead_kib: int = 1024,
    ) -> None:
        self.ops = ops
        self.read_ahead_kib = read_ahead_kib
        self.mountpoint = mountpoint
        self.connection = connection
        self.lasting = lasting
        self._options = set(MOUNT_OPTIONS) | ({"debug"} if debug else set())
        self._task: asyncio.Task[None] | None = None

    async def start(self, resumed: bool) -> None:
        """Serve the connection: a new one (``resumed`` False), or one an earlier agent
        served, whose INIT libfuse is shown again and whose requests that agent read
        but never answered the kernel is asked to queue again."""
        pyfuse3.asyncio.enable()
        replay, writer = os.pipe()
        os.write(writer, self.connection.init)
        os.close(writer)

        def connected() -> None:
            # Inside libfuse's INIT, before its reply: from here on the session reads
            # and writes the real connection.
            os.dup2(self.connection.fd, replay, inheritable=False)
            if resumed and self.connection.offers_resend:
                self.connection.ask_resend()

        self.ops.on_init = connected
        pyfuse3.init(self.ops, f"/dev/fd/{replay}", self._options)
        self._task = asyncio.create_task(pyfuse3.main(), name="fuse-main")
        if not resumed:
            # The kernel sets the mount's read-ahead when INIT is answered: set ours
            # once a first request (statvfs, served by this loop) proves that is done.
            await asyncio.to_thread(os.statvfs, self.mountpoint)
            set_read_ahead(self.mountpoint, self.read_ahead_kib)
        log.info("fs.serving", path=str(self.mountpoint), resumed=resumed)

    async def stop(self) -> None:
        """Stop serving; requests that arrive meanwhile wait for the next agent."""
        if self._task is None:
            return
        try:
            pyfuse3.terminate()
        except asyncio.InvalidStateError:
            # pyfuse3's asyncio glue fails to wake a reader whose request already
            # arrived; stop the serving task directly instead.
            self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        pyfuse3.close(unmount=False)  # closes the session's descriptor, not the holder's
        os.close(self.connection.fd)
        if not self.lasting:
            detach(self.mountpoint)
        log.info("fs.stopped_serving", path=str(self.mountpoint), detached=not self.lasting)

    @classmethod
    async def new(cls, ops: LayerFS, mountpoint: Path) -> FuseMount:
        """A new connection at ``mountpoint``, served now, that ends with the mount (a
        file system in this process alone: tests, benchmarks)."""
        connection = await connect_new(mountpoint)
        mount = cls(ops, mountpoint, connection, lasting=False)
        await mount.start(resumed=False)
        return mount


async def connect_new(mountpoint: Path) -> FuseConnection:
    """A new connection at ``mountpoint``, in place of whatever mount was left there by
    an agent whose connection nobody holds any more."""
    force_unmount(mountpoint)
    mountpoint.mkdir(parents=True, exist_ok=True)
    return await asyncio.to_thread(mount_connection, mountpoint)
