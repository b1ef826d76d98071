"""eStargz layers (full mode, or eStargz images built by other tools)."""

from __future__ import annotations

import bisect
import itertools
from functools import partial

from agent.layers.lazy_layer import ChunkSlice, ReadAheadBudget
from fetcher.chunks import BlobSource, ChunkSpec
from formats.estargz_reader import ChunkRef, EstargzToc, MemberDecoder, read_member
from formats.toc import TocEntry


def _member_specs(chunks: dict[str, list[ChunkRef]]) -> dict[int, ChunkSpec]:
    """One fetchable, cacheable chunk per gzip member, keyed by the member's blob offset.

    Small files share a member (``innerOffset``); caching the member rather than each file
    means one request, one inflate, one digest pass and one cache file for all of them.
    """
    members: dict[int, list[ChunkRef]] = {}
    for refs in chunks.values():
        for ref in refs:
            members.setdefault(ref.blob_offset, []).append(ref)
    specs = {}
    for offset in sorted(members):
        refs = members[offset]
        end = max(ref.blob_end for ref in refs)
        specs[offset] = ChunkSpec(
            key=f"m{offset:012x}-{end:x}",
            fetch_start=offset,
            fetch_end=end,
            decoded_size=max(ref.inner_offset + ref.size for ref in refs),
            decode=partial(read_member, refs),
            streaming=partial(MemberDecoder, refs),
        )
    return specs


class EstargzLayer:
    """Serves files from verified gzip members; a file's bytes are slices of them."""

    kind = "estargz"

    def __init__(self, blob: BlobSource, toc: EstargzToc) -> None:
        self.blob = blob
        self.toc = toc
        self.entries: list[TocEntry] = toc.entries
        self._chunks: dict[str, list[ChunkRef]] = toc.chunks
        self._starts = {name: [c.file_offset for c in refs] for name, refs in self._chunks.items()}
        self._members = _member_specs(self._chunks)
        self._ordered = list(self._members.values())
        self._position = {offset: i for i, offset in enumerate(self._members)}

    def read_plan(self, entry: TocEntry, offset: int, length: int) -> list[ChunkSlice]:
        """Member slices for the file's bytes [offset, offset+length) (clipped at EOF)."""
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
            member = self._members[ref.blob_offset]
            plan.append(ChunkSlice(member, ref.inner_offset + start, take))
            position += take
            index += 1
        return plan

    def file_chunks(self, entry: TocEntry) -> list[ChunkSpec]:
        """Every member holding part of the file, in file order."""
        specs = [self._members[ref.blob_offset] for ref in self._chunks.get(entry.name, [])]
        return list(dict.fromkeys(specs))

    def all_chunks(self) -> list[ChunkSpec]:
        """Every member in blob order; the prioritized (landmark) area comes first."""
        return list(self._ordered)

    def chunks_after(self, chunk: ChunkSpec, budget: ReadAheadBudget) -> list[ChunkSpec]:
        """Following members in blob order, within ``budget``."""
        index = self._position.get(chunk.fetch_start)
        if index is None:
            return []
        return budget.take(itertools.islice(self._ordered, index + 1, None))

    def prefetch_chunks(self) -> list[ChunkSpec]:
        """Members before the prefetch landmark: what the image's builder said startup needs."""
        if self.toc.prefetch_end is None:
            return []
        return [s for s in self._ordered if s.fetch_start < self.toc.prefetch_end]
