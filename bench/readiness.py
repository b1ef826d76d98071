"""When is a started container "ready"? Probed from outside, the way a kubelet would.

A benchmark that stops the clock when `ctr run` returns measures the wrong thing for a
server (it never returns) and for a batch job it hides where the time went. A kubelet
knows a container is ready by a probe: here a line on the container's output (a
startup message), the process exiting with an expected code (a job), or a TCP port
accepting connections (a server on the host network). Each probe watches a running
`ctr run` process and returns the moment readiness was seen.
"""

from __future__ import annotations

import os
import re
import select
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import Protocol


class NotReadyError(RuntimeError):
    """The container exited, or the deadline passed, before the probe succeeded."""


class ReadinessProbe(Protocol):
    """Watches one starting container; ``wait`` returns `time.monotonic()` at readiness."""

    def wait(self, process: subprocess.Popen[bytes], deadline: float) -> float:
        """Block until ready (time of readiness) or raise NotReadyError."""
        ...


def _output_tail(captured: bytes, limit: int = 2000) -> str:
    return captured[-limit:].decode(errors="replace")


@dataclass(frozen=True)
class LogLineProbe:
    """Ready when a line of the container's stdout matches ``pattern`` (a regex).

    The process's stdout must be a pipe. Lines are read as they arrive, so the time is
    when the line was written, not when the container exits.
    """

    pattern: str

    def wait(self, process: subprocess.Popen[bytes], deadline: float) -> float:
        """Read the output stream until a matching line shows up."""
        if process.stdout is None:
            raise ValueError("LogLineProbe needs the process's stdout as a pipe")
        wanted = re.compile(self.pattern.encode())
        fd = process.stdout.fileno()
        pending = b""
        captured = b""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NotReadyError(
                    f"no line matching {self.pattern!r} in time; output:\n{_output_tail(captured)}"
                )
            readable, _, _ = select.select([fd], [], [], min(remaining, 0.5))
            if not readable:
                continue
            data = os.read(fd, 65536)
            if not data:
                process.wait(max(deadline - time.monotonic(), 0.1))
                raise NotReadyError(
                    f"container exited {process.returncode} before printing "
                    f"{self.pattern!r}; output:\n{_output_tail(captured)}"
                )
            seen = time.monotonic()
            captured += data
            pending += data
            *lines, pending = pending.split(b"\n")
            if any(wanted.search(line) for line in lines):
                return seen


@dataclass(frozen=True)
class ExitProbe:
    """Ready when the container's process exits with ``code`` (a job that ran to the end)."""

    code: int = 0

    def wait(self, process: subprocess.Popen[bytes], deadline: float) -> float:
        """Wait for the exit and check its code."""
        try:
            returncode = process.wait(max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            raise NotReadyError("container did not exit in time") from None
        finished = time.monotonic()
        if returncode != self.code:
            raise NotReadyError(f"container exited {returncode}, expected {self.code}")
        return finished


@dataclass(frozen=True)
class TcpProbe:
    """Ready when ``host:port`` accepts a TCP connection (a server with host networking).

    Polls every ``interval`` seconds, as a kubelet's tcpSocket probe does (much faster
    here, since the time of readiness is what is being measured).
    """

    host: str
    port: int
    interval: float = 0.01

    def wait(self, process: subprocess.Popen[bytes], deadline: float) -> float:
        """Poll the port until it accepts, the container exits, or the deadline passes."""
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise NotReadyError(
                    f"container exited {process.returncode} before {self.host}:{self.port} "
                    "accepted a connection"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=self.interval):
                    return time.monotonic()
            except OSError:
                time.sleep(self.interval)
        raise NotReadyError(f"{self.host}:{self.port} did not accept a connection in time")
