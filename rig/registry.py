"""The real CNCF distribution registry (`docker-registry` 2.8) as a rig component.

acceld speaks the distribution spec to registries it does not control, so tests, the
demo and the benchmarks run the reference implementation instead of a fake: each
`RegistryServer` gets its own config, storage directory and logs in a work dir, and can
require htpasswd Basic auth or Bearer tokens (from `rig.token_service`), send push
notifications, or run inside a network namespace through ``command_prefix``.

What distribution 2.8 logs (checked against the binary): stdout carries an Apache
"combined" access log with one line per request, including those refused by auth
(``127.0.0.1 - - [time] "GET /v2/r/blobs/sha256:.. HTTP/1.1" 206 10 "" "agent"``);
stderr carries the application log (JSON here), whose ``response completed`` records
skip requests that failed authorization. Neither logs request headers, so a Range GET
shows only as status 206 with a short size, never by its ``Range`` value.
`RegistryServer.requests` parses the access log.

A registry may serve HTTPS with a certificate from a rig CA (`RegistryTLS`), require
client certificates (distribution's ``http.tls.clientcas``), or be a pull-through cache
of another registry (``proxy.remoteurl``, through ``extra_config``).
"""

from __future__ import annotations

import copy
import re
import secrets
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from common.logging import get_logger
from rig.certificates import IssuedPair
from rig.ports import free_port
from rig.processes import terminate_group
from rig.token_service import TokenAuth

log = get_logger(__name__)

_BIND_RETRIES = 3


@dataclass(frozen=True)
class HtpasswdAuth:
    """Basic auth against an htpasswd file (bcrypt) that the registry reads."""

    users: Mapping[str, str]
    realm: str = "acceld-rig"


@dataclass(frozen=True)
class RegistryTLS:
    """HTTPS for a registry: its certificate, the CA clients verify it with, and, when
    ``client_ca`` is set, the CA whose client certificates it requires (``client``
    is the pair the readiness probe presents)."""

    server: IssuedPair
    ca: Path
    client_ca: Path | None = None
    client: IssuedPair | None = None

    def client_context(self) -> ssl.SSLContext:
        """What a client that trusts the CA (and holds the client pair) uses."""
        context = ssl.create_default_context(cafile=str(self.ca))
        if self.client is not None:
            context.load_cert_chain(str(self.client.cert), str(self.client.key))
        return context


@dataclass(frozen=True)
class RegistryRequest:
    """One request as the registry's access log recorded it (``size``: body bytes sent)."""

    method: str
    path: str
    query: str
    status: int
    size: int
    user_agent: str
    remote_addr: str


_ACCESS_LINE = re.compile(
    r'^(?P<remote>\S+) \S+ \S+ \[[^\]]*\] "(?P<method>\S+) (?P<uri>\S+) [^"]*" '
    r'(?P<status>\d{3}) (?P<size>\d+|-) "[^"]*" "(?P<agent>[^"]*)"'
)


def htpasswd_line(username: str, password: str) -> str:
    """A bcrypt htpasswd entry made by Apache's own tool, the format the registry reads."""
    result = subprocess.run(
        ["htpasswd", "-Bbn", username, password],
        check=True,
        capture_output=True,
        text=True,
    )
    return result.stdout.strip()


def deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in; nested mappings merge, anything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_access_log(text: str) -> list[RegistryRequest]:
    """Requests from a combined-format access log; lines that do not match are skipped."""
    found = []
    for line in text.splitlines():
        match = _ACCESS_LINE.match(line)
        if match is None:
            continue  # e.g. the last line, read while the registry is still writing it
        path, _, query = match["uri"].partition("?")
        found.append(
            RegistryRequest(
                method=match["method"],
                path=path,
                query=query,
                status=int(match["status"]),
                size=0 if match["size"] == "-" else int(match["size"]),
                user_agent=match["agent"],
                remote_addr=match["remote"],
            )
        )
    return found


