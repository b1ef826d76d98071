"""Find a lazily servable form of a layer, given what containerd tells us about it.

containerd's Prepare labels name the image (as the user wrote it), its manifest digest
and the layer digest. In order of preference we serve the layer from:
1. the layer itself, when it is eStargz (a full-mode image, or one made by other tools:
   recognised by the TOC-digest annotation, or failing that by the eStargz footer);
2. the full-mode twin published as `<tag>_accelerated` from this very manifest, whose
   layer at the same position holds the same files as eStargz (per-file chunks are
   cheaper to serve than inflating checkpoint spans);
3. an index-only artifact that refers to the image's manifest (referrers API or the
   tag-schema fallback).
Anything else is a NoAccelerationError whose ``reason`` feeds the fallback metric.

containerd prepares an image's layers one after another, each waiting for the one
below. So when the first layer of a manifest is asked for, the layers above it are
looked up at once, in the background: their indexes download (and parse) while the
lower layers are mounted and committed, not after, and the lookups every layer shares
(twin manifest, referrers) are made once per manifest.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, TypeVar

from agent.layers.distrust import DistrustedMetadata
from agent.layers.estargz_layer import EstargzLayer
from agent.layers.indexed_layer import IndexedLayer
from agent.layers.metadata_work import off_loop
from common.gc_pause import gc_paused
from common.logging import get_logger
from fetcher import mediatypes as mt
from fetcher.chunks import BlobSource
from fetcher.errors import NotFoundError, RegistryError, RegistryNotAllowedError
from fetcher.manifest import Descriptor, ImageIndex, ImageManifest, Platform
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from formats import layer_index, layer_index_codec
from formats.accelerated import (
    ANNOTATION_LAYER_DIGEST,
    ANNOTATION_PREFETCH,
    ANNOTATION_SOURCE_DIGEST,
    ARTIFACT_TYPE_INDEX,
    MEDIA_TYPE_LAYER_INDEX,
    accelerated_tag,
    conversion_format,
    is_accelerated_tag,
)
from formats.estargz_reader import parse_toc
from formats.estargz_toc import FOOTER_SIZE, TOC_DIGEST_ANNOTATION, EstargzFormatError, parse_footer

log = get_logger(__name__)
MAX_INDEX_BLOB = 256 << 20
MAX_TOC_MEMBER = 64 << 20
AHEAD_TTL_S = 120.0
"""How long a layer looked up ahead waits for its Prepare (a pull that was given up on
must not pin parsed indexes)."""
LOOKUP_TTL_S = 30.0
"""How long a per-manifest lookup is shared: one pull's worth, so an image converted
meanwhile is found on the next pull."""
T = TypeVar("T")
MetadataFirst = Callable[[], AbstractContextManager[None]]


class NoAccelerationError(Exception):
    """This layer cannot be served lazily; ``reason`` is a short metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass
class DiscoveredLayer:
    """A lazily servable layer plus what the image's publisher said startup needs."""

    layer: EstargzLayer | IndexedLayer
    prefetch_paths: list[str]


async def open_estargz(
    client: RegistryClient,
    blob: BlobSource,
    toc_digest: str | None,
    metadata_first: MetadataFirst = contextlib.nullcontext,
    on_decoded: TocDecoded | None = None,
) -> EstargzLayer:
    """Read footer and TOC (two small range reads) and build the layer reader;
    ``on_decoded`` is shown the TOC's records before they are validated (on the
    metadata thread)."""
    if blob.size < FOOTER_SIZE:
        raise EstargzFormatError("blob too small to be eStargz")
    tail = await client.get_range(blob.ref, blob.digest, blob.size - FOOTER_SIZE, FOOTER_SIZE)
    toc_offset = parse_footer(tail, blob.size)
    toc_length = blob.size - FOOTER_SIZE - toc_offset
    if toc_length <= 0 or toc_length > MAX_TOC_MEMBER:
        raise EstargzFormatError(f"implausible TOC length {toc_length}")
    return await _load_metadata(
        "discovery.toc_loaded",
        blob,
        metadata_first,
        lambda: client.get_range(blob.ref, blob.digest, toc_offset, toc_length),
        functools.partial(
            _estargz_layer,
            blob,
            toc_offset=toc_offset,
            toc_digest=toc_digest,
            on_decoded=on_decoded and functools.partial(on_decoded, toc_offset),
        ),
        lambda layer: len(layer.entries),
    )


