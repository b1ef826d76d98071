"""The compressed bytes a start cannot do without: the honest physical limit.

The suite's first limit counted the bytes the application read, uncompressed, at link
speed. What crosses the link is compressed, so lazy starts came out "faster than the
limit" and the table stopped saying how much was left to win. Here the ranges a start
read (a learned profile's coverage, per layer and file) are mapped to the compressed
bytes that hold them, at the finest granularity the layer's form allows:

* an untouched gzip layer (the index-only form): deflate can be entered only at a block
  boundary, with the 32 KiB of output before it. An index as dense as the format allows
  (a checkpoint at the first block boundary after every 32 KiB of output, which with
  zlib's block sizes is nearly every boundary) says which compressed bytes hold each
  range. The windows are index metadata and are not counted;
* an eStargz layer (the full form): the gzip members (chunks) holding the ranges, from
  its TOC; a member can only be inflated whole.

Next to it, what acceld's own fetch units cost for the same ranges: whole 4 MiB spans
(what an unplanned read of an index-only layer fetches), or the span's leading pieces
that reach the read (what a planned read fetches); members in the full form. The
difference to the limit is the "granularity" share of over-fetch (bench/overfetch.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from converter.convert import ConvertOptions
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from formats.estargz_reader import EstargzToc, parse_toc
from formats.estargz_toc import FOOTER_SIZE, parse_footer
from formats.gzip_index import DEFAULT_PIECE, WINDOW_SIZE
from formats.layer_index import LayerIndex
from formats.layer_index_builder import build_layer_index
from formats.layer_tree import InodeAllocator, LayerTree
from formats.toc import TocEntry
from profiles.format import Profile
from rig.images import BuiltImage

FileRanges = Mapping[str, Sequence[tuple[int, int]]]
"""A layer's files (normalized names) and the [start, end) ranges of each that were read."""
FINEST_SPAN = WINDOW_SIZE
"""The densest checkpoint spacing a gzip index can have (a window's worth of output)."""


@dataclass(frozen=True)
class RangeCost:
    """What some read ranges cost in bytes on the link, by fetch granularity."""

    read_bytes: int = 0
    """The ranges themselves, uncompressed (what the first limit counted)."""
    limit_bytes: int = 0
    """Compressed, at the finest granularity the form allows: the honest limit."""
    span_bytes: int = 0
    """Compressed, in acceld's whole fetch units (spans; members)."""
    piece_bytes: int = 0
    """Compressed, in acceld's planned units (the spans' leading pieces; members)."""

    def __add__(self, other: RangeCost) -> RangeCost:
        return RangeCost(
            self.read_bytes + other.read_bytes,
            self.limit_bytes + other.limit_bytes,
            self.span_bytes + other.span_bytes,
            self.piece_bytes + other.piece_bytes,
        )


def profile_ranges(profile: Profile) -> dict[str, dict[str, list[tuple[int, int]]]]:
    """Per layer digest, the ranges of each file some recorded start read."""
    by_layer: dict[str, dict[str, list[tuple[int, int]]]] = {}
    for stat in profile.files:
        ranges = [(start, end) for start, end, _ in stat.coverage if end > start]
        if ranges:
            by_layer.setdefault(stat.layer, {})[stat.path] = ranges
    return by_layer


def union_bytes(extents: Iterable[tuple[int, int]]) -> int:
    """Bytes covered by ``[start, end)`` extents that may overlap or repeat."""
    total = 0
    reach = -1
    for start, end in sorted(extents):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


def _data_entries(entries: Sequence[TocEntry], names: Iterable[str]) -> dict[str, TocEntry]:
    """Each named regular file's entry that holds its data, as the layer's tree shows it
    (formats/layer_tree.py: the last entry of a name wins, a hard link reads its
    target's data)."""
    tree = LayerTree(list(entries), InodeAllocator())
    found = {}
    for name in names:
        node = tree.lookup(name)
        if node is not None and node.entry.type == "reg":
            found[name] = node.entry
    return found


def _stream_ranges(entries: Sequence[TocEntry], ranges: FileRanges) -> list[tuple[int, int]]:
    """The ranges as offsets in the layer's uncompressed tar stream (clipped at each
    file's end; files the layer does not hold as regular files are skipped)."""
    files = _data_entries(entries, ranges)
    stream = []
    for path, file_ranges in ranges.items():
        entry = files.get(path)
        if entry is None:
            continue
        for start, end in file_ranges:
            end = min(end, entry.size)
            if start < end:
                stream.append((entry.offset + start, entry.offset + end))
    return stream


