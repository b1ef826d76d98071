"""Finding the profile an image without one of its own can inherit (`profiles.inherit`).

Where a new version's predecessors are: the other tags of its repository, which the
registry lists, and images this node has met that share its layers (whatever their
repository; a registry cannot be asked which images hold a layer, the node can
remember). The search runs while a pod waits for its image, and a plan that arrives
after the layers' tables are decoded misses the fetches it could have started there,
so it is bounded in requests and in round trips:

- the first MAX_LISTED tags listed are read; the manifests of the MAX_CANDIDATES
  highest, in natural order (``v10`` after ``v9``), are read, a few at a time. That
  order stands for "newest": a registry tells no push time without a read of each
  image's config, one more round trip per candidate;
- candidates are ranked by how many layers they share with the image (shared layers
  give exact entries), then same repository first, then same form (an accelerated
  image's mode annotation: a full-mode image's predecessor is the full-mode one), then
  newest; the referrers of the MAX_PROFILE_LOOKUPS best are asked for a profile all at
  once, and the best-ranked one that has a profile is taken.

Anything the registry does wrong here (a tag that vanished, a manifest that is not an
image, an index without this platform) skips that candidate: inheriting is a guess that
makes a start faster, never a reason for one to fail.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import OrderedDict
from dataclasses import dataclass

from common.logging import get_logger
from fetcher import mediatypes as mt
from fetcher.errors import ManifestError, RegistryError
from fetcher.manifest import ImageManifest
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from formats.accelerated import ANNOTATION_MODE
from profiles.format import Profile, ProfileFormatError
from profiles.inherit import InheritedPlan, inherit
from profiles.registry_sync import fetch_profile

log = get_logger(__name__)

MAX_LISTED = 1000
"""Tags read from the registry's listing (distribution pages them; a hostile one could
forever)."""
MAX_CANDIDATES = 12
MAX_PROFILE_LOOKUPS = 4
LOOKUP_CONCURRENCY = 8
REMEMBERED_PROFILES = 16
"""Profiles of images met on this node kept for images of other repositories sharing
their layers (each at most a few MB parsed; this bounds the memory they take)."""
CANDIDATE_TTL_S = 60.0
"""How long a repository's candidates are reused: pods of one rollout start together."""

_REFERRERS_TAG = re.compile(r"^(sha256|sha512)-[0-9a-f]+$")
_SKIPPED = (RegistryError, ManifestError, ProfileFormatError, ValueError)


@dataclass(frozen=True)
class Candidate:
    """An image that may have a profile to inherit."""

    reference: ImageReference
    """Pinned to ``manifest_digest``; its tag (if any) is the one it was listed under."""
    manifest_digest: str
    layers: tuple[str, ...]
    form: str | None
    """The accelerated form it is (`formats.accelerated.ANNOTATION_MODE`), None for an
    image as pushed."""
    newness: int
    """Place in the repository's version order, higher is newer (0: not listed)."""


@dataclass(frozen=True)
class Inheritance:
    """An inherited plan and the image it was learned on."""

    plan: InheritedPlan
    reference: ImageReference