async def _load_metadata(
    event: str,
    blob: BlobSource,
    metadata_first: MetadataFirst,
    download: Callable[[], Awaitable[bytes]],
    build: Callable[[bytes], T],
    files: Callable[[T], int],
) -> T:
    """Download a layer's index or TOC and parse it on a metadata thread, holding
    prefetch back meanwhile; logs how long each half took and how many files it lists."""
    started = time.perf_counter()
    with metadata_first():
        raw = await download()
        fetched = time.perf_counter()
        built = await off_loop(build, raw)
    log.info(
        event,
        layer=blob.digest,
        bytes=len(raw),
        files=files(built),
        download_s=round(fetched - started, 3),
        parse_s=round(time.perf_counter() - fetched, 3),
    )
    return built


def _estargz_layer(
    blob: BlobSource,
    member: bytes,
    toc_offset: int,
    toc_digest: str | None,
    on_decoded: Callable[[list[Any]], None] | None,
) -> EstargzLayer:
    """Parse the TOC and build the layer, on a worker thread: a big layer's TOC takes
    long to parse, and on the event loop it would hold up the FUSE requests and
    containerd's calls for the other layers of the pull."""
    with gc_paused():
        return EstargzLayer(blob, parse_toc(member, toc_offset, toc_digest, on_decoded))


@dataclass(frozen=True)
class EarlyLayer:
    """An index-only layer whose spans are checked and whose file table is decoded but
    not yet checked: a learned profile's files can be found in it and their spans
    fetched while the table is checked and the tree built, which for a big layer takes
    long enough to matter to the start."""

    layer: IndexedLayer
    """The layer itself: its spans serve now, its entries once the table is checked."""
    files: layer_index_codec.DecodedIndex


EarlyHook = Callable[[str, str, EarlyLayer], None]
"""Told (manifest digest, layer digest, early layer) as soon as an index is decoded."""
TocDecoded = Callable[[int, list[Any]], None]
"""Shown (TOC offset, TOC records not yet validated) on the metadata thread."""
TocHook = Callable[[str, str, BlobSource], TocDecoded | None]
"""Asked (manifest digest, layer digest, blob) before a TOC is parsed: what, if
anything, to show its decoded records to."""


def _early_layer(blob: BlobSource, raw: bytes) -> EarlyLayer:
    """Check the index's header and spans and decode its file table, on a worker thread
    (as ``_estargz_layer``)."""
    with gc_paused():
        decoded = layer_index_codec.parse_spans(raw)
    index = decoded.index
    if index.layer_digest != blob.digest or index.compressed_size != blob.size:
        raise layer_index.IndexFormatError("index describes another layer")
    return EarlyLayer(IndexedLayer(blob, index, decoded), decoded)


def _indexed_layer(early: EarlyLayer) -> IndexedLayer:
    """Check the decoded file table, on a worker thread: the early layer then has its
    entries (one layer object, so chunks fetched early and read later are one spec)."""
    with gc_paused():
        early.files.checked()
    return early.layer


def _prefetch_from(annotations: dict[str, str]) -> list[str]:
    raw = annotations.get(ANNOTATION_PREFETCH)
    if not raw:
        return []
    try:
        paths = json.loads(raw)
    except ValueError:
        return []
    return [p for p in paths if isinstance(p, str)] if isinstance(paths, list) else []


