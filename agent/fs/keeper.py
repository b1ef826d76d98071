"""The keeper: a small process that holds the agent's FUSE connections across its deaths.

A FUSE connection lives while any descriptor of it is open (`agent.fs.fuse_connection`),
so a process that does nothing but hold the descriptor, and the INIT the kernel sent
on it, lets a restarted agent resume the connection its containers' overlay mounts
use. The keeper does no file system work: it cannot hang behind a FUSE request, and it
has nothing to crash on.

An agent attaches over a unix socket, per mountpoint: it gets the held descriptor (with
SCM_RIGHTS) and INIT if there is one, else it mounts a new connection and hands it over
(``hold``). While an agent is attached the keeper only waits; when the agent's socket
closes (a crash, a kill, a stop) a grace period starts, and if no agent attaches again
within it the connection is aborted (every waiting reader gets an error, nothing is
left in D state) and the mount detached. While an agent serves a mountpoint, another
that asks for it is refused, unless it asks to take over (a live upgrade): then the
serving agent is told to drain, and the connection is handed over once it has left.
Two agents never read one connection at once: each would see half of its requests.

Keepers hand over to each other too, for a rolling upgrade that starts the new agent
and keeper (a surge pod) beside the old ones: a keeper started with ``--handoff`` asks
the one listening there for everything it holds; that one drains its agents, sends
each connection, and retires (it answers agents "busy" from then on, and holds
nothing). Agents talk to their own keeper only (``--socket``, e.g. in a volume the
pod's two containers share), so an old agent never reaches the new keeper.

Messages are msgpack maps, each after a 4-byte length, descriptors sent with the one
message they belong to.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from agent.fs.fuse_connection import FuseConnection, check_init, detach
from common.logging import configure_logging, get_logger

log = get_logger(__name__)

MAX_MESSAGE = 64 << 10
DRAIN_TIMEOUT_S = 60.0
_LENGTH = struct.Struct("<I")


class KeeperProtocolError(Exception):
    """A peer sent something that is not a keeper message."""


def dial(socket_path: Path) -> socket.socket:
    """A blocking connection to the unix socket at ``socket_path``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(socket_path))
    except OSError:
        sock.close()
        raise
    return sock


def _listen(socket_path: Path) -> socket.socket:
    """A non-blocking listener at ``socket_path`` (in place of a stale one), owner-only."""
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(socket_path))
    os.chmod(socket_path, 0o600)
    listener.listen()
    listener.setblocking(False)
    return listener


