"""Run stargz-snapshotter's daemon (the peer acceld is measured against) as a process.

acceld's benchmark compares itself side by side with stargz-snapshotter on the same
node, link and images, and acceld's eStargz output must be lazily pullable by it (a
contract in DESIGN.md). Debian ships the peer's library but not its daemon, so
``./install.sh --bench-peer`` builds our own short main (`packaging/stargz-peer`) to
`STARGZ_GRPC_BINARY`. This module starts it with an empty root and a config, waits
until containerd can dial its socket, reads its JSON log for the remote-snapshot
verdicts, and stops it so that none of its FUSE mounts outlive a run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from common.logging import get_logger
from rig.processes import terminate_group

log = get_logger(__name__)

STARGZ_GRPC_BINARY = Path(
    os.environ.get("ACCELD_STARGZ_GRPC", "/usr/local/libexec/acceld/containerd-stargz-grpc")
)
"""Where ``./install.sh --bench-peer`` puts the daemon (ACCELD_STARGZ_GRPC overrides)."""
PEER_INSTALL_COMMAND = "./install.sh --bench-peer"
"""What builds and installs the daemon (from the repository's root)."""
_REMOTE_KEY = "remote-snapshot-prepared"
"""The field stargz-snapshotter logs (at debug level) on every layer Prepare: "true"
when the layer was mounted lazily, "false" when containerd must download it."""


class StargzError(RuntimeError):
    """The stargz daemon is missing, did not start, or exited."""


def missing_binary_message(binary: Path = STARGZ_GRPC_BINARY) -> str | None:
    """Why the peer cannot run (None when it can): names the path and the fix."""
    if os.access(binary, os.X_OK):
        return None
    return (
        f"stargz-snapshotter daemon not found at {binary}; "
        f"build it with `{PEER_INSTALL_COMMAND}` (or set ACCELD_STARGZ_GRPC)"
    )


@dataclass(frozen=True)
class RemoteSnapshots:
    """The daemon's per-layer verdicts so far: mounted lazily, or left to containerd."""

    lazy: int
    fallback: int


class StargzDaemon:
    """`containerd-stargz-grpc` in a subprocess, with its root, socket and log in ``workdir``.

    ``plain_http`` hosts get a resolver mirror entry with ``insecure = true``: the peer
    only speaks plain HTTP to localhost names by itself, and the bench registry's name
    must not depend on that. ``fs_config`` adds top-level settings of the library's
    config (e.g. ``noprefetch``); the defaults are the peer's own.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        plain_http: Sequence[str] = (),
        fs_config: Mapping[str, Any] | None = None,
        binary: Path = STARGZ_GRPC_BINARY,
        log_level: str = "debug",
    ) -> None:
        self.workdir = workdir
        self.root = workdir / "root"
        self.socket = workdir / "stargz.sock"
        self.config_path = workdir / "config.toml"
        self.log_path = workdir / "stargz.log"
        self.binary = binary
        self.log_level = log_level
        self.plain_http = list(plain_http)
        self.fs_config = dict(fs_config or {})
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The daemon's process id."""
        if self._process is None:
            raise StargzError("the stargz daemon has not been started")
        return self._process.pid

    def config(self) -> dict[str, Any]:
        """The daemon's TOML config as a dict."""
        hosts = {host: {"mirrors": [{"host": host, "insecure": True}]} for host in self.plain_http}
        config: dict[str, Any] = dict(self.fs_config)
        if hosts:
            config["resolver"] = {"host": hosts}
        return config

    def start(self, timeout: float = 30.0) -> StargzDaemon:
        """Start the daemon and wait until its socket accepts connections."""
        problem = missing_binary_message(self.binary)
        if problem:
            raise StargzError(problem)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(tomli_w.dumps(self.config()))
        command = [
            str(self.binary),
            "-address", str(self.socket),
            "-root", str(self.root),
            "-config", str(self.config_path),
            "-log-level", self.log_level,
        ]  # fmt: skip
        with self.log_path.open("ab") as log_file:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self._process.poll() is not None:
                self._unmount()
                raise StargzError(
                    f"stargz daemon exited {self._process.returncode}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise StargzError(f"stargz daemon did not listen in {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)
        log.info("stargz.started", socket=str(self.socket), log=str(self.log_path))
        return self

    def _answers(self) -> bool:
        if not self.socket.exists():
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(self.socket))
            except OSError:
                return False
        return True

    def stop(self, grace: float = 20.0) -> int | None:
        """SIGTERM (the daemon unmounts every layer it mounted), then sweep what is left."""
        if self._process is None:
            return None
        code = terminate_group(self._process, grace=grace)
        self._process = None
        self._unmount()
        log.info("stargz.stopped", workdir=str(self.workdir), exit_code=code)
        return code

    def fuse_mounts(self) -> list[Path]:
        """The daemon's FUSE mounts (one per lazily mounted layer) right now."""
        return [point for point, fstype in _mounts_under(self.root) if fstype.startswith("fuse")]

    def remote_snapshots(self) -> RemoteSnapshots:
        """How many layer Prepares the daemon mounted lazily, and how many it left to
        containerd (from its JSON log; needs ``log_level`` debug)."""
        lazy = fallback = 0
        for record in self.log_records():
            verdict = record.get(_REMOTE_KEY)
            if verdict == "true":
                lazy += 1
            elif verdict == "false":
                fallback += 1
        return RemoteSnapshots(lazy, fallback)

    def log_records(self) -> list[dict[str, Any]]:
        """The daemon's log lines that are JSON objects (Go's own panics are not)."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []
        records = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def log_tail(self, lines: int = 40) -> str:
        """The end of the daemon's log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def log_paths(self) -> list[Path]:
        """Files worth keeping when a test fails."""
        return [self.config_path, self.log_path]

    def _unmount(self) -> None:
        """Detach whatever a killed daemon left mounted under its root, deepest first."""
        points = [point for point, _ in _mounts_under(self.root)]
        for point in sorted(points, key=lambda p: len(p.parts), reverse=True):
            subprocess.run(["umount", "-l", str(point)], capture_output=True, check=False)

    def __enter__(self) -> StargzDaemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _mounts_under(top: Path) -> list[tuple[Path, str]]:
    """(mount point, fs type) of every mount at or below ``top``."""
    top = top.resolve()
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" ")
        point = Path(fields[4].encode().decode("unicode_escape").encode("latin-1").decode())
        fstype = fields[fields.index("-") + 1]
        if point == top or point.is_relative_to(top):
            found.append((point, fstype))
    return found
