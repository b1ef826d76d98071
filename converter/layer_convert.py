"""Convert one layer, streamed from the registry once, into its accelerated form.

Full mode decompresses the original layer and re-packs it as eStargz into a temporary
file (the only copy of the layer on disk); index-only mode reads the compressed bytes
once to build the checkpoint index in memory (a fraction of a percent of the layer).
Either way the source blob's digest is verified as it streams: a layer whose bytes do
not match the manifest fails the conversion.
"""

from __future__ import annotations

import gzip
import tarfile
import time
import zlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO, cast

import zstandard

from converter.errors import ConversionError
from converter.progress import LayerProgress
from fetcher import mediatypes as mt
from fetcher.errors import RegistryError
from fetcher.manifest import Descriptor
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from fetcher.sync_stream import consume_in_thread
from formats import layer_index
from formats.estargz import (
    FOOTER_SIZE,
    EstargzResult,
    EstargzToc,
    parse_footer,
    parse_toc,
    write_estargz,
)
from formats.gzip_index import GzipIndexError
from formats.layer_index_builder import build_layer_index
from formats.layer_index_codec import serialize
from formats.toc import HostileLayerError, TocEntry


@dataclass
class ConvertedLayer:
    """The outcome for one source layer."""

    source: Descriptor
    entries: list[TocEntry]
    seconds: float
    estargz: EstargzResult | None = None
    estargz_path: Path | None = None
    index_blob: bytes | None = None

    @property
    def output_size(self) -> int:
        """Bytes this layer adds to the registry in its accelerated form."""
        if self.estargz is not None:
            return self.estargz.blob_size
        return len(self.index_blob or b"")


async def _counted(
    chunks: AsyncIterator[bytes], progress: LayerProgress, digest: str
) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        progress.advance(digest, len(chunk))
        yield chunk


def _decompressed(compressed: BinaryIO, layer: Descriptor) -> IO[bytes]:
    """An uncompressed tar stream over the source layer, by media type."""
    if layer.media_type in mt.GZIP_LAYERS:
        return cast(IO[bytes], gzip.GzipFile(fileobj=compressed, mode="rb"))
    if layer.media_type in mt.ZSTD_LAYERS:
        return zstandard.ZstdDecompressor().stream_reader(compressed, read_across_frames=True)
    if layer.media_type in mt.TAR_LAYERS:
        return compressed
    raise ConversionError(f"layer {layer.digest}: unsupported media type {layer.media_type!r}")


def read_back_toc(path: Path, result: EstargzResult) -> EstargzToc:
    """Parse the TOC of a blob we just wrote, as the agent will: proves it is readable
    and yields the file list for prefetch validation."""
    with path.open("rb") as blob:
        blob.seek(result.blob_size - FOOTER_SIZE)
        toc_offset = parse_footer(blob.read(FOOTER_SIZE), result.blob_size)
        blob.seek(toc_offset)
        member = blob.read(result.blob_size - FOOTER_SIZE - toc_offset)
    return parse_toc(member, toc_offset, result.toc_digest)


def _describe_failure(layer: Descriptor, exc: BaseException) -> ConversionError:
    return ConversionError(f"layer {layer.digest} ({layer.media_type}): {exc}")


async def convert_layer_full(
    client: RegistryClient,
    ref: ImageReference,
    layer: Descriptor,
    workdir: Path,
    progress: LayerProgress,
    chunk_size: int,
    prefetch: Sequence[str],
    min_chunk_size: int,
) -> ConvertedLayer:
    """Re-pack ``layer`` as eStargz into ``workdir``; nothing is pushed here."""
    started = time.monotonic()
    out_path = workdir / f"{layer.digest.replace(':', '-')}.estargz"
    entries: list[TocEntry] = []

    def convert(compressed: BinaryIO) -> EstargzResult:
        with out_path.open("wb") as out:
            result = write_estargz(
                _decompressed(compressed, layer),
                out,
                chunk_size=chunk_size,
                min_chunk_size=min_chunk_size,
                prefetch=prefetch,
                spool_dir=str(workdir),
            )
        compressed.read()  # the tail (gzip trailer, padding) must reach the digest check
        entries.extend(read_back_toc(out_path, result).entries)
        return result

    try:
        result = await consume_in_thread(
            _counted(client.iter_blob(ref, layer.digest), progress, layer.digest), convert
        )
    except (
        RegistryError,
        HostileLayerError,
        OSError,
        EOFError,
        zstandard.ZstdError,
        zlib.error,
        tarfile.TarError,
    ) as exc:
        out_path.unlink(missing_ok=True)
        raise _describe_failure(layer, exc) from exc
    progress.finish_layer(layer.digest)
    return ConvertedLayer(
        layer, entries, time.monotonic() - started, estargz=result, estargz_path=out_path
    )


async def convert_layer_index(
    client: RegistryClient,
    ref: ImageReference,
    layer: Descriptor,
    progress: LayerProgress,
    span: int,
) -> ConvertedLayer:
    """Build the checkpoint index + TOC of ``layer`` (gzip or plain tar; zstd refused)."""
    if layer.media_type in mt.ZSTD_LAYERS:
        raise ConversionError(
            f"layer {layer.digest} is zstd-compressed ({layer.media_type}): zstd frames have "
            "no resumable deflate structure to index, so it cannot be read in place; "
            "use --mode full instead"
        )
    started = time.monotonic()

    def build(compressed: BinaryIO) -> layer_index.LayerIndex:
        index = build_layer_index(
            compressed, layer_digest=layer.digest, media_type=layer.media_type, span=span
        )
        compressed.read()
        return index

    try:
        index = await consume_in_thread(
            _counted(client.iter_blob(ref, layer.digest), progress, layer.digest), build
        )
    except (
        RegistryError,
        HostileLayerError,
        GzipIndexError,
        layer_index.UnsupportedLayerError,
        OSError,
    ) as exc:
        raise _describe_failure(layer, exc) from exc
    if index.compressed_size != layer.size:
        raise ConversionError(
            f"layer {layer.digest}: manifest says {layer.size} bytes, blob has "
            f"{index.compressed_size}"
        )
    progress.finish_layer(layer.digest)
    return ConvertedLayer(
        layer, index.entries, time.monotonic() - started, index_blob=serialize(index)
    )