def _natural_key(tag: str) -> list[tuple[int, int | str]]:
    """``v10`` sorts after ``v9``: digit runs compare as numbers."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.findall(r"\d+|\D+", tag)]


def version_tags(tags: list[str]) -> list[str]:
    """The tags worth reading, highest version first (referrers-schema tags are not
    images: they are left out)."""
    images = [tag for tag in tags if not _REFERRERS_TAG.match(tag)]
    return sorted(images, key=_natural_key, reverse=True)


def form_of(manifest: ImageManifest) -> str | None:
    """The accelerated form of an image manifest, None for an image as pushed."""
    return manifest.annotations.get(ANNOTATION_MODE)


async def read_candidate(
    client: RegistryClient, ref: ImageReference, newness: int
) -> Candidate | None:
    """The image ``ref`` names (this host's platform), or None if it is not one."""
    try:
        resolved = await client.resolve(ref)
    except _SKIPPED as exc:
        log.info("profile.candidate_skipped", image=str(ref), reason=str(exc))
        return None
    manifest = resolved.manifest
    if manifest.artifact_type is not None or manifest.config.media_type == mt.OCI_EMPTY:
        return None  # an artifact (an index-only form, a profile): not an image
    return Candidate(
        ref.with_digest(resolved.manifest_digest),
        resolved.manifest_digest,
        tuple(layer.digest for layer in manifest.layers),
        form_of(manifest),
        newness,
    )


def rank(
    candidates: list[Candidate], layers: tuple[str, ...], repository: str, form: str | None
) -> list[Candidate]:
    """Most shared layers first, then the image's own repository, its form, newest."""
    wanted = set(layers)

    def key(candidate: Candidate) -> tuple[int, bool, bool, int]:
        shared = len(wanted.intersection(candidate.layers))
        return (
            -shared,
            candidate.reference.repository != repository,
            candidate.form != form,
            -candidate.newness,
        )

    return sorted(candidates, key=key)


class ProfileInheritance:
    """Finds predecessors and their profiles; one per agent (or CLI run), whose memory of
    met profiles and repository look-ups lets many starts of a rollout share one search."""

    def __init__(self, client: RegistryClient) -> None:
        self.client = client
        self._remembered: OrderedDict[str, tuple[Candidate, Profile]] = OrderedDict()
        self._repositories: dict[tuple[str, str], tuple[float, asyncio.Task[list[Candidate]]]] = {}

    def remember(self, reference: ImageReference, profile: Profile) -> None:
        """A profile this node loaded for an image of its own: a predecessor candidate
        for images of any repository that share its layers."""
        candidate = Candidate(
            reference.with_digest(profile.image), profile.image, profile.layers, None, 0
        )
        self._remembered[profile.image] = (candidate, profile)
        self._remembered.move_to_end(profile.image)
        while len(self._remembered) > REMEMBERED_PROFILES:
            self._remembered.popitem(last=False)

    async def find(
        self, reference: ImageReference, manifest_digest: str, manifest: ImageManifest
    ) -> Inheritance | None:
        """The plan inherited by image ``manifest_digest`` (``manifest``), or None when
        no predecessor has a profile."""
        layers = tuple(layer.digest for layer in manifest.layers)
        listed = await self.repository_candidates(reference)
        known = {c.manifest_digest for c in listed}
        shared = set(layers)
        remembered = [
            candidate
            for candidate, _ in self._remembered.values()
            if candidate.manifest_digest not in known and shared.intersection(candidate.layers)
        ]
        ranked = [
            c
            for c in rank(listed + remembered, layers, reference.repository, form_of(manifest))
            if c.manifest_digest != manifest_digest
        ][:MAX_PROFILE_LOOKUPS]
        profiles = await asyncio.gather(*(self._profile_of(c) for c in ranked))
        for candidate, profile in zip(ranked, profiles, strict=True):
            if profile is None:
                continue
            same_repository = (candidate.reference.registry, candidate.reference.repository) == (
                reference.registry,
                reference.repository,
            )
            plan = inherit(profile, layers, by_path=same_repository)
            if plan.entries:
                return Inheritance(plan, candidate.reference)
        return None

    async def close(self) -> None:
        """Stop the repository listings under way (their starts are going away)."""
        tasks = [task for _, task in self._repositories.values()]
        self._repositories.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _profile_of(self, candidate: Candidate) -> Profile | None:
        remembered = self._remembered.get(candidate.manifest_digest)
        if remembered is not None:
            return remembered[1]
        try:
            return await fetch_profile(self.client, candidate.reference, candidate.manifest_digest)
        except _SKIPPED as exc:
            log.info("profile.candidate_skipped", image=str(candidate.reference), reason=str(exc))
            return None

    async def repository_candidates(self, reference: ImageReference) -> list[Candidate]:
        """The images listed in ``reference``'s repository (one listing per repository at
        a time, reused for CANDIDATE_TTL_S)."""
        key = (reference.registry, reference.repository)
        now = time.monotonic()
        for stale in [k for k, (at, _) in self._repositories.items() if now - at > CANDIDATE_TTL_S]:
            del self._repositories[stale]
        cached = self._repositories.get(key)
        if cached is None or _failed(cached[1]):
            cached = (now, asyncio.ensure_future(self._list_candidates(reference)))
            self._repositories[key] = cached
        return await asyncio.shield(cached[1])

    async def _list_candidates(self, reference: ImageReference) -> list[Candidate]:
        try:
            tags = version_tags(await self.client.list_tags(reference, MAX_LISTED))
        except _SKIPPED as exc:
            log.info("profile.tags_unlisted", repository=reference.repository, reason=str(exc))
            return []
        gate = asyncio.Semaphore(LOOKUP_CONCURRENCY)

        async def one(tag: str, newness: int) -> Candidate | None:
            async with gate:
                return await read_candidate(self.client, reference.with_tag(tag), newness)

        chosen = tags[:MAX_CANDIDATES]
        found = await asyncio.gather(*(one(tag, len(chosen) - n) for n, tag in enumerate(chosen)))
        unique = {c.manifest_digest: c for c in found if c is not None}
        return list(unique.values())


def _failed(task: asyncio.Task[list[Candidate]]) -> bool:
    return task.done() and (task.cancelled() or task.exception() is not None)
