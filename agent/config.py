"""acceld's configuration: a YAML file, overridden by command-line flags.

Defaults suit a node: state under /var/lib/acceld, the snapshotter socket where the
shipped containerd drop-in expects it, metrics on loopback only.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from fetcher.hosts_config import DEFAULT_HOSTS_DIR


class ConfigError(ValueError):
    """A configuration file or flag that cannot be used."""


@dataclass(frozen=True)
class AgentConfig:
    """Every knob of the node agent.

    ``prefetch``: fetch ahead what an image itself says its start needs (an eStargz
    layer's landmark area, the converter's prefetch list). ``profiles``: fetch ahead
    what the fleet learned its starts read (the image's profile from the registry).
    Either works without the other; ``record_profiles`` is what teaches the fleet.
    ``profile_inheritance``: an image without a profile of its own takes the plan of a
    predecessor's (`profiles.inherit`): another version in its repository, or an image
    whose layers it shares.

    ``allowed_registries``: the registries the agent may contact; empty means any.
    Entries are ``host:port`` (exactly that), ``host`` (any port) or ``*.domain``
    (optionally ``:port``; any subdomain of domain, not domain itself). Enforced under
    every registry request the agent makes (`fetcher.registry_policy`): a layer of an
    image from another registry is not served lazily, the agent logs
    `registry_not_allowed` and containerd pulls and unpacks it itself (containerd's
    own registry access is outside the agent's control). Blob redirect targets (CDNs)
    and token realms named by an allowed registry are followed without a check.

    ``watchdog_stall_threshold_s``: how long the event loop may run no callback before
    the watchdog logs a `watchdog.stall` record (with every thread's stacks) and
    /healthz answers 503. ``watchdog_request_threshold_s``: the age at which an
    unanswered FUSE request is reported. Keep it at most ``demand_timeout``: a read
    waits that long for the registry at most and then fails with EIO, so a request
    older than that is stuck in the agent itself; below it, reads slowed by the
    registry are reported too (the default is half of it).

    ``discovery_timeout_s``: how long finding and reading a layer's accelerated form
    (manifests, referrers, an index or TOC) may take before the layer falls back to
    containerd's own pull. Each read of the registry has its own timeouts, but a
    registry that trickles its answers, or a connection left out of step, renews them
    byte by byte: without an overall bound a Prepare, and the pod's pull, waits for it.

    ``read_ahead_kib``: the kernel's read-ahead on the FUSE mount. Sequential reads then
    cost a round trip per window rather than per 128 KiB (the kernel's default); 0
    turns read-ahead off, so every read reaches FUSE as the application asked for it,
    which is how the benchmark learns exactly which bytes a start reads.

    ``hosts_dir``: where the node's containerd keeps its registry host configuration
    (its CRI plugin's ``registry.config_path``; ``:`` between several roots; empty:
    none). The agent reads the same ``<registry>/hosts.toml`` files as containerd
    (`fetcher.hosts_config`): mirrors in order for what each may serve (``pull``,
    ``resolve``), then ``server``; ``ca``, ``client``, ``skip_verify``, ``header`` and
    ``override_path`` per host; ``_default``; Docker's ``*.crt``/``*.cert``/``*.key``
    files where there is no hosts.toml. Set it to the node's ``config_path`` so that a
    lazy layer comes from where containerd would pull it.

    ``keeper``: hold the FUSE connection in a keeper process (`agent.fs.keeper`, at
    ``keeper_socket``, started by the agent unless ``keeper_spawn`` is off because a
    service manager runs it), so that running containers survive the agent's crashes
    and restarts: their reads wait and then get their bytes. If no agent comes back
    within ``keeper_grace_s`` seconds the connection is aborted (readers get EIO).
    """

    root: Path = Path("/var/lib/acceld")
    socket: Path = Path("/run/acceld/snapshotter.sock")
    mountpoint: Path | None = None
    cache_max_bytes: int = 20 << 30
    metrics_address: str = "127.0.0.1:9797"
    plain_http: tuple[str, ...] = ()
    hosts_dir: str = DEFAULT_HOSTS_DIR
    docker_config: Path | None = None
    pull_secrets: tuple[Path, ...] = ()
    allowed_registries: tuple[str, ...] = ()
    prefetch: bool = True
    background_fill: bool = True
    background_fill_delay_s: float = 10.0
    discover_referrers: bool = True
    max_connections_per_registry: int = 8
    demand_timeout: float = 60.0
    discovery_timeout_s: float = 30.0
    watchdog_stall_threshold_s: float = 5.0
    watchdog_request_threshold_s: float = 30.0
    log_level: str = "INFO"
    profiles: bool = True
    profile_inheritance: bool = True
    record_profiles: bool = True
    record_starts: int = 3
    profile_sample_rate: float = 0.1
    trace_quiet_s: float = 3.0
    trace_deadline_s: float = 60.0
    read_ahead_kib: int = 1024
    ebpf: bool = True
    kubernetes_credentials: bool = False
    kubernetes_credentials_namespace: str = ""
    keeper: bool = True
    keeper_socket: Path | None = None
    keeper_spawn: bool = True
    keeper_grace_s: float = 120.0

    @property
    def fuse_mountpoint(self) -> Path:
        """Where the node's FUSE mount lives."""
        return self.mountpoint or self.root / "mnt"

    @property
    def keeper_address(self) -> Path:
        """Where the keeper of this agent's FUSE connection listens."""
        return self.keeper_socket or self.root / "keeper.sock"

    @property
    def cache_dir(self) -> Path:
        """The on-disk chunk cache."""
        return self.root / "cache"

    @property
    def snapshots_dir(self) -> Path:
        """Snapshot metadata and upper/work directories."""
        return self.root / "snapshotter"

    @classmethod
    def load(cls, path: Path | None, overrides: dict[str, Any] | None = None) -> AgentConfig:
        """Defaults, then the YAML file (if any), then non-None ``overrides``."""
        values: dict[str, Any] = {}
        if path is not None:
            try:
                doc = yaml.safe_load(path.read_text()) or {}
            except (OSError, yaml.YAMLError) as exc:
                raise ConfigError(f"{path}: {exc}") from None
            if not isinstance(doc, dict):
                raise ConfigError(f"{path}: expected a mapping")
            values.update(doc)
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AgentConfig:
        """Validate keys and coerce types."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown configuration keys: {', '.join(unknown)}")
        config = cls()
        coerced: dict[str, Any] = {}
        for name, value in values.items():
            default = getattr(config, name)
            try:
                if name in ("root", "socket", "mountpoint", "docker_config", "keeper_socket"):
                    coerced[name] = Path(value) if value is not None else None
                elif name == "pull_secrets":
                    coerced[name] = tuple(Path(v) for v in value)
                elif isinstance(default, tuple):
                    coerced[name] = tuple(str(v) for v in value)
                elif isinstance(default, bool):
                    if not isinstance(value, bool):
                        raise TypeError("expected true or false")
                    coerced[name] = value
                elif isinstance(default, int | float):
                    coerced[name] = type(default)(value)
                else:
                    coerced[name] = str(value)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"configuration key {name!r}: {exc}") from None
        if coerced.get("cache_max_bytes", 1) <= 0:
            raise ConfigError("cache_max_bytes must be positive")
        if not 0 <= coerced.get("read_ahead_kib", 0) <= 1 << 20:
            raise ConfigError("read_ahead_kib must be within 0..1048576")
        for name in (
            "watchdog_stall_threshold_s",
            "watchdog_request_threshold_s",
            "keeper_grace_s",
        ):
            if coerced.get(name, 1) <= 0:
                raise ConfigError(f"{name} must be positive")
        return replace(config, **coerced)
