"""eStargz layers (full mode, or eStargz images built by other tools)."""

from __future__ import annotations

import bisect
from functools import partial

from agent.layers.lazy_layer import ChunkSlice
from fetcher.chunks import BlobSource, ChunkSpec
from formats.estargz_reader import ChunkRef, EstargzToc, read_chunk
from formats.toc import TocEntry


def _spec(ref: ChunkRef) -> ChunkSpec:
    return ChunkSpec(
        key=f"e{ref.blob_offset:012x}-{ref.inner_offset:x}-{ref.size:x}",
        fetch_start=ref.blob_offset,
        fetch_end=ref.blob_end,
        decode=partial(read_chunk, ref),
    )


class EstargzLayer:
    """Serves files chunk by chunk; each chunk is one verified gzip member range."""

    kind = "estargz"

    def __init__(self, blob: BlobSource, toc: EstargzToc) -> None:
        self.blob = blob
        self.toc = toc
        self.entries: list[TocEntry] = toc.entries
        self._chunks: dict[str, list[ChunkRef]] = toc.chunks
        self._starts = {name: [c.file_offset for c in refs] for name, refs in self._chunks.items()}
        self._specs: dict[tuple[str, int], ChunkSpec] = {}
        self._ordered: list[ChunkSpec] | None = None
        self._position: dict[str, int] = {}

    def _spec_for(self, name: str, index: int) -> ChunkSpec:
        key = (name, index)
        spec = self._specs.get(key)
        if spec is None:
            spec = self._specs[key] = _spec(self._chunks[name][index])
        return spec

    def read_plan(self, entry: TocEntry, offset: int, length: int) -> list[ChunkSlice]:
        """Chunk slices for the file's bytes [offset, offset+length) (clipped at EOF)."""
        refs = self._chunks.get(entry.name, [])
        end = min(offset + length, entry.size)
        if offset >= end or not refs:
            return []
        starts = self._starts[entry.name]
        index = bisect.bisect_right(starts, offset) - 1
        plan = []
        position = offset
        while position < end and index < len(refs):
            ref = refs[index]
            start = position - ref.file_offset
            take = min(ref.size - start, end - position)
            plan.append(ChunkSlice(self._spec_for(entry.name, index), start, take))
            position += take
            index += 1
        return plan

    def file_chunks(self, entry: TocEntry) -> list[ChunkSpec]:
        """Every chunk of the file."""
        return [self._spec_for(entry.name, i) for i in range(len(self._chunks.get(entry.name, [])))]

    def all_chunks(self) -> list[ChunkSpec]:
        """Every chunk in blob order; the prioritized (landmark) area comes first."""
        specs = [
            self._spec_for(name, i) for name, refs in self._chunks.items() for i in range(len(refs))
        ]
        return sorted(specs, key=lambda s: s.fetch_start)

    def chunks_after(self, chunk: ChunkSpec, budget: int) -> list[ChunkSpec]:
        """Following chunks in blob order, up to ``budget`` compressed bytes."""
        if self._ordered is None:
            self._ordered = self.all_chunks()
            self._position = {spec.key: i for i, spec in enumerate(self._ordered)}
        index = self._position.get(chunk.key)
        if index is None:
            return []
        following: list[ChunkSpec] = []
        spent = 0
        for spec in self._ordered[index + 1 :]:
            if spec.fetch_start == chunk.fetch_start:
                continue  # packed into the same member: arrives with it
            spent += spec.fetch_end - spec.fetch_start
            if spent > budget:
                break
            following.append(spec)
        return following

    def prefetch_chunks(self) -> list[ChunkSpec]:
        """Chunks before the prefetch landmark: what the image's builder said startup needs."""
        if self.toc.prefetch_end is None:
            return []
        return [s for s in self.all_chunks() if s.fetch_start < self.toc.prefetch_end]
