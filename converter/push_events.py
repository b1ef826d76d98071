"""Which registry push notifications should trigger a conversion, and how.

The distribution registry POSTs an envelope of events for every blob and manifest
push. Only a manifest pushed under a tag is an image someone will run; accelerated
forms and referrers-fallback tags are our own output and must never be converted again
(that would loop forever).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from converter.prefetch import PrefetchList
from converter.record_at_conversion import ContainerdTarget, RecordSettings, RecordSettingsError
from fetcher import mediatypes as mt
from fetcher.hosts_config import DEFAULT_HOSTS_DIR
from formats.accelerated import MODE_FULL, MODE_INDEX, is_accelerated_tag

EVENTS_MEDIA_TYPE = "application/vnd.docker.distribution.events.v1+json"
_REFERRERS_TAG_RE = re.compile(r"^sha(256|512)-[a-f0-9]{64,128}$")


class ServerConfigError(ValueError):
    """A convert-server configuration that cannot be used."""


@dataclass(frozen=True)
class RepositoryRule:
    """How to convert the repositories whose name matches ``match`` (fnmatch)."""

    match: str
    mode: str
    prefetch: PrefetchList
    record: RecordSettings | None = None
    """`record_profile`: start each converted image once, sandboxed, and publish its
    profile (`converter.record_at_conversion`); None: no start at conversion."""


@dataclass(frozen=True)
class PushedImage:
    """A tag that was just pushed."""

    registry: str
    repository: str
    tag: str
    digest: str


@dataclass(frozen=True)
class ServerConfig:
    """convert-server settings (YAML file)."""

    listen_host: str = "127.0.0.1"
    listen_port: int = 8089
    registry: str | None = None
    rules: tuple[RepositoryRule, ...] = ()
    webhook_url: str | None = None
    plain_http: tuple[str, ...] = ()
    hosts_dir: str = DEFAULT_HOSTS_DIR
    """containerd's registry ``config_path`` (`fetcher.hosts_config`): the registry's
    CA, client certificates and mirrors, as the node's containerd reads them."""
    docker_config: Path | None = None
    token: str | None = None
    """The bearer token `POST /events` requires (read from ``token_file``: a mounted
    Secret). Without it anyone who reaches the port could make us pull and push."""
    allowed_registries: tuple[str, ...] = ()
    """``host:port`` patterns (fnmatch) an event may name when ``registry`` is unset; an
    event naming any other host is refused, never contacted."""
    queue_size: int = 256
    """Pushes waiting for conversion; past it /events answers 429 and the registry
    retries (its notification queue is the backpressure)."""
    containerd: ContainerdTarget = field(default_factory=ContainerdTarget)
    """Where rules with `record_profile` start their images (`containerd.address`,
    `containerd.snapshotter`: the one its CRI plugin pulls with)."""

    def check_servable(self) -> None:
        """ServerConfigError unless /events is authenticated and the registries it may
        make us contact are fixed."""
        if not self.token:
            raise ServerConfigError("convert-server needs token_file: /events must not be open")
        if self.registry is None and not self.allowed_registries:
            raise ServerConfigError("convert-server needs registry or allowed_registries")
        if self.queue_size < 1:
            raise ServerConfigError("queue_size must be at least 1")

    def allows(self, registry: str) -> bool:
        """Whether an event may make us contact ``registry``."""
        if self.registry is not None:
            return registry == self.registry
        return any(fnmatch.fnmatchcase(registry, pattern) for pattern in self.allowed_registries)

    @classmethod
    def load(cls, path: Path) -> ServerConfig:
        """Parse and validate a YAML config file."""
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ServerConfigError(f"{path}: {exc}") from None
        return cls.from_dict(doc, str(path))

    @classmethod
    def from_dict(cls, doc: Any, source: str = "config") -> ServerConfig:
        """Validate a parsed config document."""
        if not isinstance(doc, dict):
            raise ServerConfigError(f"{source}: expected a mapping")
        rules = []
        for i, raw in enumerate(doc.get("repositories") or []):
            if not isinstance(raw, dict) or not isinstance(raw.get("match"), str):
                raise ServerConfigError(f"{source}: repositories[{i}] needs a 'match' pattern")
            mode = raw.get("mode", MODE_INDEX)
            if mode not in (MODE_FULL, MODE_INDEX):
                raise ServerConfigError(f"{source}: repositories[{i}]: mode must be full/index")
            prefetch = PrefetchList(())
            if raw.get("prefetch_list"):
                prefetch = PrefetchList.load(Path(raw["prefetch_list"]))
            elif raw.get("prefetch"):
                prefetch = PrefetchList.parse_lines(raw["prefetch"], f"{source}: prefetch")
            record = None
            if raw.get("record_profile") not in (None, False):
                try:
                    record = RecordSettings.from_dict(
                        raw["record_profile"], f"{source}: repositories[{i}]"
                    )
                except RecordSettingsError as exc:
                    raise ServerConfigError(str(exc)) from None
            rules.append(RepositoryRule(raw["match"], mode, prefetch, record))
        host, _, port = str(doc.get("listen", "127.0.0.1:8089")).rpartition(":")
        if not port.isdigit():
            raise ServerConfigError(f"{source}: listen must be host:port")
        token = None
        if doc.get("token_file"):
            try:
                token = Path(doc["token_file"]).read_text().strip()
            except OSError as exc:
                raise ServerConfigError(f"{source}: token_file: {exc}") from None
            if not token:
                raise ServerConfigError(f"{source}: token_file is empty")
        allowed = doc.get("allowed_registries") or []
        if not isinstance(allowed, list) or not all(isinstance(a, str) for a in allowed):
            raise ServerConfigError(f"{source}: allowed_registries must be a list of host:port")
        queue_size = doc.get("queue_size", 256)
        if type(queue_size) is not int or queue_size < 1:
            raise ServerConfigError(f"{source}: queue_size must be a positive integer")
        containerd = doc.get("containerd") or {}
        if not isinstance(containerd, dict) or not all(
            isinstance(containerd.get(k, ""), str) for k in ("address", "snapshotter")
        ):
            raise ServerConfigError(f"{source}: containerd must map address/snapshotter to text")
        return cls(
            containerd=ContainerdTarget(
                address=containerd.get("address") or ContainerdTarget.address,
                snapshotter=containerd.get("snapshotter") or ContainerdTarget.snapshotter,
            ),
            token=token,
            allowed_registries=tuple(allowed),
            queue_size=queue_size,
            listen_host=host or "127.0.0.1",
            listen_port=int(port),
            registry=doc.get("registry"),
            rules=tuple(rules),
            webhook_url=doc.get("webhook"),
            plain_http=tuple(doc.get("plain_http") or ()),
            hosts_dir=str(doc.get("hosts_dir", DEFAULT_HOSTS_DIR)),
            docker_config=Path(doc["docker_config"]) if doc.get("docker_config") else None,
        )

    def rule_for(self, repository: str) -> RepositoryRule | None:
        """The first rule matching ``repository``; None means: do not convert it."""
        for rule in self.rules:
            if fnmatch.fnmatchcase(repository, rule.match):
                return rule
        return None


def images_to_convert(envelope: Any, registry_override: str | None) -> list[PushedImage]:
    """The tagged image pushes of a notification envelope that we may convert."""
    events = envelope.get("events") if isinstance(envelope, dict) else None
    if not isinstance(events, list):
        raise ValueError("notification envelope without an 'events' list")
    pushed: list[PushedImage] = []
    for event in events:
        if not isinstance(event, dict) or event.get("action") != "push":
            continue
        target = event.get("target")
        if not isinstance(target, dict):
            continue
        tag = target.get("tag")
        if not isinstance(tag, str) or not tag:
            continue
        if is_accelerated_tag(tag) or _REFERRERS_TAG_RE.match(tag):
            continue
        if target.get("mediaType") not in mt.ALL_MANIFESTS:
            continue
        repository, digest = target.get("repository"), target.get("digest")
        if not isinstance(repository, str) or not isinstance(digest, str):
            continue
        registry = registry_override or urlsplit(str(target.get("url", ""))).netloc
        if not registry:
            continue
        pushed.append(PushedImage(registry, repository, tag, digest))
    return pushed
