"""HTTP transport to registries: pooling, authentication, retries and redirect reuse.

Every registry call goes through `RegistryTransport.send`, so there is one place that
knows how to answer a 401 challenge, when a failure is worth retrying, that a blob
redirect (e.g. a pre-signed storage URL) can be reused until it expires instead of
costing a registry round trip per range request, which registries may be contacted at
all (`fetcher.registry_policy`), and where the realms and redirects a registry names may
lead (`fetcher.delegation`, enforced at connect time by `fetcher.resolver`), and which
requests go through an HTTP proxy (`fetcher.proxy_env`, containerd's rules).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver

from common.logging import get_logger
from fetcher.auth import Challenge, TokenCache, basic_header, parse_challenge, repository_scope
from fetcher.bodies import SMALL_BODY, json_capped
from fetcher.credentials import CredentialStore
from fetcher.delegation import delegate_allowed, host_of_url, may_send_credentials, registry_host
from fetcher.errors import (
    DelegationRefusedError,
    ForbiddenError,
    NotFoundError,
    RegistryError,
    RegistryUnavailableError,
    UnauthorizedError,
)
from fetcher.http_errors import TRANSIENT_ERRORS, malformed
from fetcher.proxy_env import ProxySelector, process_proxies
from fetcher.registry_policy import RegistryPolicy
from fetcher.resolver import PublicOnlyResolver, RegistryResolver
from fetcher.retry import RETRYABLE_STATUS, RetryPolicy

log = get_logger(__name__)

_CREDENTIAL_LOOKUPS = ThreadPoolExecutor(max_workers=1, thread_name_prefix="acceld-credentials")
"""Credential lookups that may run a Docker credential helper (one at a time)."""
RETRY_CAUSES = ("status", "connection", "range", "stream", "upload")
"""Why a registry request was sent again: a retryable HTTP status, a failed connection,
a bad Range answer, a blob stream cut short, a failed upload."""

REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
DEFAULT_REDIRECT_TTL = 60.0
REDIRECT_EXPIRY_MARGIN = 5.0
BodyFactory = Callable[[], Any]


@dataclass(frozen=True)
class Target:
    """What a request is about: the registry host, repository and whether it writes."""

    registry: str
    repository: str
    push: bool = False


def redirect_expiry(url: str, now: float, default_ttl: float = DEFAULT_REDIRECT_TTL) -> float:
    """When a redirect URL stops working, from the signature parameters storage services use.

    S3 (`X-Amz-Date` + `X-Amz-Expires`), CloudFront/GCS v2 (`Expires` epoch) and Azure
    (`se` ISO time); otherwise ``default_ttl``. Returned on the monotonic clock.
    """
    query = {k.lower(): v[0] for k, v in parse_qs(urlsplit(url).query).items()}
    wall_expiry: float | None = None
    try:
        if "x-amz-date" in query and "x-amz-expires" in query:
            signed = datetime.strptime(query["x-amz-date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
            wall_expiry = signed.timestamp() + float(query["x-amz-expires"])
        elif "expires" in query:
            wall_expiry = float(query["expires"])
        elif "se" in query:
            wall_expiry = datetime.fromisoformat(query["se"].replace("Z", "+00:00")).timestamp()
    except ValueError:
        wall_expiry = None
    if wall_expiry is None:
        return now + default_ttl
    return now + (wall_expiry - time.time()) - REDIRECT_EXPIRY_MARGIN


def error_codes(body: Any) -> list[str]:
    """The `errors[].code` values of a distribution error body, if it is one."""
    if isinstance(body, dict) and isinstance(body.get("errors"), list):
        return [str(e.get("code")) for e in body["errors"] if isinstance(e, dict)]
    return []


class RegistryTransport:
    """Pooled, authenticated, retrying HTTP to any number of registries."""

    def __init__(
        self,
        credentials: CredentialStore | None = None,
        plain_http_hosts: set[str] | frozenset[str] = frozenset(),
        retry: RetryPolicy | None = None,
        max_connections_per_host: int = 8,
        connect_timeout: float = 10.0,
        read_timeout: float = 30.0,
        redirect_ttl: float = DEFAULT_REDIRECT_TTL,
        policy: RegistryPolicy | None = None,
    ) -> None:
        self.credentials = credentials or CredentialStore()
        self.policy = policy or RegistryPolicy()
        self.plain_http_hosts = set(plain_http_hosts)
        self.retry = retry or RetryPolicy()
        self.retries: collections.Counter[str] = collections.Counter()
        """Retries so far, by cause (RETRY_CAUSES): a registry that keeps failing shows
        there (the agent exports them) long before it fails a pull."""
        self.timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout, sock_read=read_timeout
        )
        self._max_per_host = max_connections_per_host
        self._redirect_ttl = redirect_ttl
        self._session: aiohttp.ClientSession | None = None
        self._public_session: aiohttp.ClientSession | None = None
        self._proxied_session: aiohttp.ClientSession | None = None
        self._registry_resolver = RegistryResolver()
        self._public_resolver = PublicOnlyResolver()
        self.proxies: ProxySelector = process_proxies()
        """Which requests go through a proxy: by the rules of this process's environment,
        read once (`process_proxies`), unless replaced (a test's own settings)."""
        self._challenges: dict[str, Challenge] = {}
        self._tokens = TokenCache()
        self._redirects: dict[tuple[str, str], tuple[str, float]] = {}

    async def open(self) -> None:
        """Create the pooled sessions (they must be created inside the running loop)."""
        if self._session is None:
            self._session = self._new_session(self._registry_resolver)
            self._public_session = self._new_session(self._public_resolver)
            # Its resolver only ever sees proxies' names: the proxy resolves the rest.
            self._proxied_session = self._new_session(RegistryResolver())

    def _new_session(self, resolver: AbstractResolver) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=0, limit_per_host=self._max_per_host, resolver=resolver
        )
        return aiohttp.ClientSession(
            connector=connector,
            timeout=self.timeout,
            headers={"User-Agent": "acceld/0.1"},
            auto_decompress=False,
        )

    async def close(self) -> None:
        """Close every pooled connection."""
        for session in (self._session, self._public_session, self._proxied_session):
            if session is not None:
                await session.close()
        self._session = self._public_session = self._proxied_session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """The pooled session to registries; `open()` must have run."""
        if self._session is None:
            raise RuntimeError("RegistryTransport used before open()")
        return self._session

    def _registry_public(self, target: Target) -> bool:
        return not self._registry_resolver.on_non_public_address(registry_host(target.registry))

    def _delegate_session(self, target: Target) -> aiohttp.ClientSession:
        """The session for the realms and redirects ``target``'s registry names: for a
        registry on a public address, one whose connections reach public addresses only.
        A connection pool of its own, so that no connection another request made to a
        private address is ever reused for them."""
        if not self._registry_public(target):
            return self.session
        if self._public_session is None:
            raise RuntimeError("RegistryTransport used before open()")
        return self._public_session

    async def _route(
        self, target: Target, url: str, delegate: bool
    ) -> tuple[aiohttp.ClientSession, str | None]:
        """The session and the proxy (None: direct) for a request to ``url``, one of
        ``target``'s registry (``delegate`` False) or of a realm or redirect it named.

        Through a proxy the proxy resolves the name and connects, so the rules meet the
        name instead of the peer (`fetcher.resolver`): a registry's name is looked up
        here to learn which rule its delegates follow, and a delegate's is held to that
        rule by the node's own answer. The registry policy and the written-address rule
        apply to the URL as before, whichever way it goes.
        """
        proxy = self.proxies.proxy_for(url)
        if proxy is None:
            return (self._delegate_session(target) if delegate else self.session), None
        if self._proxied_session is None:
            raise RuntimeError("RegistryTransport used before open()")
        if not delegate:
            await self._registry_resolver.learn(host_of_url(url))
        elif self._registry_public(target):
            await self._public_resolver.check_name(host_of_url(url))
        return self._proxied_session, proxy

    def _check_delegate(self, target: Target, url: str, what: str) -> None:
        """Refuse a realm or redirect written as a non-public address (a name is judged
        when the delegate session resolves it)."""
        if not delegate_allowed(self._registry_public(target), url):
            log.warning("registry.delegate_refused", registry=target.registry, what=what)
            raise DelegationRefusedError(
                f"{target.registry}: {what} to a non-public address, not followed",
                url=str(urlsplit(url)._replace(query="").geturl()),
            )

    def base_url(self, registry: str) -> str:
        """`http(s)://host` for a registry: plain HTTP only where configured or on loopback."""
        host = registry.rsplit(":", 1)[0] if registry.count(":") == 1 else registry
        plain = (
            registry in self.plain_http_hosts
            or host in ("localhost", "[::1]")
            or (host.startswith("127."))
        )
        return f"{'http' if plain else 'https'}://{registry}"

    def _auth_header(self, target: Target) -> str | None:
        challenge = self._challenges.get(target.registry)
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            # What the last challenge looked up (a helper is asked again on the next 401).
            credential = self.credentials.lookup(target.registry, ask_helper=False)
            return basic_header(credential) if credential and credential.username else None
        if challenge.scheme == "bearer":
            scope = repository_scope(target.repository, target.push)
            token = self._tokens.get(
                challenge.params.get("realm", ""), challenge.params.get("service", ""), scope
            )
            return f"Bearer {token}" if token else None
        return None

    async def _authorize(self, target: Target, header: str) -> str:
        """Answer a 401 challenge: remember it and return the Authorization to retry with."""
        challenge = parse_challenge(header)
        self._challenges[target.registry] = challenge
        # Off the loop, on a thread of its own: a Docker credential helper is a
        # subprocess, and the loop's default executor also runs file-system walks
        # that can wait behind overlayfs.
        loop = asyncio.get_running_loop()
        credential = await loop.run_in_executor(
            _CREDENTIAL_LOOKUPS, self.credentials.lookup, target.registry
        )
        if challenge.scheme == "basic":
            if credential is None or not credential.username:
                raise UnauthorizedError(
                    f"{target.registry} needs credentials, none configured", status=401
                )
            return basic_header(credential)
        if challenge.scheme == "bearer":
            realm = challenge.params.get("realm", "")
            self._check_delegate(target, realm, "token realm")
            if credential is not None and not may_send_credentials(target.registry, realm):
                log.warning("registry.realm_credentials_withheld", registry=target.registry)
                credential = None
            scope = repository_scope(target.repository, target.push)
            session, proxy = await self._route(target, realm, delegate=True)
            token = await self._tokens.fetch(
                session, challenge, scope, credential, self.timeout, proxy=proxy
            )
            return f"Bearer {token}"
        raise UnauthorizedError(f"unsupported auth scheme {challenge.scheme!r}", status=401)

    def cached_redirect(self, target: Target, digest: str) -> str | None:
        """A still-valid redirect URL previously given for this blob."""
        entry = self._redirects.get((target.registry, digest))
        if entry and entry[1] > time.monotonic():
            return entry[0]
        self._redirects.pop((target.registry, digest), None)
        return None

    def forget_redirect(self, target: Target, digest: str) -> None:
        """Drop a redirect that failed, so the next request asks the registry again."""
        self._redirects.pop((target.registry, digest), None)

    async def send(
        self,
        method: str,
        target: Target,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: BodyFactory | None = None,
        attempts: int | None = None,
        blob_digest: str | None = None,
    ) -> aiohttp.ClientResponse:
        """Send one request with auth, redirects and retries; return the open response.

        Retries connection failures and RETRYABLE_STATUS (honouring Retry-After). Other
        statuses are returned for the caller to map; an answer that is not readable HTTP
        raises MalformedResponseError. ``body`` is a factory so a retry can resend it.
        ``blob_digest`` enables redirect caching for blob GET/HEAD.
        A registry the policy does not allow raises RegistryNotAllowedError before
        anything is sent; the hosts it delegates to are not held to the policy's list,
        only to `fetcher.delegation`'s rule (DelegationRefusedError).
        """
        self.policy.check(target.registry)
        attempts = attempts or self.retry.attempts
        last_error: str = "no attempt made"
        for attempt in range(attempts):
            try:
                resp = await self._send_once(method, target, url, headers, body, blob_digest)
            except TRANSIENT_ERRORS as exc:
                last_error = f"{exc.__class__.__name__}: {exc}"
                retry_after = None
            except aiohttp.ClientError as exc:
                raise malformed(f"{method} {url}", exc, url) from None
            else:
                if resp.status not in RETRYABLE_STATUS:
                    return resp
                last_error = f"HTTP {resp.status}"
                retry_after = resp.headers.get("Retry-After")
                resp.release()
            if attempt + 1 < attempts:
                self.retries["status" if last_error.startswith("HTTP") else "connection"] += 1
                delay = self.retry.delay(attempt, retry_after)
                log.warning(
                    "registry.retry",
                    method=method,
                    url=url,
                    error=last_error,
                    attempt=attempt + 1,
                    delay=round(delay, 3),
                )
                await asyncio.sleep(delay)
        raise RegistryUnavailableError(
            f"{method} {url} failed after {attempts} attempts: {last_error}", url=url
        )

    async def _send_once(
        self,
        method: str,
        target: Target,
        url: str,
        headers: Mapping[str, str] | None,
        body: BodyFactory | None,
        blob_digest: str | None,
    ) -> aiohttp.ClientResponse:
        if blob_digest:
            cached = self.cached_redirect(target, blob_digest)
            if cached:
                resp = await self._follow(target, method, cached, headers, MAX_REDIRECTS)
                if resp.status < 400 or resp.status in RETRYABLE_STATUS:
                    return resp
                resp.release()
                log.info("registry.redirect_expired", status=resp.status)
                self.forget_redirect(target, blob_digest)
        request_headers = dict(headers or {})
        auth = self._auth_header(target)
        if auth:
            request_headers["Authorization"] = auth

        session, proxy = await self._route(target, url, delegate=False)

        async def send() -> aiohttp.ClientResponse:
            return await session.request(
                method,
                url,
                headers=request_headers,
                data=body() if body else None,
                allow_redirects=False,
                proxy=proxy,
            )

        resp = await send()
        if resp.status == 401 and "WWW-Authenticate" in resp.headers:
            challenge = resp.headers["WWW-Authenticate"]
            resp.release()
            if auth and auth.startswith("Bearer "):
                old = parse_challenge(challenge)
                self._tokens.invalidate(
                    old.params.get("realm", ""),
                    old.params.get("service", ""),
                    repository_scope(target.repository, target.push),
                )
            request_headers["Authorization"] = await self._authorize(target, challenge)
            resp = await send()
        if resp.status in REDIRECT_STATUS and "Location" in resp.headers:
            location = urljoin(url, resp.headers["Location"])
            resp.release()
            self._check_delegate(target, location, "redirect")
            if blob_digest:
                self._redirects[(target.registry, blob_digest)] = (
                    location,
                    redirect_expiry(location, time.monotonic(), self._redirect_ttl),
                )
            return await self._follow(target, method, location, headers, MAX_REDIRECTS - 1)
        return resp

    async def _follow(
        self,
        target: Target,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        hops: int,
    ) -> aiohttp.ClientResponse:
        """Follow a redirect without our registry credentials (they are not the CDN's)."""
        session, proxy = await self._route(target, url, delegate=True)
        resp = await session.request(
            method, url, headers=dict(headers or {}), allow_redirects=False, proxy=proxy
        )
        if resp.status in REDIRECT_STATUS and "Location" in resp.headers and hops > 0:
            location = urljoin(url, resp.headers["Location"])
            resp.release()
            self._check_delegate(target, location, "redirect")
            return await self._follow(target, method, location, headers, hops - 1)
        return resp


async def raise_for_status(resp: aiohttp.ClientResponse, what: str) -> None:
    """Map a failed response to a typed error naming ``what`` (e.g. 'blob sha256:..')."""
    if resp.status < 400:
        return
    try:
        body = await json_capped(resp, SMALL_BODY, "error document")
    except (ValueError, RegistryError):
        body = None
    finally:
        resp.release()
    codes = error_codes(body)
    url = str(resp.url.with_query(None))
    if resp.status == 404:
        raise NotFoundError(f"{what} not found", resp.status, url, codes)
    if resp.status == 401:
        raise UnauthorizedError(f"not authorized for {what}", resp.status, url, codes)
    if resp.status == 403:
        raise ForbiddenError(f"access to {what} denied", resp.status, url, codes)
    if resp.status in RETRYABLE_STATUS:
        raise RegistryUnavailableError(f"registry failed on {what}", resp.status, url, codes)
    raise RegistryError(f"registry refused {what}", resp.status, url, codes)
