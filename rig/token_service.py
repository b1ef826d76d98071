"""A Docker registry v2 token server, so Bearer auth is tested against the real registry.

Private registries (Docker Hub, Harbor, GitLab, ECR's front door) answer with
``WWW-Authenticate: Bearer realm=...,service=...,scope=...`` and expect the client to
fetch a short-lived JWT from the realm. This module is that realm: users with
per-repository permissions, tokens signed with a key pair made at start, and a
self-signed certificate that the real `docker-registry` loads as its
``auth.token.rootcertbundle``. Tokens carry the certificate in their ``x5c`` header,
which distribution 2.8 verifies against that bundle (a libtrust ``kid`` also works
there, but ``x5c`` is the standard JWS way and needs no libtrust fingerprint).

It runs as its own process (``python -m rig.token_service --config FILE``) so the
registry, the agent under test and the benchmarks all see a separate server, exactly
as in production; `TokenService` starts and stops that process. Every request is
appended to a JSON-lines log that tests read back with `TokenService.requests()` to
assert which scopes a client asked for.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import datetime as dt
import fnmatch
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.logging import configure_logging, get_logger
from rig.certificates import write_self_signed
from rig.processes import terminate_group

log = get_logger(__name__)

Permissions = Mapping[str, Sequence[str]]
"""Repository-name glob -> allowed actions (``pull``, ``push``, ``delete``, or ``*``)."""

DEFAULT_SERVICE = "acceld-rig-registry"
DEFAULT_ISSUER = "acceld-rig-token-service"


@dataclass(frozen=True)
class TokenAuth:
    """What the registry needs to trust this service (its ``auth.token`` section)."""

    realm: str
    service: str
    issuer: str
    rootcertbundle: Path


@dataclass(frozen=True)
class TokenRequest:
    """One request the token service answered, as read back from its log.

    ``scope`` is the requested scopes joined by spaces (None when none were asked),
    ``account`` the username the client presented (None for anonymous requests),
    ``granted`` the ``access`` claim of the issued token (empty when refused).
    """

    method: str
    grant_type: str | None
    account: str | None
    scope: str | None
    scopes: tuple[str, ...]
    granted: tuple[tuple[str, str, tuple[str, ...]], ...]
    status: int


# --------------------------------------------------------------------------- keys


def write_signing_material(key_path: Path, cert_path: Path, common_name: str) -> None:
    """Write a fresh key and self-signed certificate (the registry's root bundle)."""
    write_self_signed(key_path, cert_path, common_name)


# --------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class Scope:
    """A parsed ``type:name:actions`` scope; the name may itself contain colons."""

    type: str
    name: str
    actions: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Scope | None:
        """None for text that is not a scope (ignored, as distribution's servers do)."""
        first, sep, rest = text.partition(":")
        name, sep2, actions = rest.rpartition(":")
        if not (sep and sep2 and first and name):
            return None
        return cls(first, name, tuple(a for a in actions.split(",") if a))


def allowed_actions(permissions: Permissions, repository: str) -> set[str]:
    """Union of the actions of every pattern matching ``repository``."""
    allowed: set[str] = set()
    for pattern, actions in permissions.items():
        if fnmatch.fnmatchcase(repository, pattern):
            allowed.update(actions)
    return allowed


def grant(permissions: Permissions, scopes: Sequence[Scope]) -> list[dict[str, Any]]:
    """The ``access`` claim: each requested scope cut down to what is allowed.

    Like Docker Hub, a token is still issued when some actions are refused; the
    registry then answers 401 ``insufficient_scope``. Only ``repository`` scopes can be
    granted here.
    """
    access: list[dict[str, Any]] = []
    for scope in scopes:
        if scope.type != "repository":
            continue
        allowed = allowed_actions(permissions, scope.name)
        actions = [a for a in scope.actions if "*" in allowed or a in allowed]
        if actions:
            access.append({"type": scope.type, "name": scope.name, "actions": actions})
    return access


# --------------------------------------------------------------------------- server


class _Rejected(Exception):
    """Credentials were presented and are wrong: answer 401, never an anonymous token."""


class TokenServer:
    """The aiohttp application behind the realm (runs inside the service process)."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.service: str = config["service"]
        self.issuer: str = config["issuer"]
        self.ttl: int = int(config["ttl_seconds"])
        self.users: dict[str, dict[str, Any]] = config["users"]
        self.anonymous: Permissions = config["anonymous"]
        key = serialization.load_pem_private_key(Path(config["key_path"]).read_bytes(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{config['key_path']}: expected an EC key for ES256")
        self.key = key
        cert = x509.load_pem_x509_certificate(Path(config["cert_path"]).read_bytes())
        self.x5c = [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]
        self.log_file = Path(config["log_path"]).open("a", encoding="utf-8")  # noqa: SIM115
        self.refresh_tokens: dict[str, str] = {}

    def app(self) -> web.Application:
        """Routes: GET is the token spec, POST the OAuth2 variant (password/refresh)."""
        app = web.Application()
        app.router.add_get("/token", self.get_token)
        app.router.add_post("/token", self.post_token)
        return app

    def _check_password(self, username: str, password: str) -> str:
        user = self.users.get(username)
        if user is None or not secrets.compare_digest(user["password"].encode(), password.encode()):
            raise _Rejected(username)
        return username

    def _basic_auth_user(self, request: web.Request) -> tuple[str | None, str | None]:
        """(presented username, verified username) from the Authorization header."""
        header = request.headers.get("Authorization", "")
        kind, _, value = header.partition(" ")
        if kind.lower() != "basic":
            return None, None
        try:
            username, _, password = base64.b64decode(value).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise _Rejected("") from None
        return username, self._check_password(username, password)

    def _issue(
        self, subject: str | None, access: list[dict[str, Any]]
    ) -> tuple[str, dict[str, Any]]:
        """A signed JWT plus the ``expires_in``/``issued_at`` fields of the answer."""
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": subject or "",
            "aud": self.service,
            "exp": now + self.ttl,
            "nbf": now - 1,
            "iat": now,
            "jti": secrets.token_hex(16),
            "access": access,
        }
        token = jwt.encode(claims, self.key, algorithm="ES256", headers={"x5c": self.x5c})
        issued = dt.datetime.fromtimestamp(now, dt.UTC).isoformat().replace("+00:00", "Z")
        return token, {"expires_in": self.ttl, "issued_at": issued}

    def _record(
        self,
        request: web.Request,
        grant_type: str | None,
        account: str | None,
        scopes: Sequence[str],
        granted: Sequence[Mapping[str, Any]],
        status: int,
    ) -> None:
        entry = {
            "time": time.time(),
            "method": request.method,
            "grant_type": grant_type,
            "account": account,
            "scopes": list(scopes),
            "granted": list(granted),
            "status": status,
        }
        self.log_file.write(json.dumps(entry) + "\n")
        self.log_file.flush()

    def _error(self, status: int, code: str, message: str) -> web.Response:
        headers = {"WWW-Authenticate": 'Basic realm="acceld-rig-token-service"'}
        return web.json_response(
            {"errors": [{"code": code, "message": message}]},
            status=status,
            headers=headers if status == 401 else None,
        )

    def _wrong_service(self, service: str | None) -> web.Response | None:
        if service is None or service == self.service:
            return None
        return self._error(400, "DENIED", f"unknown service {service!r}")

    def _permissions(self, username: str | None) -> Permissions:
        return self.users[username]["access"] if username else self.anonymous

    async def get_token(self, request: web.Request) -> web.Response:
        """The classic flow: Basic auth (or none) plus ``scope`` query parameters."""
        scopes = request.query.getall("scope", [])
        presented: str | None = None
        try:
            presented, username = self._basic_auth_user(request)
        except _Rejected as rejected:
            self._record(request, None, str(rejected) or None, scopes, [], 401)
            return self._error(401, "UNAUTHORIZED", "invalid username or password")
        refused = self._wrong_service(request.query.get("service"))
        if refused is not None:
            self._record(request, None, presented, scopes, [], refused.status)
            return refused
        parsed = [s for s in (Scope.parse(text) for text in scopes) if s is not None]
        access = grant(self._permissions(username), parsed)
        token, body = self._issue(username, access)
        body.update(token=token, access_token=token)
        if username and request.query.get("offline_token") == "true":
            body["refresh_token"] = self._new_refresh_token(username)
        self._record(request, None, presented, scopes, access, 200)
        return web.json_response(body)

    async def post_token(self, request: web.Request) -> web.Response:
        """OAuth2 form flow used by containerd and newer Docker clients."""
        form = await request.post()
        grant_type = str(form.get("grant_type", ""))
        scopes = str(form.get("scope", "")).split()
        presented = str(form["username"]) if "username" in form else None
        refused = self._wrong_service(str(form["service"]) if "service" in form else None)
        if refused is not None:
            self._record(request, grant_type, presented, scopes, [], refused.status)
            return refused
        try:
            if grant_type == "password":
                username = self._check_password(
                    str(form.get("username", "")), str(form.get("password", ""))
                )
            elif grant_type == "refresh_token":
                username = self.refresh_tokens.get(str(form.get("refresh_token", "")), "")
                presented = username or None
                if not username:
                    raise _Rejected("")
            else:
                self._record(request, grant_type, presented, scopes, [], 400)
                return self._error(400, "UNSUPPORTED", f"grant_type {grant_type!r}")
        except _Rejected:
            self._record(request, grant_type, presented, scopes, [], 401)
            return self._error(401, "UNAUTHORIZED", "invalid credentials or refresh token")
        parsed = [s for s in (Scope.parse(text) for text in scopes) if s is not None]
        access = grant(self._permissions(username), parsed)
        token, body = self._issue(username, access)
        body["access_token"] = token
        body["scope"] = " ".join(scopes)
        if grant_type == "refresh_token":
            body["refresh_token"] = form["refresh_token"]
        elif form.get("access_type") == "offline":
            body["refresh_token"] = self._new_refresh_token(username)
        self._record(request, grant_type, presented, scopes, access, 200)
        return web.json_response(body)

    def _new_refresh_token(self, username: str) -> str:
        token = secrets.token_urlsafe(32)
        self.refresh_tokens[token] = username
        return token


async def _serve(config: Mapping[str, Any]) -> None:
    """Serve until SIGTERM/SIGINT; the bound port goes to ``ready_path`` once listening."""
    server = TokenServer(config)
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((config["host"], int(config.get("port", 0))))
    await web.SockSite(runner, sock).start()
    port = sock.getsockname()[1]
    ready = Path(config["ready_path"])
    tmp = ready.with_suffix(".tmp")
    tmp.write_text(str(port))
    tmp.rename(ready)
    log.info("token_service.started", host=config["host"], port=port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await runner.cleanup()
    server.log_file.close()
    log.info("token_service.stopped", port=port)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the service process."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--config", type=Path, required=True, help="JSON written by TokenService")
    args = parser.parse_args(argv)
    configure_logging()
    asyncio.run(_serve(json.loads(args.config.read_text())))


# --------------------------------------------------------------------------- wrapper


class TokenService:
    """Starts, stops and inspects one token-service process.

    ``users`` maps a username to (password, permissions); ``anonymous`` is what a
    client without credentials may do (nothing by default).
    """

    def __init__(
        self,
        work_dir: Path,
        users: Mapping[str, tuple[str, Permissions]],
        *,
        anonymous: Permissions | None = None,
        host: str = "127.0.0.1",
        service: str = DEFAULT_SERVICE,
        issuer: str = DEFAULT_ISSUER,
        ttl_seconds: int = 300,
        start_timeout: float = 20.0,
    ) -> None:
        self.work_dir = work_dir
        self.users = dict(users)
        self.anonymous = dict(anonymous or {})
        self.bind_host = host
        self.service = service
        self.issuer = issuer
        self.ttl_seconds = ttl_seconds
        self.start_timeout = start_timeout
        self.key_path = work_dir / "token-key.pem"
        self.cert_path = work_dir / "token-cert.pem"
        self.config_path = work_dir / "token-service.json"
        self.requests_path = work_dir / "token-requests.jsonl"
        self.log_path = work_dir / "token-service.log"
        self._ready_path = work_dir / "token-service.port"
        self.port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Base URL of the running service."""
        if self.port is None:
            raise RuntimeError("token service is not started")
        return f"http://{self.bind_host}:{self.port}"

    @property
    def realm(self) -> str:
        """The realm URL a registry puts into its Bearer challenge."""
        return f"{self.url}/token"

    def registry_auth(self) -> TokenAuth:
        """The `auth.token` settings for a `RegistryServer` that trusts this service."""
        return TokenAuth(self.realm, self.service, self.issuer, self.cert_path)

    def start(self) -> None:
        """Write key, certificate and config, start the process, wait until it listens."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        write_signing_material(self.key_path, self.cert_path, self.issuer)
        self._ready_path.unlink(missing_ok=True)
        config = {
            "host": self.bind_host,
            "port": 0,
            "service": self.service,
            "issuer": self.issuer,
            "ttl_seconds": self.ttl_seconds,
            "key_path": str(self.key_path),
            "cert_path": str(self.cert_path),
            "log_path": str(self.requests_path),
            "ready_path": str(self._ready_path),
            "users": {
                name: {"password": password, "access": {k: list(v) for k, v in perms.items()}}
                for name, (password, perms) in self.users.items()
            },
            "anonymous": {k: list(v) for k, v in self.anonymous.items()},
        }
        self.config_path.write_text(json.dumps(config, indent=2))
        self.requests_path.touch()
        with self.log_path.open("ab") as log_file:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "rig.token_service", "--config", str(self.config_path)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=Path(__file__).resolve().parent.parent,
                env={**os.environ, "ACCELD_LOG_FORMAT": "json"},
                start_new_session=True,
            )
        deadline = time.monotonic() + self.start_timeout
        while not self._ready_path.exists():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"token service did not start; log {self.log_path}:\n"
                    + self.log_path.read_text(errors="replace")[-4000:]
                )
            time.sleep(0.05)
        self.port = int(self._ready_path.read_text())
        log.info("token_service.ready", url=self.url, log=str(self.log_path))

    def stop(self) -> None:
        """Terminate the process (idempotent); kills it if it ignores SIGTERM."""
        proc, self._proc = self._proc, None
        if proc is not None:
            terminate_group(proc)

    def requests(self) -> list[TokenRequest]:
        """Every request answered so far, oldest first."""
        found = []
        complete, _, _ = self.requests_path.read_text().rpartition("\n")  # skip a partial line
        for line in complete.splitlines():
            entry = json.loads(line)
            scopes = tuple(entry["scopes"])
            found.append(
                TokenRequest(
                    method=entry["method"],
                    grant_type=entry["grant_type"],
                    account=entry["account"],
                    scope=" ".join(scopes) or None,
                    scopes=scopes,
                    granted=tuple(
                        (a["type"], a["name"], tuple(a["actions"])) for a in entry["granted"]
                    ),
                    status=entry["status"],
                )
            )
        return found

    def log_paths(self) -> list[Path]:
        """Files worth keeping when a test fails."""
        return [self.log_path, self.requests_path, self.config_path]

    def __enter__(self) -> TokenService:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    main()
