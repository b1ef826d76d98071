"""Image references (`[registry/]repository[:tag][@digest]`) as Docker and containerd read them.

A reference decides which host we contact and which credentials we send, so this follows
the distribution reference grammar, including the Docker Hub defaults
(`ubuntu` and `index.docker.io/ubuntu` -> `docker.io/library/ubuntu:latest`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from common.digest import InvalidDigestError, validate_digest
from fetcher.errors import InvalidReferenceError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API_HOST = "registry-1.docker.io"
LEGACY_DOCKER_HUB = "index.docker.io"
"""Docker Hub's old name: a reference naming it names the same repositories as
``docker.io`` (``index.docker.io/x`` is ``docker.io/library/x``)."""

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
_HOST_RE = re.compile(r"^(?:[a-zA-Z0-9.-]+|\[[0-9a-fA-F:]+\])(?::[0-9]+)?$")


@dataclass(frozen=True)
class ImageReference:
    """A parsed reference; ``registry`` is the host[:port] we talk to."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> ImageReference:
        """Parse ``text``; raise InvalidReferenceError saying which part is wrong."""
        if not text or len(text) > 4096 or text != text.strip():
            raise InvalidReferenceError(f"invalid image reference: {text!r}")
        remainder, digest = text, None
        if "@" in remainder:
            remainder, digest = remainder.split("@", 1)
            try:
                validate_digest(digest)
            except InvalidDigestError as exc:
                raise InvalidReferenceError(f"{text!r}: {exc}") from None
        tag = None
        last_slash = remainder.rfind("/")
        last_colon = remainder.rfind(":")
        if last_colon > last_slash:
            remainder, tag = remainder[:last_colon], remainder[last_colon + 1 :]
            if not _TAG_RE.match(tag):
                raise InvalidReferenceError(f"{text!r}: invalid tag {tag!r}")
        first, sep, rest = remainder.partition("/")
        if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
            registry, repository = first, rest
        else:
            registry, repository = DOCKER_HUB, remainder
        if registry == LEGACY_DOCKER_HUB:
            registry = DOCKER_HUB  # as distribution's ParseNormalizedNamed (containerd's)
        if registry == DOCKER_HUB and "/" not in repository:
            repository = f"library/{repository}"
        if not _HOST_RE.match(registry):
            raise InvalidReferenceError(f"{text!r}: invalid registry host {registry!r}")
        if len(repository) > 255 or not _REPOSITORY_RE.match(repository):
            raise InvalidReferenceError(f"{text!r}: invalid repository name {repository!r}")
        if tag is None and digest is None:
            tag = "latest"
        return cls(registry=registry, repository=repository, tag=tag, digest=digest)

    @property
    def api_host(self) -> str:
        """Host that serves the registry API (Docker Hub's API lives on another name)."""
        return DOCKER_HUB_API_HOST if self.registry == DOCKER_HUB else self.registry

    @property
    def reference(self) -> str:
        """What goes into /v2/<name>/manifests/<reference>: the digest when pinned."""
        if self.digest:
            return self.digest
        assert self.tag is not None
        return self.tag

    def with_tag(self, tag: str) -> ImageReference:
        """Same repository, another tag, no digest."""
        if not _TAG_RE.match(tag):
            raise InvalidReferenceError(f"invalid tag {tag!r}")
        return replace(self, tag=tag, digest=None)

    def with_digest(self, digest: str) -> ImageReference:
        """Same repository pinned to ``digest`` (the tag is kept for display)."""
        return replace(self, digest=validate_digest(digest))

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text
