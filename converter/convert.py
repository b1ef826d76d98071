"""Convert an image into its accelerated form and publish it as `<tag>_accelerated`.

Two phases keep a refused image from leaving anything behind: every layer of every
selected platform is converted first (results on local disk or in memory), and only
when all succeeded are blobs, manifests and tags pushed. Layers convert in parallel;
a conversion already published for the same source digest and mode is not redone.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.digest import sha256_digest
from common.logging import get_logger
from converter.errors import ConversionError
from converter.layer_convert import ConvertedLayer, convert_layer_full, convert_layer_index
from converter.prefetch import PrefetchList
from converter.progress import LayerProgress
from fetcher import mediatypes as mt
from fetcher.errors import NotFoundError
from fetcher.manifest import Descriptor, ImageIndex, ImageManifest, Platform
from fetcher.reference import ImageReference
from fetcher.registry import FetchedManifest, RegistryClient
from formats.accelerated import (
    ANNOTATION_CONVERSION,
    ANNOTATION_LAYER_DIGEST,
    ANNOTATION_MODE,
    ANNOTATION_PREFETCH,
    ANNOTATION_SOURCE_DIGEST,
    ARTIFACT_TYPE_INDEX,
    EMPTY_JSON,
    MEDIA_TYPE_LAYER_INDEX,
    MODE_FULL,
    MODE_INDEX,
    accelerated_tag,
    is_accelerated_tag,
)
from formats.estargz_toc import DEFAULT_CHUNK_SIZE
from formats.estargz_writer import DEFAULT_MIN_CHUNK_SIZE
from formats.gzip_index import DEFAULT_SPAN

log = get_logger(__name__)

CONVERTER_FORMAT = 4
"""Bumped whenever the output for the same input and settings changes (format 2: small
files share gzip members; 3: index-only spans are digested in pieces too; 4: pieces of
64 KiB), so that conversions by an older converter are redone."""


@dataclass(frozen=True)
class ConvertOptions:
    """How to convert; defaults match the documented CLI defaults."""

    mode: str = MODE_INDEX
    prefetch: PrefetchList = field(default_factory=lambda: PrefetchList(()))
    platforms: tuple[Platform, ...] = ()
    chunk_size: int = DEFAULT_CHUNK_SIZE
    min_chunk_size: int = DEFAULT_MIN_CHUNK_SIZE
    span: int = DEFAULT_SPAN
    parallel_layers: int = 2
    force: bool = False
    workdir: Path | None = None


@dataclass
class PlatformResult:
    """One converted image manifest (one platform of the source)."""

    source_digest: str
    platform: Platform | None
    layers: list[ConvertedLayer]
    missing_prefetch: list[str]
    manifest_body: bytes = b""
    manifest_digest: str = ""
    media_type: str = mt.OCI_MANIFEST
    config_body: bytes = b""


@dataclass
class ConversionResult:
    """What `convert_image` did, for the CLI, the convert-server and benchmarks."""

    source: ImageReference
    target: ImageReference
    mode: str
    source_digest: str
    result_digest: str
    skipped: bool
    seconds: float = 0.0
    platforms: list[PlatformResult] = field(default_factory=list)

    @property
    def source_bytes(self) -> int:
        """Compressed bytes of every converted source layer."""
        return sum(layer.source.size for p in self.platforms for layer in p.layers)

    @property
    def output_bytes(self) -> int:
        """Bytes of the accelerated layers (eStargz blobs or index blobs)."""
        return sum(layer.output_size for p in self.platforms for layer in p.layers)


def _json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def _conversion_settings(options: ConvertOptions) -> str:
    """What shapes the output, as a canonical string recorded on it: a conversion is only
    reused when this matches, so a new converter format or other chunking or prefetch
    options produce a new conversion instead of silently keeping the old one."""
    settings: dict[str, Any] = {
        "format": CONVERTER_FORMAT,
        "mode": options.mode,
        "prefetch": options.prefetch.as_paths(),
    }
    if options.mode == MODE_FULL:
        settings.update(chunk_size=options.chunk_size, min_chunk_size=options.min_chunk_size)
    else:
        settings["span"] = options.span
    return json.dumps(settings, sort_keys=True, separators=(",", ":"))


async def _existing_conversion(
    client: RegistryClient, target: ImageReference, source_digest: str, options: ConvertOptions
) -> str | None:
    """Digest of a published conversion of the same source with the same settings."""
    try:
        fetched = await client.get_manifest(target)
    except NotFoundError:
        return None
    annotations = fetched.parsed.annotations
    if annotations.get(ANNOTATION_SOURCE_DIGEST) == source_digest and annotations.get(
        ANNOTATION_CONVERSION
    ) == _conversion_settings(options):
        return fetched.digest
    return None


def _selected(index: ImageIndex, platforms: tuple[Platform, ...]) -> list[Descriptor]:
    chosen = []
    for desc in index.manifests:
        if desc.media_type not in mt.IMAGE_MANIFESTS or desc.platform is None:
            continue  # attestations and nested indexes are not runnable images
        if desc.platform.os == "unknown":
            continue
        if platforms and not any(p.matches(desc.platform) for p in platforms):
            continue
        chosen.append(desc)
    if not chosen:
        wanted = ", ".join(map(str, platforms)) or "any"
        raise ConversionError(f"no image manifest in the index matches platform {wanted}")
    return chosen


async def convert_image(
    client: RegistryClient,
    source: ImageReference,
    options: ConvertOptions,
    progress: LayerProgress | None = None,
) -> ConversionResult:
    """Convert ``source`` and publish it under `<tag>_accelerated`."""
    if options.mode not in (MODE_FULL, MODE_INDEX):
        raise ConversionError(f"unknown mode {options.mode!r}: use full or index")
    if not source.tag:
        raise ConversionError(f"{source}: give a tag; the result is published as <tag>_accelerated")
    if is_accelerated_tag(source.tag):
        raise ConversionError(f"{source} is already an accelerated form")
    started = time.monotonic()
    target = source.with_tag(accelerated_tag(source.tag))
    top = await client.get_manifest(source)
    if not options.force:
        existing = await _existing_conversion(client, target, top.digest, options)
        if existing:
            log.info(
                "convert.already_done", source=str(source), target=str(target), digest=existing
            )
            return ConversionResult(source, target, options.mode, top.digest, existing, True)
    if isinstance(top.parsed, ImageIndex):
        descriptors = _selected(top.parsed, options.platforms)
        sources = [
            (d.platform, await client.get_manifest(source.with_digest(d.digest)))
            for d in descriptors
        ]
    else:
        sources = [(None, top)]
    progress = progress or LayerProgress()
    with (
        tempfile.TemporaryDirectory(prefix="acceld-convert-", dir=options.workdir) as tmp,
        progress,
    ):
        results = [
            await _convert_manifest(client, source, fetched, platform, options, Path(tmp), progress)
            for platform, fetched in sources
        ]
        result_digest = await _publish(client, source, target, top, results, options)
    elapsed = time.monotonic() - started
    outcome = ConversionResult(
        source, target, options.mode, top.digest, result_digest, False, elapsed, results
    )
    log.info(
        "convert.done",
        source=str(source),
        target=str(target),
        mode=options.mode,
        digest=result_digest,
        seconds=round(elapsed, 2),
        source_bytes=outcome.source_bytes,
        output_bytes=outcome.output_bytes,
    )
    return outcome


async def _convert_manifest(
    client: RegistryClient,
    source: ImageReference,
    fetched: FetchedManifest,
    platform: Platform | None,
    options: ConvertOptions,
    workdir: Path,
    progress: LayerProgress,
) -> PlatformResult:
    manifest = fetched.parsed
    if not isinstance(manifest, ImageManifest):
        raise ConversionError(f"{source}: nested index, expected an image manifest")
    if options.mode == MODE_INDEX:
        for i, layer in enumerate(manifest.layers):
            if layer.media_type in mt.ZSTD_LAYERS:
                raise ConversionError(
                    f"{source}: layer {i} ({layer.digest}) is zstd-compressed; index-only "
                    "mode needs gzip or uncompressed layers (zstd has no checkpointable "
                    "deflate stream). Nothing was pushed; use --mode full."
                )
    for i, layer in enumerate(manifest.layers):
        if layer.media_type not in mt.LAYERS:
            raise ConversionError(
                f"{source}: layer {i} has unsupported media type {layer.media_type!r}"
            )
        progress.add_layer(layer.digest, layer.size, f"{platform or ''} layer {i}".strip())
    limit = asyncio.Semaphore(max(1, options.parallel_layers))
    prefetch_paths = options.prefetch.as_paths()

    async def one(layer: Descriptor) -> ConvertedLayer:
        async with limit:
            if options.mode == MODE_FULL:
                return await convert_layer_full(
                    client,
                    source,
                    layer,
                    workdir,
                    progress,
                    options.chunk_size,
                    prefetch_paths,
                    options.min_chunk_size,
                )
            return await convert_layer_index(client, source, layer, progress, options.span)

    tasks = [asyncio.create_task(one(layer)) for layer in manifest.layers]
    try:
        layers = await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    missing = options.prefetch.missing([layer.entries for layer in layers])
    if missing:
        log.warning(
            "convert.prefetch_missing", image=str(source), platform=str(platform), paths=missing
        )
    result = PlatformResult(fetched.digest, platform, list(layers), missing)
    if options.mode == MODE_FULL:
        await _build_full_manifest(client, source, fetched, manifest, result, options)
    else:
        _build_index_artifact(fetched, manifest, result, options)
    return result


def _common_annotations(source_digest: str, options: ConvertOptions) -> dict[str, str]:
    annotations = {
        ANNOTATION_SOURCE_DIGEST: source_digest,
        ANNOTATION_MODE: options.mode,
        ANNOTATION_CONVERSION: _conversion_settings(options),
    }
    if options.prefetch.entries:
        annotations[ANNOTATION_PREFETCH] = json.dumps(options.prefetch.as_paths())
    return annotations


async def _build_full_manifest(
    client: RegistryClient,
    source: ImageReference,
    fetched: FetchedManifest,
    manifest: ImageManifest,
    result: PlatformResult,
    options: ConvertOptions,
) -> None:
    """New config (diff_ids of the eStargz tars) and an OCI manifest; pushed later."""
    config = json.loads(await client.get_blob(source, manifest.config.digest))
    rootfs = config.setdefault("rootfs", {"type": "layers"})
    rootfs["diff_ids"] = [layer.estargz.diff_id for layer in result.layers if layer.estargz]
    result.config_body = _json(config)
    layers = []
    for layer in result.layers:
        assert layer.estargz is not None
        annotations = dict(layer.source.annotations)
        annotations.update(layer.estargz.annotations())
        layers.append(
            Descriptor(
                mt.OCI_LAYER_GZIP, layer.estargz.blob_digest, layer.estargz.blob_size, annotations
            ).to_json()
        )
    doc = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": {
            "mediaType": mt.OCI_CONFIG,
            "digest": sha256_digest(result.config_body),
            "size": len(result.config_body),
        },
        "layers": layers,
        "annotations": {**manifest.annotations, **_common_annotations(fetched.digest, options)},
    }
    result.manifest_body = _json(doc)
    result.manifest_digest = sha256_digest(result.manifest_body)


def _build_index_artifact(
    fetched: FetchedManifest,
    manifest: ImageManifest,
    result: PlatformResult,
    options: ConvertOptions,
) -> None:
    """An artifact manifest whose subject is the source manifest, one blob per layer."""
    layers = []
    for layer in result.layers:
        assert layer.index_blob is not None
        layers.append(
            {
                "mediaType": MEDIA_TYPE_LAYER_INDEX,
                "digest": sha256_digest(layer.index_blob),
                "size": len(layer.index_blob),
                "annotations": {ANNOTATION_LAYER_DIGEST: layer.source.digest},
            }
        )
    doc = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE_INDEX,
        "config": {
            "mediaType": mt.OCI_EMPTY,
            "digest": sha256_digest(EMPTY_JSON),
            "size": len(EMPTY_JSON),
        },
        "layers": layers,
        "subject": {
            "mediaType": fetched.media_type,
            "digest": fetched.digest,
            "size": len(fetched.body),
        },
        "annotations": _common_annotations(fetched.digest, options),
    }
    result.manifest_body = _json(doc)
    result.manifest_digest = sha256_digest(result.manifest_body)


async def _publish(
    client: RegistryClient,
    source: ImageReference,
    target: ImageReference,
    top: FetchedManifest,
    results: list[PlatformResult],
    options: ConvertOptions,
) -> str:
    """Push blobs, manifests and finally the `_accelerated` tag (last, so readers never
    see a tag whose content is incomplete)."""
    for result in results:
        if options.mode == MODE_FULL:
            for layer in result.layers:
                assert layer.estargz is not None and layer.estargz_path is not None
                await client.push_blob_file(
                    source, layer.estargz_path, layer.estargz.blob_digest, layer.estargz.blob_size
                )
            await client.push_blob(source, result.config_body)
            await client.push_manifest(
                source.with_digest(result.manifest_digest), result.manifest_body, mt.OCI_MANIFEST
            )
        else:
            await client.push_blob(source, EMPTY_JSON)
            for layer in result.layers:
                assert layer.index_blob is not None
                await client.push_blob(source, layer.index_blob)
            await client.push_referrer(source, result.manifest_body, mt.OCI_MANIFEST)
    if not isinstance(top.parsed, ImageIndex):
        only = results[0]
        return await client.push_manifest(target, only.manifest_body, mt.OCI_MANIFEST)
    index_doc = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_INDEX,
        "manifests": [
            Descriptor(
                mt.OCI_MANIFEST,
                r.manifest_digest,
                len(r.manifest_body),
                platform=r.platform,
                artifact_type=ARTIFACT_TYPE_INDEX if options.mode == MODE_INDEX else None,
            ).to_json()
            for r in results
        ],
        "annotations": _common_annotations(top.digest, options),
    }
    return await client.push_manifest(target, _json(index_doc), mt.OCI_INDEX)
