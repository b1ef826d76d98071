"""What to fetch ahead of a start, for each image served here, and when.

Two settings over the plan's sources (`agent.image_sessions.PlanSource`): ``prefetch``
covers what the image itself says startup needs (an eStargz layer's landmark area, the
converter's prefetch list), ``profiles`` what the fleet learned (the image's profile,
fetched from the registry at its first Prepare; without one, a predecessor's, mapped
into the image's layers: `profiles.inherit`). The planner keeps each image's session,
hears discovery's hooks (a layer decoded, a TOC about to be parsed) and the provider's
(a layer mounted), and hands plan entries to the fetcher as soon as the one resolver
(`agent.plan_resolver`) can place them in the image's layers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from agent import metrics
from agent.fs.operations import MountedLayer
from agent.image_sessions import ImageSession, ImageSessions, PlanSource
from agent.layers.discovery import EarlyLayer, TocDecoded
from agent.plan_resolver import resolve_ready, warm_files
from common.logging import get_logger
from fetcher.chunk_cache import ChunkCache
from fetcher.chunks import BlobSource, FetcherClosedError, Priority
from fetcher.errors import RegistryError
from fetcher.manifest import ImageManifest
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from fetcher.scheduler import ChunkFetcher
from fetcher.warming import WARM_MAX_BYTES
from formats.estargz_extents import Extent, WantedFile, member_extents
from profiles.format import ProfileFormatError
from profiles.plan import PrefetchEntry, prefetch_plan
from profiles.predecessors import Inheritance, ProfileInheritance
from profiles.provenance import conversion_runs
from profiles.registry_sync import fetch_profile

log = get_logger(__name__)

PLAN_TTL_S = 120.0
"""How long a profile fetched at a first Prepare waits for a layer of its image to mount."""
T = TypeVar("T")


@dataclass(frozen=True)
class LoadedPlan:
    """An image's learned plan and where it came from: ``LEARNED`` (its own profile) or
    ``INHERITED`` (a predecessor's, `profiles.inherit`)."""

    source: PlanSource
    entries: list[PrefetchEntry]


NO_PLAN = LoadedPlan(PlanSource.LEARNED, [])


async def load_plan(
    client: RegistryClient,
    reference: ImageReference,
    manifest_digest: str,
    inheritance: ProfileInheritance | None = None,
) -> LoadedPlan:
    """The image's learned prefetch plan: its own profile's, else (with ``inheritance``)
    a predecessor's; empty when there is none or it cannot be had (prefetching is an
    optimisation, never a reason to fail a pull)."""
    try:
        profile = await fetch_profile(client, reference, manifest_digest)
    except (RegistryError, ProfileFormatError, ValueError) as exc:
        log.warning("profile.fetch_failed", image=str(reference), error=str(exc))
        return NO_PLAN
    if profile is not None:
        plan = prefetch_plan(profile)
        if inheritance is not None:
            inheritance.remember(reference, profile)
        metrics.PROFILE_PLANS.labels("own").inc()
        log.info(
            "profile.loaded",
            image=str(reference),
            origin="own",
            entries=len(plan),
            runs=profile.runs.count,
            conversion_runs=conversion_runs(profile),
        )
        return LoadedPlan(PlanSource.LEARNED, plan)
    found = await _inherited(client, reference, manifest_digest, inheritance)
    if found is None:
        metrics.PROFILE_PLANS.labels("none").inc()
        log.info("profile.loaded", image=str(reference), origin="none", entries=0, runs=0)
        return NO_PLAN
    inherited = found.plan
    metrics.PROFILE_PLANS.labels("inherited").inc()
    log.info(
        "profile.loaded",
        image=str(reference),
        origin="inherited",
        inherited_from=inherited.source,
        inherited_image=str(found.reference),
        entries=len(inherited.entries),
        exact=inherited.exact,
        by_path=inherited.by_path,
        dropped=inherited.dropped,
        cut=inherited.cut,
        shared_layers=inherited.shared_layers,
        planned_bytes=inherited.planned_bytes,
    )
    return LoadedPlan(PlanSource.INHERITED, list(inherited.entries))


async def _inherited(
    client: RegistryClient,
    reference: ImageReference,
    manifest_digest: str,
    inheritance: ProfileInheritance | None,
) -> Inheritance | None:
    """A predecessor's plan for an image without a profile, or None (never an error)."""
    if inheritance is None:
        return None
    try:
        # The listing is what takes round trips; it goes while the manifest is read.
        fetched, _ = await asyncio.gather(
            client.get_manifest(reference.with_digest(manifest_digest)),
            inheritance.repository_candidates(reference),
        )
        if not isinstance(fetched.parsed, ImageManifest):
            return None
        return await inheritance.find(reference, manifest_digest, fetched.parsed)
    except (RegistryError, ProfileFormatError, ValueError) as exc:
        log.warning("profile.inherit_failed", image=str(reference), error=str(exc))
        return None


class PrefetchPlanner:
    """Plans per image: the image's own hints and its learned profile, by setting."""

    def __init__(
        self,
        client: RegistryClient,
        fetcher: ChunkFetcher,
        cache: ChunkCache,
        sessions: ImageSessions,
        prefetch: bool = True,
        profiles: bool = True,
        inheritance: ProfileInheritance | None = None,
    ) -> None:
        self.client = client
        self.fetcher = fetcher
        self.cache = cache
        self.sessions = sessions
        self.prefetch = prefetch
        self.profiles = profiles
        self.inheritance = inheritance
        """Finds a predecessor's profile for images without one (None: never)."""
        self._tasks: set[asyncio.Task[Any]] = set()
        self._plans: dict[str, asyncio.Task[LoadedPlan]] = {}
        """Learned plans being fetched for images whose first layer is being prepared."""
        self._early: dict[str, dict[str, EarlyLayer]] = {}
        """Manifest digest -> layer digest -> a layer decoded but not mounted yet."""

    def image_preparing(self, reference: ImageReference, manifest_digest: str) -> None:
        """At an image's first Prepare, fetch its learned profile alongside the layer
        lookup, not after the first mount: the profile is then at hand when the first
        layer's tree is."""
        if self.profiles and manifest_digest not in self.sessions.by_manifest:
            self._plan_fetch(reference, manifest_digest)

    def layer_mounted(
        self,
        mounted: MountedLayer,
        hinted_paths: list[str],
        image: tuple[ImageReference, str, list[str]] | None,
        layer_digest: str,
    ) -> None:
        """A layer is mounted: add it to its image's session (``image``: reference,
        manifest digest and layer order, when containerd named the image) with what the
        image says its start needs (its landmark area, the converter's list:
        ``hinted_paths``), and hand the fetcher every plan entry that can now be placed."""
        if image is None:
            # Without the manifest there is no merged view to place a path in.
            log.info("agent.prefetch_skipped", layer=layer_digest, reason="no-image-labels")
            return
        reference, manifest_digest, order = image
        session, created = self.sessions.layer_ready(
            reference, manifest_digest, order, layer_digest, mounted
        )
        session.prepared = session.prepared or order[-1:] == [layer_digest]
        early = self._early.get(manifest_digest, {}).get(layer_digest)
        if early is not None:
            self._forget_early(manifest_digest, layer_digest, early)  # the tree decides now
        if self.prefetch:
            landmarks = mounted.layer.landmark_files()
            session.add_plan(
                PlanSource.LANDMARK, [PrefetchEntry(layer_digest, p, None) for p in landmarks]
            )
            session.add_plan(
                PlanSource.LISTED, [PrefetchEntry(None, p, None) for p in hinted_paths]
            )
        if created and self.profiles:
            plan = self._plan_fetch(reference, manifest_digest)
            del self._plans[manifest_digest]  # collected: the session holds the plan now
            self._spawn(self._prefetch_profile(session, plan))
        self._enqueue_plan(session)

    def layer_fell_back(self, manifest_digest: str, layer_digest: str) -> None:
        """A layer of the image is left to containerd: if it is the top one, the image's
        merged view here is final, and the entries that waited for it can be placed."""
        session = self.sessions.by_manifest.get(manifest_digest)
        if session is not None and session.layer_order[-1:] == [layer_digest]:
            session.prepared = True
            self._enqueue_plan(session)

    def layer_decoded(self, manifest_digest: str, layer_digest: str, early: EarlyLayer) -> None:
        """Discovery hook: a layer of the image is decoded; prefetch the plan's files
        found in it now, not once it is checked and mounted."""
        if not self.profiles:
            return
        self._early.setdefault(manifest_digest, {})[layer_digest] = early
        # A pull that was given up on never mounts it.
        asyncio.get_running_loop().call_later(
            PLAN_TTL_S, self._forget_early, manifest_digest, layer_digest, early
        )
        session = self.sessions.by_manifest.get(manifest_digest)
        if session is not None:
            self._enqueue_plan(session)

    def toc_decoded(
        self, manifest_digest: str, layer_digest: str, blob: BlobSource
    ) -> TocDecoded | None:
        """Discovery hook, before an eStargz TOC is parsed: once its records are decoded,
        download the members holding the plan's files in this layer, while the TOC is
        validated and the tree built (nothing to do for a layer this node has cached)."""
        if not (self.profiles or self.prefetch) or self.cache.holds(blob.digest):
            return None
        loop = asyncio.get_running_loop()

        def decoded(toc_offset: int, records: list[Any]) -> None:
            # On the metadata thread, inside the TOC's parse. The plan is only read here;
            # if it has not arrived yet (a small TOC decodes fast), nothing is warmed and
            # the mounted tree's prefetch asks for the members as before.
            try:
                wanted = self._wanted_files(manifest_digest, layer_digest)
                extents = member_extents(records, toc_offset, wanted, WARM_MAX_BYTES)
            except Exception:
                # A hint must never fail the parse: validation judges the TOC.
                log.exception("agent.profile_warm_failed", layer=blob.digest)
                return
            if extents:
                loop.call_soon_threadsafe(self._warm, blob, extents)

        return decoded

    def _wanted_files(self, manifest_digest: str, layer_digest: str) -> list[WantedFile]:
        """The files of the image's plan known so far (the learned one if it has
        arrived) to warm in this layer."""
        session = self.sessions.by_manifest.get(manifest_digest)
        plan = [entry for _, entry in session.plan_entries()] if session is not None else []
        task = self._plans.get(manifest_digest)
        if task is not None and task.done() and not task.cancelled() and not task.exception():
            plan += task.result().entries  # not in the session yet
        return warm_files(plan, layer_digest)

    def _warm(self, blob: BlobSource, extents: list[Extent]) -> None:
        try:
            self.fetcher.warm(blob, extents)
        except FetcherClosedError:
            return
        log.info(
            "agent.profile_warm",
            layer=blob.digest,
            members=len(extents),
            bytes=sum(end - start for start, end in extents),
        )

    def _forget_early(self, manifest_digest: str, layer_digest: str, early: EarlyLayer) -> None:
        layers = self._early.get(manifest_digest, {})
        if layers.get(layer_digest) is early:
            del layers[layer_digest]
            if not layers:
                del self._early[manifest_digest]

    def _plan_fetch(
        self, reference: ImageReference, manifest_digest: str
    ) -> asyncio.Task[LoadedPlan]:
        """The image's plan fetch: the one under way, else a new one."""
        task = self._plans.get(manifest_digest)
        if task is None:
            task = self._spawn(load_plan(self.client, reference, manifest_digest, self.inheritance))
            self._plans[manifest_digest] = task
            # A pull whose layers all fall back never collects it.
            asyncio.get_running_loop().call_later(
                PLAN_TTL_S, self._plans.pop, manifest_digest, None
            )
        return task

    def _spawn(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """A background task that close() cancels."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _prefetch_profile(
        self, session: ImageSession, plan: asyncio.Task[LoadedPlan]
    ) -> None:
        loaded = await plan
        session.add_plan(loaded.source, loaded.entries)
        self._enqueue_plan(session)

    def _enqueue_plan(self, session: ImageSession) -> None:
        """Hand the fetcher the plan entries of the session's mounted or decoded layers
        (timed: it runs on the event loop while containerd waits for the next layer)."""
        started = time.perf_counter()
        queued = dict.fromkeys(PlanSource, 0)
        early = self._early.get(session.manifest_digest, {})
        for source, blob, chunks in resolve_ready(session, early):
            self.fetcher.enqueue(blob, chunks, Priority.PREFETCH)
            queued[source] += len(chunks)
            metrics.PREFETCH_CHUNKS.labels(source.name.lower()).inc(len(chunks))
        if any(queued.values()):
            log.info(
                "agent.prefetch_planned",
                image=str(session.reference),
                seconds=round(time.perf_counter() - started, 4),
                **{f"{source.name.lower()}_chunks": n for source, n in queued.items() if n},
            )

    async def close(self) -> None:
        """Stop profile fetches and plans in flight."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.inheritance is not None:
            await self.inheritance.close()
