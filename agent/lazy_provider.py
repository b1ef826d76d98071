"""The snapshotter's remote-layer hook: lazy layers mounted in the agent's FUSE tree.

On a Prepare that carries CRI's labels, this finds the layer's accelerated form, puts
its tree under the FUSE mount, and starts fetching in the background: first what the
image says startup needs (prefetch), then the whole layer (background fill), so the
node converges to holding the full image while the container is already running.
"""

from __future__ import annotations

import asyncio
import posixpath
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from agent import metrics
from agent.fs.operations import LayerFS, MountedLayer
from agent.image_sessions import ImageSession, ImageSessions
from agent.layers.discovery import EarlyLayer, LayerDiscovery, NoAccelerationError, TocDecoded
from agent.layers.indexed_layer import IndexedLayer
from agent.layers.layer_audit import AuditStopped, audit_layer
from agent.layers.lazy_layer import LazyLayer, metadata_tag
from agent.layers.metadata_work import off_loop
from agent.profile_prefetch import enqueue_ready, load_plan, node_chunks, warm_files
from agent.startup_recorder import StartupRecorder
from common.logging import get_logger
from fetcher.chunk_cache import ChunkCache
from fetcher.chunks import BlobSource, ChunkSpec, FetcherClosedError, Priority
from fetcher.errors import RegistryError
from fetcher.reference import ImageReference
from fetcher.scheduler import WARM_MAX_BYTES, ChunkFetcher
from formats.estargz_extents import Extent, WantedFile, member_extents
from formats.plan_path import PlanPath, PlanPathError
from formats.toc import TocEntry
from profiles.plan import PrefetchEntry

log = get_logger(__name__)

LABEL_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
LABEL_MANIFEST_DIGEST = "containerd.io/snapshot/cri.manifest-digest"
LABEL_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
PLAN_TTL_S = 120.0
"""How long a profile fetched at a first Prepare waits for a layer of its image to mount."""
T = TypeVar("T")


def layer_name(layer: LazyLayer) -> str:
    """The directory of a layer under the mount root: named after its blob and the
    metadata its tree comes from, so that an image whose layer has other metadata (an
    index made with other settings, or a hostile one) never borrows this tree."""
    tag = metadata_tag(layer.metadata_digest)
    return f"{layer.kind}-{layer.blob.digest.replace(':', '-')}-{tag}"


def prefetch_chunks(mounted: MountedLayer, paths: list[str]) -> list[ChunkSpec]:
    """Chunks of what the converter's prefetch list names in this layer: files, and with
    a trailing `/` whole directories (as the list writes them), by the same rule as a
    learned profile's entries (``node_chunks``)."""
    chunks: dict[str, ChunkSpec] = {}
    for raw in paths:
        try:
            path = PlanPath.parse(raw)
        except PlanPathError:
            continue  # the converter wrote it, but the image's annotation is a claim
        node = mounted.tree.lookup(path.name)
        if node is not None and node.is_dir == path.whole_directory:
            for chunk in node_chunks(mounted.layer, node):
                chunks.setdefault(chunk.key, chunk)
    return list(chunks.values())