class RegistryServer:
    """One `docker-registry serve` process with its own config, storage and logs.

    ``extra_config`` is deep-merged into the generated config last, for anything not
    covered by a parameter (storage middleware, ``storage.redirect.disable``, ...).
    """

    def __init__(
        self,
        work_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        auth: HtpasswdAuth | TokenAuth | None = None,
        tls: RegistryTLS | None = None,
        notification_urls: Sequence[str] = (),
        notification_headers: Mapping[str, str] | None = None,
        delete_enabled: bool = True,
        storage_dir: Path | None = None,
        extra_config: Mapping[str, Any] | None = None,
        command_prefix: Sequence[str] = (),
        binary: str = "docker-registry",
        start_timeout: float = 20.0,
    ) -> None:
        self.work_dir = work_dir
        self.bind_host = host
        self._fixed_port = port
        self.port = port or 0
        self.auth = auth
        self.tls = tls
        self.notification_urls = list(notification_urls)
        self.notification_headers = dict(notification_headers or {})
        self.delete_enabled = delete_enabled
        self.storage_dir = storage_dir or work_dir / "storage"
        self.extra_config = dict(extra_config or {})
        self.command_prefix = list(command_prefix)
        self.binary = binary
        self.start_timeout = start_timeout
        self.config_path = work_dir / "config.yml"
        self.log_path = work_dir / "registry.log"
        self.access_log_path = work_dir / "access.log"
        self.htpasswd_path = work_dir / "htpasswd"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        """``host:port`` as written in image references."""
        return f"{self.bind_host}:{self.port}"

    @property
    def url(self) -> str:
        """Base URL, ``http(s)://host:port``."""
        return f"{'https' if self.tls else 'http'}://{self.host}"

    def config(self) -> dict[str, Any]:
        """The registry config this server runs with (written to ``config_path``)."""
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "json", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "delete": {"enabled": self.delete_enabled},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {
                "addr": f"{self.bind_host}:{self.port}",
                # A fixed secret silences the "No HTTP secret" warning and keeps upload
                # state valid if a benchmark restarts the registry mid-run.
                "secret": self._http_secret(),
                "headers": {"X-Content-Type-Options": ["nosniff"]},
            },
            "health": {"storagedriver": {"enabled": False}},
        }
        if self.tls is not None:
            tls: dict[str, Any] = {
                "certificate": str(self.tls.server.cert),
                "key": str(self.tls.server.key),
            }
            if self.tls.client_ca is not None:
                tls["clientcas"] = [str(self.tls.client_ca)]
            config["http"]["tls"] = tls
        if isinstance(self.auth, HtpasswdAuth):
            config["auth"] = {
                "htpasswd": {"realm": self.auth.realm, "path": str(self.htpasswd_path)}
            }
        elif isinstance(self.auth, TokenAuth):
            config["auth"] = {
                "token": {
                    "realm": self.auth.realm,
                    "service": self.auth.service,
                    "issuer": self.auth.issuer,
                    "rootcertbundle": str(self.auth.rootcertbundle),
                }
            }
        if self.notification_urls:
            config["notifications"] = {
                "endpoints": [
                    {
                        "name": f"rig-{index}",
                        "url": url,
                        "timeout": "2s",
                        "threshold": 3,
                        "backoff": "1s",
                        "headers": {k: [v] for k, v in self.notification_headers.items()},
                    }
                    for index, url in enumerate(self.notification_urls)
                ]
            }
        return deep_merge(config, self.extra_config)

    def _http_secret(self) -> str:
        secret_path = self.work_dir / "http-secret"
        if not secret_path.exists():
            secret_path.write_text(secrets.token_hex(16))
        return secret_path.read_text()

    def start(self) -> None:
        """Write config (and htpasswd), start the registry, return once /v2/ answers.

        A port picked here can be taken by someone else before the registry binds it;
        then a new one is picked (unless the caller fixed the port).
        """
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        if isinstance(self.auth, HtpasswdAuth):
            lines = [htpasswd_line(u, p) for u, p in self.auth.users.items()]
            self.htpasswd_path.write_text("\n".join(lines) + "\n")
        for attempt in range(_BIND_RETRIES):
            if self._fixed_port is None:
                # Behind a prefix (another network namespace) the listen address may not
                # exist here; any locally free port will do, the retry covers collisions.
                self.port = free_port("127.0.0.1" if self.command_prefix else self.bind_host)
            self.config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            self._spawn()
            if self._wait_ready():
                log.info("registry.started", url=self.url, log=str(self.log_path))
                return
            self.stop()
            output = self.log_path.read_text(errors="replace")[log_offset:]
            if "address already in use" in output and self._fixed_port is None:
                log.info("registry.port_taken", port=self.port, attempt=attempt + 1)
                continue
            raise RuntimeError(
                f"docker-registry did not start; config {self.config_path}, "
                f"log {self.log_path}:\n{output[-4000:]}"
            )
        raise RuntimeError(f"docker-registry found no free port after {_BIND_RETRIES} tries")

    def _spawn(self) -> None:
        binary = shutil.which(self.binary) or self.binary
        command = [*self.command_prefix, binary, "serve", str(self.config_path)]
        with self.log_path.open("ab") as err, self.access_log_path.open("ab") as out:
            self._proc = subprocess.Popen(
                command, stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True
            )

    def _wait_ready(self) -> bool:
        """True once GET /v2/ is answered by a registry (401 counts: auth is up too).

        The API-version header tells our registry from another server that took the
        port first; proxies from the environment are bypassed, the rig is local.
        """
        assert self._proc is not None
        handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
        if self.tls is not None:
            handlers.append(urllib.request.HTTPSHandler(context=self.tls.client_context()))
        opener = urllib.request.build_opener(*handlers)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                with opener.open(f"{self.url}/v2/", timeout=1) as response:
                    headers = response.headers
            except urllib.error.HTTPError as error:
                headers = error.headers
            except OSError:
                time.sleep(0.05)
                continue
            return headers.get("Docker-Distribution-API-Version") == "registry/2.0"
        return False

    def stop(self) -> None:
        """Stop the registry (idempotent): SIGTERM to its process group, then SIGKILL."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        terminate_group(proc)
        log.info("registry.stopped", url=self.url, returncode=proc.returncode)

    @property
    def pid(self) -> int | None:
        """Process id of the registry (inside its namespace prefix, if any), None if stopped."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """Whether the registry process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def requests(self) -> list[RegistryRequest]:
        """Every request the registry has answered so far, oldest first.

        The registry writes a line once a handler returns, which can be a moment after
        the client read the last byte; wait a little before asserting on a request
        that just completed.
        """
        if not self.access_log_path.exists():
            return []
        return parse_access_log(self.access_log_path.read_text(errors="replace"))

    def log_paths(self) -> list[Path]:
        """Files worth keeping when a test fails."""
        return [self.config_path, self.log_path, self.access_log_path]

    def __enter__(self) -> RegistryServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
