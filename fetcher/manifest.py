"""OCI / Docker schema-2 manifests and indexes: strict parsing and platform selection.

Manifests come from the network and drive what we download and mount, so parsing is
strict: every digest is validated, every size is a non-negative integer, and a document
whose declared media type contradicts its shape is refused rather than guessed at.
"""

from __future__ import annotations

import json
import platform as host_platform
from dataclasses import dataclass, field
from typing import Any

from common.digest import InvalidDigestError, validate_digest
from fetcher import mediatypes as mt
from fetcher.errors import ManifestError, UnsupportedMediaTypeError

MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # the distribution registry's own limit


@dataclass(frozen=True)
class Platform:
    """An OCI platform; ``variant`` matters for arm, ``os_version`` for Windows."""

    os: str
    architecture: str
    variant: str | None = None
    os_version: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        """Parse ``os/arch[/variant]`` as containerd and `--platform` flags write it."""
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"invalid platform {text!r}: expected os/arch[/variant]")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    @classmethod
    def host(cls) -> Platform:
        """The platform of this machine, named the way images name theirs."""
        machine = host_platform.machine().lower()
        arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(machine, machine)
        return cls("linux", arch, "v7" if arch == "arm" else None)

    def matches(self, other: Platform) -> bool:
        """Whether an image built for ``other`` runs here (variant defaults as containerd's)."""
        if (self.os, self.architecture) != (other.os, other.architecture):
            return False
        default_variant = {"arm64": "v8", "arm": "v7"}.get(self.architecture)
        mine = self.variant or default_variant
        theirs = other.variant or default_variant
        return mine == theirs

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    urls: tuple[str, ...] = ()
    platform: Platform | None = None
    artifact_type: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The descriptor as it appears in a manifest (only the fields that are set)."""
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.urls:
            out["urls"] = list(self.urls)
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform:
            plat: dict[str, str] = {
                "os": self.platform.os,
                "architecture": self.platform.architecture,
            }
            if self.platform.variant:
                plat["variant"] = self.platform.variant
            if self.platform.os_version:
                plat["os.version"] = self.platform.os_version
            out["platform"] = plat
        return out


@dataclass(frozen=True)
class ImageManifest:
    """An image (or artifact) manifest."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: dict[str, str] = field(default_factory=dict)
    subject: Descriptor | None = None
    artifact_type: str | None = None


@dataclass(frozen=True)
class ImageIndex:
    """A multi-platform index (OCI image index or Docker manifest list)."""

    media_type: str
    manifests: tuple[Descriptor, ...]
    annotations: dict[str, str] = field(default_factory=dict)
    subject: Descriptor | None = None
    artifact_type: str | None = None

    def select(self, wanted: Platform) -> Descriptor:
        """The manifest for ``wanted``; raise NotFound-like ManifestError listing what exists."""
        for desc in self.manifests:
            if desc.platform is not None and wanted.matches(desc.platform):
                return desc
        available = ", ".join(str(d.platform) for d in self.manifests if d.platform) or "none"
        raise ManifestError(f"no manifest for platform {wanted} in index (available: {available})")


def _obj(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ManifestError(f"{what}: expected a JSON object")
    return value


def _str_map(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    obj = _obj(value, what)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in obj.items()):
        raise ManifestError(f"{what}: annotations must map strings to strings")
    return dict(obj)


def _platform(value: Any, what: str) -> Platform | None:
    if value is None:
        return None
    obj = _obj(value, what)
    os_name, arch = obj.get("os"), obj.get("architecture")
    if not isinstance(os_name, str) or not isinstance(arch, str):
        raise ManifestError(f"{what}: platform needs string os and architecture")
    variant = obj.get("variant")
    os_version = obj.get("os.version")
    return Platform(
        os_name,
        arch,
        variant if isinstance(variant, str) else None,
        os_version if isinstance(os_version, str) else None,
    )


def parse_descriptor(value: Any, what: str) -> Descriptor:
    """Validate one descriptor; ``what`` names it in errors (e.g. 'layers[2]')."""
    obj = _obj(value, what)
    media_type = obj.get("mediaType")
    if not isinstance(media_type, str) or not media_type:
        raise ManifestError(f"{what}: missing mediaType")
    try:
        digest = validate_digest(obj.get("digest"))  # type: ignore[arg-type]
    except InvalidDigestError as exc:
        raise ManifestError(f"{what}: {exc}") from None
    size = obj.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ManifestError(f"{what}: size must be a non-negative integer, got {size!r}")
    urls = obj.get("urls") or []
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise ManifestError(f"{what}: urls must be a list of strings")
    artifact_type = obj.get("artifactType")
    return Descriptor(
        media_type=media_type,
        digest=digest,
        size=size,
        annotations=_str_map(obj.get("annotations"), what),
        urls=tuple(urls),
        platform=_platform(obj.get("platform"), what),
        artifact_type=artifact_type if isinstance(artifact_type, str) else None,
    )


def parse_manifest(body: bytes, content_type: str | None = None) -> ImageManifest | ImageIndex:
    """Parse a manifest or index body; ``content_type`` is the HTTP header, if any."""
    if len(body) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest of {len(body)} bytes exceeds {MAX_MANIFEST_BYTES}")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:  # also over-long integers, deep nesting
        raise ManifestError(f"manifest is not valid JSON: {exc}") from None
    doc = _obj(doc, "manifest")
    declared = doc.get("mediaType")
    header_type = (content_type or "").split(";")[0].strip() or None
    if (
        header_type in (mt.DOCKER_SCHEMA1, mt.DOCKER_SCHEMA1_SIGNED)
        or doc.get("schemaVersion") == 1
    ):
        raise UnsupportedMediaTypeError("Docker schema 1 manifests are not supported")
    if doc.get("schemaVersion") != 2:
        raise ManifestError(f"unsupported schemaVersion {doc.get('schemaVersion')!r}")
    if declared is not None and not isinstance(declared, str):
        raise ManifestError("mediaType must be a string")
    if declared and header_type and header_type in mt.ALL_MANIFESTS and declared != header_type:
        raise ManifestError(f"mediaType {declared!r} contradicts Content-Type {header_type!r}")
    media_type = declared or header_type
    is_index = "manifests" in doc
    if media_type is None:
        media_type = mt.OCI_INDEX if is_index else mt.OCI_MANIFEST
    if media_type not in mt.ALL_MANIFESTS:
        raise UnsupportedMediaTypeError(f"unsupported manifest media type {media_type!r}")
    subject = parse_descriptor(doc["subject"], "subject") if doc.get("subject") else None
    artifact_type = doc.get("artifactType") if isinstance(doc.get("artifactType"), str) else None
    annotations = _str_map(doc.get("annotations"), "manifest")
    if media_type in mt.INDEXES:
        if "layers" in doc or not isinstance(doc.get("manifests"), list):
            raise ManifestError(f"{media_type} must have a 'manifests' list and no 'layers'")
        manifests = tuple(
            parse_descriptor(d, f"manifests[{i}]") for i, d in enumerate(doc["manifests"])
        )
        return ImageIndex(media_type, manifests, annotations, subject, artifact_type)
    if is_index or not isinstance(doc.get("layers"), list) or "config" not in doc:
        raise ManifestError(f"{media_type} must have 'config' and a 'layers' list")
    config = parse_descriptor(doc["config"], "config")
    layers = tuple(parse_descriptor(d, f"layers[{i}]") for i, d in enumerate(doc["layers"]))
    return ImageManifest(media_type, config, layers, annotations, subject, artifact_type)
