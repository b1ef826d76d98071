"""The agent's side of the keeper (`agent.fs.keeper`): get the connection, hand it over.

The agent starts the keeper itself when none answers (in its own session, so that the
agent's death does not take it along); where a service manager runs the keeper (a
systemd unit, a container of its own in the agent's pod) the agent only connects.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path

from agent.fs.fuse_connection import FuseConnection, check_init
from agent.fs.keeper import KeeperProtocolError, dial, receive_message, send_message
from common.logging import get_logger

log = get_logger(__name__)

CONNECT_TIMEOUT_S = 10.0


class KeeperBusyError(RuntimeError):
    """Another agent serves the mountpoint and would not hand it over."""


class KeeperClient:
    """One connection to the keeper; its calls run on threads (blocking socket)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._lock = asyncio.Lock()

    @classmethod
    async def connect(
        cls, socket_path: Path, grace_s: float, spawn: bool, log_path: Path
    ) -> KeeperClient:
        """The keeper at ``socket_path``; with ``spawn``, one started now if none
        answers, else the one a service manager starts beside the agent, waited for."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CONNECT_TIMEOUT_S
        spawned = not spawn
        while True:
            try:
                return cls(await asyncio.to_thread(dial, socket_path))
            except OSError:
                if loop.time() > deadline:
                    raise
            if not spawned:
                _spawn(socket_path, grace_s, log_path)
                spawned = True
            await asyncio.sleep(0.05)

    async def attach(
        self, mountpoint: Path, takeover: bool = True
    ) -> tuple[FuseConnection, float] | None:
        """The connection held for ``mountpoint`` and how long it went unserved (the
        longest any request can have waited), or None when there is none to resume.
        An agent serving it is asked to drain first (``takeover``), else (or if it does
        not leave) KeeperBusyError."""
        message = {"op": "attach", "mountpoint": str(mountpoint), "takeover": takeover}
        async with self._lock:
            await asyncio.to_thread(send_message, self._sock, message)
            reply, fds = await asyncio.to_thread(receive_message, self._sock)
        if reply["op"] == "busy":
            raise KeeperBusyError(f"another agent serves {mountpoint}")
        if reply["op"] != "attached" or not reply.get("held"):
            return None
        init = reply.get("init")
        if len(fds) != 1 or not isinstance(init, bytes):
            raise KeeperProtocolError("the keeper's handover lacks the descriptor or INIT")
        check_init(init)
        return FuseConnection(fds[0], init, str(reply["device"])), float(reply.get("gap_s", 0))

    async def hold(self, mountpoint: Path, connection: FuseConnection) -> None:
        """Give the keeper a new connection to hold (it keeps its own descriptor)."""
        message = {
            "op": "hold",
            "mountpoint": str(mountpoint),
            "init": connection.init,
            "device": connection.device,
        }
        async with self._lock:
            await asyncio.to_thread(send_message, self._sock, message, [connection.fd])

    async def release(self, mountpoint: Path) -> None:
        """End the connection now (abort and detach), not after the grace period; returns
        once the mount is detached."""
        async with self._lock:
            await asyncio.to_thread(
                send_message, self._sock, {"op": "release", "mountpoint": str(mountpoint)}
            )
            reply, _ = await asyncio.to_thread(receive_message, self._sock)
        if reply["op"] != "released":
            raise KeeperProtocolError(f"the keeper answered a release with {reply['op']!r}")

    async def drain_requested(self) -> bool:
        """Wait until the keeper asks this agent to drain (True: a successor takes the
        connection over) or goes away (False: the connection is this agent's alone now,
        and ends with it). Call once the connection is attached or held."""
        while True:
            try:
                message, fds = await asyncio.to_thread(receive_message, self._sock)
            except (ConnectionError, KeeperProtocolError, OSError):
                return False
            for fd in fds:
                os.close(fd)
            if message["op"] == "drain":
                return True

    def close(self) -> None:
        """Leave: the keeper starts the grace period for what this agent served. Shut
        down first: closing alone does not wake a thread waiting in ``drain_requested``,
        and the process would wait for that thread at exit."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()


def _spawn(socket_path: Path, grace_s: float, log_path: Path) -> None:
    """Start a keeper that outlives this process (its own session, no inherited fds)."""
    command = [sys.executable, "-m", "agent.fs.keeper", "--socket", str(socket_path)]
    command += ["--grace", str(grace_s), "--pid-file", str(socket_path.with_suffix(".pid"))]
    command += ["--exit-idle"]  # nobody else would stop it
    with open(log_path, "ab") as output:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            start_new_session=True,
            close_fds=True,
        )
    log.info("keeper.spawned", pid=process.pid, socket=str(socket_path))
