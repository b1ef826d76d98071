"""The snapshotter's gRPC server on a unix socket, where containerd's proxy plugin dials.

Whoever can talk to this socket can make the agent mount and delete directories as
root, so the socket is 0600 in a directory created 0700. The agent runs the server in
its own event loop (`SnapshotterServer`); ``python -m agent.snapshotter.server`` runs
it alone, with no lazy layers, e.g. to check a containerd configuration.
"""

from __future__ import annotations

import asyncio
import signal
import stat
from pathlib import Path

import click
import grpc

from agent.snapshotter.remote import NoRemoteLayers, RemoteLayers
from agent.snapshotter.service import SnapshotsService, rpc_handler
from agent.snapshotter.snapshotter import Snapshotter
from common.logging import configure_logging, get_logger

log = get_logger(__name__)


class SnapshotterServer:
    """Serves a `Snapshotter` rooted at ``root`` on ``socket_path`` until stopped."""

    def __init__(self, root: Path, socket_path: Path, remote: RemoteLayers | None = None) -> None:
        self.root = root
        self.socket_path = socket_path
        self.remote: RemoteLayers = remote or NoRemoteLayers()
        self.snapshotter: Snapshotter | None = None
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        """Open the metadata, re-serve remote layers, then listen.

        Remote layers come back before the socket opens, so containerd never sees a
        snapshot whose lowerdir is not there yet.
        """
        await self.restore()
        await self.listen()

    async def restore(self) -> None:
        """Open the metadata and re-serve remote layers (before the FUSE connection is
        served again, after a restart: the kernel's node IDs must find their layers)."""
        self.snapshotter = Snapshotter(self.root, self.remote)
        await self.snapshotter.restore_remote()

    async def listen(self) -> None:
        """Open the socket to containerd (after ``restore``)."""
        if self.snapshotter is None:
            raise RuntimeError("listen() before restore()")
        if not self.socket_path.parent.exists():
            self.socket_path.parent.mkdir(mode=0o700, parents=True)
        _remove_stale_socket(self.socket_path)
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((rpc_handler(SnapshotsService(self.snapshotter)),))
        server.add_insecure_port(f"unix://{self.socket_path}")
        await server.start()
        self.socket_path.chmod(0o600)
        self._server = server
        log.info("snapshotter.listening", socket=str(self.socket_path), root=str(self.root))

    async def stop(self, grace: float = 5.0) -> None:
        """Let calls in flight finish (up to ``grace`` seconds), then close everything.

        The socket goes first: a client dialling meanwhile gets a clean "no such file"
        and retries, instead of a connection the stopping server drops mid-handshake.
        """
        self.socket_path.unlink(missing_ok=True)
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self.snapshotter is not None:
            await self.snapshotter.close()
            self.snapshotter = None
        log.info("snapshotter.stopped", socket=str(self.socket_path))


def _remove_stale_socket(path: Path) -> None:
    """A socket left by a previous run would make the bind fail; anything else is kept."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise RuntimeError(f"{path} exists and is not a socket")
    path.unlink()


async def _serve(root: Path, socket_path: Path) -> None:
    server = SnapshotterServer(root, socket_path)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await server.start()
    try:
        await stopping.wait()
    finally:
        await server.stop()


@click.command()
@click.option("--root", type=click.Path(path_type=Path), required=True, help="State directory.")
@click.option("--socket", "socket_path", type=click.Path(path_type=Path), required=True)
@click.option("--log-level", default="INFO", show_default=True)
def main(root: Path, socket_path: Path, log_level: str) -> None:
    """Serve containerd's snapshots API with overlayfs snapshots only (no lazy layers)."""
    configure_logging(log_level)
    asyncio.run(_serve(root, socket_path))


if __name__ == "__main__":
    main()
