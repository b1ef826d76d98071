"""Which HTTP proxy a request goes through: containerd's rules, read from the environment.

containerd's registry client is Go's net/http with `http.ProxyFromEnvironment`
(golang.org/x/net/http/httpproxy). acceld must reach a registry the way containerd on
the same node does, or its lazy reads go where the node's pulls do not (or cannot) go.
aiohttp's own ``trust_env`` follows urllib's rules, which differ (they proxy loopback,
know no CIDR in NO_PROXY), so the rules are written here and the transport hands the
chosen proxy to each request:

* HTTPS_PROXY for https URLs, HTTP_PROXY for http URLs; of each pair the upper-case
  variable wins when it is set and not empty. A value without a scheme
  (``host[:port]``) means ``http://host[:port]``.
* NO_PROXY (or no_proxy), comma-separated: ``*`` bypasses the proxy for every host; an
  IP address or a CIDR prefix matches addresses; a name matches itself and its
  subdomains, ``.name`` and ``*.name`` its subdomains only; ``:port`` after a name or
  an address limits the entry to that port. Names compare case-insensitively after
  IDNA encoding, and never match a host written as an IP address.
* ``localhost`` and loopback addresses are never proxied, whatever the variables say.
* With REQUEST_METHOD set (a CGI handler, whose HTTP_PROXY a client's ``Proxy:``
  header can set), an http URL that HTTP_PROXY would serve is refused, not sent.

The variables are read once per process, as Go does (`process_proxies`).

Proxy URLs: ``http://`` only; an https registry is still reached over TLS from end to
end, through a CONNECT tunnel. Credentials in the URL (``user:pass@``) go to the proxy
as Proxy-Authorization (Basic), on the CONNECT or on each proxied http request, as Go
sends them. A proxy reached over TLS (``https://``), SOCKS (``socks5://``) or any
other scheme is refused at start-up (`ProxyConfigError`): Go would use them, acceld is
not tested with them, and going direct instead would reach registries by a path the
node's containerd does not take.
"""

from __future__ import annotations

import functools
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from common.logging import get_logger
from fetcher.errors import RegistryError

log = get_logger(__name__)

_DEFAULT_PORTS = {"http": "80", "https": "443"}
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ProxyConfigError(ValueError):
    """A proxy variable acceld cannot honour (raised when the variables are read)."""


class ProxyRefusedError(RegistryError):
    """HTTP_PROXY would serve this request, but the process runs as a CGI handler."""


@dataclass(frozen=True)
class ProxyEnvironment:
    """The variables as Go's ``httpproxy.FromEnvironment`` reads them."""

    http_proxy: str = ""
    https_proxy: str = ""
    no_proxy: str = ""
    cgi: bool = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> ProxyEnvironment:
        """Read ``environ`` (default: this process's environment)."""
        env = os.environ if environ is None else environ

        def first(*names: str) -> str:
            return next((env[name] for name in names if env.get(name)), "")

        return cls(
            http_proxy=first("HTTP_PROXY", "http_proxy"),
            https_proxy=first("HTTPS_PROXY", "https_proxy"),
            no_proxy=first("NO_PROXY", "no_proxy"),
            cgi=bool(env.get("REQUEST_METHOD")),
        )


def go_split_host_port(hostport: str) -> tuple[str, str] | None:
    """Go's ``net.SplitHostPort``: (host, port), brackets removed; None where Go fails."""
    i = hostport.rfind(":")
    if i < 0:
        return None
    j = k = 0
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0 or end + 1 != i:
            return None
        host, j, k = hostport[1:end], 1, end + 1
    else:
        host = hostport[:i]
        if ":" in host:
            return None
    if "[" in hostport[j:] or "]" in hostport[k:]:
        return None
    return host, hostport[i + 1 :]


def _url_host_port(url: str) -> tuple[str, str, str]:
    """(scheme, host, port) of ``url`` as Go's ``url.Hostname``/``url.Port`` give them:
    the host as written (case kept, brackets and escapes removed), the scheme's port
    when none is written."""
    parts = urlsplit(url)
    hostport = unquote(parts.netloc.rpartition("@")[2])
    host, port = hostport, ""
    colon = hostport.rfind(":")
    if colon >= 0 and all(c in "0123456789" for c in hostport[colon + 1 :]):
        host, port = hostport[:colon], hostport[colon + 1 :]
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return parts.scheme, _ascii(host), port or _DEFAULT_PORTS.get(parts.scheme, "")


def _ascii(name: str) -> str:
    """IDNA (punycode) form of a non-ASCII name, label by label; as is if that fails."""
    if name.isascii():
        return name
    try:
        return ".".join(label.encode("idna").decode() if label else "" for label in name.split("."))
    except UnicodeError:
        return name


def _address(text: str, zone_allowed: bool) -> _Address | None:
    """``text`` as an IP address (an IPv4-mapped IPv6 one as IPv4, as Go compares them)."""
    if not zone_allowed and "%" in text:
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _network(text: str) -> _Network | None:
    """``text`` as Go's ``net.ParseCIDR`` reads it (``address/bits``, host bits allowed)."""
    address, slash, bits = text.partition("/")
    if not slash or not bits.isdigit() or _address(address, zone_allowed=False) is None:
        return None
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None


