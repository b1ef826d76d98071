"""The common shape of a lazily served layer, whatever its accelerated form.

The FUSE code asks one question of a layer: which chunks, and which bytes of them, hold
bytes [offset, offset+length) of this file. eStargz answers with per-file chunks (one
gzip member each); index-only layers answer with checkpoint spans of the tar stream.
Both return ChunkSpecs whose ``decode`` verifies the bytes before anyone sees them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from fetcher.chunks import BlobSource, ChunkSpec
from formats.toc import TocEntry


@dataclass(frozen=True)
class ChunkSlice:
    """``length`` bytes at ``start`` within the decoded ``chunk``."""

    chunk: ChunkSpec
    start: int
    length: int


class LazyLayer(Protocol):
    """A layer whose files are read from its blob on demand."""

    blob: BlobSource
    kind: str
    entries: list[TocEntry]

    def read_plan(self, entry: TocEntry, offset: int, length: int) -> list[ChunkSlice]:
        """The chunk slices that make up the file's bytes [offset, offset+length)."""
        ...

    def file_chunks(self, entry: TocEntry) -> list[ChunkSpec]:
        """Every chunk holding part of the file (for prefetch)."""
        ...

    def all_chunks(self) -> list[ChunkSpec]:
        """Every chunk of the layer, in blob order (for background fill)."""
        ...

    def chunks_after(self, chunk: ChunkSpec, budget: int) -> list[ChunkSpec]:
        """The chunks that follow ``chunk`` in the blob, up to ``budget`` compressed bytes
        (blob-order read-ahead: files of one directory sit next to each other)."""
        ...

    def prefetch_chunks(self) -> list[ChunkSpec]:
        """Chunks the layer itself marks as needed first (eStargz landmark area)."""
        ...