def gzip_layer_cost(
    blob: Path,
    media_type: str,
    ranges: FileRanges,
    *,
    span: int = ConvertOptions.span,
    piece: int = DEFAULT_PIECE,
) -> RangeCost:
    """The cost of ``ranges`` in an untouched gzip (or plain tar) layer blob: two passes
    over it, one indexing as densely as deflate allows, one as the converter does."""
    with blob.open("rb") as source:
        finest = build_layer_index(
            source,
            layer_digest="",
            media_type=media_type,
            span=FINEST_SPAN,
            piece=FINEST_SPAN,
        )
    with blob.open("rb") as source:
        acceld = build_layer_index(
            source, layer_digest="", media_type=media_type, span=span, piece=piece
        )
    stream = _stream_ranges(finest.entries, ranges)
    return RangeCost(
        union_bytes(stream),
        union_bytes(_plan_extent(finest, start, end) for start, end in stream),
        *_acceld_extents(acceld, stream),
    )


def _plan_extent(index: LayerIndex, start: int, end: int) -> tuple[int, int]:
    plan = index.plan_read(start, end - start)
    return plan.fetch_start, plan.fetch_end


def _acceld_extents(index: LayerIndex, stream: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """Compressed bytes of the whole spans the ranges touch, and of the leading pieces
    that reach the furthest range in each span (the whole span where pieces do not
    reach: the last piece runs on to the next checkpoint)."""
    if index.is_gzip:
        bounds = [index.span_range(n) for n in range(len(index.checkpoints))]
    else:
        size = index.span_size
        bounds = [
            (start, min(start + size, index.uncompressed_size))
            for start in range(0, index.uncompressed_size, size)
        ]
    starts = [start for start, _ in bounds]
    reach: dict[int, int] = {}
    for position, stop in stream:
        number = _span_at(starts, position)
        while position < stop:
            span_start, span_end = bounds[number]
            reach[number] = max(reach.get(number, 0), min(span_end, stop) - span_start)
            position = span_end
            number += 1
    spans = []
    prefixes = []
    for number, furthest in reach.items():
        start, end = bounds[number]
        whole = _plan_extent(index, start, end)
        spans.append(whole)
        count = -(-furthest // index.piece_size) if index.piece_size else 0
        if index.is_gzip and 0 < count <= index.pieces(number):
            prefixes.append(index.prefix_fetch(number, count))
        else:
            prefixes.append(whole)
    return union_bytes(spans), union_bytes(prefixes)


def _span_at(starts: Sequence[int], offset: int) -> int:
    lo, hi = 0, len(starts) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if starts[mid] <= offset:
            lo = mid
        else:
            hi = mid - 1
    return lo


def estargz_layer_cost(toc: EstargzToc, ranges: FileRanges) -> RangeCost:
    """The cost of ``ranges`` in an eStargz layer: every member holding a read byte."""
    files = _data_entries(toc.entries, ranges)
    read = 0
    members = []
    for path, file_ranges in ranges.items():
        entry = files.get(path)
        if entry is None:
            continue
        chunks = toc.chunks.get(entry)
        clipped = [(start, min(end, entry.size)) for start, end in file_ranges]
        clipped = [(start, end) for start, end in clipped if start < end]
        read += union_bytes(clipped)
        members += [
            (chunk.blob_offset, chunk.blob_end)
            for start, end in clipped
            for chunk in chunks
            if chunk.file_offset < end and chunk.file_offset + chunk.size > start
        ]
    compressed = union_bytes(members)
    return RangeCost(read, compressed, compressed, compressed)


async def fetch_estargz_toc(
    client: RegistryClient, reference: ImageReference, digest: str, size: int
) -> EstargzToc:
    """A layer's TOC, from its footer and TOC member (two Range GETs)."""
    tail = await client.get_range(reference, digest, size - FOOTER_SIZE, FOOTER_SIZE)
    toc_offset = parse_footer(tail, size)
    member = await client.get_range(reference, digest, toc_offset, size - FOOTER_SIZE - toc_offset)
    return parse_toc(member, toc_offset)


def index_form_cost(built: BuiltImage, profile: Profile) -> RangeCost:
    """What the ranges a profile records cost in the image's original layers (the
    index-only form serves those blobs, which the bench has locally)."""
    media_types = {layer.digest: layer.media_type for layer in built.layers}
    total = RangeCost()
    for digest, ranges in profile_ranges(profile).items():
        if digest in media_types:
            total += gzip_layer_cost(built.blob_path(digest), media_types[digest], ranges)
    return total


async def full_form_cost(
    client: RegistryClient, reference: ImageReference, profile: Profile
) -> RangeCost:
    """What the ranges a profile records cost in the eStargz image ``reference``."""
    resolved = await client.resolve(reference)
    sizes = {layer.digest: layer.size for layer in resolved.manifest.layers}
    total = RangeCost()
    for digest, ranges in profile_ranges(profile).items():
        if digest in sizes:
            toc = await fetch_estargz_toc(client, reference, digest, sizes[digest])
            total += estargz_layer_cost(toc, ranges)
    return total
