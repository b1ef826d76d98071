"""Which registries a client may talk to: the one gate every registry request passes.

A node that may only pull from the company registry must not be talked into contacting
another host by an image reference, a full-mode twin or a profile artifact, so the
check sits in the transport (`RegistryTransport.send`), below every caller, and runs
before any connection is opened.

Entry forms (host names compare case-insensitively):
  * ``host:port`` - exactly that host and port;
  * ``host`` - that host on any port;
  * ``*.example.com`` (optionally ``:port``) - any subdomain of example.com, at any
    depth, but not example.com itself (list both to allow both).
Docker Hub's names (``docker.io``, ``index.docker.io``, ``registry-1.docker.io``) are
one registry. No entries at all means every registry is allowed.

What is not a registry is not checked against this list: the hosts a registry
delegates to, i.e. blob redirect targets (pre-signed storage/CDN URLs) and token realms.
The allowed registry chose them, and operators cannot know their CDN's host names in
advance; what may go to them, and which addresses they may be, is
`fetcher.delegation`'s rule.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from common.logging import get_logger
from fetcher.credentials import normalize_registry_key
from fetcher.errors import RegistryNotAllowedError

log = get_logger(__name__)

WILDCARD_PREFIX = "*."


def split_host_port(registry: str) -> tuple[str, str | None]:
    """``host[:port]`` (IPv6 hosts in brackets) as (lower-case host, port or None)."""
    if registry.startswith("["):
        host, _, rest = registry.partition("]")
        return (host + "]").lower(), rest[1:] if rest.startswith(":") and rest[1:] else None
    host, sep, port = registry.rpartition(":")
    if sep and host and port.isdigit():
        return host.lower(), port
    return registry.lower(), None


@dataclass(frozen=True)
class _Rule:
    host: str
    port: str | None
    subdomains: bool

    def matches(self, host: str, port: str | None) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.subdomains:
            return host.endswith("." + self.host)
        return host == self.host


def _parse_rule(entry: str) -> _Rule:
    text = entry.strip()
    subdomains = text.startswith(WILDCARD_PREFIX)
    if subdomains:
        text = text[len(WILDCARD_PREFIX) :]
    host, port = split_host_port(normalize_registry_key(text))
    if not host or "*" in host or "/" in host:
        raise ValueError(f"allowed registry {entry!r}: expected host[:port] or *.domain[:port]")
    return _Rule(host, port, subdomains)


class RegistryPolicy:
    """The allow-list; built from config entries (empty: every registry allowed)."""

    def __init__(self, allowed: Iterable[str] = ()) -> None:
        self.entries = tuple(allowed)
        self._rules = tuple(_parse_rule(entry) for entry in self.entries)

    def allows(self, registry: str) -> bool:
        """Whether requests to ``registry`` (host[:port], as dialled) may be sent."""
        if not self._rules:
            return True
        host, port = split_host_port(normalize_registry_key(registry))
        return any(rule.matches(host, port) for rule in self._rules)

    def check(self, registry: str) -> None:
        """Raise RegistryNotAllowedError (and log it) unless ``registry`` is allowed."""
        if self.allows(registry):
            return
        log.warning("registry_not_allowed", registry=registry, allowed=list(self.entries))
        raise RegistryNotAllowedError(
            f"registry {registry} is not in allowed_registries ({', '.join(self.entries)});"
            " no request was sent"
        )
