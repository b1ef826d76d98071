"""containerd's registry host configuration, read as containerd 1.6/1.7 reads it.

A node's containerd finds, for each registry namespace (the host part of an image
reference), the hosts to contact in ``<config_path>/<namespace>/hosts.toml``: mirrors in
the order listed (``[host."https://mirror"]``), then ``server``. acceld serves the same
images from the same node, so it reads the same files by the same rules, or a lazy
layer would come from a host containerd would never have asked (`remotes/docker/config`
in containerd, `hosts.go`):

* ``config_path`` may list several roots, ``:``-separated; the first root holding a
  directory for the namespace wins. In a root, ``host_port_`` is looked for first, then
  ``host:port``, then ``_default``.
* A directory without ``hosts.toml`` (or with an empty one) is read in Docker's
  certificate layout: ``*.crt`` are CA files, ``*.cert`` client certificates with the
  ``*.key`` of the same name. So is one whose ``hosts.toml`` cannot be decoded: that is
  logged as an error (`hosts_config.invalid`) and the namespace's own host is used.
* ``server`` without a scheme means https; ``/v2`` is appended to its path unless the
  path ends in it or ``override_path`` is set. No ``server`` means the namespace itself
  (``docker.io`` means ``registry-1.docker.io``; loopback and ``localhost`` plain http),
  with every capability, whatever ``capabilities`` the file gave the top level.
* ``capabilities`` (``pull``, ``resolve``, ``push``; all three when absent), ``ca`` (a
  path or a list), ``client`` (a path holding cert and key, or a list of such paths or
  of ``[cert, key]`` pairs), ``skip_verify``, ``header`` (a string or a list per name)
  and ``override_path`` apply to the host they are written under. Relative paths are
  relative to the namespace's directory.
* A CA is added to the system's trust store, never in its place.

Two choices that differ from containerd, both toward what its documentation says: a file
with ``server`` and no ``[host]`` table is honoured (containerd before 1.7.32 refuses
it and uses the namespace's own host; a warning says so), and content by digest is
fetched only from hosts with the ``pull`` capability (containerd tries every host).
"""

from __future__ import annotations

import enum
import os
import posixpath
import ssl
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from common.logging import get_logger
from fetcher.errors import HostsConfigError
from fetcher.reference import DOCKER_HUB, DOCKER_HUB_API_HOST

log = get_logger(__name__)

DEFAULT_HOSTS_DIR = "/etc/containerd/certs.d"
"""containerd's usual ``config_path`` (the CRI plugin's ``registry.config_path``)."""
HOSTS_DIR_ENV = "ACCELD_HOSTS_DIR"
"""Where the command-line tools take the hosts directory from when no option names it."""
DEFAULT_DIRECTORY = "_default"
RELOAD_AFTER_S = 5.0
"""How long a namespace's hosts are used before the directory is read again: containerd
reads it at every pull, so an edit must reach the agent without a restart too."""


class Capability(enum.Flag):
    """What a host may be asked for (containerd's HostCapabilities)."""

    PULL = enum.auto()
    """Content by digest: blobs, manifests by digest."""
    RESOLVE = enum.auto()
    """Names to digests: manifests by tag. Only with PULL too (as containerd filters)."""
    PUSH = enum.auto()
    """Uploads, manifest puts and deletes."""


ALL_CAPABILITIES = Capability.PULL | Capability.RESOLVE | Capability.PUSH
RESOLVING = Capability.PULL | Capability.RESOLVE
"""What a host needs to be asked for a tag: containerd asks only hosts with both."""


@dataclass(frozen=True)
class HostTLS:
    """A host's own TLS settings; none set means the system's defaults."""

    ca_files: tuple[Path, ...] = ()
    client_pairs: tuple[tuple[Path, Path | None], ...] = ()
    """(certificate, key); no key means the certificate file holds the key too."""
    skip_verify: bool | None = None

    @property
    def configured(self) -> bool:
        """Whether anything differs from the defaults (an own SSL context is needed)."""
        return bool(self.ca_files or self.client_pairs) or self.skip_verify is not None


