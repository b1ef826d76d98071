"""Sharing profiles through the registry, with many nodes writing at once and no loss.

Scheme: content-addressed, append-only artifacts plus reader-side merging.
  * Each node pushes an immutable OCI artifact per run (or per batch of runs): config =
    the OCI empty descriptor, one layer = the msgpack profile, `subject` = the
    accelerated image's manifest, so it is found with the client's `referrers`. Its
    digest is a function of its content, and every run profile is unique by content
    (it holds the run's start time), so concurrent pushes never overwrite each other's
    blobs or manifests and a retried push is a no-op instead of a double count.
  * Readers merge every profile artifact they find; merging is associative and
    commutative (`profiles.learn`), so the result does not depend on who pushed first.
  * A compactor merges the artifacts it finds into one whose `supersedes` lists every
    artifact it absorbed. Readers resolve overlaps deterministically (largest coverage
    first, then digest) and ignore what an accepted profile supersedes, so nothing is
    counted twice even while absorbed artifacts still exist. Absorbed artifacts are
    deleted only by a later compaction once the absorbing profile is older than a grace
    period, so a reader never meets a state where a run is in neither place.

The one mutable object is the tag-schema referrers index (`sha256-<hex>` tag) that
registries without the referrers API (our distribution 2.8) need: `push_referrer` reads
it, adds the new descriptor and writes it back, and distribution has no conditional PUT,
so a writer that read the index before our write and writes after it drops our entry.
The manifest itself is safe (it is stored by digest), only its discoverability is lost.
`_publish` therefore verifies: after writing, it re-reads the index with jitter until
the entry has stayed present for a settle period after our last write, re-adding it
(with jittered back-off, so colliding writers drift apart) whenever it went missing.
A stale writer's window is one GET+PUT, far below the settle period, so once our entry
has survived that long no write based on an older read can still land. Pruning the
index after deletions is the same read-modify-write and is covered by the same
argument: any writer whose entry it drops is still inside its own settle period.
The same repair covers distribution's filesystem driver rewriting link files in place
(truncate, then write): a tag read racing a tag write can find no index at all, and
that writer then writes an index holding only its own entry; everyone it dropped is
still settling and re-adds theirs. (The same in-place rewrite makes concurrent uploads
of one blob briefly "unknown" to a manifest PUT; `_put_referrer` retries that.)
Assumptions, stated: no read-modify-write of the index takes longer than `settle`, and
no compaction takes longer than `prune_grace`. Unique per-artifact tags would avoid the
shared index but make every reader list all tags of the repository and would not be
found through `referrers` by other OCI tools.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from common.digest import sha256_digest
from common.logging import get_logger
from fetcher import mediatypes as mt
from fetcher.errors import NotFoundError, RegistryError
from fetcher.manifest import Descriptor, ImageIndex, ImageManifest
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient, referrers_tag
from formats.accelerated import (
    ANNOTATION_PROFILE_KIND,
    ARTIFACT_TYPE_PROFILE,
    EMPTY_JSON,
    MEDIA_TYPE_PROFILE,
)
from profiles.format import (
    MAX_PROFILE_BYTES,
    MAX_SUPERSEDES,
    Profile,
    ProfileFormatError,
    parse,
    serialize,
)
from profiles.learn import merge_all

log = get_logger(__name__)

# Proposed for formats/accelerated.py (kept here until the lead moves them).
ANNOTATION_CREATED = "org.opencontainers.image.created"
KIND_RUN = "run"
KIND_COMPACTED = "compacted"

MAX_REFERRERS = 4096
FETCH_CONCURRENCY = 8
BLOB_RACE_ATTEMPTS = 5


class ProfileSyncError(RuntimeError):
    """A profile could not be made durably discoverable in the registry."""


@dataclass(frozen=True)
class PublishPolicy:
    """How hard `_publish` works to keep its referrers-index entry.

    ``settle``: seconds the entry must stay listed after our last write before we trust
    it; ``check_interval``: mean pause between checks (jittered ±50%).
    """

    settle: float = 3.0
    check_interval: float = 0.5
    max_repairs: int = 20


@dataclass(frozen=True)
class Published:
    """A profile artifact now listed as a referrer; ``repairs``: times we re-added it."""

    digest: str
    repairs: int


@dataclass(frozen=True)
class Compaction:
    """What `compact` did: the new artifact (None if there was nothing to merge), how
    many artifacts it merged, and which absorbed artifacts it deleted."""

    digest: str | None
    merged: int
    deleted: tuple[str, ...]


@dataclass(frozen=True)
class _Stored:
    """A profile artifact as found in the registry."""

    digest: str
    profile: Profile
    created: float | None

    @property
    def reach(self) -> frozenset[str]:
        """Every artifact whose runs this one contains, itself included."""
        return frozenset(self.profile.supersedes) | {self.digest}


def _reference(ref: str | ImageReference) -> ImageReference:
    return ref if isinstance(ref, ImageReference) else ImageReference.parse(ref)


def _json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


async def _put_referrer(
    client: RegistryClient, ref: ImageReference, body: bytes, blobs: Sequence[bytes]
) -> None:
    """`push_referrer`, riding out distribution's same-blob upload race.

    When several nodes upload the same blob at once (the empty config every profile
    shares), distribution 2.8's filesystem driver rewrites the repository's link to it
    in place, and a manifest PUT that lands meanwhile is refused as referring to an
    unknown blob. The blob is there a moment later: re-ensure it and try again.
    """
    for attempt in range(1, BLOB_RACE_ATTEMPTS + 1):
        try:
            await client.push_referrer(ref, body, mt.OCI_MANIFEST)
            return
        except RegistryError as exc:
            if "MANIFEST_BLOB_UNKNOWN" not in exc.codes or attempt == BLOB_RACE_ATTEMPTS:
                raise
            log.warning("profiles.blob_race", attempt=attempt, error=str(exc))
        await asyncio.sleep(random.uniform(0.05, 0.2) * attempt)
        for blob in blobs:
            await client.push_blob(ref, blob)


async def _publish(
    client: RegistryClient,
    ref: ImageReference,
    subject: str,
    body: bytes,
    blobs: Sequence[bytes],
    policy: PublishPolicy,
) -> Published:
    """Push a referrer manifest and stay until its index entry has provably stuck."""
    digest = sha256_digest(body)
    loop = asyncio.get_running_loop()
    await _put_referrer(client, ref, body, blobs)
    written, repairs = loop.time(), 0
    while True:
        await asyncio.sleep(policy.check_interval * random.uniform(0.5, 1.5))
        listed = await client.referrers(ref, subject, ARTIFACT_TYPE_PROFILE)
        if any(d.digest == digest for d in listed):
            if loop.time() - written >= policy.settle:
                return Published(digest, repairs)
            continue
        repairs += 1
        if repairs > policy.max_repairs:
            raise ProfileSyncError(
                f"profile {digest} kept vanishing from the referrers of {subject}"
            )
        log.warning("profiles.referrer_lost", digest=digest, subject=subject, repairs=repairs)
        await asyncio.sleep(random.uniform(0, policy.check_interval) * min(repairs, 8))
        await _put_referrer(client, ref, body, blobs)
        written = loop.time()


async def _push(
    client: RegistryClient,
    ref: ImageReference,
    profile: Profile,
    annotations: dict[str, str],
    policy: PublishPolicy,
) -> Published:
    subject = await client.get_manifest(ref.with_digest(profile.image))
    blob = serialize(profile)
    await client.push_blob(ref, blob)
    await client.push_blob(ref, EMPTY_JSON)
    doc = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE_PROFILE,
        "config": {
            "mediaType": mt.OCI_EMPTY,
            "digest": sha256_digest(EMPTY_JSON),
            "size": len(EMPTY_JSON),
        },
        "layers": [
            {"mediaType": MEDIA_TYPE_PROFILE, "digest": sha256_digest(blob), "size": len(blob)}
        ],
        "subject": {
            "mediaType": subject.media_type,
            "digest": subject.digest,
            "size": len(subject.body),
        },
        "annotations": annotations,
    }
    blobs = (blob, EMPTY_JSON)
    published = await _publish(client, ref, profile.image, _json(doc), blobs, policy)
    log.info(
        "profiles.pushed",
        digest=published.digest,
        subject=profile.image,
        kind=annotations[ANNOTATION_PROFILE_KIND],
        runs=profile.runs.count,
        repairs=published.repairs,
    )
    return published


async def push_run_profile(
    client: RegistryClient,
    accelerated_ref: str | ImageReference,
    profile: Profile,
    policy: PublishPolicy | None = None,
) -> Published:
    """Share the profile of one run (or one node's batch of runs) with the fleet.

    ``accelerated_ref`` names the repository; the subject is ``profile.image``. The
    artifact carries no timestamp so that pushing the same profile twice (a retry) is
    one artifact, not two runs.
    """
    if profile.runs.count == 0:
        raise ValueError("a profile without successful runs has nothing to share")
    annotations = {ANNOTATION_PROFILE_KIND: KIND_RUN}
    return await _push(
        client, _reference(accelerated_ref), profile, annotations, policy or PublishPolicy()
    )


def _created(manifest: ImageManifest) -> float | None:
    try:
        return datetime.fromisoformat(manifest.annotations[ANNOTATION_CREATED]).timestamp()
    except (KeyError, ValueError):
        return None


def _refusal(manifest: object, subject: str) -> str | None:
    """Why an artifact listed as our profile is not one we will read, or None."""
    if not isinstance(manifest, ImageManifest):
        return "not an image manifest"
    if manifest.artifact_type != ARTIFACT_TYPE_PROFILE:
        return f"artifact type {manifest.artifact_type!r}"
    if manifest.subject is None or manifest.subject.digest != subject:
        return "subject is not the image"
    if len(manifest.layers) != 1 or manifest.layers[0].media_type != MEDIA_TYPE_PROFILE:
        return "not exactly one profile layer"
    if not 0 < manifest.layers[0].size <= MAX_PROFILE_BYTES:
        return f"profile layer of {manifest.layers[0].size} bytes"
    return None


async def _load(
    client: RegistryClient, ref: ImageReference, subject: str, descriptor: Descriptor
) -> _Stored | None:
    """One artifact's profile; None (logged) for artifacts deleted meanwhile or unusable."""
    try:
        fetched = await client.get_manifest(
            ref.with_digest(descriptor.digest), accept=mt.OCI_MANIFEST
        )
    except NotFoundError:
        return None  # deleted by a compaction; the index entry is only not pruned yet
    reason = _refusal(fetched.parsed, subject)
    if reason is None:
        manifest = fetched.parsed
        assert isinstance(manifest, ImageManifest)
        blob = await client.get_blob(ref, manifest.layers[0].digest, max_size=MAX_PROFILE_BYTES)
        try:
            profile = parse(blob)
        except ProfileFormatError as exc:
            reason = str(exc)
        else:
            if profile.image == subject:
                return _Stored(descriptor.digest, profile, _created(manifest))
            reason = f"profile is for image {profile.image}"
    log.warning("profiles.artifact_refused", digest=descriptor.digest, reason=reason)
    return None


async def _load_many(
    client: RegistryClient, ref: ImageReference, subject: str, descriptors: Sequence[Descriptor]
) -> list[_Stored]:
    gate = asyncio.Semaphore(FETCH_CONCURRENCY)

    async def one(descriptor: Descriptor) -> _Stored | None:
        async with gate:
            return await _load(client, ref, subject, descriptor)

    loaded = await asyncio.gather(*(one(d) for d in descriptors))
    return [s for s in loaded if s is not None]


def _resolve(stored: Iterable[_Stored]) -> tuple[list[_Stored], list[_Stored]]:
    """(accepted, rejected): a set of artifacts that covers each run at most once.

    Largest reach first, so a compaction wins over everything it absorbed; two
    overlapping compactions that absorbed neither each other (concurrent compactors)
    are settled by digest, and the loser's runs still count through whatever else
    holds them.
    """
    accepted: list[_Stored] = []
    rejected: list[_Stored] = []
    claimed: set[str] = set()
    for item in sorted(stored, key=lambda s: (-len(s.reach), s.digest)):
        if item.reach & claimed:
            rejected.append(item)
        else:
            accepted.append(item)
            claimed |= item.reach
    return accepted, rejected


async def _gather(
    client: RegistryClient, ref: ImageReference, subject: str
) -> tuple[list[Descriptor], list[_Stored]]:
    """The listed profile artifacts and the loaded ones; artifacts absorbed by an
    accepted compaction are not downloaded at all."""
    found = await client.referrers(ref, subject, ARTIFACT_TYPE_PROFILE)
    listed = list({d.digest: d for d in found}.values())
    if len(listed) > MAX_REFERRERS:
        log.warning("profiles.too_many_artifacts", subject=subject, count=len(listed))
        listed = listed[:MAX_REFERRERS]
    compacted = [d for d in listed if d.annotations.get(ANNOTATION_PROFILE_KIND) == KIND_COMPACTED]
    stored = await _load_many(client, ref, subject, compacted)
    covered = frozenset().union(*(s.reach for s in _resolve(stored)[0]))
    covered |= {d.digest for d in compacted}
    rest = [d for d in listed if d.digest not in covered]
    stored += await _load_many(client, ref, subject, rest)
    return listed, stored


def _usable(accepted: list[_Stored]) -> list[_Stored]:
    """The accepted profiles that agree with the first on the image's layers (a profile
    that does not is broken or hostile, and cannot be merged)."""
    layers = accepted[0].profile.layers if accepted else ()
    for item in accepted:
        if item.profile.layers != layers:
            log.warning("profiles.artifact_refused", digest=item.digest, reason="layer list")
    return [s for s in accepted if s.profile.layers == layers]


async def fetch_profile(
    client: RegistryClient, accelerated_ref: str | ImageReference, manifest_digest: str
) -> Profile | None:
    """Everything the fleet has learned about ``manifest_digest``, or None if nothing.

    The result is a read view: its ``supersedes`` is empty because it is no artifact.
    """
    _, stored = await _gather(client, _reference(accelerated_ref), manifest_digest)
    usable = _usable(_resolve(stored)[0])
    if not usable:
        return None
    return replace(merge_all(s.profile for s in usable), supersedes=())


def _doomed(
    listed: list[Descriptor], accepted: list[_Stored], rejected: list[_Stored], cutoff: float
) -> list[str]:
    """Artifacts safe to delete: those absorbed by an accepted compaction older than the
    grace period, and losing compactions whose every run such a compaction holds."""

    def settled(item: _Stored) -> bool:
        return item.created is not None and item.created <= cutoff

    safe = frozenset().union(*(s.profile.supersedes for s in accepted if settled(s)))
    keep = {s.digest for s in accepted}
    doomed = {d.digest for d in listed if d.digest in safe and d.digest not in keep}
    doomed |= {
        item.digest
        for item in rejected
        if item.profile.supersedes and safe.issuperset(item.profile.supersedes) and settled(item)
    }
    return sorted(doomed)


async def _unlist(
    client: RegistryClient, ref: ImageReference, subject: str, digests: set[str]
) -> None:
    """Drop deleted artifacts from the tag-schema index, if this registry uses one."""
    tag_ref = ref.with_tag(referrers_tag(subject))
    try:
        fetched = await client.get_manifest(tag_ref, accept=mt.OCI_INDEX)
    except NotFoundError:
        return
    if not isinstance(fetched.parsed, ImageIndex):
        return
    kept = [d.to_json() for d in fetched.parsed.manifests if d.digest not in digests]
    if len(kept) < len(fetched.parsed.manifests):
        index = {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": kept}
        await client.push_manifest(tag_ref, _json(index), mt.OCI_INDEX)


async def _prune(
    client: RegistryClient, ref: ImageReference, subject: str, doomed: list[str]
) -> tuple[str, ...]:
    deleted: list[str] = []
    for digest in doomed:
        try:
            await client.delete_manifest(ref.with_digest(digest))
        except NotFoundError:
            pass
        except RegistryError as exc:
            log.warning("profiles.prune_refused", digest=digest, error=str(exc))
            break  # deletes disabled: superseded artifacts just stay ignored
        deleted.append(digest)
    if deleted:
        await _unlist(client, ref, subject, set(deleted))
    return tuple(deleted)


async def compact(
    client: RegistryClient,
    accelerated_ref: str | ImageReference,
    manifest_digest: str,
    *,
    min_artifacts: int = 2,
    prune_grace: float = 600.0,
    policy: PublishPolicy | None = None,
) -> Compaction:
    """Merge the profile artifacts of ``manifest_digest`` into one; delete what earlier
    compactions absorbed once they are ``prune_grace`` seconds old."""
    ref = _reference(accelerated_ref)
    listed, stored = await _gather(client, ref, manifest_digest)
    accepted, rejected = _resolve(stored)
    deleted = await _prune(
        client, ref, manifest_digest, _doomed(listed, accepted, rejected, time.time() - prune_grace)
    )
    usable = _usable(accepted)
    if len(usable) < min_artifacts:
        return Compaction(None, 0, deleted)
    reach = frozenset().union(*(s.reach for s in usable))
    if len(reach) > MAX_SUPERSEDES:
        raise ProfileSyncError(f"compaction would supersede over {MAX_SUPERSEDES} artifacts")
    merged = replace(merge_all(s.profile for s in usable), supersedes=tuple(sorted(reach)))
    annotations = {
        ANNOTATION_PROFILE_KIND: KIND_COMPACTED,
        ANNOTATION_CREATED: datetime.now(UTC).isoformat(timespec="milliseconds"),
    }
    published = await _push(client, ref, merged, annotations, policy or PublishPolicy())
    return Compaction(published.digest, len(usable), deleted)
