"""Which accelerated form, if any, an image has in its registry, cached with a TTL.

Only a full-mode form is a runnable image that a pod can be switched to. An index-only
form is an artifact the agent finds by itself through referrers of the original image,
so such a pod keeps its image and only needs to land on an acceld node. A form whose
recorded source digest differs from what the original tag names now is stale (the tag
moved after conversion): switching to it would run old content, so it counts as absent.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from common.logging import get_logger
from fetcher import mediatypes as mt
from fetcher.errors import InvalidReferenceError, NotFoundError, RegistryError
from fetcher.manifest import ImageIndex, ImageManifest
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from formats.accelerated import (
    ANNOTATION_MODE,
    ANNOTATION_SOURCE_DIGEST,
    ARTIFACT_TYPE_INDEX,
    MODE_INDEX,
    accelerated_tag,
    is_accelerated_tag,
)

log = get_logger(__name__)

_IMAGE_CONFIGS = frozenset({mt.OCI_CONFIG, mt.DOCKER_CONFIG})
MAX_CACHED_IMAGES = 10_000
"""Past this many entries, expired ones are dropped (a long-lived webhook sees many images)."""


class Acceleration(enum.Enum):
    """What the registry holds under an image's `_accelerated` tag."""

    NONE = "none"
    FULL = "full"
    INDEX_ONLY = "index-only"


@dataclass(frozen=True)
class LookupResult:
    """The form found and, for a full-mode form, the image a pod should run instead."""

    acceleration: Acceleration
    image: str | None = None


NOT_ACCELERATED = LookupResult(Acceleration.NONE)


class RegistryLookupError(Exception):
    """The registry could not say (down, slow, refused): the caller must not guess."""


def _is_index_only(parsed: ImageManifest | ImageIndex) -> bool:
    if parsed.annotations.get(ANNOTATION_MODE) == MODE_INDEX:
        return True
    if parsed.artifact_type == ARTIFACT_TYPE_INDEX:
        return True
    if isinstance(parsed, ImageManifest):
        return parsed.config.media_type not in _IMAGE_CONFIGS
    return any(
        d.artifact_type == ARTIFACT_TYPE_INDEX or d.media_type not in mt.IMAGE_MANIFESTS
        for d in parsed.manifests
    )


class AcceleratedImageLookup:
    """Answers `lookup(image)` from the registry, remembering answers for ``ttl`` seconds.

    Failures are never cached: the next pod retries, so a registry that comes back is
    used at once.
    """

    def __init__(
        self,
        client: RegistryClient,
        ttl: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.ttl = ttl
        self._clock = clock
        self._cache: dict[str, tuple[float, LookupResult]] = {}

    async def lookup(self, image: str) -> LookupResult:
        """The accelerated form of ``image``; RegistryLookupError if the registry fails."""
        now = self._clock()
        cached = self._cache.get(image)
        if cached is not None and cached[0] > now:
            return cached[1]
        result = await self._query(image)
        if len(self._cache) >= MAX_CACHED_IMAGES:
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
        self._cache[image] = (now + self.ttl, result)
        return result

    async def _query(self, image: str) -> LookupResult:
        try:
            source = ImageReference.parse(image)
        except InvalidReferenceError:
            return NOT_ACCELERATED
        if source.digest or source.tag is None:
            # Digest-pinned images ask for exactly that content; never swap them.
            return NOT_ACCELERATED
        if is_accelerated_tag(source.tag):
            # Already switched (a second webhook call, or the user named it): keep it.
            return LookupResult(Acceleration.FULL, image)
        target = source.with_tag(accelerated_tag(source.tag))
        try:
            try:
                fetched = await self.client.get_manifest(target)
            except NotFoundError:
                return NOT_ACCELERATED
            # The twin must say which image it was made from, and be of that image as
            # the tag stands now: anyone who can push a tag can push a "twin".
            recorded = fetched.parsed.annotations.get(ANNOTATION_SOURCE_DIGEST)
            if recorded is None or recorded != await self.client.manifest_digest(source):
                log.info("webhook.stale_accelerated_form", image=image, target=str(target))
                return NOT_ACCELERATED
        except (TimeoutError, RegistryError, aiohttp.ClientError) as exc:
            raise RegistryLookupError(f"{target}: {exc.__class__.__name__}: {exc}") from exc
        if _is_index_only(fetched.parsed):
            return LookupResult(Acceleration.INDEX_ONLY)
        # Pinned to the twin checked just now: the tag may move before the pod starts.
        return LookupResult(Acceleration.FULL, str(target.with_digest(fetched.digest)))