class LazyLayerProvider:
    """Implements the snapshotter's RemoteLayers protocol with FUSE + the fetcher."""

    def __init__(
        self,
        discovery: LayerDiscovery,
        fs: LayerFS,
        fetcher: ChunkFetcher,
        cache: ChunkCache,
        mountpoint: Path,
        prefetch: bool = True,
        background_fill: bool = True,
        recorder: StartupRecorder | None = None,
        background_fill_delay_s: float = 10.0,
        discovery_timeout_s: float = 30.0,
    ) -> None:
        self.discovery = discovery
        self.fs = fs
        self.fetcher = fetcher
        self.cache = cache
        self.mountpoint = mountpoint
        self.prefetch = prefetch
        self.background_fill = background_fill
        self.background_fill_delay_s = background_fill_delay_s
        self.discovery_timeout_s = discovery_timeout_s
        self._users: dict[str, int] = {}
        self.sessions = ImageSessions()
        self.recorder = recorder
        self._tasks: set[asyncio.Task[Any]] = set()
        self._plans: dict[str, asyncio.Task[list[PrefetchEntry]]] = {}
        """Learned plans being fetched for images whose first layer is being prepared."""
        self._fills: dict[str, asyncio.TimerHandle] = {}
        """Background fills not yet due, by layer name."""
        self._early: dict[str, dict[str, EarlyLayer]] = {}
        """Manifest digest -> layer digest -> a layer decoded but not mounted yet."""
        fs.listener = self
        discovery.on_early = self._layer_decoded
        discovery.on_toc = self._toc_decoded

    async def prepare_layer(
        self, key: str, parent: str | None, labels: dict[str, str]
    ) -> Path | None:
        """Mount the layer lazily, or return None (and count why) to fall back."""
        image_ref = labels.get(LABEL_IMAGE_REF)
        layer_digest = labels.get(LABEL_LAYER_DIGEST)
        if not image_ref or not layer_digest:
            metrics.FALLBACKS.labels("no-cri-labels").inc()
            metrics.LAYERS.labels("fallback").inc()
            return None
        if self.prefetch:
            self._start_plan_fetch(labels)
        try:
            async with asyncio.timeout(self.discovery_timeout_s):
                found = await self.discovery.discover(
                    image_ref, labels.get(LABEL_MANIFEST_DIGEST), layer_digest
                )
        except TimeoutError:
            log.warning(
                "agent.layer_fallback",
                image=image_ref,
                layer=layer_digest,
                reason="discovery-timeout",
                detail=f"no accelerated form found in {self.discovery_timeout_s:g} s",
            )
            metrics.FALLBACKS.labels("discovery-timeout").inc()
            metrics.LAYERS.labels("fallback").inc()
            return None
        except NoAccelerationError as exc:
            log.info(
                "agent.layer_fallback",
                image=image_ref,
                layer=layer_digest,
                reason=exc.reason,
                detail=str(exc),
            )
            metrics.FALLBACKS.labels(exc.reason).inc()
            metrics.LAYERS.labels("fallback").inc()
            return None
        layer = found.layer
        if self.fs.distrust.reason(layer.metadata_digest) is not None:
            # Caught lying after discovery's shared lookup found it: mounting it again
            # would only give this image EIO where a plain pull gives it its files.
            metrics.FALLBACKS.labels("distrusted-metadata").inc()
            metrics.LAYERS.labels("fallback").inc()
            return None
        name = layer_name(layer)
        self._users[name] = self._users.get(name, 0) + 1
        first_use = self._users[name] == 1
        tree = None if self.fs.layer(name) else await off_loop(self.fs.build_tree, layer)
        mounted = self.fs.add_layer(name, layer, tree)
        self._track_image(labels, layer_digest, mounted)
        if not first_use:
            return self.mountpoint / name  # already mounted for another snapshot
        self.cache.pin(layer.blob.digest)
        if self.prefetch:
            chunks = layer.prefetch_chunks() + prefetch_chunks(mounted, found.prefetch_paths)
            if chunks:
                self.fetcher.enqueue(layer.blob, chunks, Priority.PREFETCH)
        if self.background_fill:
            # Later, not now: a start's first seconds of small demand reads must not queue
            # behind megabytes of fill (bench/startup: with immediate fill every lazy run
            # downloaded the whole image before the app was ready).
            due = self._fills.pop(name, None)
            if due is not None:
                due.cancel()  # from an earlier mount of the layer: this one's replaces it
            self._fills[name] = asyncio.get_running_loop().call_later(
                self.background_fill_delay_s, self._fill, name, layer
            )
        metrics.LAYERS.labels("lazy").inc()
        log.info(
            "agent.layer_lazy",
            image=image_ref,
            layer=layer_digest,
            kind=layer.kind,
            files=len(layer.entries),
            key=key,
        )
        return self.mountpoint / name

    def _fill(self, name: str, layer: LazyLayer) -> None:
        self._fills.pop(name, None)
        if self.fs.layer(name) is None:
            return
        if isinstance(layer, IndexedLayer):
            self._spawn(self._audit(name, layer))
        else:
            self.fetcher.enqueue(layer.blob, layer.all_chunks(), Priority.BACKGROUND)

    async def _audit(self, name: str, layer: IndexedLayer) -> None:
        """Fill an index-only layer by streaming its blob through the audit, which
        checks the index against it (layer_audit); if the stream fails, by its spans."""
        started = time.monotonic()
        stream = self.discovery.client.iter_blob(layer.blob.ref, layer.blob.digest)
        try:
            verdict, downloaded = await audit_layer(
                layer, stream, self.cache, lambda: self.fs.layer(name) is not None
            )
        except AuditStopped:
            return
        except (RegistryError, OSError) as exc:
            log.warning("agent.layer_audit_incomplete", layer=name, error=str(exc))
            if self.fs.layer(name) is not None:
                self.fetcher.enqueue(layer.blob, layer.all_chunks(), Priority.BACKGROUND)
            return
        self.fetcher.stats.record_request(
            Priority.BACKGROUND, downloaded, time.monotonic() - started
        )
        if verdict is None:
            log.info("agent.layer_audited", layer=name, rows=len(layer.entries))
        else:
            self.fs.distrust.mark(layer.metadata_digest, layer.kind, name, verdict)

    def _track_image(
        self, labels: dict[str, str], layer_digest: str, mounted: MountedLayer
    ) -> None:
        """Add the layer to its image's session; the first layer of an image starts
        fetching its learned profile, later ones release plan entries they hold."""
        manifest_digest = labels.get(LABEL_MANIFEST_DIGEST)
        if not manifest_digest:
            return
        order = self.discovery.layer_order(manifest_digest)
        reference = ImageReference.parse(labels[LABEL_IMAGE_REF]).with_digest(manifest_digest)
        session, created = self.sessions.layer_ready(
            reference, manifest_digest, order, layer_digest, mounted
        )
        early = self._early.get(manifest_digest, {}).get(layer_digest)
        if early is not None:
            self._forget_early(manifest_digest, layer_digest, early)  # the tree decides now
        if created and self.prefetch:
            plan = self._plan_fetch(reference, manifest_digest)
            del self._plans[manifest_digest]  # collected: the session holds the plan now
            self._spawn(self._prefetch_profile(session, plan))
        elif self.prefetch:
            self._enqueue_plan(session)

    def _layer_decoded(self, manifest_digest: str, layer_digest: str, early: EarlyLayer) -> None:
        """Discovery hook: a layer of the image is decoded; prefetch the plan's files
        found in it now, not once it is checked and mounted."""
        if not self.prefetch:
            return
        self._early.setdefault(manifest_digest, {})[layer_digest] = early
        # A pull that was given up on never mounts it.
        asyncio.get_running_loop().call_later(
            PLAN_TTL_S, self._forget_early, manifest_digest, layer_digest, early
        )
        session = self.sessions.by_manifest.get(manifest_digest)
        if session is not None:
            self._enqueue_plan(session)

    def _toc_decoded(
        self, manifest_digest: str, layer_digest: str, blob: BlobSource
    ) -> TocDecoded | None:
        """Discovery hook, before an eStargz TOC is parsed: once its records are decoded,
        download the members holding the plan's files in this layer, while the TOC is
        validated and the tree built (nothing to do for a layer this node has cached)."""
        if not self.prefetch or self.cache.holds(blob.digest):
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
        """The files of the image's plan (if it has arrived) to warm in this layer."""
        session = self.sessions.by_manifest.get(manifest_digest)
        plan = session.plan if session is not None else None
        task = self._plans.get(manifest_digest)
        if not plan and task is not None and task.done() and not task.cancelled():
            plan = task.result() if task.exception() is None else None
        return warm_files(plan or [], layer_digest)

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

    def _start_plan_fetch(self, labels: dict[str, str]) -> None:
        """At an image's first Prepare, fetch its learned profile alongside the layer
        lookup: waiting for the first mount cost python-fat-api ~0.7 s of prefetch."""
        manifest_digest = labels.get(LABEL_MANIFEST_DIGEST)
        if not manifest_digest or manifest_digest in self.sessions.by_manifest:
            return
        try:
            reference = ImageReference.parse(labels[LABEL_IMAGE_REF]).with_digest(manifest_digest)
        except ValueError:
            return  # discovery reports the bad label
        self._plan_fetch(reference, manifest_digest)

    def _plan_fetch(
        self, reference: ImageReference, manifest_digest: str
    ) -> asyncio.Task[list[PrefetchEntry]]:
        """The image's plan fetch: the one under way, else a new one."""
        task = self._plans.get(manifest_digest)
        if task is None:
            task = self._spawn(load_plan(self.discovery.client, reference, manifest_digest))
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
        self, session: ImageSession, plan: asyncio.Task[list[PrefetchEntry]]
    ) -> None:
        session.plan = await plan
        self._enqueue_plan(session)

    def _enqueue_plan(self, session: ImageSession) -> None:
        """Hand the fetcher the plan entries of the session's mounted or decoded layers
        (timed: it runs on the event loop while containerd waits for the next layer)."""
        started = time.perf_counter()
        queued = enqueue_ready(self.fetcher, session, self._early.get(session.manifest_digest, {}))
        if queued:
            log.info(
                "agent.profile_prefetch",
                image=str(session.reference),
                chunks=queued,
                seconds=round(time.perf_counter() - started, 4),
            )

    def opened(self, mounted: MountedLayer, entry: TocEntry, pid: int) -> None:
        """FUSE listener: a container process opened a file (may start a recording)."""
        if self.recorder is not None:
            self.recorder.on_open(self.sessions.using(mounted.name), pid)

    def read(self, mounted: MountedLayer, entry: TocEntry, offset: int, size: int) -> None:
        """FUSE listener: a read reached FUSE (the FUSE side of a startup trace)."""
        if self.recorder is not None:
            self.recorder.on_demand(
                self.sessions.using(mounted.name), mounted.name, entry.name, offset, size
            )

    async def close(self) -> None:
        """Stop background work (profile fetches, fills not yet due, recordings in flight)."""
        for handle in self._fills.values():
            handle.cancel()  # the fetcher closes next: a fill due later would find it closed
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.recorder is not None:
            await self.recorder.close()

    async def restore_layer(self, labels: dict[str, str]) -> Path | None:
        """After a restart: mount a committed remote snapshot's layer again."""
        return await self.prepare_layer("restore", None, labels)

    async def release_layer(self, labels: dict[str, str], path: Path) -> None:
        """The snapshot is gone: once no snapshot uses the layer, unmount it and let the
        cache evict its chunks (one layer can back snapshots of several chains)."""
        name = posixpath.basename(str(path))
        remaining = self._users.get(name, 0) - 1
        if remaining > 0:
            self._users[name] = remaining
            return
        self._users.pop(name, None)
        mounted = self.fs.layer(name)
        if mounted is not None:
            self.cache.unpin(mounted.layer.blob.digest)
            self.fs.remove_layer(name)

    def layer_usage(self, path: Path) -> tuple[int, int]:
        """(bytes, inodes) a lazy layer occupies: its file sizes, as a full unpack would."""
        mounted = self.fs.layer(posixpath.basename(str(path)))
        if mounted is None:
            return 0, 0
        nodes = mounted.tree.nodes.values()
        return sum(n.entry.size for n in nodes), len(mounted.tree.nodes)