@dataclass(frozen=True)
class _Name:
    suffix: str
    port: str
    whole: bool
    """Whether the name itself matches too (written without a leading ``.`` or ``*.``)."""


@dataclass
class NoProxy:
    """NO_PROXY's entries, parsed as Go parses them (a malformed entry is ignored)."""

    everything: bool = False
    addresses: list[tuple[_Address, str]] = field(default_factory=list)
    networks: list[_Network] = field(default_factory=list)
    names: list[_Name] = field(default_factory=list)

    @classmethod
    def parse(cls, value: str) -> NoProxy:
        """Parse the variable's value."""
        parsed = cls()
        for raw in value.split(","):
            entry = raw.strip().lower()
            if not entry:
                continue
            if entry == "*":
                return cls(everything=True)
            network = _network(entry)
            if network is not None:
                parsed.networks.append(network)
                continue
            split = go_split_host_port(entry)
            host, port = split if split is not None else (entry, "")
            if not host:
                continue
            address = _address(host, zone_allowed=False)
            if address is not None:
                parsed.addresses.append((address, port))
                continue
            if host.startswith("*."):
                host = host[1:]
            whole = not host.startswith(".")
            parsed.names.append(_Name(_ascii(host if not whole else f".{host}"), port, whole))
        return parsed

    def bypass(self, host: str, port: str) -> bool:
        """Whether a request to ``host:port`` goes direct: Go's ``useProxy``, negated."""
        if host == "localhost":
            return True
        address = _address(host, zone_allowed=True)
        if address is not None and address.is_loopback:
            return True
        if self.everything:
            return True
        if address is not None:
            return any(a == address and p in ("", port) for a, p in self.addresses) or any(
                n.version == address.version and address in n for n in self.networks
            )
        name = host.strip().lower()
        return any(
            (name.endswith(n.suffix) or (n.whole and name == n.suffix[1:])) and n.port in ("", port)
            for n in self.names
        )


def _parse_proxy(variable: str, value: str) -> str | None:
    """The proxy URL a variable names (``host[:port]`` means http), or None if unset."""
    if not value:
        return None
    parts = urlsplit(value)
    if not parts.scheme or not parts.netloc:
        parts = urlsplit(f"http://{value}")
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        port_ok = False
    if not parts.hostname or not port_ok:
        raise ProxyConfigError(f"{variable}={redact(value)} is not a proxy URL")
    if parts.scheme != "http":
        raise ProxyConfigError(
            f"{variable}={redact(value)}: acceld supports http:// proxies only, not"
            f" {parts.scheme}:// (an https registry is still reached over TLS, through"
            " a CONNECT tunnel); not going direct instead"
        )
    return parts.geturl()


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***``, for logs and error messages."""
    parts = urlsplit(url if "://" in url else f"//{url}")
    user, at, hostport = parts.netloc.rpartition("@")
    if not at:
        return url
    name = user.partition(":")[0]
    return url.replace(parts.netloc, f"{name}:***@{hostport}", 1)


class ProxySelector:
    """Go's ``ProxyFunc`` for one `ProxyEnvironment`: which proxy, if any, serves a URL."""

    def __init__(self, environment: ProxyEnvironment | None = None) -> None:
        environment = environment or ProxyEnvironment()
        self._http = _parse_proxy("HTTP_PROXY", environment.http_proxy)
        self._https = _parse_proxy("HTTPS_PROXY", environment.https_proxy)
        self._cgi = environment.cgi
        self._no_proxy_text = environment.no_proxy
        self._no_proxy = NoProxy.parse(environment.no_proxy)

    @property
    def configured(self) -> bool:
        """Whether any request can go through a proxy."""
        return bool(self._http or self._https)

    def proxy_for(self, url: str) -> str | None:
        """The proxy URL (credentials included) for a request to ``url``, None for direct.

        Raises ProxyRefusedError where Go refuses (HTTP_PROXY in a CGI process).
        """
        scheme, host, port = _url_host_port(url)
        proxy = {"https": self._https, "http": self._http}.get(scheme)
        if proxy is None:
            return None
        if scheme == "http" and self._cgi:
            raise ProxyRefusedError(
                "refusing to use HTTP_PROXY in a CGI environment (REQUEST_METHOD is set)",
                url=url,
            )
        return None if self._no_proxy.bypass(host, port) else proxy

    def request_options(self, url: str) -> dict[str, str]:
        """aiohttp request keyword arguments that send a request to ``url`` the right way."""
        proxy = self.proxy_for(url)
        return {} if proxy is None else {"proxy": proxy}

    def describe(self) -> dict[str, str]:
        """The settings for a log record, without credentials."""
        return {
            "http_proxy": redact(self._http) if self._http else "",
            "https_proxy": redact(self._https) if self._https else "",
            "no_proxy": self._no_proxy_text,
        }


@functools.cache
def process_proxies() -> ProxySelector:
    """This process's proxy settings, read (and logged) once, as Go reads them once."""
    selector = ProxySelector(ProxyEnvironment.from_environ())
    if selector.configured:
        log.info("registry.proxy", **selector.describe())
    return selector
