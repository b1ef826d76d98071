"""Index-only layers: the original gzip (or plain tar) blob read in place."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from functools import partial

from agent.layers.lazy_layer import ChunkSlice, ReadAheadBudget, metadata_tag
from fetcher.chunks import BlobSource, ChunkSpec
from formats.header_check import HeaderMismatchError, check_header, member_end
from formats.layer_index import LayerIndex
from formats.layer_index_codec import DecodedIndex, fingerprint
from formats.toc import MAX_HEADER_CHAIN, TocEntry


class IndexedLayer:
    """Serves files from checkpoint spans of the tar stream, each inflated and verified."""

    kind = "index"

    def __init__(
        self, blob: BlobSource, index: LayerIndex, decoded: DecodedIndex | None = None
    ) -> None:
        self.blob = blob
        self.index = index
        self._decoded = decoded
        """The table as decoded, for finding headers before it is checked (prefetch)."""
        self.metadata_digest = fingerprint(index)
        self._key_prefix = f"{metadata_tag(self.metadata_digest)}-s"
        """Span keys name the index: another index of the blob lays spans out otherwise."""
        self._bounds = self._span_bounds()
        self._specs: dict[int, ChunkSpec] = {}
        self._prefixes: dict[int, ChunkSpec] = {}
        """Spans whose reads, as far as a prefix of them reaches, are served from that
        prefix (see ``expect_reads``)."""
        self._row_ends: list[int] = []
        """Where each row's data ends, in table order: a file's tar headers start at the
        end of the row before it, which ``header_plan`` fetches to check it against."""
        self._checked: set[int] = set()
        """Data offsets of the files whose rows matched their tar headers."""

    @property
    def span_bounds(self) -> list[tuple[int, int]]:
        """Uncompressed (start, end) of every span, in order."""
        return self._bounds

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
                f"{self._key_prefix}{number:08d}",
                plan.fetch_start,
                plan.fetch_end,
                end - start,
                decode,
                streaming,
            )
            self._specs[number] = spec
        return spec

    def _prefix_spec(self, number: int, count: int) -> ChunkSpec:
        start, end = self.index.prefix_fetch(number, count)
        return ChunkSpec(
            f"{self._key_prefix}{number:08d}p{count}",
            start,
            end,
            count * self.index.piece_size,
            partial(self.index.read_prefix, number, count),
        )

    def _slices(self, entry: TocEntry, offset: int, length: int) -> list[tuple[int, int, int]]:
        """(span, start in span, length) for the file's bytes [offset, offset+length)."""
        end = min(offset + length, entry.size)
        if offset >= end:
            return []
        return self._stream_slices(entry.offset + offset, entry.offset + end)

    def _stream_slices(self, position: int, stop: int) -> list[tuple[int, int, int]]:
        """(span, start in span, length) for the tar stream's bytes [position, stop)."""
        slices = []
        number = self._span_of(position)
        while position < stop:
            span_start, span_end = self._bounds[number]
            take = min(span_end, stop) - position
            slices.append((number, position - span_start, take))
            position += take
            number += 1
        return slices

    def read_plan(self, entry: TocEntry, offset: int, length: int) -> list[ChunkSlice]:
        """Span slices holding the file's bytes [offset, offset+length) (clipped at EOF):
        of a span's expected prefix where that reaches far enough, else of the span."""
        return self._plan(self._slices(entry, offset, length))

    def _plan(self, slices: list[tuple[int, int, int]]) -> list[ChunkSlice]:
        """Each slice from its span's expected prefix if every slice of that span fits
        in it, else from the whole span (one chunk per span per read, never both)."""
        reach: dict[int, int] = {}
        for number, start, take in slices:
            reach[number] = max(reach.get(number, 0), start + take)
        plan = []
        for number, start, take in slices:
            chunk = self._prefixes.get(number)
            if chunk is None or reach[number] > chunk.decoded_size:
                chunk = self._spec(number)
            plan.append(ChunkSlice(chunk, start, take))
        return plan

    def _header_slices(self, entry: TocEntry, strict: bool = True) -> list[tuple[int, int, int]]:
        """Slices of the stream between the previous row's end and the file's data;
        none once the row is checked. A row with no room for headers there is a lie
        (HeaderMismatchError), or, not ``strict`` (prefetch), nothing to fetch."""
        if entry.type != "reg" or not entry.size or entry.offset in self._checked:
            return []
        ends = self._ends()
        previous = bisect.bisect_right(ends, entry.offset) - 1
        start = member_end(ends[previous]) if previous >= 0 else 0
        if not 0 < entry.offset - start <= MAX_HEADER_CHAIN:
            # No room for a header chain (or room for far more than one): the row is a
            # lie before anything is read. (Before the table is checked, when row ends
            # only steer prefetch, nothing is planned.)
            if not strict or not self.entries:
                return []
            raise HeaderMismatchError(
                f"{entry.name!r}: {entry.offset - start} bytes between the previous row's "
                "end and its data can hold no tar header chain"
            )
        return self._stream_slices(start, entry.offset)

    def _ends(self) -> list[int]:
        """Row ends of the checked table; before it is checked, of the decoded one (which
        only steers prefetch: reads come after the check, and check again)."""
        if not self._row_ends and self.entries:
            self._row_ends = [entry.offset + entry.size for entry in self.entries]
        if self._row_ends or self._decoded is None:
            return self._row_ends
        return self._decoded.row_ends()

    def header_plan(self, entry: TocEntry, offset: int, length: int) -> list[ChunkSlice]:
        """The bytes a regular file's row is checked against before its data is first
        served (here with bytes [offset, offset+length)): its own tar headers in the
        verified stream. The spans' digests prove the bytes, not that the table tells
        the truth about them."""
        header = self._header_slices(entry)
        if not header:
            return []
        return self._plan(header + self._slices(entry, offset, length))[: len(header)]

    def mark_audited(self) -> None:
        """The whole table matched the whole stream (``layer_audit``): no row needs its
        header read again."""
        self._checked.update(entry.offset for entry in self.entries)

    def check_header(self, entry: TocEntry, chain: bytes) -> None:
        """Compare the row with the headers ``header_plan`` read (HeaderMismatchError)."""
        check_header(chain, entry)
        self._checked.add(entry.offset)

    def expect_reads(self, reads: Iterable[tuple[TocEntry, int, int]]) -> None:
        """Told what a prefetch is about to ask for (file, offset, length): a span that
        these reads need only the start of is fetched and checked only that far, by its
        pieces, and later reads within that start are served from it. A span's digest
        covers all of its 4 MiB, so otherwise a start that reads the first part of many
        spans fetches their whole spans.
        Spans told once keep what they were told (chunk keys must not change under
        readers); reads beyond a prefix take the whole span."""
        reach: dict[int, int] = {}
        for entry, offset, length in reads:
            slices = self._header_slices(entry, strict=False) + self._slices(entry, offset, length)
            for number, start, take in slices:
                reach[number] = max(reach.get(number, 0), start + take)
        piece = self.index.piece_size
        for number, end in reach.items():
            count = -(-end // piece) if piece else 0
            if number not in self._prefixes and 0 < count <= self.index.pieces(number):
                self._prefixes[number] = self._prefix_spec(number, count)

    def file_chunks(self, entry: TocEntry) -> list[ChunkSpec]:
        """Every span holding part of the file."""
        return [s.chunk for s in self.read_plan(entry, 0, entry.size)]

    def all_chunks(self) -> list[ChunkSpec]:
        """Every span of the layer, in order."""
        return [self._spec(i) for i in range(len(self._bounds))]

    def chunks_after(self, chunk: ChunkSpec, budget: ReadAheadBudget) -> list[ChunkSpec]:
        """The following spans, within ``budget``."""
        number = int(chunk.key[len(self._key_prefix) :][:8])  # <tag>-s<span>[p<pieces>]
        following = range(number + 1, len(self._bounds))
        return budget.take(self._spec(number) for number in following)

    def landmark_files(self) -> list[str]:
        """Index-only layers keep their prefetch list in the artifact, not the blob."""
        return []
