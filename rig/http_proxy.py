"""An HTTP proxy from Debian's packages (tinyproxy) as a rig component.

Nodes often reach registries only through an HTTP proxy named by HTTPS_PROXY /
HTTP_PROXY, and acceld must go the way containerd goes (`fetcher.proxy_env`). Tests
prove it against a real proxy rather than a stand-in: each `HttpProxy` runs
``tinyproxy -d`` (foreground) with a config, log and optional Basic credentials of its
own, and `HttpProxy.requests` reads back what it was asked.

What tinyproxy 1.11 logs (checked against the binary), at ``LogLevel Connect`` and
above: one ``Request (file descriptor N): <METHOD> <target> HTTP/1.1`` line per request
it reads, whether it then serves it or refuses it (407 without the credentials). The
target is ``host:port`` for a CONNECT tunnel (an https URL) and the absolute URL for a
proxied plain-http request.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from common.logging import get_logger
from rig.ports import free_port, port_accepts
from rig.processes import terminate_group

log = get_logger(__name__)

_REQUEST = re.compile(r"Request \(file descriptor \d+\): (\S+) (\S+) HTTP/")
_BIND_RETRIES = 3


@dataclass(frozen=True)
class ProxiedRequest:
    """One request line from the proxy's log."""

    method: str
    target: str
    """``host:port`` of a CONNECT, the absolute URL of any other request."""

    @property
    def authority(self) -> str:
        """``host:port`` the request was for, whatever its form."""
        return self.target if self.method == "CONNECT" else urlsplit(self.target).netloc

    @property
    def path(self) -> str:
        """The URL path of a proxied plain-http request ('' for a CONNECT: it is inside TLS)."""
        return "" if self.method == "CONNECT" else urlsplit(self.target).path


def parse_proxy_log(text: str) -> list[ProxiedRequest]:
    """Every request line in a tinyproxy log, oldest first."""
    return [ProxiedRequest(m.group(1), m.group(2)) for m in _REQUEST.finditer(text)]


class HttpProxy:
    """One foreground tinyproxy on ``host`` (loopback by default) and a free port."""

    def __init__(
        self,
        work_dir: Path,
        *,
        host: str = "127.0.0.1",
        credentials: tuple[str, str] | None = None,
        binary: str = "tinyproxy",
        start_timeout: float = 15.0,
    ) -> None:
        self.work_dir = work_dir
        self.bind_host = host
        self.port = 0
        self.credentials = credentials
        self.binary = binary
        self.start_timeout = start_timeout
        self.config_path = work_dir / "tinyproxy.conf"
        self.log_path = work_dir / "tinyproxy.log"
        self.output_path = work_dir / "tinyproxy.out"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """What HTTP_PROXY / HTTPS_PROXY should say, credentials included."""
        userinfo = f"{self.credentials[0]}:{self.credentials[1]}@" if self.credentials else ""
        return f"http://{userinfo}{self.bind_host}:{self.port}"

    def config(self) -> str:
        """The config file's text: only ``host`` listens, any port may be tunnelled to
        (no ConnectPort line), no Via header (the proxy stays out of the answers)."""
        lines = [
            f"Port {self.port}",
            f"Listen {self.bind_host}",
            "Timeout 120",
            f'LogFile "{self.log_path}"',
            "LogLevel Connect",
            "MaxClients 200",
            "DisableViaHeader Yes",
        ]
        if self.credentials:
            lines.append(f"BasicAuth {self.credentials[0]} {self.credentials[1]}")
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        """Start the proxy; return once its port accepts connections. A port taken by
        someone else between choosing and binding it costs a retry on another."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(_BIND_RETRIES):
            self.port = free_port(self.bind_host)
            self.config_path.write_text(self.config())
            binary = shutil.which(self.binary) or self.binary
            with self.output_path.open("ab") as output:
                self._proc = subprocess.Popen(
                    [binary, "-d", "-c", str(self.config_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            if self._wait_ready():
                log.info("http_proxy.started", url=f"http://{self.bind_host}:{self.port}")
                return
            self.stop()
            log.info("http_proxy.start_failed", port=self.port, attempt=attempt + 1)
        raise RuntimeError(f"tinyproxy did not start; see {self.log_path}, {self.output_path}")

    def _wait_ready(self) -> bool:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            if port_accepts(self.bind_host, self.port):
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        """Stop the proxy (idempotent)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            terminate_group(proc)

    def requests(self) -> list[ProxiedRequest]:
        """Every request the proxy has read so far, oldest first."""
        if not self.log_path.exists():
            return []
        return parse_proxy_log(self.log_path.read_text(errors="replace"))

    def log_paths(self) -> list[Path]:
        """Files worth keeping when a test fails."""
        return [self.config_path, self.log_path, self.output_path]

    def __enter__(self) -> HttpProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
