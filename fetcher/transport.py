"""HTTP transport to registries: pooling, authentication, retries and redirect reuse.

Every registry call goes through `RegistryTransport.send` (or `send_to`, for a URL a
host gave: an upload's, a next page), so there is one place that knows how to answer a
401 challenge, when a failure is worth retrying, that a blob redirect (e.g. a pre-signed
storage URL) can be reused until it expires instead of costing a registry round trip
per range request, which registries may be contacted at all (`fetcher.registry_policy`),
where the realms and redirects a registry names may lead (`fetcher.delegation`, enforced
at connect time by `fetcher.resolver`), and which requests go through an HTTP proxy
(`fetcher.proxy_env`, containerd's rules).

Which hosts answer for a registry is the node's containerd configuration
(`fetcher.hosts_config`): a request goes to the first host, in the configured order,
that may be asked for it (resolve: a tag; pull: content by digest; push), with that
host's TLS settings, headers and credentials. A mirror that fails (no connection, a
TLS error, an error status, a 404) hands the request to the next host, down to the
server, and is passed over for a while (MIRROR_PASS_OVER_S) when it is gone, so that
each request does not wait for it again. Without a hosts.toml the one host is the
registry itself, exactly as before.
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
from multidict import CIMultiDict

from common.logging import get_logger
from fetcher.auth import Challenge, TokenCache, basic_header, parse_challenge, repository_scope
from fetcher.bodies import SMALL_BODY, json_capped
from fetcher.credentials import CredentialStore
from fetcher.delegation import delegate_allowed, host_of_url, may_send_credentials, registry_host
from fetcher.errors import (
    BodyInterruptedError,
    DelegationRefusedError,
    ForbiddenError,
    HostsConfigError,
    MalformedResponseError,
    NotFoundError,
    RegistryError,
    RegistryUnavailableError,
    UnauthorizedError,
)
from fetcher.hosts_config import Capability, HostsConfig, RegistryHost, split_roots
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

SKIP_REASONS = (
    "down",
    "connection",
    "tls",
    "status",
    "not_found",
    "auth",
    "malformed",
    "body",
    "no_range",
    "error",
)
"""Why a request passed a mirror by: it failed a moment ago (down), no connection, a
TLS failure, an error status, 404, authentication, an unreadable answer, a body cut
short, a Range request answered whole, any other refusal."""
MIRROR_PASS_OVER_S = 30.0
"""How long a mirror that was unreachable or cut a body short is passed over (for every
blob), or one that answered a Range whole (for that blob: a pull-through cache answers
so until it has stored the blob, which its first request makes it do): long enough that
a dead mirror costs one failed connection, not one per request."""
PASS_OVER_REASONS = frozenset({"connection", "tls", "body"})
BLOB_PASS_OVER_REASONS = frozenset({"no_range"})
MAX_HOST_LABELS = 32
"""Distinct hosts named in the served and skipped counters; the rest are "other"."""

REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
DEFAULT_REDIRECT_TTL = 60.0
REDIRECT_EXPIRY_MARGIN = 5.0
BodyFactory = Callable[[], Any]


@dataclass(frozen=True)
class Target:
    """What a request is about: the registry as the image reference names it (the
    namespace of containerd's hosts directory), the repository and whether it writes."""

    registry: str
    repository: str
    push: bool = False


def skip_reason(exc: RegistryError) -> str:
    """The SKIP_REASONS entry for an error a host answered a request with."""
    if isinstance(exc, BodyInterruptedError):
        return "body"
    if isinstance(exc, RegistryUnavailableError):
        if isinstance(exc.__cause__, aiohttp.ClientSSLError):
            return "tls"
        return "connection" if exc.__cause__ is not None else "status"
    if isinstance(exc, UnauthorizedError):
        return "auth"
    if isinstance(exc, MalformedResponseError):
        return "malformed"
    return "error"


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


def _status_reason(status: int) -> str:
    """The SKIP_REASONS entry for an error status."""
    if status == 404:
        return "not_found"
    return "auth" if status in (401, 403) else "status"


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
        hosts_dir: str = "",
    ) -> None:
        """``hosts_dir``: containerd's ``config_path`` (``:``-separated roots; empty:
        every registry is its own only host)."""
        self.credentials = credentials or CredentialStore()
        self.policy = policy or RegistryPolicy()
        self.plain_http_hosts = set(plain_http_hosts)
        self.hosts = HostsConfig(split_roots(hosts_dir), plain_http=self._plain_http)
        self.served: collections.Counter[tuple[str, str]] = collections.Counter()
        """Responses by (host, role): which host answered, mirror or server."""
        self.skipped: collections.Counter[tuple[str, str, str]] = collections.Counter()
        """Requests that passed a host by, by (host, role, SKIP_REASONS entry)."""
        self._host_labels: set[str] = set()
        self._passed_over: dict[tuple[str, str], float] = {}
        """(host, blob digest or "" for every request) -> until when it is passed over."""
        self._serving: dict[str, str] = {}
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
        self._redirects: dict[tuple[str, str, str], tuple[str, float]] = {}

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

    def _registry_public(self, host: str) -> bool:
        return not self._registry_resolver.on_non_public_address(registry_host(host))

    def _delegate_session(self, host: str) -> aiohttp.ClientSession:
        """The session for the realms and redirects ``host`` names: for a registry on a
        public address, one whose connections reach public addresses only. A connection
        pool of its own, so that no connection another request made to a private
        address is ever reused for them."""
        if not self._registry_public(host):
            return self.session
        if self._public_session is None:
            raise RuntimeError("RegistryTransport used before open()")
        return self._public_session

    async def _route(
        self, host: str, url: str, delegate: bool
    ) -> tuple[aiohttp.ClientSession, str | None]:
        """The session and the proxy (None: direct) for a request to ``url``, one of
        registry host ``host`` (``delegate`` False) or of a realm or redirect it named.

        Through a proxy the proxy resolves the name and connects, so the rules meet the
        name instead of the peer (`fetcher.resolver`): a registry's name is looked up
        here to learn which rule its delegates follow, and a delegate's is held to that
        rule by the node's own answer. The registry policy and the written-address rule
        apply to the URL as before, whichever way it goes.
        """
        proxy = self.proxies.proxy_for(url)
        if proxy is None:
            return (self._delegate_session(host) if delegate else self.session), None
        if self._proxied_session is None:
            raise RuntimeError("RegistryTransport used before open()")
        if not delegate:
            await self._registry_resolver.learn(host_of_url(url))
        elif self._registry_public(host):
            await self._public_resolver.check_name(host_of_url(url))
        return self._proxied_session, proxy

    def _check_delegate(self, host: str, url: str, what: str) -> None:
        """Refuse a realm or redirect written as a non-public address (a name is judged
        when the delegate session resolves it)."""
        if not delegate_allowed(self._registry_public(host), url):
            log.warning("registry.delegate_refused", registry=host, what=what)
            raise DelegationRefusedError(
                f"{host}: {what} to a non-public address, not followed",
                url=str(urlsplit(url)._replace(query="").geturl()),
            )

    def _plain_http(self, registry: str) -> bool:
        """Whether a registry's own host is spoken to over plain HTTP: where configured,
        or on loopback (containerd's default for localhost too)."""
        host = registry.rsplit(":", 1)[0] if registry.count(":") == 1 else registry
        return (
            registry in self.plain_http_hosts
            or host in ("localhost", "[::1]")
            or (host.startswith("127."))
        )

    def _auth_header(self, target: Target, host: str) -> str | None:
        challenge = self._challenges.get(host)
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            # What the last challenge looked up (a helper is asked again on the next 401).
            credential = self.credentials.lookup(host, ask_helper=False)
            return basic_header(credential) if credential and credential.username else None
        if challenge.scheme == "bearer":
            scope = repository_scope(target.repository, target.push)
            token = self._tokens.get(
                challenge.params.get("realm", ""), challenge.params.get("service", ""), scope
            )
            return f"Bearer {token}" if token else None
        return None

    async def _authorize(self, target: Target, host: str, header: str) -> str:
        """Answer ``host``'s 401 challenge with ``host``'s credentials (as containerd
        looks them up: by the host contacted, a mirror's own): remember the challenge
        and return the Authorization to retry with."""
        challenge = parse_challenge(header)
        self._challenges[host] = challenge
        # Off the loop, on a thread of its own: a Docker credential helper is a
        # subprocess, and the loop's default executor also runs file-system walks
        # that can wait behind overlayfs.
        loop = asyncio.get_running_loop()
        credential = await loop.run_in_executor(_CREDENTIAL_LOOKUPS, self.credentials.lookup, host)
        if challenge.scheme == "basic":
            if credential is None or not credential.username:
                raise UnauthorizedError(f"{host} needs credentials, none configured", status=401)
            return basic_header(credential)
        if challenge.scheme == "bearer":
            realm = challenge.params.get("realm", "")
            self._check_delegate(host, realm, "token realm")
            if credential is not None and not may_send_credentials(host, realm):
                log.warning("registry.realm_credentials_withheld", registry=host)
                credential = None
            scope = repository_scope(target.repository, target.push)
            session, proxy = await self._route(host, realm, delegate=True)
            token = await self._tokens.fetch(
                session, challenge, scope, credential, self.timeout, proxy=proxy
            )
            return f"Bearer {token}"
        raise UnauthorizedError(f"unsupported auth scheme {challenge.scheme!r}", status=401)

    def cached_redirect(self, target: Target, host: str, digest: str) -> str | None:
        """A still-valid redirect URL ``host`` previously gave for this blob."""
        key = (target.registry, host, digest)
        entry = self._redirects.get(key)
        if entry and entry[1] > time.monotonic():
            return entry[0]
        self._redirects.pop(key, None)
        return None

    def forget_redirect(self, target: Target, digest: str) -> None:
        """Drop the redirects any host gave for a blob that failed, so the next request
        asks the registry again."""
        for key in [k for k in self._redirects if k[0] == target.registry and k[2] == digest]:
            self._redirects.pop(key, None)

    def candidates(self, target: Target, need: Capability) -> list[RegistryHost]:
        """The hosts to try for a request that needs ``need``, in order (a push goes to
        the first push host only, as containerd pushes)."""
        hosts = [host for host in self.hosts.hosts(target.registry) if host.allows(need)]
        if not hosts:
            raise HostsConfigError(
                f"no host configured for {target.registry} may be asked to"
                f" {'/'.join((c.name or '').lower() for c in need)}"
                " (capabilities in its hosts.toml)"
            )
        return hosts[:1] if Capability.PUSH in need else hosts

    def _label(self, host: RegistryHost) -> str:
        """``host`` as the counters name it: configuration names few hosts, but a
        registry's own host comes from image references, so the names are capped."""
        if host.host in self._host_labels or len(self._host_labels) < MAX_HOST_LABELS:
            self._host_labels.add(host.host)
            return host.host
        return "other"

    def pass_over(
        self, target: Target, host: RegistryHost, reason: str, blob_digest: str | None = None
    ) -> None:
        """Record that ``host`` failed a request for ``reason``; a mirror that failed for
        one of PASS_OVER_REASONS (or BLOB_PASS_OVER_REASONS, for ``blob_digest``) is
        passed over for MIRROR_PASS_OVER_S."""
        self.skipped[(self._label(host), host.role, reason)] += 1
        until = time.monotonic() + MIRROR_PASS_OVER_S
        if host.mirror and reason in PASS_OVER_REASONS:
            self._passed_over[(host.host, "")] = until
        elif host.mirror and blob_digest and reason in BLOB_PASS_OVER_REASONS:
            self._passed_over[(host.host, blob_digest)] = until
        log.warning(
            "registry.host_skipped",
            registry=target.registry,
            host=host.host,
            role=host.role,
            reason=reason,
        )

    def _passed_over_now(self, host: RegistryHost, blob_digest: str | None) -> bool:
        now = time.monotonic()
        for key in ((host.host, ""), (host.host, blob_digest or "")):
            until = self._passed_over.get(key)
            if until is not None and until <= now:
                del self._passed_over[key]
            elif until is not None:
                return True
        return False

    def _count_served(self, target: Target, host: RegistryHost) -> None:
        self.served[(self._label(host), host.role)] += 1
        if self._serving.get(target.registry) != host.host:
            self._serving[target.registry] = host.host
            log.info(
                "registry.serving_host", registry=target.registry, host=host.host, role=host.role
            )

    async def send(
        self,
        method: str,
        target: Target,
        api_path: str,
        *,
        need: Capability = Capability.PULL,
        headers: Mapping[str, str] | None = None,
        body: BodyFactory | None = None,
        attempts: int | None = None,
        blob_digest: str | None = None,
    ) -> tuple[aiohttp.ClientResponse, RegistryHost]:
        """Send a request for ``api_path`` (``<repository>/blobs/<digest>``) to the first
        host that answers it; return the open response and that host.

        A mirror gets one attempt: its failure, an error status or a 404 hands the
        request to the next host. The last host (the server) gets `send_to`'s retries,
        and its answer, whatever the status, is the caller's to map. The registry is
        checked against the policy before anything is sent; its hosts come from the
        node's configuration, not from the request, and are not held to the policy.
        """
        self.policy.check(target.registry)
        hosts = self.candidates(target, need)
        for host in hosts[:-1]:
            if self._passed_over_now(host, blob_digest):
                self.skipped[(self._label(host), host.role, "down")] += 1
                continue
            url = host.url(api_path, target.registry)
            try:
                resp = await self.send_to(
                    method,
                    target,
                    host,
                    url,
                    headers=headers,
                    body=body,
                    attempts=1,
                    blob_digest=blob_digest,
                )
            except RegistryError as exc:
                self.pass_over(target, host, skip_reason(exc))
                continue
            if resp.status < 400 or resp.status == 416:
                self._count_served(target, host)
                return resp, host
            resp.release()
            self.pass_over(target, host, _status_reason(resp.status))
        server = hosts[-1]
        resp = await self.send_to(
            method,
            target,
            server,
            server.url(api_path, target.registry),
            headers=headers,
            body=body,
            attempts=attempts,
            blob_digest=blob_digest,
        )
        self._count_served(target, server)
        return resp, server

    async def send_to(
        self,
        method: str,
        target: Target,
        host: RegistryHost,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: BodyFactory | None = None,
        attempts: int | None = None,
        blob_digest: str | None = None,
    ) -> aiohttp.ClientResponse:
        """Send one request to ``url`` on ``host`` with auth, redirects and retries;
        return the open response (for a URL a host gave: an upload's, the next page's).

        Retries connection failures and RETRYABLE_STATUS (honouring Retry-After). Other
        statuses are returned for the caller to map; an answer that is not readable HTTP
        raises MalformedResponseError. ``body`` is a factory so a retry can resend it.
        ``blob_digest`` enables redirect caching for blob GET/HEAD. The hosts a registry
        delegates to are held to `fetcher.delegation`'s rule (DelegationRefusedError).
        """
        attempts = attempts or self.retry.attempts
        last_error: str = "no attempt made"
        last_exc: BaseException | None = None
        for attempt in range(attempts):
            try:
                resp = await self._send_once(method, target, host, url, headers, body, blob_digest)
            except TRANSIENT_ERRORS as exc:
                last_error = f"{exc.__class__.__name__}: {exc}"
                last_exc = exc
                retry_after = None
            except aiohttp.ClientError as exc:
                raise malformed(f"{method} {url}", exc, url) from None
            else:
                if resp.status not in RETRYABLE_STATUS:
                    return resp
                last_error = f"HTTP {resp.status}"
                last_exc = None
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
        # The cause (None for a status) tells a skipped mirror's reason; callers see
        # this error's type only.
        raise RegistryUnavailableError(
            f"{method} {url} failed after {attempts} attempts: {last_error}", url=url
        ) from last_exc

    async def _send_once(
        self,
        method: str,
        target: Target,
        host: RegistryHost,
        url: str,
        headers: Mapping[str, str] | None,
        body: BodyFactory | None,
        blob_digest: str | None,
    ) -> aiohttp.ClientResponse:
        if blob_digest:
            cached = self.cached_redirect(target, host.host, blob_digest)
            if cached:
                resp = await self._follow(host.host, method, cached, headers, MAX_REDIRECTS)
                if resp.status < 400 or resp.status in RETRYABLE_STATUS:
                    return resp
                resp.release()
                log.info("registry.redirect_expired", status=resp.status)
                self.forget_redirect(target, blob_digest)
        request_headers: CIMultiDict[str] = CIMultiDict(host.headers)
        request_headers.update(headers or {})
        auth = self._auth_header(target, host.host)
        if auth:
            request_headers["Authorization"] = auth
        ssl = self.hosts.ssl_for(target.registry, host)

        session, proxy = await self._route(host.host, url, delegate=False)

        async def send() -> aiohttp.ClientResponse:
            return await session.request(
                method,
                url,
                headers=request_headers,
                data=body() if body else None,
                allow_redirects=False,
                ssl=ssl,
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
            request_headers["Authorization"] = await self._authorize(target, host.host, challenge)
            resp = await send()
        if resp.status in REDIRECT_STATUS and "Location" in resp.headers:
            location = urljoin(url, resp.headers["Location"])
            resp.release()
            self._check_delegate(host.host, location, "redirect")
            if blob_digest:
                self._redirects[(target.registry, host.host, blob_digest)] = (
                    location,
                    redirect_expiry(location, time.monotonic(), self._redirect_ttl),
                )
            return await self._follow(host.host, method, location, headers, MAX_REDIRECTS - 1)
        return resp

    async def _follow(
        self,
        host: str,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        hops: int,
    ) -> aiohttp.ClientResponse:
        """Follow a redirect without our registry credentials (they are not the CDN's)
        nor the host's configured headers (they are the host's)."""
        session, proxy = await self._route(host, url, delegate=True)
        resp = await session.request(
            method, url, headers=dict(headers or {}), allow_redirects=False, proxy=proxy
        )
        if resp.status in REDIRECT_STATUS and "Location" in resp.headers and hops > 0:
            location = urljoin(url, resp.headers["Location"])
            resp.release()
            self._check_delegate(host, location, "redirect")
            return await self._follow(host, method, location, headers, hops - 1)
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