@dataclass(frozen=True)
class RegistryHost:
    """One place a namespace's requests can go: a mirror, or the server (always last)."""

    scheme: str
    host: str
    """``host[:port]`` as dialled."""
    path: str
    """The API root, ``/v2`` unless ``override_path`` said otherwise."""
    capabilities: Capability = ALL_CAPABILITIES
    tls: HostTLS = HostTLS()
    headers: tuple[tuple[str, str], ...] = ()
    mirror: bool = False
    """Listed under ``[host]`` and not the server itself: a copy, which may fail or lag
    without the registry being at fault (the server may be listed there for settings)."""

    @property
    def role(self) -> str:
        """``mirror`` or ``server``: what logs and metrics call it."""
        return "mirror" if self.mirror else "server"

    def allows(self, needed: Capability) -> bool:
        """Whether every capability in ``needed`` is the host's."""
        return needed in self.capabilities

    def url(self, api_path: str, namespace: str) -> str:
        """The URL of ``api_path`` (``<repository>/blobs/<digest>``, a query allowed) on
        this host.

        As containerd does, a request to a host that is not the namespace's own carries
        ``?ns=<namespace>``, so that a mirror serving several registries knows which.
        """
        api_path, _, query = api_path.partition("?")
        joined = posixpath.join("/", self.path.strip("/"), api_path)
        path = posixpath.normpath(joined) + ("/" if api_path.endswith("/") else "")
        if self.is_proxy_for(namespace):
            query += ("&" if query else "") + urlencode({"ns": namespace})
        return f"{self.scheme}://{self.host}{path}" + (f"?{query}" if query else "")

    def is_proxy_for(self, namespace: str) -> bool:
        """Whether this host answers for ``namespace`` without being it (containerd's
        isProxy: Docker Hub's API host is Docker Hub)."""
        if self.host == namespace:
            return False
        return not (namespace == DOCKER_HUB and self.host == DOCKER_HUB_API_HOST)


@dataclass
class _Entry:
    """A host as written, before the default server is filled in."""

    scheme: str = ""
    host: str = ""
    path: str = ""
    capabilities: Capability = ALL_CAPABILITIES
    tls: HostTLS = field(default_factory=HostTLS)
    headers: tuple[tuple[str, str], ...] = ()


def host_directory_name(namespace: str) -> str:
    """``host:port`` as containerd names its directory first: ``host_port_``."""
    index = namespace.rfind(":")
    if index > 0:
        return f"{namespace[:index]}_{namespace[index + 1 :]}_"
    return namespace


def split_roots(config_path: str) -> tuple[Path, ...]:
    """``config_path`` as containerd splits it (``:``-separated, empty parts dropped)."""
    return tuple(Path(part) for part in config_path.split(os.pathsep) if part)


def find_host_dir(roots: Iterable[Path], namespace: str) -> Path | None:
    """The directory whose files configure ``namespace``, or None."""
    own = host_directory_name(namespace)
    for root in roots:
        candidates = [root / own] if own != namespace else []
        candidates += [root / namespace, root / DEFAULT_DIRECTORY]
        for candidate in candidates:
            try:
                candidate.stat()
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise HostsConfigError(f"registry host directory {candidate}: {exc}") from None
            return candidate
    return None


def _absolute(path: str, base: Path) -> Path:
    return Path(path) if os.path.isabs(path) else base / path


