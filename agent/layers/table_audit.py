"""The whole file table of an index-only layer, checked against the whole tar stream.

Reads check each regular file's row against its own tar header before its data is
served (formats/header_check.py). That leaves the rows no read ever touches
(directories, symlinks, devices, hard links: their names, modes and owners) and trusts
the table's framing of where members start. Once the background fill brings the whole
layer, walking the verified stream from its first byte settles every row: the tar says
what each member is and where its data starts, and the table must say exactly that, row
for row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import BinaryIO

from agent.layers.indexed_layer import IndexedLayer
from fetcher.chunks import Priority
from fetcher.scheduler import ChunkFetcher
from fetcher.sync_stream import consume_in_thread
from formats.toc import HostileLayerError, TocEntry, iter_tar_entries


class AuditStopped(Exception):
    """The layer went away before its audit finished: no verdict either way."""


def first_difference(table: list[TocEntry], stream: BinaryIO) -> str | None:
    """Where ``table`` and the tar ``stream`` first disagree (None if nowhere)."""
    rows = iter(table)
    number = 0
    try:
        for found, _info, _data in iter_tar_entries(stream):
            row = next(rows, None)
            if row is None:
                return f"the layer has more members than the table's {number} rows"
            if dataclasses.replace(row, digest=found.digest) != found:
                return f"row {number} ({row.name!r}) differs from the layer's member {found.name!r}"
            number += 1
    except HostileLayerError as exc:
        return f"the layer's tar stops making sense at row {number}: {exc}"
    if next(rows, None) is not None:
        return f"the table has rows past the layer's {number} members"
    return None


async def audit_table(
    layer: IndexedLayer, fetcher: ChunkFetcher, still_wanted: Callable[[], bool]
) -> str | None:
    """Stream every span of the layer (from the cache, or fetched at background
    priority) through a tar walk on a worker thread; the first difference, or None.
    AuditStopped once ``still_wanted`` says the layer is gone."""

    async def spans() -> AsyncIterator[bytes]:
        for spec in layer.all_chunks():
            if not still_wanted():
                raise AuditStopped(layer.blob.digest)
            yield await fetcher.get(layer.blob, spec, Priority.BACKGROUND)

    verdict = await consume_in_thread(
        spans(), lambda stream: first_difference(layer.entries, stream)
    )
    if verdict is None:
        layer.mark_audited()
    return verdict
