"""Member extents read from a TOC before validation agree with the validated TOC's
chunks, and records that are odd in any way are skipped rather than trusted."""

from __future__ import annotations

import io
import tarfile
from typing import Any

from formats.estargz import write_estargz
from formats.estargz_extents import member_extents
from formats.estargz_reader import EstargzToc, parse_toc
from formats.estargz_toc import FOOTER_SIZE, parse_footer

CHUNK = 1000


def _layer() -> tuple[EstargzToc, list[Any]]:
    """A layer with small files sharing members and a file of several chunks, as the
    validated TOC and the records it was decoded from."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for index in range(12):
            data = bytes([index]) * (100 + 37 * index)
            info = tarfile.TarInfo(f"lib/small{index}.py")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        big = bytes(range(256)) * 20
        info = tarfile.TarInfo("lib/big.so")
        info.size = len(big)
        tar.addfile(info, io.BytesIO(big))
    blob = io.BytesIO()
    write_estargz(io.BytesIO(out.getvalue()), blob, chunk_size=CHUNK, min_chunk_size=600)
    raw = blob.getvalue()
    toc_offset = parse_footer(raw[-FOOTER_SIZE:], len(raw))
    seen: list[list[Any]] = []
    toc = parse_toc(raw[toc_offset : len(raw) - FOOTER_SIZE], toc_offset, None, seen.append)
    return toc, seen[0]


def _chunks_named(toc: EstargzToc, name: str) -> list[Any]:
    """The chunks of the last file called ``name`` (none if there is none)."""
    files = [entry for entry in toc.entries if entry.name == name]
    return toc.chunks.get(files[-1]) if files else []


def _chunk_extents(toc: EstargzToc, name: str, ranges: list[tuple[int, int]] | None) -> set:
    return {
        (ref.blob_offset, ref.blob_end)
        for ref in _chunks_named(toc, name)
        if ranges is None
        or any(s < ref.file_offset + ref.size and ref.file_offset < e for s, e in ranges)
    }


def test_extents_are_the_validated_chunks_members() -> None:
    toc, records = _layer()
    assert len({ref.blob_offset for ref in _chunks_named(toc, "lib/small3.py")}) == 1
    wanted: list[tuple[str, list[tuple[int, int]] | None]] = [
        ("lib/small3.py", None),
        ("lib/big.so", [(2500, 2600)]),
        ("lib/small4.py", None),
        ("lib/missing.py", None),
    ]
    extents = member_extents(records, toc.toc_offset, wanted, 1 << 30)
    expected = set().union(*(_chunk_extents(toc, n, r) for n, r in wanted[:3]))
    assert set(extents) == expected
    assert len(extents) == len(expected)  # a member two files share is named once
    whole = member_extents(records, toc.toc_offset, [("lib/big.so", None)], 1 << 30)
    assert set(whole) == _chunk_extents(toc, "lib/big.so", None) and len(whole) > 2
    # In wanted order, until the byte limit.
    first = whole[0][1] - whole[0][0]
    assert member_extents(records, toc.toc_offset, [("lib/big.so", None)], first) == whole[:1]


def test_odd_records_are_skipped_not_trusted() -> None:
    toc, records = _layer()
    name = "lib/small5.py"
    good = member_extents(records, toc.toc_offset, [(name, None)], 1 << 30)
    assert good
    index = next(i for i, r in enumerate(records) if r.get("name") == name)
    for field, value in (
        ("offset", str(records[index]["offset"])),
        ("offset", toc.toc_offset),
        ("offset", -1),
        ("chunkOffset", -5),
        ("chunkSize", "big"),
        ("type", "symlink"),
    ):
        hostile = [*records[:index], {**records[index], field: value}, *records[index + 1 :]]
        assert member_extents(hostile, toc.toc_offset, [(name, None)], 1 << 30) == []
    garbage = [7, "x", None, [], {"name": [], "type": "reg", "offset": 0}, *records]
    assert member_extents(garbage, toc.toc_offset, [(name, None)], 1 << 30) == good
    # No later member within reach: the TOC is not in blob order, so nothing is named.
    stranded = [*records[: index + 1], *([{"name": "d", "type": "dir"}] * 300)]
    assert member_extents(stranded, toc.toc_offset, [(name, None)], 1 << 30) == []
