"""Where named files lie in an eStargz blob, read from a TOC not yet validated.

A big layer's TOC (tens of thousands of records) takes long to validate, with one core
busy and the link idle. Which gzip members hold the files a learned profile names
is known as soon as the TOC's JSON is decoded, so their bytes can be on their way while
it is validated. Nothing here is trusted: the extents only say which compressed bytes to
download early; every chunk is still inflated and checked against the validated TOC's
digests before anyone reads it. So a record that is odd in any way is skipped, not
refused (validation refuses the TOC, if it must, with a reason).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Extent = tuple[int, int]
"""[start, end) in the blob."""
WantedFile = tuple[str, Sequence[tuple[int, int]] | None]
"""A normalized file name and the [start, end) ranges of its content wanted (None: all)."""
_LOOK_AHEAD = 256
"""Records searched past a member's for the next member's start (directories, links and
landmarks have none): bounded, so a hostile TOC cannot make the search quadratic."""


def member_extents(
    records: Sequence[Any], toc_offset: int, wanted: Sequence[WantedFile], limit: int
) -> list[Extent]:
    """The blob extents of the gzip members holding ``wanted`` content, in ``wanted``'s
    order (a member shared by several files once), until ``limit`` bytes are named.

    It runs on the parse's own thread, before validation, so it touches the 40 000
    records once, in one comprehension, and looks closer only at the wanted ones (a
    name the TOC spells unnormalized is simply not warmed).
    """
    names = {name for name, _ in wanted}
    hits = [
        index
        for index, record in enumerate(records)
        if type(record) is dict and type(name := record.get("name")) is str and name in names
    ]
    found: dict[str, list[tuple[int, float, Extent]]] = {}
    for index in hits:
        piece = _member_piece(records, index, toc_offset)
        if piece is not None:
            found.setdefault(records[index]["name"], []).append(piece)
    extents: list[Extent] = []
    seen: set[int] = set()
    total = 0
    for name, ranges in wanted:
        for first, last, extent in found.get(name, ()):
            if extent[0] in seen or not _overlaps(first, last, ranges):
                continue
            total += extent[1] - extent[0]
            if total > limit:
                return extents
            seen.add(extent[0])
            extents.append(extent)
    return extents


def _member_piece(
    records: Sequence[Any], index: int, toc_offset: int
) -> tuple[int, float, Extent] | None:
    """(first file byte, end of the file's bytes, member extent) of one content record;
    None for anything else. The member ends where the next record with a later offset
    starts (TOCs list members in blob order), or at the TOC."""
    record = records[index]
    offset = record.get("offset")
    if record.get("type") not in ("reg", "chunk") or type(offset) is not int:
        return None
    first = record.get("chunkOffset", 0)
    size = record.get("chunkSize") or 0
    if type(first) is not int or type(size) is not int or first < 0 or size < 0:
        return None
    if not 0 <= offset < toc_offset:
        return None
    end = toc_offset
    for later in records[index + 1 : index + 1 + _LOOK_AHEAD]:
        if type(later) is dict and type(start := later.get("offset")) is int and start > offset:
            end = min(start, toc_offset)
            break
    else:
        if index + 1 + _LOOK_AHEAD < len(records):
            return None  # no later member nearby: not a TOC in blob order
    return first, first + size if size else float("inf"), (offset, end)


def _overlaps(first: int, last: float, ranges: Sequence[tuple[int, int]] | None) -> bool:
    return ranges is None or any(start < last and first < end for start, end in ranges)