def _strings(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise HostsConfigError(f"invalid type for {what}: expected a string or a list of them")
    return value


def _capabilities(value: Any) -> Capability:
    if value is None or value == []:
        return ALL_CAPABILITIES
    result = Capability(0)
    for name in _strings(value, '"capabilities"'):
        try:
            result |= Capability[name.upper()]
        except KeyError:
            raise HostsConfigError(f"unknown capability {name}") from None
    return result


def _client_pairs(value: Any, base: Path) -> tuple[tuple[Path, Path | None], ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return ((_absolute(value, base), None),)
    if not isinstance(value, list):
        raise HostsConfigError(f'invalid type {type(value).__name__} for "client"')
    pairs: list[tuple[Path, Path | None]] = []
    for item in value:
        if isinstance(item, str):
            pairs.append((_absolute(item, base), None))
            continue
        pair = _strings(item, '"client" pair')
        if len(pair) != 2:
            raise HostsConfigError(f'invalid pair {pair} for "client"')
        pairs.append((_absolute(pair[0], base), _absolute(pair[1], base) if pair[1] else None))
    return tuple(pairs)


def _headers(value: Any) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise HostsConfigError('invalid type for "header": expected a table')
    headers: list[tuple[str, str]] = []
    for name, values in value.items():
        items = [values] if isinstance(values, str) else _strings(values, f"header {name!r}")
        headers.extend((name, item) for item in items)
    return tuple(headers)


def _server_location(server: str, override_path: bool) -> tuple[str, str, str]:
    """(scheme, host, API root) of a ``server`` or ``[host]`` key."""
    if "://" not in server:
        server = "https://" + server
    parts = urlsplit(server)
    if not parts.netloc:
        raise HostsConfigError(f"unable to parse server {server}")
    path = posixpath.normpath(parts.path) if parts.path else ""
    if not override_path and not path.endswith("/v2"):
        path = path.rstrip("/") + "/v2"
    return parts.scheme, parts.netloc, path


def _entry(server: str, table: Mapping[str, Any], base: Path) -> _Entry:
    """One host's settings (containerd's parseHostConfig)."""
    override_path = table.get("override_path", False)
    skip_verify = table.get("skip_verify")
    if not isinstance(override_path, bool) or not isinstance(skip_verify, bool | None):
        raise HostsConfigError('"override_path" and "skip_verify" must be true or false')
    entry = _Entry()
    if server:
        entry.scheme, entry.host, entry.path = _server_location(server, override_path)
    entry.capabilities = _capabilities(table.get("capabilities"))
    ca = table.get("ca")
    ca_files = [ca] if isinstance(ca, str) else _strings(ca, '"ca"') if ca is not None else []
    entry.tls = HostTLS(
        ca_files=tuple(_absolute(f, base) for f in ca_files),
        client_pairs=_client_pairs(table.get("client"), base),
        skip_verify=skip_verify,
    )
    entry.headers = _headers(table.get("header"))
    return entry


def parse_hosts_toml(text: str, base: Path) -> list[_Entry]:
    """The hosts a hosts.toml lists, in order, its ``server`` last (containerd's
    parseHostsFile); HostsConfigError for a file containerd would refuse."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise HostsConfigError(f"failed to parse TOML: {exc}") from None
    tables = doc.get("host", {})
    server = doc.get("server", "")
    if not isinstance(tables, dict) or not isinstance(server, str):
        raise HostsConfigError('invalid "host" tree or "server"')
    entries = []
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise HostsConfigError(f"host {name!r} is not a table")
        entries.append(_entry(name, table, base))
    entries.append(_entry(server, doc, base))
    return entries


def load_cert_files(directory: Path) -> list[_Entry]:
    """Docker's certificate layout (containerd's loadCertFiles): one default host with
    every ``*.crt`` as a CA and every ``*.cert`` with its ``*.key`` as a client pair."""
    try:
        names = sorted(p.name for p in directory.iterdir() if not p.is_dir())
    except FileNotFoundError:
        names = []
    except OSError as exc:
        raise HostsConfigError(f"registry host directory {directory}: {exc}") from None
    ca_files = tuple(directory / n for n in names if n.endswith(".crt"))
    pairs: list[tuple[Path, Path | None]] = []
    for name in names:
        if name.endswith(".cert"):
            key = directory / (name.removesuffix(".cert") + ".key")
            pairs.append((directory / name, key if key.exists() else None))
    return [_Entry(tls=HostTLS(ca_files=ca_files, client_pairs=tuple(pairs)))]


def load_host_dir(directory: Path) -> list[_Entry]:
    """A namespace directory's hosts (containerd's loadHostDir)."""
    path = directory / "hosts.toml"
    try:
        text = path.read_text()
    except FileNotFoundError:
        text = ""
    except OSError as exc:
        raise HostsConfigError(f"{path}: {exc}") from None
    if not text:
        return load_cert_files(directory)
    try:
        entries = parse_hosts_toml(text, directory)
    except HostsConfigError as exc:
        log.error(
            "hosts_config.invalid",
            path=str(path),
            error=str(exc),
            fallback="the namespace's own host, with the directory's certificate files",
        )
        return load_cert_files(directory)
    if len(entries) == 1 and entries[0].host:
        log.warning(
            "hosts_config.server_without_host_table",
            path=str(path),
            note="containerd before 1.7.32 refuses such a file and uses the namespace's own"
            " host; add a [host] table to have both read it alike",
        )
    return entries


def registry_hosts(
    roots: Sequence[Path], namespace: str, default_scheme: str = "https"
) -> tuple[RegistryHost, ...]:
    """The hosts for ``namespace`` in order, mirrors first, as containerd configures
    them (ConfigureHosts). ``default_scheme`` is the namespace's own host's when no file
    names a server (``http`` for a registry the operator lists as plain http)."""
    directory = find_host_dir(roots, namespace)
    entries = load_host_dir(directory) if directory is not None else [_Entry()]
    last = entries[-1]
    if not last.host:
        if namespace == DOCKER_HUB:
            last.scheme, last.host = "https", DOCKER_HUB_API_HOST
        else:
            last.scheme, last.host = default_scheme, namespace
        last.path = "/v2"
        last.capabilities = ALL_CAPABILITIES
    return tuple(
        RegistryHost(
            scheme=entry.scheme,
            host=entry.host,
            path=entry.path,
            capabilities=entry.capabilities,
            tls=entry.tls,
            headers=entry.headers,
            mirror=entry is not last and entry.host != last.host,
        )
        for entry in entries
    )


def tls_context(tls: HostTLS, host: str) -> ssl.SSLContext:
    """An SSL context for a host with TLS settings of its own: the system's store plus
    its CA files, its first client pair, verification off only where configured."""
    context = ssl.create_default_context()
    try:
        for ca in tls.ca_files:
            context.load_verify_locations(cafile=str(ca))
        for cert, key in tls.client_pairs:
            context.load_cert_chain(str(cert), str(key) if key else None)
            if len(tls.client_pairs) > 1:
                # An SSLContext presents one chain; containerd offers Go each pair.
                log.warning("hosts_config.extra_client_pairs_ignored", host=host, used=str(cert))
            break
    except (OSError, ssl.SSLError) as exc:
        raise HostsConfigError(f"TLS files for {host}: {exc}") from None
    if tls.skip_verify:
        log.warning("hosts_config.skip_verify", host=host)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


@dataclass
class _Loaded:
    hosts: tuple[RegistryHost, ...]
    expires: float
    contexts: dict[HostTLS, ssl.SSLContext]


class HostsConfig:
    """The node's hosts directory, read again after RELOAD_AFTER_S; no roots means
    every namespace is its own host, as without a hosts.toml."""

    def __init__(
        self,
        roots: Sequence[Path] = (),
        plain_http: Callable[[str], bool] = lambda _: False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.roots = tuple(roots)
        self._plain_http = plain_http
        self._clock = clock
        self._loaded: dict[str, _Loaded] = {}

    def hosts(self, namespace: str) -> tuple[RegistryHost, ...]:
        """``namespace``'s hosts in the order to try; HostsConfigError when a file or a
        TLS setting it names cannot be used (containerd fails such a pull too)."""
        now = self._clock()
        loaded = self._loaded.get(namespace)
        if loaded is None or loaded.expires <= now:
            scheme = "http" if self._plain_http(namespace) else "https"
            hosts = registry_hosts(self.roots, namespace, scheme)
            contexts = loaded.contexts if loaded and loaded.hosts == hosts else {}
            loaded = self._loaded[namespace] = _Loaded(hosts, now + RELOAD_AFTER_S, contexts)
            for host in hosts:
                if host.tls.configured and host.scheme == "https" and host.tls not in contexts:
                    contexts[host.tls] = tls_context(host.tls, host.host)
        return loaded.hosts

    def ssl_for(self, namespace: str, host: RegistryHost) -> ssl.SSLContext | bool:
        """What aiohttp's ``ssl`` takes for ``host``: its own context, else True (the
        default verification)."""
        loaded = self._loaded.get(namespace)
        if loaded is None or not host.tls.configured:
            return True
        return loaded.contexts.get(host.tls, True)
