"""Registry authentication: WWW-Authenticate challenges, Basic, and Bearer tokens.

Implements the distribution token flow: a 401 names a realm and service; we ask the
realm for a token for exactly the scope the operation needs (pull, or pull+push), cache
it until shortly before it expires, and reuse it for every request under that scope.
"""

from __future__ import annotations

import asyncio
import base64
import re
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from common.logging import get_logger
from fetcher.bodies import SMALL_BODY, json_capped
from fetcher.credentials import Credential
from fetcher.errors import (
    ForbiddenError,
    RegistryUnavailableError,
    ResponseTooLargeError,
    UnauthorizedError,
)
from fetcher.http_errors import TRANSIENT_ERRORS, malformed

log = get_logger(__name__)

_PARAM_RE = re.compile(r'([a-zA-Z_]+)=(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))')
TOKEN_EXPIRY_MARGIN = 10.0
DEFAULT_TOKEN_LIFETIME = 60.0


@dataclass(frozen=True)
class Challenge:
    """One parsed WWW-Authenticate challenge."""

    scheme: str
    params: dict[str, str]


def parse_challenge(header: str) -> Challenge:
    """Parse e.g. `Bearer realm="https://a/token",service="reg",scope="repository:x:pull"`."""
    scheme, _, rest = header.strip().partition(" ")
    params = {
        m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
        for m in _PARAM_RE.finditer(rest)
    }
    return Challenge(scheme.lower(), {k: v.replace('\\"', '"') for k, v in params.items()})


def basic_header(credential: Credential) -> str:
    """The Basic Authorization header value for a username/password credential."""
    raw = f"{credential.username}:{credential.password}".encode()
    return "Basic " + base64.b64encode(raw).decode()


def repository_scope(repository: str, push: bool) -> str:
    """The token scope for an operation on ``repository``."""
    return f"repository:{repository}:{'pull,push' if push else 'pull'}"


@dataclass
class _CachedToken:
    value: str
    expires_at: float


class TokenCache:
    """Bearer tokens by (realm, service, scope); one fetch at a time per key."""

    def __init__(self) -> None:
        self._tokens: dict[tuple[str, str, str], _CachedToken] = {}
        self._locks: dict[tuple[str, str, str], asyncio.Lock] = {}

    def get(self, realm: str, service: str, scope: str) -> str | None:
        """A still-valid token for the key, if cached."""
        cached = self._tokens.get((realm, service, scope))
        if cached and cached.expires_at > time.monotonic():
            return cached.value
        return None

    def invalidate(self, realm: str, service: str, scope: str) -> None:
        """Forget a token the registry refused (revoked or expired early)."""
        self._tokens.pop((realm, service, scope), None)

    async def fetch(
        self,
        session: aiohttp.ClientSession,
        challenge: Challenge,
        scope: str,
        credential: Credential | None,
        timeout: aiohttp.ClientTimeout,
        proxy: str | None = None,
    ) -> str:
        """A token for ``scope`` from the challenge's realm (through ``proxy``), cached."""
        realm = challenge.params.get("realm")
        if not realm:
            raise UnauthorizedError("Bearer challenge without a realm")
        service = challenge.params.get("service", "")
        key = (realm, service, scope)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            cached = self.get(*key)
            if cached:
                return cached
            if credential and credential.registry_token:
                token, lifetime = credential.registry_token, DEFAULT_TOKEN_LIFETIME
            else:
                token, lifetime = await _request_token(
                    session, realm, service, scope, credential, timeout, proxy
                )
            expires = time.monotonic() + max(lifetime - TOKEN_EXPIRY_MARGIN, 1.0)
            self._tokens[key] = _CachedToken(token, expires)
            log.debug(
                "registry.token_issued",
                realm=realm,
                service=service,
                scope=scope,
                lifetime=lifetime,
            )
            return token


async def _request_token(
    session: aiohttp.ClientSession,
    realm: str,
    service: str,
    scope: str,
    credential: Credential | None,
    timeout: aiohttp.ClientTimeout,
    proxy: str | None,
) -> tuple[str, float]:
    """Ask the token service: OAuth2 refresh-token POST if we hold one, else GET (+Basic)."""
    try:
        if credential and credential.identity_token:
            form = {
                "grant_type": "refresh_token",
                "refresh_token": credential.identity_token,
                "service": service,
                "scope": scope,
                "client_id": "acceld",
            }
            async with session.post(realm, data=form, timeout=timeout, proxy=proxy) as resp:
                return await _token_from_response(resp, realm)
        params = {"scope": scope, "client_id": "acceld"}
        if service:
            params["service"] = service
        headers = {}
        if credential and credential.username:
            params["account"] = credential.username
            headers["Authorization"] = basic_header(credential)
        async with session.get(
            realm, params=params, headers=headers, timeout=timeout, proxy=proxy
        ) as resp:
            return await _token_from_response(resp, realm)
    except TRANSIENT_ERRORS as exc:
        raise RegistryUnavailableError(
            f"token service {realm} unreachable: {exc.__class__.__name__}", url=realm
        ) from None
    except aiohttp.ClientError as exc:
        raise malformed(f"token service {realm}", exc, realm) from None


async def _token_from_response(resp: aiohttp.ClientResponse, realm: str) -> tuple[str, float]:
    if resp.status == 401:
        raise UnauthorizedError("token service rejected the credentials", status=401, url=realm)
    if resp.status == 403:
        raise ForbiddenError("token service denied access", status=403, url=realm)
    if resp.status >= 400:
        raise RegistryUnavailableError("token service failed", status=resp.status, url=realm)
    try:
        doc: Any = await json_capped(resp, SMALL_BODY, "token response")
    except (ValueError, ResponseTooLargeError):
        raise UnauthorizedError("token service answered with invalid JSON", url=realm) from None
    token = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
    if not isinstance(token, str) or not token:
        raise UnauthorizedError("token service answered without a token", url=realm)
    lifetime = doc.get("expires_in")
    if not isinstance(lifetime, int | float) or lifetime <= 0:
        lifetime = DEFAULT_TOKEN_LIFETIME
    return token, float(lifetime)