class LayerDiscovery:
    """Looks up accelerated forms in the registry (cached per manifest)."""

    def __init__(
        self,
        client: RegistryClient,
        use_referrers: bool = True,
        metadata_first: MetadataFirst = contextlib.nullcontext,
        distrust: DistrustedMetadata | None = None,
        on_early: EarlyHook | None = None,
        on_toc: TocHook | None = None,
    ) -> None:
        """``on_early``: shown each index-only layer once decoded, before its check;
        ``on_toc``: asked, before an eStargz TOC is parsed, for a callback that sees its
        decoded records (both for prefetch: `agent.prefetch_planner`)."""
        self.client = client
        self.use_referrers = use_referrers
        self.distrust = distrust if distrust is not None else DistrustedMetadata()
        """Index artifacts caught lying: never loaded again."""
        self.metadata_first = metadata_first
        """Held around each index or TOC download and parse (the fetcher then lets it go
        first); an index's is let go once it is decoded, for its early prefetch."""
        self.on_early = on_early
        self.on_toc = on_toc
        self._manifests: dict[str, ImageManifest] = {}
        self._ahead: dict[tuple[str, str, str], asyncio.Task[DiscoveredLayer]] = {}
        self._lookups: dict[tuple[str, ...], asyncio.Task[Any]] = {}

    async def _manifest(self, ref: ImageReference, digest: str | None) -> tuple[str, ImageManifest]:
        if digest and digest in self._manifests:
            return digest, self._manifests[digest]
        if digest:
            fetched = await self.client.get_manifest(ref.with_digest(digest))
            if not isinstance(fetched.parsed, ImageManifest):
                raise NoAccelerationError("bad-manifest", f"{digest} is not an image manifest")
            self._manifests[digest] = fetched.parsed
            return digest, fetched.parsed
        resolved = await self.client.resolve(ref)
        self._manifests[resolved.manifest_digest] = resolved.manifest
        return resolved.manifest_digest, resolved.manifest

    def layer_order(self, manifest_digest: str) -> list[str]:
        """The layer digests (bottom to top) of a manifest seen by `discover`."""
        manifest = self._manifests.get(manifest_digest)
        return [d.digest for d in manifest.layers] if manifest else []

    async def discover(
        self, image_ref: str, manifest_digest: str | None, layer_digest: str
    ) -> DiscoveredLayer:
        """The best lazy form of ``layer_digest`` of ``image_ref``; NoAccelerationError if none."""
        ahead = self._ahead.pop((image_ref, manifest_digest or "", layer_digest), None)
        if ahead is not None:
            return await ahead
        return await self._discover(image_ref, manifest_digest, layer_digest, look_ahead=True)

    def _look_ahead(self, image_ref: str, manifest_digest: str, layers: list[str]) -> None:
        """Start discovering ``layers`` now; their Prepares will find the result waiting."""
        loop = asyncio.get_running_loop()
        for layer_digest in layers:
            key = (image_ref, manifest_digest, layer_digest)
            if key in self._ahead:
                continue
            task = loop.create_task(self._discover(image_ref, manifest_digest, layer_digest))
            task.add_done_callback(_mark_retrieved)
            self._ahead[key] = task
            loop.call_later(AHEAD_TTL_S, self._forget_ahead, key, task)

    def _forget_ahead(self, key: tuple[str, str, str], task: asyncio.Task[DiscoveredLayer]) -> None:
        if self._ahead.get(key) is task:
            del self._ahead[key]
            task.cancel()

    async def _shared(self, key: tuple[str, ...], make: Callable[[], Awaitable[T]]) -> T:
        """One lookup for every layer that needs it; failures are not kept (a registry
        hiccup must not make later layers fall back), results for LOOKUP_TTL_S."""
        task = self._lookups.get(key)
        if task is None:
            task = asyncio.ensure_future(make())
            self._lookups[key] = task
            task.add_done_callback(lambda done: self._settle_lookup(key, done))
        result: T = await asyncio.shield(task)
        return result

    def _settle_lookup(self, key: tuple[str, ...], task: asyncio.Task[Any]) -> None:
        if task.cancelled() or task.exception() is not None:
            self._lookups.pop(key, None)
            return
        asyncio.get_running_loop().call_later(LOOKUP_TTL_S, self._expire_lookup, key, task)

    def _expire_lookup(self, key: tuple[str, ...], task: asyncio.Task[Any]) -> None:
        if self._lookups.get(key) is task:
            del self._lookups[key]

    async def _discover(
        self,
        image_ref: str,
        manifest_digest: str | None,
        layer_digest: str,
        look_ahead: bool = False,
    ) -> DiscoveredLayer:
        try:
            ref = ImageReference.parse(image_ref)
        except ValueError as exc:
            raise NoAccelerationError("bad-reference", str(exc)) from None
        try:
            digest, manifest = await self._manifest(ref, manifest_digest)
            position = next(
                (i for i, d in enumerate(manifest.layers) if d.digest == layer_digest), None
            )
            if position is None:
                raise NoAccelerationError("layer-not-in-manifest", layer_digest)
            if look_ahead and manifest_digest:
                above = [d.digest for d in manifest.layers[position + 1 :]]
                self._look_ahead(image_ref, manifest_digest, above)
            descriptor = manifest.layers[position]
            blob = BlobSource(ref, descriptor.digest, descriptor.size)
            prefetch = _prefetch_from(manifest.annotations)
            if TOC_DIGEST_ANNOTATION in descriptor.annotations:
                layer = await open_estargz(
                    self.client,
                    blob,
                    descriptor.annotations[TOC_DIGEST_ANNOTATION],
                    self.metadata_first,
                    self._toc_hook(digest, layer_digest, blob),
                )
                return DiscoveredLayer(layer, prefetch)
            if ref.tag and not is_accelerated_tag(ref.tag):
                found = await self._from_full_twin(ref, digest, position, layer_digest)
                if found is not None:
                    return found
            if self.use_referrers:
                found = await self._from_index_artifact(ref, digest, descriptor)
                if found is not None:
                    return found
            if descriptor.media_type in mt.GZIP_LAYERS:
                try:
                    layer = await open_estargz(
                        self.client,
                        blob,
                        None,
                        self.metadata_first,
                        self._toc_hook(digest, layer_digest, blob),
                    )
                    return DiscoveredLayer(layer, prefetch)
                except EstargzFormatError:
                    pass
        except RegistryNotAllowedError as exc:  # the client's policy: never contacted
            raise NoAccelerationError("registry-not-allowed", str(exc)) from None
        except RegistryError as exc:
            raise NoAccelerationError("registry-error", str(exc)) from None
        except (EstargzFormatError, layer_index.IndexFormatError) as exc:
            raise NoAccelerationError("bad-index", str(exc)) from None
        raise NoAccelerationError("not-accelerated", f"{image_ref} layer {layer_digest}")

    async def _index_artifacts(
        self, ref: ImageReference, manifest_digest: str
    ) -> list[ImageManifest]:
        """The index-only artifacts that refer to the manifest, those of the newest
        converter format first."""
        found = []
        for desc in await self.client.referrers(ref, manifest_digest, ARTIFACT_TYPE_INDEX):
            try:
                artifact = await self.client.get_manifest(ref.with_digest(desc.digest))
            except NotFoundError:
                # The tag-schema referrers list is kept by clients, not the registry: an
                # artifact deleted since (or a bogus entry) must not hide the others.
                log.warning(
                    "discovery.referrer_missing", subject=manifest_digest, artifact=desc.digest
                )
                continue
            parsed = artifact.parsed
            if (
                isinstance(parsed, ImageManifest)
                and parsed.subject is not None
                and parsed.subject.digest == manifest_digest
            ):
                found.append(parsed)
        found.sort(key=lambda artifact: conversion_format(artifact.annotations), reverse=True)
        return found

    async def _from_index_artifact(
        self, ref: ImageReference, manifest_digest: str, layer: Descriptor
    ) -> DiscoveredLayer | None:
        artifacts = await self._shared(
            ("index-artifacts", str(ref.with_digest(manifest_digest))),
            lambda: self._index_artifacts(ref, manifest_digest),
        )
        distrusted = None
        for parsed in artifacts:
            for blob_desc in parsed.layers:
                if (
                    blob_desc.media_type == MEDIA_TYPE_LAYER_INDEX
                    and blob_desc.annotations.get(ANNOTATION_LAYER_DIGEST) == layer.digest
                ):
                    if self.distrust.reason(blob_desc.digest) is not None:
                        distrusted = blob_desc.digest
                        continue
                    blob = BlobSource(ref, layer.digest, layer.size)
                    indexed = await self._load_index(manifest_digest, blob, blob_desc.digest)
                    return DiscoveredLayer(indexed, _prefetch_from(parsed.annotations))
        if distrusted is not None:
            raise NoAccelerationError(
                "distrusted-metadata", f"index {distrusted} of {layer.digest}"
            )
        return None

    async def _load_index(
        self, manifest_digest: str, blob: BlobSource, index_digest: str
    ) -> IndexedLayer:
        """Download and decode the index, show it to ``on_early``, then check it."""
        early = await _load_metadata(
            "discovery.index_decoded",
            blob,
            self.metadata_first,
            functools.partial(self.client.get_blob, blob.ref, index_digest, MAX_INDEX_BLOB),
            functools.partial(_early_layer, blob),
            lambda early: len(early.files.rows),
        )
        if self.on_early is not None:
            self.on_early(manifest_digest, blob.digest, early)
        started = time.perf_counter()
        indexed = await off_loop(_indexed_layer, early)
        log.info(
            "discovery.index_checked",
            layer=blob.digest,
            check_s=round(time.perf_counter() - started, 3),
        )
        return indexed

    async def _twin_candidates(self, twin_ref: ImageReference) -> list[ImageManifest]:
        """The manifests (for this platform) of the full-mode twin tag; none if absent."""
        try:
            fetched = await self.client.get_manifest(twin_ref)
        except NotFoundError:
            return []
        candidates: list[ImageManifest] = []
        if isinstance(fetched.parsed, ImageIndex):
            for desc in fetched.parsed.manifests:
                if desc.platform is None or Platform.host().matches(desc.platform):
                    sub = await self.client.get_manifest(twin_ref.with_digest(desc.digest))
                    if isinstance(sub.parsed, ImageManifest):
                        candidates.append(sub.parsed)
        else:
            candidates.append(fetched.parsed)
        return candidates

    def _toc_hook(
        self, manifest_digest: str, layer_digest: str, blob: BlobSource
    ) -> TocDecoded | None:
        return self.on_toc(manifest_digest, layer_digest, blob) if self.on_toc else None

    async def _from_full_twin(
        self, ref: ImageReference, manifest_digest: str, position: int, layer_digest: str
    ) -> DiscoveredLayer | None:
        assert ref.tag is not None
        twin_ref = ref.with_tag(accelerated_tag(ref.tag))
        candidates = await self._shared(
            ("twin", str(twin_ref)), lambda: self._twin_candidates(twin_ref)
        )
        for twin in candidates:
            if (
                twin.annotations.get(ANNOTATION_SOURCE_DIGEST) != manifest_digest
                or twin.artifact_type is not None
                or position >= len(twin.layers)
            ):
                continue
            descriptor = twin.layers[position]
            if TOC_DIGEST_ANNOTATION not in descriptor.annotations:
                continue
            blob = BlobSource(ref, descriptor.digest, descriptor.size)
            layer = await open_estargz(
                self.client,
                blob,
                descriptor.annotations[TOC_DIGEST_ANNOTATION],
                self.metadata_first,
                self._toc_hook(manifest_digest, layer_digest, blob),
            )
            return DiscoveredLayer(layer, _prefetch_from(twin.annotations))
        return None


def _mark_retrieved(task: asyncio.Task[Any]) -> None:
    """A layer looked up ahead may never be asked for (the pull was given up on); its
    error is then nobody's to report, and must not be logged as unhandled."""
    if not task.cancelled():
        task.exception()
