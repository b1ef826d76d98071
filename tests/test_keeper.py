"""The keeper process on its own: it holds a real FUSE connection for the next agent,
lets only one agent serve it, gives up on it after the grace period (readers get an
error, the mount goes), and shrugs off a peer that speaks nonsense.

A real keeper process and a real FUSE mount; the "agents" are clients in this process
that never serve the connection, so a reader of the mount waits until the keeper ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.fs.fuse_connection import FuseConnection, mount_connection
from agent.fs.keeper import send_message
from agent.fs.keeper_client import KeeperBusyError, KeeperClient
from agent.fs.mount import is_mounted


@contextlib.contextmanager
def _keeper(sock: Path, *extra: str, ready: bool = True) -> Iterator[Path]:
    """A keeper process with a 1.5 s grace period (``ready``: once it listens at ``sock``)."""
    process = _spawn_keeper(sock, "--grace", "1.5", *extra)
    deadline = time.monotonic() + 10
    while ready and not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield sock
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(10)


def _spawn_keeper(sock: Path, *arguments: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "agent.fs.keeper", "--socket", str(sock), *arguments]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture
def keeper(tmp_path: Path) -> Iterator[Path]:
    with _keeper(tmp_path / "keeper.sock") as sock:
        yield sock


async def _client(sock: Path, tmp_path: Path) -> KeeperClient:
    return await KeeperClient.connect(sock, 1.5, False, tmp_path / "keeper.log")


async def _agent_holding(sock: Path, tmp_path: Path) -> tuple[KeeperClient, FuseConnection]:
    """An agent that found nothing held, mounted a new connection at ``tmp_path/mnt``
    and gave it to the keeper (only the keeper's descriptor keeps it now)."""
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    agent = await _client(sock, tmp_path)
    assert await agent.attach(mountpoint) is None
    connection = await asyncio.to_thread(mount_connection, mountpoint)
    await agent.hold(mountpoint, connection)
    os.close(connection.fd)
    return agent, connection


async def test_the_connection_is_held_for_the_next_agent_and_served_by_one(
    keeper: Path, tmp_path: Path
) -> None:
    mountpoint = tmp_path / "mnt"
    first, connection = await _agent_holding(keeper, tmp_path)
    second = await _client(keeper, tmp_path)
    with pytest.raises(KeeperBusyError):
        await second.attach(mountpoint, takeover=False)
    first.close()  # the agent died: the keeper waits for the next one
    await asyncio.sleep(0.2)
    held = await second.attach(mountpoint)
    assert held is not None
    resumed, gap = held
    assert resumed.init == connection.init and resumed.device == connection.device
    assert 0 < gap < 1.5
    assert is_mounted(mountpoint)
    await second.release(mountpoint)
    os.close(resumed.fd)
    assert not is_mounted(mountpoint)
    second.close()


async def test_after_the_grace_period_readers_get_an_error_and_the_mount_goes(
    keeper: Path, tmp_path: Path
) -> None:
    mountpoint = tmp_path / "mnt"
    agent, _ = await _agent_holding(keeper, tmp_path)
    agent.close()
    started = time.monotonic()
    with pytest.raises(OSError):  # nobody serves it: the lookup waits for the abort
        await asyncio.wait_for(asyncio.to_thread(os.stat, mountpoint / "file"), 20)
    assert 1.0 < time.monotonic() - started < 10
    await asyncio.sleep(0.2)
    assert not is_mounted(mountpoint)


async def test_nonsense_from_a_peer_costs_only_its_own_connection(
    keeper: Path, tmp_path: Path
) -> None:
    for garbage in (b"\xff\xff\xff\xff", b"\x03\x00\x00\x00abc", b"\x01\x00\x00\x00\x90"):
        with socket.socket(socket.AF_UNIX) as peer:
            peer.connect(str(keeper))
            peer.sendall(garbage)
            peer.settimeout(5)
            assert peer.recv(16) == b""  # the keeper hangs up on it
    with socket.socket(socket.AF_UNIX) as peer:
        peer.connect(str(keeper))
        send_message(peer, {"op": "hold", "mountpoint": str(tmp_path)})  # no descriptor
        peer.settimeout(5)
        assert peer.recv(16) == b""
    agent = await _client(keeper, tmp_path)
    assert await agent.attach(tmp_path / "mnt") is None  # still serving others
    agent.close()


async def test_a_connection_aborted_meanwhile_is_not_handed_over(
    keeper: Path, tmp_path: Path
) -> None:
    """An operator (or the scale-up benchmark's unwedging) aborted it through fusectl:
    the next agent gets none and mounts a new one."""
    mountpoint = tmp_path / "mnt"
    agent, connection = await _agent_holding(keeper, tmp_path)
    agent.close()
    (connection.control_dir / "abort").write_text("1")
    successor = await _client(keeper, tmp_path)
    assert await successor.attach(mountpoint) is None
    assert not is_mounted(mountpoint)
    successor.close()


async def test_a_new_keeper_takes_every_connection_from_the_old_one(tmp_path: Path) -> None:
    """A surge pod's keeper, started beside the old pod's: the old one drains its
    agent, hands the connection over and retires; the new pod's agent resumes it."""
    handoff = str(tmp_path / "handoff.sock")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with _keeper(tmp_path / "old.sock", "--handoff", handoff) as old:
        agent = await _client(old, tmp_path)
        assert await agent.attach(mountpoint) is None
        connection = await asyncio.to_thread(mount_connection, mountpoint)
        await agent.hold(mountpoint, connection)
        os.close(connection.fd)
        drained = asyncio.ensure_future(agent.drain_requested())
        with _keeper(tmp_path / "new.sock", "--handoff", handoff, ready=False) as new:
            assert await asyncio.wait_for(drained, 10)  # told to drain...
            agent.close()  # ...it leaves, and the connection moves on
            successor = await _client(new, tmp_path)
            held = None
            for _ in range(100):  # until the new keeper has it
                held = await successor.attach(mountpoint)
                if held is not None:
                    break
                await asyncio.sleep(0.05)
            assert held is not None
            resumed, _ = held
            assert (resumed.init, resumed.device) == (connection.init, connection.device)
            late = await _client(old, tmp_path)
            with pytest.raises(KeeperBusyError):  # retired
                await late.attach(mountpoint)
            late.close()
            await successor.release(mountpoint)
            os.close(resumed.fd)
            successor.close()
    assert not is_mounted(mountpoint)


async def test_a_keeper_an_agent_started_exits_once_it_holds_nothing(tmp_path: Path) -> None:
    """Started by an agent (``--exit-idle``), nobody else would ever stop it: once the
    grace period has let its connection go and no agent is attached, it exits."""
    sock = tmp_path / "keeper.sock"
    process = _spawn_keeper(sock, "--grace", "1", "--exit-idle")
    try:
        mountpoint = tmp_path / "mnt"
        agent, _ = await _agent_holding(sock, tmp_path)
        await asyncio.sleep(1.5)
        assert process.poll() is None  # an agent is attached
        agent.close()
        assert await asyncio.to_thread(process.wait, 10) == 0
        assert not is_mounted(mountpoint)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
