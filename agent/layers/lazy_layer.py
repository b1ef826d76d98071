"""The common shape of a lazily served layer, whatever its accelerated form.

The FUSE code asks one question of a layer: which chunks, and which bytes of them, hold
bytes [offset, offset+length) of this file. eStargz answers with per-file chunks (one
gzip member each); index-only layers answer with checkpoint spans of the tar stream.
Both return ChunkSpecs whose ``decode`` verifies the bytes before anyone sees them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from fetcher.chunks import BlobSource, ChunkSpec
from formats.toc import TocEntry


@dataclass(frozen=True)
class ReadAheadBudget:
    """How much one read miss may fetch ahead: ``fetch_bytes`` bounds the link time it
    takes, ``decoded_bytes`` the memory. Both matter: a highly compressible layer puts
    dozens of 4 MiB spans in 1 MiB of blob, and holding them all while they are
    verified and cached made the agent's memory grow with the file it served."""

    fetch_bytes: int
    decoded_bytes: int

    def take(self, following: Iterable[ChunkSpec]) -> list[ChunkSpec]:
        """The leading chunks that fit both budgets (with 1 MiB index-only spans, the
        next span or two fit: a miss reads ahead in both forms)."""
        taken: list[ChunkSpec] = []
        fetched = decoded = 0
        for spec in following:
            fetched += spec.fetch_length
            decoded += spec.decoded_size
            if fetched > self.fetch_bytes or decoded > self.decoded_bytes:
                break
            taken.append(spec)
        return taken


@dataclass(frozen=True)
class ChunkSlice:
    """``length`` bytes at ``start`` within the decoded ``chunk``."""

    chunk: ChunkSpec
    start: int
    length: int


def metadata_tag(metadata_digest: str) -> str:
    """The short form of a layer's metadata digest that cache keys and mount names carry
    (128 bits: no one can make two indexes of a blob whose tags meet)."""
    return metadata_digest.partition(":")[2][:32]


class LazyLayer(Protocol):
    """A layer whose files are read from its blob on demand."""

    blob: BlobSource
    kind: str
    metadata_digest: str
    """The digest of the metadata (eStargz TOC, layer index) its files and chunks come
    from. One blob can have several (twins and indexes made with other settings, or a
    hostile one): what is derived from one, cached chunks and mounted trees, is named
    after it so that two metadata views of one blob never meet."""

    @property
    def entries(self) -> list[TocEntry]:
        """The layer's files in blob order (a later entry of a name replaces earlier ones)."""
        ...

    def read_plan(self, entry: TocEntry, offset: int, length: int) -> list[ChunkSlice]:
        """The chunk slices that make up the file's bytes [offset, offset+length)."""
        ...

    def header_plan(self, entry: TocEntry, offset: int, length: int) -> list[ChunkSlice]:
        """What must be read with the file's bytes [offset, offset+length), and handed to
        ``check_header``, before its data is first served: the evidence for metadata no
        digest covers (empty if there is none, or it was checked)."""
        ...

    def check_header(self, entry: TocEntry, evidence: bytes) -> None:
        """Raise HeaderMismatchError if ``evidence`` contradicts the file's metadata."""
        ...

    def file_chunks(self, entry: TocEntry) -> list[ChunkSpec]:
        """Every chunk holding part of the file (for prefetch)."""
        ...

    def all_chunks(self) -> list[ChunkSpec]:
        """Every chunk of the layer, in blob order (for background fill)."""
        ...

    def chunks_after(self, chunk: ChunkSpec, budget: ReadAheadBudget) -> list[ChunkSpec]:
        """The chunks that follow ``chunk`` in the blob, within ``budget`` (blob-order
        read-ahead: files of one directory sit next to each other)."""
        ...

    def landmark_files(self) -> list[str]:
        """Plan paths of the files the layer itself marks as needed first (the eStargz
        landmark area)."""
        ...

    def expect_reads(self, reads: Iterable[tuple[TocEntry, int, int]]) -> None:
        """Told, before a prefetch asks for chunks, every (file, offset, length) it is
        about to ask for, so that a layer whose chunks are larger than those reads can
        make them smaller first."""
        ...
