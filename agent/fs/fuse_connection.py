"""A FUSE connection that outlives the agent serving it.

The kernel keeps a FUSE connection (and every mount of it) alive while any descriptor
of /dev/fuse for it is open, and queues requests while nobody reads them. So the agent
mounts the connection itself (``mount(2)`` with ``fd=N``), keeps the descriptor in a
process that survives it (`agent.fs.keeper`), and every agent generation serves the
same connection; readers wait during the gap instead of failing.

Two facts of the kernel and libfuse shape the rest (measured on this kernel and
pyfuse3 3.5 / libfuse 3.14, docs/restart-survival.md):

- The kernel sends INIT once per connection, and libfuse answers EIO to every request
  before it has seen one. The INIT message is kept with the descriptor, and each
  generation gives libfuse a pipe holding it as its "device" (``/dev/fd/N``, taken as
  an open FUSE descriptor since libfuse 3.3). Inside INIT, in ``Operations.init``,
  the pipe is replaced by the real descriptor (``dup2``), so everything after that,
  the INIT reply included, goes to the kernel. For the generation that mounted the
  connection, that reply is the real one; a successor's carries an answered request's
  id, which the kernel refuses (ENOENT) and libfuse ignores.
- A request the dead generation had read but not answered would wait forever; with
  FUSE_HAS_RESEND (kernel 6.9 on, offered in INIT's flags) a successor asks the kernel
  to queue those again (FUSE_NOTIFY_RESEND). Handlers are read-only, so answering one
  twice is harmless.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import struct
from dataclasses import dataclass
from pathlib import Path

from common.logging import get_logger

log = get_logger(__name__)

FUSE_INIT = 26
IN_HEADER = struct.Struct("<IIQQIIIHH")
"""fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding."""
INIT_IN = struct.Struct("<IIIII")
"""The start of fuse_init_in: major, minor, max_readahead, flags, flags2."""
FUSE_INIT_EXT = 1 << 30
FUSE_HAS_RESEND = 1 << 39
"""Not in Debian 12's linux/fuse.h (7.38); the running kernel's INIT says what it offers."""
FUSE_NOTIFY_RESEND = 7
MAX_INIT_BYTES = 4096
READ_BUFFER = (1 << 20) + 4096
INIT_TIMEOUT_S = 10.0
MS_RDONLY, MS_NOSUID, MS_NODEV = 1, 2, 4
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)


class FuseConnectionError(OSError):
    """The connection could not be made or its INIT not read."""


@dataclass(frozen=True)
class FuseConnection:
    """An open FUSE connection: the descriptor, the INIT the kernel sent on it, and the
    mount's device (``major:minor``; the minor names its /sys/fs/fuse/connections
    directory)."""

    fd: int
    init: bytes
    device: str

    @property
    def offers_resend(self) -> bool:
        """Whether the kernel can queue again what a dead generation had read."""
        _, minor, _, flags, flags2 = INIT_IN.unpack_from(self.init, IN_HEADER.size)
        if minor < 36 or not flags & FUSE_INIT_EXT:
            return False
        return bool((flags | flags2 << 32) & FUSE_HAS_RESEND)

    @property
    def control_dir(self) -> Path:
        """The connection's fusectl directory (``abort``, ``waiting``)."""
        return Path("/sys/fs/fuse/connections") / self.device.split(":")[1]

    def alive(self) -> bool:
        """Whether the connection still carries requests (an aborted one polls as an
        error, for good)."""
        poller = select.poll()
        poller.register(self.fd, select.POLLERR | select.POLLHUP)
        return not any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))

    def waiting(self) -> int:
        """Requests the kernel holds for this connection (queued or being answered)."""
        try:
            return int((self.control_dir / "waiting").read_text())
        except (OSError, ValueError):
            return 0

    def ask_resend(self) -> None:
        """Have the kernel queue again every request read but not answered."""
        os.write(self.fd, struct.pack("<IiQ", 16, FUSE_NOTIFY_RESEND, 0))


def mount_connection(mountpoint: Path, fsname: str = "acceld") -> FuseConnection:
    """Open /dev/fuse, mount it read-only at ``mountpoint`` and read its INIT."""
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    options = f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions"
    if _libc.mount(
        fsname.encode(),
        os.fsencode(mountpoint),
        f"fuse.{fsname}".encode(),
        MS_RDONLY | MS_NOSUID | MS_NODEV,
        options.encode(),
    ):
        code = ctypes.get_errno()
        os.close(fd)
        raise FuseConnectionError(code, f"mount {mountpoint}: {os.strerror(code)}")
    try:
        return FuseConnection(fd, _read_init(fd), _mount_device(mountpoint))
    except BaseException:
        detach(mountpoint)
        os.close(fd)
        raise


def detach(mountpoint: Path) -> None:
    """Lazily unmount ``mountpoint`` (what still uses it keeps it until it lets go)."""
    if _libc.umount2(os.fsencode(mountpoint), MNT_DETACH):
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOENT):  # not mounted (any more)
            raise FuseConnectionError(code, f"umount {mountpoint}: {os.strerror(code)}")


def _read_init(fd: int) -> bytes:
    """The INIT request the kernel queues at mount time."""
    ready, _, _ = select.select([fd], [], [], INIT_TIMEOUT_S)
    if not ready:
        raise FuseConnectionError(errno.ETIMEDOUT, "the kernel sent no FUSE INIT")
    # The kernel refuses (EINVAL) a read into less than one request of the largest
    # size it may send, whatever the request it has queued.
    message = os.read(fd, READ_BUFFER)
    check_init(message)
    return message


def check_init(message: bytes) -> None:
    """Refuse anything but one whole INIT request (a kept INIT is replayed to libfuse)."""
    if not IN_HEADER.size + INIT_IN.size <= len(message) <= MAX_INIT_BYTES:
        raise FuseConnectionError(errno.EPROTO, f"INIT of {len(message)} bytes")
    length, opcode = struct.unpack_from("<II", message)
    if opcode != FUSE_INIT or length != len(message):
        raise FuseConnectionError(errno.EPROTO, f"not an INIT: opcode {opcode}")


def _mount_device(mountpoint: Path) -> str:
    """``major:minor`` of the mount, from mountinfo (a stat would ask the file system,
    which nobody serves yet)."""
    target = os.path.abspath(mountpoint)
    with open("/proc/self/mountinfo") as info:
        devices = [line.split()[2] for line in info if line.split()[4] == target]
    if not devices:
        raise FuseConnectionError(errno.ENOENT, f"{mountpoint} is not mounted")
    return devices[-1]