def send_message(sock: socket.socket, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    """One framed message, with ``fds`` attached (blocking socket)."""
    body = msgpack.packb(message, use_bin_type=True)
    data = _LENGTH.pack(len(body)) + body
    if fds:
        sent = socket.send_fds(sock, [data], list(fds))
        data = data[sent:]
    if data:
        sock.sendall(data)


def receive_message(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """One framed message and the descriptors sent with it (blocking socket); the
    descriptors are not inherited by children (a FUSE descriptor held by a stray child
    would keep a connection alive that the keeper means to end)."""
    head, fds, _, _ = socket.recv_fds(sock, _LENGTH.size, 4)
    for fd in fds:
        os.set_inheritable(fd, False)
    if not head:
        raise ConnectionError("keeper connection closed")
    (length,) = _LENGTH.unpack(head + _exactly(sock, _LENGTH.size - len(head)))
    if length > MAX_MESSAGE:
        raise KeeperProtocolError(f"message of {length} bytes")
    return _decode(_exactly(sock, length)), fds


def _exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        more = sock.recv(count - len(data))
        if not more:
            raise ConnectionError("keeper connection closed")
        data += more
    return data


def _decode(body: bytes) -> dict[str, Any]:
    try:
        message = msgpack.unpackb(body, raw=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise KeeperProtocolError(f"not msgpack: {exc}") from None
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise KeeperProtocolError("a message is a map with an 'op'")
    return message


@dataclass
class _Held:
    """One mountpoint's connection, and who serves it."""

    connection: FuseConnection
    agent: socket.socket | None = None
    expiry: asyncio.TimerHandle | None = None
    left_at: float = 0.0
    """When the last agent left (loop time): how long requests may have waited."""
    departed: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the serving agent leaves (what a takeover waits for)."""


class Keeper:
    """Holds connections by mountpoint; serves agents on ``socket_path``."""

    def __init__(
        self,
        socket_path: Path,
        grace_s: float,
        handoff: Path | None = None,
        exit_idle: bool = False,
    ) -> None:
        """``exit_idle``: stop once nothing is held and no agent is attached (a keeper
        an agent started: nobody else would ever stop it)."""
        self.socket_path = socket_path
        self.grace_s = grace_s
        self.handoff = handoff
        self.exit_idle = exit_idle
        self._serving: asyncio.Task[None] | None = None
        self._held: dict[str, _Held] = {}
        self._agents: dict[socket.socket, asyncio.Task[None]] = {}
        self._retired = False

    async def serve(self) -> None:
        """Take over from a predecessor (with ``handoff``), then accept agents (and a
        successor) until cancelled; then abort and detach whatever is held."""
        loop = asyncio.get_running_loop()
        self._serving = asyncio.current_task()
        if self.handoff is not None:
            try:
                await self._succeed(self.handoff)
            except (ConnectionError, KeeperProtocolError, OSError) as exc:
                # What arrived is held; the rest stays with the predecessor.
                log.error("keeper.succession_failed", error=str(exc), held=len(self._held))
        listener = _listen(self.socket_path)
        handoffs = _listen(self.handoff) if self.handoff is not None else None
        log.info("keeper.started", socket=str(self.socket_path), grace_s=self.grace_s)
        tasks: set[asyncio.Task[None]] = set()
        if handoffs is not None:
            tasks.add(loop.create_task(self._accept_successors(handoffs)))
        try:
            while True:
                agent, _ = await loop.sock_accept(listener)
                agent.setblocking(True)  # read on a thread of its own, written from here
                self._agents[agent] = loop.create_task(self._serve_agent(agent))
        finally:
            for task in tasks:
                task.cancel()
            if handoffs is not None:
                handoffs.close()
            for agent in list(self._agents):
                with contextlib.suppress(OSError):
                    agent.shutdown(socket.SHUT_RDWR)  # ends the reading threads
            for mountpoint in list(self._held):
                self._let_go(mountpoint, "keeper stopped")
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()

    async def _succeed(self, handoff: Path) -> None:
        """Take every connection the keeper listening at ``handoff`` holds (none there:
        nothing to take)."""
        try:
            predecessor = await asyncio.to_thread(dial, handoff)
        except OSError:
            return
        with predecessor:
            send_message(predecessor, {"op": "succeed"})
            while True:
                message, fds = await asyncio.to_thread(receive_message, predecessor)
                if message["op"] == "succeeded":
                    break
                init = message.get("init")
                if message["op"] != "held" or len(fds) != 1 or not isinstance(init, bytes):
                    raise KeeperProtocolError(f"a predecessor sent {message['op']!r}")
                check_init(init)
                connection = FuseConnection(fds[0], init, str(message["device"]))
                mountpoint = str(message["mountpoint"])
                self._held[mountpoint] = _Held(connection)
                self._wait_for_agent(mountpoint, self._held[mountpoint])
        log.info("keeper.succeeded", handoff=str(handoff), connections=len(self._held))

    async def _accept_successors(self, handoffs: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            successor, _ = await loop.sock_accept(handoffs)
            successor.setblocking(True)
            with successor:
                try:
                    await self._hand_over(successor)
                except (ConnectionError, KeeperProtocolError, OSError) as exc:
                    log.warning("keeper.handoff_failed", error=str(exc))

    async def _hand_over(self, successor: socket.socket) -> None:
        """Give a successor every connection (each serving agent drained first) and
        retire: what arrives later is the successor's business."""
        message, fds = await asyncio.to_thread(receive_message, successor)
        for fd in fds:
            os.close(fd)
        if message["op"] != "succeed":
            raise KeeperProtocolError(f"a successor sent {message['op']!r}")
        self._retired = True
        for mountpoint, held in list(self._held.items()):
            if held.agent is not None:
                await self._drain(mountpoint, held)
            if held.agent is not None:
                # Never two agents on one connection: it stays with the one serving it.
                log.error("keeper.drain_timeout", mountpoint=mountpoint)
                continue
            connection = held.connection
            reply = {"op": "held", "mountpoint": mountpoint, "init": connection.init}
            send_message(successor, {**reply, "device": connection.device}, [connection.fd])
            if held.expiry is not None:
                held.expiry.cancel()
            os.close(connection.fd)
            del self._held[mountpoint]
        send_message(successor, {"op": "succeeded"})
        log.info("keeper.retired")

    async def _serve_agent(self, agent: socket.socket) -> None:
        """One agent's session: its messages, then its departure."""
        served: set[str] = set()
        try:
            while True:
                message, fds = await asyncio.to_thread(receive_message, agent)
                await self._handle(agent, message, fds, served)
        except (ConnectionError, KeeperProtocolError, OSError) as exc:
            if not isinstance(exc, ConnectionError):
                log.warning("keeper.agent_refused", error=str(exc))
        finally:
            self._agents.pop(agent, None)
            agent.close()
            for mountpoint in served:
                self._agent_gone(mountpoint, agent)
            self._stop_if_idle()

    async def _handle(
        self, agent: socket.socket, message: dict[str, Any], fds: list[int], served: set[str]
    ) -> None:
        mountpoint = str(message.get("mountpoint", ""))
        op = message["op"]
        if op == "attach":
            await self._attach(agent, mountpoint, bool(message.get("takeover")), served)
        elif op == "hold" and len(fds) == 1:
            init = message.get("init")
            if not isinstance(init, bytes):
                raise KeeperProtocolError("hold needs the INIT bytes")
            check_init(init)
            self._hold(mountpoint, FuseConnection(fds[0], init, str(message["device"])), agent)
            served.add(mountpoint)
        elif op == "release":
            self._let_go(mountpoint, "released by the agent")
            served.discard(mountpoint)
            send_message(agent, {"op": "released"})
        else:
            for fd in fds:
                os.close(fd)
            raise KeeperProtocolError(f"unknown message {op!r}")

    async def _attach(
        self, agent: socket.socket, mountpoint: str, takeover: bool, served: set[str]
    ) -> None:
        held = self._held.get(mountpoint)
        if held is not None and not held.connection.alive():
            self._let_go(mountpoint, "the connection was aborted")  # e.g. by an operator
            held = None
        if held is not None and held.agent is not None and takeover:
            await self._drain(mountpoint, held)
        if self._retired or (held is not None and held.agent is not None):
            send_message(agent, {"op": "busy"})
            return
        if held is None:
            send_message(agent, {"op": "attached", "held": False})
        else:
            if held.expiry is not None:
                held.expiry.cancel()
                held.expiry = None
            held.agent = agent
            held.departed = asyncio.Event()
            connection = held.connection
            gap = asyncio.get_running_loop().time() - held.left_at
            reply = {"op": "attached", "held": True, "init": connection.init, "gap_s": gap}
            send_message(agent, {**reply, "device": connection.device}, [connection.fd])
            log.info("keeper.handover", mountpoint=mountpoint, gap_s=round(gap, 3))
        served.add(mountpoint)

    async def _drain(self, mountpoint: str, held: _Held) -> None:
        """Tell the serving agent to stop serving and leave; wait until it has."""
        assert held.agent is not None
        log.info("keeper.draining", mountpoint=mountpoint)
        with contextlib.suppress(OSError):
            send_message(held.agent, {"op": "drain", "mountpoint": mountpoint})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(held.departed.wait(), DRAIN_TIMEOUT_S)

    def _hold(self, mountpoint: str, connection: FuseConnection, agent: socket.socket) -> None:
        old = self._held.pop(mountpoint, None)
        if old is not None:
            os.close(old.connection.fd)
        self._held[mountpoint] = _Held(connection, agent)
        log.info("keeper.holding", mountpoint=mountpoint, device=connection.device)

    def _agent_gone(self, mountpoint: str, agent: socket.socket) -> None:
        """The agent serving ``mountpoint`` left: wait ``grace_s`` for another."""
        held = self._held.get(mountpoint)
        if held is None or held.agent is not agent:
            return
        held.agent = None
        held.departed.set()
        self._wait_for_agent(mountpoint, held)
        log.warning("keeper.agent_gone", mountpoint=mountpoint, grace_s=self.grace_s)

    def _wait_for_agent(self, mountpoint: str, held: _Held) -> None:
        """Start the grace period of a connection no agent serves."""
        held.left_at = asyncio.get_running_loop().time()
        held.expiry = asyncio.get_running_loop().call_later(
            self.grace_s, self._let_go, mountpoint, "no agent came back in the grace period"
        )

    def _let_go(self, mountpoint: str, reason: str) -> None:
        """Abort the connection (readers get errors, none stays waiting) and detach it."""
        held = self._held.pop(mountpoint, None)
        if held is None:
            return
        if held.expiry is not None:
            held.expiry.cancel()
        with contextlib.suppress(OSError):
            (held.connection.control_dir / "abort").write_text("1")
        with contextlib.suppress(OSError):
            detach(Path(mountpoint))
        os.close(held.connection.fd)
        log.warning("keeper.let_go", mountpoint=mountpoint, reason=reason)
        self._stop_if_idle()

    def _stop_if_idle(self) -> None:
        if self.exit_idle and not self._held and not self._agents and self._serving:
            log.info("keeper.idle_exit")
            self._serving.cancel()


def main(argv: list[str] | None = None) -> int:
    """``python -m agent.fs.keeper --socket PATH [--grace S] [--pid-file PATH]``."""
    parser = argparse.ArgumentParser(prog="acceld-keeper", description=__doc__)
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--grace", type=float, default=120.0, help="seconds to wait")
    parser.add_argument("--pid-file", type=Path, help="where to write this process's id")
    parser.add_argument(
        "--handoff", type=Path, help="where keepers meet: take over from the one there"
    )
    parser.add_argument(
        "--exit-idle",
        action="store_true",
        help="exit once nothing is held and no agent is attached",
    )
    args = parser.parse_args(argv)
    configure_logging()
    keeper = Keeper(args.socket, args.grace, args.handoff, args.exit_idle)
    if args.pid_file is not None:
        args.pid_file.write_text(f"{os.getpid()}\n")

    async def run() -> None:
        task = asyncio.current_task()
        assert task is not None
        for signum in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(signum, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await keeper.serve()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
