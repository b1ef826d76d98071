"""Registry credentials from Docker `config.json` files and Kubernetes pull secrets.

Operators already keep pull credentials in one of these two forms; reading them as
Docker and the kubelet do means acceld needs no credential format of its own. Secret
values never appear in `repr`, logs or error messages.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fetcher.errors import CredentialsError
from fetcher.reference import DOCKER_HUB, DOCKER_HUB_API_HOST

HELPER_TTL_S = 300.0
"""How long a credential helper's answer is used before the helper is asked again."""

DOCKERCONFIGJSON_TYPE = "kubernetes.io/dockerconfigjson"
DOCKERCONFIGJSON_KEY = ".dockerconfigjson"
_HUB_ALIASES = ("https://index.docker.io/v1/", "index.docker.io", DOCKER_HUB, DOCKER_HUB_API_HOST)


@dataclass(frozen=True)
class Credential:
    """Username/password, or an OAuth2 refresh token (`identitytoken`), for one registry."""

    username: str = field(default="", repr=False)
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)
    registry_token: str = field(default="", repr=False)

    def __repr__(self) -> str:
        kind = "token" if self.identity_token or self.registry_token else "basic"
        return f"Credential(kind={kind}, username={'<set>' if self.username else '<none>'})"


def normalize_registry_key(key: str) -> str:
    """Reduce a config.json `auths` key (which may be a URL) to the host[:port] we dial."""
    host = key.strip()
    for prefix in ("https://", "http://"):
        if host.startswith(prefix):
            host = host[len(prefix) :]
    host = host.split("/", 1)[0]
    return DOCKER_HUB if host in _HUB_ALIASES else host


def _decode_auth_entry(entry: Any, source: str, key: str) -> Credential:
    if not isinstance(entry, dict):
        raise CredentialsError(f"{source}: auths[{key!r}] must be an object")
    username = entry.get("username") or ""
    password = entry.get("password") or ""
    if entry.get("auth"):
        try:
            decoded = base64.b64decode(entry["auth"], validate=True).decode()
        except (binascii.Error, UnicodeDecodeError, TypeError):
            raise CredentialsError(f"{source}: auths[{key!r}].auth is not base64") from None
        username, sep, password = decoded.partition(":")
        if not sep:
            raise CredentialsError(f"{source}: auths[{key!r}].auth is not user:password")
    return Credential(
        username=str(username),
        password=str(password),
        identity_token=str(entry.get("identitytoken") or ""),
        registry_token=str(entry.get("registrytoken") or ""),
    )


