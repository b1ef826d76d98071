"""Where a registry may send the client: token realms and blob redirects.

A registry delegates: to a token service (its realm) and to storage (blob redirects).
The client follows, but what it takes along and where it goes are its own decisions:

* Registry credentials go to a realm only over https, or on the registry's own host
  (a registry served over plain http on a private network with its token service
  beside it). A realm elsewhere over plain http gets an anonymous token request: the
  credentials would otherwise cross the network in the clear to whoever the registry
  named.
* A realm or redirect never leads to loopback, link-local, private or otherwise
  non-public addresses unless the registry itself is on such an address: a public
  registry (or a man in the middle of plain http) must not make the agent reach the
  node's own services or its cloud's metadata endpoint.

Addresses are judged, not names. A host written as an IP literal is the address
connected to, and is judged here as written. A name is judged by what it resolves to,
in the resolver of the connection itself (`fetcher.resolver`): the addresses checked
are the ones connected to, so a DNS answer that changes between a check and the
connect (rebinding) finds no gap between them. A registry is on a non-public address
when it is written as one, or when every address its name has resolved to was one.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from fetcher.registry_policy import split_host_port


def host_of_url(url: str) -> str:
    """The host of ``url``, lower-case, IPv6 without brackets."""
    return (urlsplit(url).hostname or "").lower()


def registry_host(registry: str) -> str:
    """The host of a ``host[:port]`` registry, lower-case, IPv6 without brackets."""
    return split_host_port(registry)[0].strip("[]")


def is_public_address(address: str) -> bool:
    """Whether the IP address ``address`` (text, an IPv6 zone allowed) is globally
    reachable: not loopback, link-local, private, shared, reserved or multicast."""
    parsed = ipaddress.ip_address(address)
    return parsed.is_global and not parsed.is_multicast


def written_non_public(host: str) -> bool:
    """Whether ``host`` as written names a non-public address: `localhost`, or an IP
    literal of one. Any other name is judged by the addresses it resolves to."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return not is_public_address(host)
    except ValueError:
        return False


def may_send_credentials(registry: str, realm: str) -> bool:
    """Whether the registry's credentials may accompany a token request to ``realm``."""
    return urlsplit(realm).scheme == "https" or host_of_url(realm) == registry_host(registry)


def delegate_allowed(registry_public: bool, url: str) -> bool:
    """Whether a realm or redirect ``url`` may be contacted, as written, for a registry
    on a public address (``registry_public``) or on a non-public one."""
    return not registry_public or not written_non_public(host_of_url(url))
