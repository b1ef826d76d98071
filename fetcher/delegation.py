"""Where a registry may send the client: token realms and blob redirects.

A registry delegates: to a token service (its realm) and to storage (blob redirects).
The client follows, but what it takes along and where it goes are its own decisions:

* Registry credentials go to a realm only over https, or on the registry's own host
  (a registry served over plain http on a private network with its token service
  beside it). A realm elsewhere over plain http gets an anonymous token request: the
  credentials would otherwise cross the network in the clear to whoever the registry
  named.
* A redirect never leads to loopback, link-local, private or otherwise non-public
  addresses unless the registry itself is on such an address: a public registry (or a
  man in the middle of plain http) must not make the agent reach the node's own
  services or its cloud's metadata endpoint.

Host names are judged as written (an IP literal or a `localhost` name); a public name
that resolves to a private address is not caught here.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from fetcher.registry_policy import split_host_port


def _host_of_url(url: str) -> str:
    return (urlsplit(url).hostname or "").lower()


def _registry_host(registry: str) -> str:
    return split_host_port(registry)[0].strip("[]")


def _non_public(host: str) -> bool:
    """Whether ``host`` names a loopback, link-local, private or reserved address."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return not address.is_global


def may_send_credentials(registry: str, realm: str) -> bool:
    """Whether the registry's credentials may accompany a token request to ``realm``."""
    return urlsplit(realm).scheme == "https" or _host_of_url(realm) == _registry_host(registry)


def redirect_allowed(registry: str, location: str) -> bool:
    """Whether a blob redirect from ``registry`` to ``location`` may be followed."""
    return not _non_public(_host_of_url(location)) or _non_public(_registry_host(registry))