class CredentialStore:
    """Credentials by registry host, merged from any number of sources (later ones win)."""

    def __init__(self) -> None:
        self._by_host: dict[str, Credential] = {}
        self._helpers: dict[str, str] = {}
        self._default_helper: str | None = None
        self._helper_answers: dict[str, tuple[Credential | None, float]] = {}

    def add(self, registry: str, credential: Credential) -> None:
        """Register a credential for ``registry`` (host[:port] or a config.json URL key)."""
        self._by_host[normalize_registry_key(registry)] = credential

    def add_docker_config(self, doc: Any, source: str) -> None:
        """Merge a parsed config.json document; ``source`` names it in errors."""
        if not isinstance(doc, dict):
            raise CredentialsError(f"{source}: expected a JSON object")
        auths = doc.get("auths")
        if auths is None:
            auths = {}
        if not isinstance(auths, dict):
            raise CredentialsError(f"{source}: 'auths' must be an object")
        for key, entry in auths.items():
            self.add(key, _decode_auth_entry(entry, source, key))
        helpers = doc.get("credHelpers") or {}
        if isinstance(helpers, dict):
            for key, helper in helpers.items():
                self._helpers[normalize_registry_key(key)] = str(helper)
        if isinstance(doc.get("credsStore"), str):
            self._default_helper = doc["credsStore"]

    def load_docker_config(self, path: str | Path) -> None:
        """Merge a Docker `config.json` file."""
        self.add_docker_config(_load_json_file(Path(path)), str(path))

    def load_kubernetes_secret(self, path: str | Path) -> None:
        """Merge a `kubernetes.io/dockerconfigjson` secret.

        Accepts the Secret object (YAML or JSON, `data` base64 or `stringData`) and the
        `.dockerconfigjson` file a mounted secret volume holds.
        """
        path = Path(path)
        text = _read_text(path)
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise CredentialsError(f"{path}: not YAML/JSON: {exc.__class__.__name__}") from None
        if isinstance(doc, dict) and doc.get("kind") == "Secret":
            if doc.get("type") != DOCKERCONFIGJSON_TYPE:
                raise CredentialsError(
                    f"{path}: secret type is {doc.get('type')!r}, need {DOCKERCONFIGJSON_TYPE}"
                )
            raw = (doc.get("stringData") or {}).get(DOCKERCONFIGJSON_KEY)
            if raw is None:
                encoded = (doc.get("data") or {}).get(DOCKERCONFIGJSON_KEY)
                if not isinstance(encoded, str):
                    raise CredentialsError(f"{path}: secret has no {DOCKERCONFIGJSON_KEY} key")
                try:
                    raw = base64.b64decode(encoded, validate=True).decode()
                except (binascii.Error, UnicodeDecodeError):
                    raise CredentialsError(
                        f"{path}: {DOCKERCONFIGJSON_KEY} is not base64"
                    ) from None
            try:
                doc = json.loads(raw)
            except json.JSONDecodeError:
                raise CredentialsError(f"{path}: {DOCKERCONFIGJSON_KEY} is not JSON") from None
        self.add_docker_config(doc, str(path))

    def lookup(self, registry: str, ask_helper: bool = True) -> Credential | None:
        """The credential for ``registry``, asking a Docker credential helper if one is
        configured. A helper's answer is kept for HELPER_TTL_S (helpers are processes and
        say nothing of expiry); ``ask_helper=False`` returns the last answer, however old,
        without running anything (for code on the event loop)."""
        host = normalize_registry_key(registry)
        if host in self._by_host:
            return self._by_host[host]
        helper = self._helpers.get(host, self._default_helper)
        if not helper:
            return None
        answered = self._helper_answers.get(host)
        if not ask_helper or (answered and time.monotonic() - answered[1] < HELPER_TTL_S):
            return answered[0] if answered else None
        credential = _ask_credential_helper(helper, host)
        self._helper_answers[host] = (credential, time.monotonic())
        return credential

    @classmethod
    def from_files(
        cls, docker_config: Path | None = None, pull_secrets: Sequence[Path] = ()
    ) -> CredentialStore:
        """The named Docker config (else Docker's default one), then the pull secrets."""
        store = cls() if docker_config else cls.from_environment()
        if docker_config:
            store.load_docker_config(docker_config)
        for secret in pull_secrets:
            store.load_kubernetes_secret(secret)
        return store

    @classmethod
    def from_environment(cls) -> CredentialStore:
        """Docker's default: `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`, if present."""
        store = cls()
        config_dir = os.environ.get("DOCKER_CONFIG") or str(Path.home() / ".docker")
        path = Path(config_dir) / "config.json"
        if path.is_file():
            store.load_docker_config(path)
        return store


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise CredentialsError(f"{path}: cannot read: {exc.strerror}") from None


def _load_json_file(path: Path) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise CredentialsError(f"{path}: not valid JSON (line {exc.lineno})") from None


def _ask_credential_helper(helper: str, host: str) -> Credential | None:
    """Run `docker-credential-<helper> get` the way the Docker CLI does."""
    try:
        proc = subprocess.run(
            [f"docker-credential-{helper}", "get"],
            input=host,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CredentialsError(
            f"credential helper {helper!r} failed: {exc.__class__.__name__}"
        ) from None
    if proc.returncode != 0:
        return None
    try:
        answer = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise CredentialsError(f"credential helper {helper!r} returned invalid JSON") from None
    username, secret = answer.get("Username", ""), answer.get("Secret", "")
    if username == "<token>":
        return Credential(identity_token=secret)
    return Credential(username=username, password=secret)
