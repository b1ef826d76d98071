"""Index-only layers: the original gzip (or plain tar) blob read in place."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from agent.layers.lazy_layer import ChunkSlice, ReadAheadBudget
from fetcher.chunks import BlobSource, ChunkSpec
from formats.layer_index import LayerIndex
from formats.toc import TocEntry


class IndexedLayer:
    """Serves files from checkpoint spans of the tar stream, each inflated and verified."""

    kind = "index"

    def __init__(self, blob: BlobSource, index: LayerIndex) -> None:
        self.blob = blob
        self.index = index
        self._bounds = self._span_bounds()
        self._specs: dict[int, ChunkSpec] = {}

    @property
    def entries(self) -> list[TocEntry]:
        """The index's file table: empty while it is only decoded, not yet checked."""
        return self.index.entries

    def _span_bounds(self) -> list[tuple[int, int]]:
        """Uncompressed (start, end) of every span."""
        if self.index.is_gzip:
            return [self.index.span_range(i) for i in range(len(self.index.checkpoints))]
        size, step = self.index.uncompressed_size, self.index.span_size
        return [(start, min(start + step, size)) for start in range(0, size, step)]

    def _span_of(self, tar_offset: int) -> int:
        if self.index.is_gzip:
            lo, hi = 0, len(self._bounds) - 1
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if self._bounds[mid][0] <= tar_offset:
                    lo = mid
                else:
                    hi = mid - 1
            return lo
        return tar_offset // self.index.span_size

    def _spec(self, number: int) -> ChunkSpec:
        spec = self._specs.get(number)
        if spec is None:
            start, end = self._bounds[number]
            plan = self.index.plan_read(start, end - start)
            decode: Callable[[bytes], bytes]
            if self.index.is_gzip:
                decode = partial(self.index.read_span, number)
                streaming = partial(self.index.span_decoder, number)
            else:
                decode, streaming = partial(self.index.read_plain_span, number), None
            spec = ChunkSpec(
                f"s{number:08d}", plan.fetch_start, plan.fetch_end, end - start, decode, streaming
            )
            self._specs[number] = spec
        return spec

    def read_plan(self, entry: TocEntry, offset: int, length: int) -> list[ChunkSlice]:
        """Span slices holding the file's bytes [offset, offset+length) (clipped at EOF)."""
        end = min(offset + length, entry.size)
        if offset >= end:
            return []
        position = entry.offset + offset
        stop = entry.offset + end
        plan = []
        number = self._span_of(position)
        while position < stop:
            span_start, span_end = self._bounds[number]
            take = min(span_end, stop) - position
            plan.append(ChunkSlice(self._spec(number), position - span_start, take))
            position += take
            number += 1
        return plan

    def file_chunks(self, entry: TocEntry) -> list[ChunkSpec]:
        """Every span holding part of the file."""
        return [s.chunk for s in self.read_plan(entry, 0, entry.size)]

    def all_chunks(self) -> list[ChunkSpec]:
        """Every span of the layer, in order."""
        return [self._spec(i) for i in range(len(self._bounds))]

    def chunks_after(self, chunk: ChunkSpec, budget: ReadAheadBudget) -> list[ChunkSpec]:
        """The following spans, within ``budget``."""
        following = range(int(chunk.key[1:]) + 1, len(self._bounds))
        return budget.take(self._spec(number) for number in following)

    def prefetch_chunks(self) -> list[ChunkSpec]:
        """Index-only layers keep their prefetch list in the artifact, not the blob."""
        return []
