"""Build a layer's index (formats/layer_index.py) in one streaming pass over its blob.

The converter indexes a layer while it downloads it, so nothing here seeks or holds
the blob: checkpoints and span digests come from the inflating pass, the file table
from walking the tar that pass yields, and the two run on separate threads.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Generator, Iterable, Iterator
from typing import IO, cast

from formats.chunk_streams import ChunkReader, CountedChunks, in_background, iter_chunks
from formats.gzip_index import DEFAULT_PIECE, DEFAULT_SPAN, GzipCheckpointer
from formats.layer_index import (
    MAX_SPAN,
    MIN_PIECE,
    MIN_SPAN,
    LayerIndex,
    UnsupportedLayerError,
)
from formats.media_types import GZIP_LAYERS, TAR_LAYERS
from formats.toc import TocEntry, iter_tar_entries


def build_layer_index(
    source: IO[bytes] | Iterable[bytes],
    *,
    layer_digest: str,
    media_type: str,
    span: int = DEFAULT_SPAN,
    piece: int = DEFAULT_PIECE,
) -> LayerIndex:
    """Index a layer in one streaming pass over its blob (a stream or chunks, e.g. a
    registry download): checkpoints and span digests while inflating, and the file
    table while walking the tar (plain tar layers get span digests of their own)."""
    if not MIN_SPAN <= span <= MAX_SPAN:
        raise ValueError(f"span must be within {MIN_SPAN}..{MAX_SPAN}")
    if piece < MIN_PIECE:
        raise ValueError(f"piece must be at least {MIN_PIECE}")
    compressed = CountedChunks(iter_chunks(source) if isinstance(source, io.IOBase) else source)
    checkpointer: GzipCheckpointer | None = None
    plain_spans: _PlainSpans | None = None
    uncompressed: Iterable[bytes] = compressed
    if media_type in TAR_LAYERS:
        plain_spans = _PlainSpans(span)
        uncompressed = plain_spans.hash(compressed)
    elif media_type in GZIP_LAYERS:
        checkpointer = GzipCheckpointer(span, piece)
        uncompressed = in_background(checkpointer.inflate(compressed))
    else:
        raise UnsupportedLayerError(
            f"layer {layer_digest} has media type {media_type!r}: only gzip or plain tar "
            "layers can be read in place"
        )
    tar_stream = ChunkReader(iter(uncompressed))
    try:
        entries = _walk_tar(tar_stream)
        tar_stream.drain(max((e.offset + e.size for e in entries if e.type == "reg"), default=0))
    finally:
        if isinstance(uncompressed, Generator):
            uncompressed.close()  # stops the inflating thread if the walk failed
    index = LayerIndex(
        layer_digest=layer_digest,
        media_type=media_type,
        compressed_size=compressed.total,
        uncompressed_size=tar_stream.position,
        span_size=span,
        entries=entries,
    )
    if checkpointer is not None:
        found = checkpointer.result()
        index.checkpoints = found.checkpoints
        index.windows = found.stored_windows
        index.span_digests = found.span_digests
        index.piece_size = checkpointer.piece
        index.piece_digests = found.piece_digests
        index.piece_ends = found.piece_ends
    if plain_spans is not None:
        index.span_digests = plain_spans.finish()
    return index


class _PlainSpans:
    """sha256 of every ``span`` bytes of a plain tar stream, so reads of an uncompressed
    layer are verified like inflated spans are."""

    def __init__(self, span: int) -> None:
        self.span = span
        self.digests: list[bytes] = []
        self._hash = hashlib.sha256()
        self._filled = 0

    def hash(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                take = min(len(view), self.span - self._filled)
                self._hash.update(view[:take])
                self._filled += take
                view = view[take:]
                if self._filled == self.span:
                    self.digests.append(self._hash.digest())
                    self._hash, self._filled = hashlib.sha256(), 0
            yield chunk

    def finish(self) -> list[bytes]:
        if self._filled:
            self.digests.append(self._hash.digest())
        return self.digests


def _walk_tar(stream: ChunkReader) -> list[TocEntry]:
    entries: list[TocEntry] = []
    for entry, _info, _reader in iter_tar_entries(cast(IO[bytes], stream)):
        entries.append(entry)
    return entries
