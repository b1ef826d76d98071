"""The snapshotter's remote-layer hook: lazy layers mounted in the agent's FUSE tree.

On a Prepare that carries CRI's labels, this finds the layer's accelerated form, puts
its tree under the FUSE mount, and starts fetching in the background: first what the
start needs (the prefetch planner's business), then the whole layer (background fill),
so the node converges to holding the full image while the container is already running.
"""

from __future__ import annotations

import asyncio
import contextlib
import posixpath
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from agent import metrics
from agent.fs.operations import LayerFS
from agent.layers.discovery import LayerDiscovery, NoAccelerationError
from agent.layers.indexed_layer import IndexedLayer
from agent.layers.layer_audit import AuditStopped, audit_layer
from agent.layers.lazy_layer import LazyLayer, metadata_tag
from agent.layers.metadata_work import off_loop
from agent.prefetch_planner import PrefetchPlanner
from common.logging import get_logger
from fetcher.chunk_cache import ChunkCache
from fetcher.chunks import Priority
from fetcher.errors import RegistryError
from fetcher.reference import ImageReference
from fetcher.scheduler import ChunkFetcher

log = get_logger(__name__)

LABEL_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
LABEL_MANIFEST_DIGEST = "containerd.io/snapshot/cri.manifest-digest"
LABEL_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
T = TypeVar("T")


def layer_name(layer: LazyLayer) -> str:
    """The directory of a layer under the mount root: named after its blob and the
    metadata its tree comes from, so that an image whose layer has other metadata (an
    index made with other settings, or a hostile one) never borrows this tree."""
    tag = metadata_tag(layer.metadata_digest)
    return f"{layer.kind}-{layer.blob.digest.replace(':', '-')}-{tag}"


class LazyLayerProvider:
    """Implements the snapshotter's RemoteLayers protocol with FUSE + the fetcher."""

    def __init__(
        self,
        discovery: LayerDiscovery,
        fs: LayerFS,
        fetcher: ChunkFetcher,
        cache: ChunkCache,
        planner: PrefetchPlanner,
        mountpoint: Path,
        background_fill: bool = True,
        background_fill_delay_s: float = 10.0,
        discovery_timeout_s: float = 30.0,
    ) -> None:
        """``planner`` decides what to fetch ahead of each start (its hooks are
        discovery's, wired by the daemon)."""
        self.discovery = discovery
        self.fs = fs
        self.fetcher = fetcher
        self.cache = cache
        self.planner = planner
        self.mountpoint = mountpoint
        self.background_fill = background_fill
        self.background_fill_delay_s = background_fill_delay_s
        self.discovery_timeout_s = discovery_timeout_s
        self._users: dict[str, int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._fills: dict[str, asyncio.TimerHandle] = {}
        """Background fills not yet due, by layer name."""

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
        image = self._image(labels)
        if image is None:
            return await self._serve(key, image_ref, layer_digest, labels, None)
        self.planner.image_preparing(image[0], image[1])
        path = await self._serve(key, image_ref, layer_digest, labels, image)
        if path is None:
            self.planner.layer_fell_back(image[1], layer_digest)
        return path

    async def _serve(
        self,
        key: str,
        image_ref: str,
        layer_digest: str,
        labels: dict[str, str],
        image: tuple[ImageReference, str] | None,
    ) -> Path | None:
        """Find the layer's accelerated form and mount it, or None to fall back."""
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
        tree = None if self.fs.layer(name) else await off_loop(self.fs.build_tree, name, layer)
        mounted = self.fs.add_layer(name, layer, tree)
        if first_use:
            self.cache.pin(layer.blob.digest)
        order = None if image is None else (*image, self.discovery.layer_order(image[1]))
        self.planner.layer_mounted(mounted, found.prefetch_paths, order, layer_digest)
        if not first_use:
            return self.mountpoint / name  # already mounted for another snapshot
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
        checks the index against it (layer_audit); if the stream fails, by its spans.
        The stream yields the link to starts (``ChunkFetcher.background_stream``)."""
        try:
            async with contextlib.aclosing(self.fetcher.background_stream(layer.blob)) as stream:
                verdict, _ = await audit_layer(
                    layer, stream, self.cache, lambda: self.fs.layer(name) is not None
                )
        except AuditStopped:
            return
        except (RegistryError, OSError) as exc:
            log.warning("agent.layer_audit_incomplete", layer=name, error=str(exc))
            if self.fs.layer(name) is not None:
                self.fetcher.enqueue(layer.blob, layer.all_chunks(), Priority.BACKGROUND)
            return
        if verdict is None:
            log.info("agent.layer_audited", layer=name, rows=len(layer.entries))
        else:
            self.fs.distrust.mark(layer.metadata_digest, layer.kind, name, verdict)

    @staticmethod
    def _image(labels: dict[str, str]) -> tuple[ImageReference, str] | None:
        """The image a Prepare is for, pinned to its manifest, when CRI named both."""
        manifest_digest = labels.get(LABEL_MANIFEST_DIGEST)
        if not manifest_digest:
            return None
        try:
            reference = ImageReference.parse(labels[LABEL_IMAGE_REF])
        except ValueError:
            return None  # discovery reports the bad label
        return reference.with_digest(manifest_digest), manifest_digest

    def _spawn(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """A background task that close() cancels."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        """Stop background work (fills not yet due, audits, plans in flight)."""
        for handle in self._fills.values():
            handle.cancel()  # the fetcher closes next: a fill due later would find it closed
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.planner.close()

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
