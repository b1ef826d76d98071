"""Run acceld as a real separate process, the way a node runs it.

Tests, the demo and benchmarks start the agent with its own root, socket and metrics
port, wait until containerd can dial it, and stop it with SIGTERM (clean shutdown) or
SIGKILL (crash). Its log is kept for failure reports.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from rig.ports import free_port
from rig.processes import terminate_group


class AgentProcess:
    """`acceld run` in a subprocess."""

    def __init__(
        self,
        workdir: Path,
        plain_http: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        settings: Mapping[str, object] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """``settings`` become the agent's YAML config file (keys of AgentConfig);
        ``env`` is added to the environment it inherits (a node's proxy variables)."""
        self.workdir = workdir
        self.settings = dict(settings or {})
        self.root = workdir / "root"
        self.socket = workdir / "run" / "snapshotter.sock"
        self.metrics_port = free_port()
        self.log_path = workdir / "acceld.log"
        self.plain_http = list(plain_http)
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The agent's process id (it is started directly, not through a shell)."""
        if self._process is None:
            raise RuntimeError("the agent has not been started")
        return self._process.pid

    @property
    def running(self) -> bool:
        """Whether the agent's process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def mountpoint(self) -> Path:
        """The agent's FUSE mount."""
        return self.root / "mnt"

    @property
    def metrics_url(self) -> str:
        """Where the Prometheus endpoint answers."""
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self, timeout: float = 30.0) -> AgentProcess:
        """Start and wait until the snapshotter socket and metrics endpoint answer."""
        self.launch()
        return self.wait_ready(timeout)

    def launch(self) -> AgentProcess:
        """Start the process without waiting for it (a test may kill it mid-start)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        config: list[str] = []
        if self.settings:
            config_path = self.workdir / "acceld.yaml"
            config_path.write_text(yaml.safe_dump(self.settings))
            config = ["--config", str(config_path)]
        command = [
            sys.executable,
            "-m",
            "agent.main",
            "run",
            "--root",
            str(self.root),
            "--socket",
            str(self.socket),
            "--metrics-address",
            f"127.0.0.1:{self.metrics_port}",
            *config,
            *self.extra_args,
        ]
        for host in self.plain_http:
            command += ["--plain-http", host]
        env = {**os.environ, **self.env, "ACCELD_LOG_FORMAT": "json"}
        log = self.log_path.open("ab")
        self._process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        return self

    def wait_ready(self, timeout: float = 30.0) -> AgentProcess:
        """Until the snapshotter socket and metrics endpoint answer."""
        assert self._process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self.stop_keeper()
                self._unmount()
                raise RuntimeError(f"acceld exited {self._process.returncode}:\n{self.log_tail()}")
            if self.socket.exists() and self._metrics_ready():
                return self
            time.sleep(0.1)
        self.kill()
        self.stop_keeper()
        self._unmount()
        raise RuntimeError(f"acceld did not become ready:\n{self.log_tail()}")

    def _metrics_ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def metrics(self) -> str:
        """The current Prometheus exposition text."""
        with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
            return str(response.read().decode())

    def metric(self, name: str) -> float:
        """Sum of every sample of series ``name`` (all label sets)."""
        total = 0.0
        for line in self.metrics().splitlines():
            if line.startswith(name) and (line[len(name)] in " {"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def wait_cache_settled(self, timeout: float = 30.0) -> None:
        """Until the chunk cache's files stop changing. The agent writes the chunks a
        start fetched once no fetch has run for a moment (``fill_idle_s``), so the disk
        right after a container's reads does not show them yet."""
        deadline = time.monotonic() + timeout
        seen: list[str] | None = None
        while time.monotonic() < deadline:
            try:
                files = sorted(str(p) for p in (self.root / "cache").rglob("*") if p.is_file())
            except OSError:  # a directory evicted while listed: still changing
                files = None
            if files is not None and files == seen:
                return
            seen = files
            time.sleep(1.0)
        raise TimeoutError(f"the cache under {self.root} was still changing after {timeout} s")

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait, then stop the keeper the agent started (which ends the FUSE
        connection): the next start is a new node's."""
        if self._process is None:
            return None
        code = terminate_group(self._process, grace=timeout)
        self.stop_keeper()
        self._unmount()
        return code

    def stop_keeper(self, timeout: float = 10.0) -> None:
        """SIGTERM the keeper of this agent's FUSE connection (it aborts and detaches
        the connection) and wait until it is gone."""
        pid_file = self.root / "keeper.pid"
        try:
            pid = int(pid_file.read_text())
        except (OSError, ValueError):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.02)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        pid_file.unlink(missing_ok=True)

    def wait_exit(self, timeout: float = 60.0) -> int:
        """Until the agent exits on its own (drained for a successor); its exit code."""
        if self._process is None:
            raise RuntimeError("the agent has not been started")
        return self._process.wait(timeout)

    def kill(self) -> None:
        """SIGKILL, as a crash would; the keeper holds the FUSE connection for the next
        start (readers wait meanwhile)."""
        if self._process is not None and self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait(10)

    def log_tail(self, lines: int = 60) -> str:
        """The end of the agent's log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> AgentProcess:
        return self.start()

    def _unmount(self) -> None:
        """Detach every mount a dead agent left behind under its mountpoint (a killed
        agent leaves its FUSE mounts dead but attached, and pytest cannot delete them)."""
        root = str(self.mountpoint)
        with open("/proc/self/mounts", encoding="utf-8") as mounts:
            points = [line.split()[1] for line in mounts]
        stale = [p for p in points if p == root or p.startswith(root + "/")]
        for point in sorted(stale, key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs: the keeper is not our child, so once it has exited it
    may stay a zombie until init reaps it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
