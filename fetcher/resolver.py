"""Name resolution for registry connections, where the delegation rule meets the
addresses actually connected to.

aiohttp resolves a name through its connector's resolver and connects to exactly the
addresses that returns; it never looks the name up a second time for that connection
(an IP literal skips the resolver: it is its own address, judged as written by
`fetcher.delegation`). A check made here is therefore a check of the connection's own
peer, not of an earlier, separate lookup whose answer a hostile name server could change
before the connect.

A transport has two resolvers:

* `RegistryResolver` serves connections to registries. It refuses nothing (which
  registries may be contacted is `fetcher.registry_policy`'s business) and remembers
  which names have resolved to a public address: a registry on a private network that
  is known by name rather than by address is recognised that way.
* `PublicOnlyResolver` serves the realms and redirects of registries on public
  addresses. It refuses a name if any address it resolves to is non-public, before a
  connection is attempted.

Through an HTTP proxy (`fetcher.proxy_env`) the proxy resolves the names and connects;
the connection's peer is the proxy, which no resolver here judges. What is left to
this side is the node's own view of a name, taken by a lookup of its own: which rule a
proxied registry's delegates follow (`RegistryResolver.learn`), and whether a proxied
delegate's name is public (`PublicOnlyResolver.check_name`). Best effort by nature:
the proxy's answer may differ, so the proxy's own rules are the last word there, as
they are for containerd.

Lookups run on threads of their own, not on the loop's default executor: that one also
runs file-system walks that can wait behind overlayfs, and a fetch that such a walk
waits for must not queue behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from concurrent.futures import ThreadPoolExecutor

from aiohttp.abc import AbstractResolver, ResolveResult

from common.logging import get_logger
from fetcher.delegation import is_public_address, written_non_public
from fetcher.errors import DelegationRefusedError

log = get_logger(__name__)

_LOOKUPS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="acceld-dns")
_NUMERIC = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV


def _key(host: str) -> str:
    return host.lower().rstrip(".")


def _lookup(host: str, port: int, family: socket.AddressFamily) -> list[ResolveResult]:
    """getaddrinfo as aiohttp's own ThreadedResolver reads it (blocking)."""
    infos = socket.getaddrinfo(
        host, port, family=family, type=socket.SOCK_STREAM, flags=socket.AI_ADDRCONFIG
    )
    results: list[ResolveResult] = []
    for info_family, _, proto, _, sockaddr in infos:
        if info_family == socket.AF_INET6:
            if len(sockaddr) < 4:
                continue  # IPv6 not supported by this Python build
            if sockaddr[3]:
                # A link-local address needs its zone, which only getnameinfo writes.
                address, service = socket.getnameinfo(
                    sockaddr, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV
                )
                resolved_port = int(service)
            else:
                address, resolved_port = str(sockaddr[0]), int(sockaddr[1])
        elif info_family == socket.AF_INET:
            address, resolved_port = str(sockaddr[0]), int(sockaddr[1])
        else:
            continue
        results.append(
            ResolveResult(
                hostname=host,
                host=address,
                port=resolved_port,
                family=info_family,
                proto=proto,
                flags=_NUMERIC,
            )
        )
    if not results:
        raise OSError(None, f"DNS lookup of {host} found no usable address")
    return results


async def _resolve(host: str, port: int, family: socket.AddressFamily) -> list[ResolveResult]:
    return await asyncio.get_running_loop().run_in_executor(_LOOKUPS, _lookup, host, port, family)


class RegistryResolver(AbstractResolver):
    """Resolves registry names, remembering which have had a public address."""

    def __init__(self) -> None:
        self._had_public: dict[str, bool] = {}
        self._unresolved: set[str] = set()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await _resolve(host, port, family)
        key = _key(host)
        public = any(is_public_address(result["host"]) for result in results)
        self._had_public[key] = self._had_public.get(key, False) or public
        return results

    def on_non_public_address(self, host: str) -> bool:
        """Whether ``host`` is on a non-public address: written as one, or a name whose
        every lookup so far answered non-public addresses only. One public answer makes
        a name public for good, or a hostile registry's name server could answer a
        private address between two public ones and so unlock private delegates for the
        connections it serves. A name never looked up counts as public."""
        return written_non_public(host) or self._had_public.get(_key(host)) is False

    async def learn(self, host: str) -> None:
        """Look up a registry name that a proxy connects to, only to learn whether it is
        public; once per name, so that a node whose names resolve only at the proxy
        pays one failed lookup, not one per request. A name the node cannot resolve
        teaches nothing (it stays public, the stricter rule for its delegates)."""
        key = _key(host)
        if key in self._had_public or key in self._unresolved:
            return
        try:
            await self.resolve(host, 0, socket.AF_UNSPEC)
        except OSError:
            self._unresolved.add(key)

    async def close(self) -> None:
        """Nothing to release: lookups run on a shared pool."""


class PublicOnlyResolver(AbstractResolver):
    """Resolves names only to public addresses: any other answer refuses the name."""

    def __init__(self) -> None:
        self._checked: set[str] = set()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await _resolve(host, port, family)
        for result in results:
            if not is_public_address(result["host"]):
                log.warning("registry.delegate_refused", host=host, address=result["host"])
                raise DelegationRefusedError(
                    f"{host} resolves to non-public address {result['host']}: a registry"
                    " on a public address may not send the client there; not followed"
                )
        return results

    async def close(self) -> None:
        """Nothing to release: lookups run on a shared pool."""

    async def check_name(self, host: str) -> None:
        """Hold a delegate's name that a proxy resolves to the rule, by the node's own
        answer: DelegationRefusedError if it has a non-public address. A name the node
        cannot resolve is left to the proxy. Either way the name is not looked up again
        (a redirect is followed for every range read)."""
        key = _key(host)
        if key in self._checked:
            return
        with contextlib.suppress(OSError):
            await self.resolve(host, 0, socket.AF_UNSPEC)
        self._checked.add(key)
