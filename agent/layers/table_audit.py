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

import asyncio
import concurrent.futures
import dataclasses
import io
from collections.abc import Callable
from typing import BinaryIO

from agent.layers.indexed_layer import IndexedLayer
from fetcher.chunks import Priority
from fetcher.scheduler import ChunkFetcher
from formats.toc import HostileLayerError, TocEntry, iter_tar_entries

_AUDITS = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="acceld-audit")
"""One audit at a time, on a thread of its own. Never the loop's default executor: an
audit's walk waits there for spans, and a few layers audited at once took every thread
the snapshotter's own work needs, so containers waited on their snapshots."""
_POLL_S = 1.0


class AuditStopped(Exception):
    """The layer (or the agent) went away before its audit finished: no verdict."""


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


class _SpanStream(io.RawIOBase):
    """The layer's tar stream for a walk on the audit thread: each span asked of the
    fetcher on the event loop when the walk reaches it (from the cache, or fetched at
    background priority), so no more than one span is held at a time."""

    def __init__(
        self,
        layer: IndexedLayer,
        fetcher: ChunkFetcher,
        loop: asyncio.AbstractEventLoop,
        still_wanted: Callable[[], bool],
    ) -> None:
        self._layer, self._fetcher, self._loop = layer, fetcher, loop
        self._still_wanted = still_wanted
        self._specs = iter(layer.all_chunks())
        self._current = memoryview(b"")

    def readable(self) -> bool:
        return True

    async def _next_span(self) -> bytes | None:
        if not self._still_wanted():
            raise AuditStopped(self._layer.blob.digest)
        spec = next(self._specs, None)
        if spec is None:
            return None
        return await self._fetcher.get(self._layer.blob, spec, Priority.BACKGROUND)

    def _ask_loop(self) -> bytes | None:
        try:
            future = asyncio.run_coroutine_threadsafe(self._next_span(), self._loop)
        except RuntimeError:  # the loop is closed: the agent is shutting down
            raise AuditStopped(self._layer.blob.digest) from None
        while True:
            try:
                return future.result(_POLL_S)
            except concurrent.futures.TimeoutError:
                if not self._loop.is_running():
                    future.cancel()
                    raise AuditStopped(self._layer.blob.digest) from None

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._current:
            span = self._ask_loop()
            if span is None:
                return 0
            self._current = memoryview(span)
        n = min(len(buffer), len(self._current))
        buffer[:n] = self._current[:n]
        self._current = self._current[n:]
        return n


async def audit_table(
    layer: IndexedLayer, fetcher: ChunkFetcher, still_wanted: Callable[[], bool]
) -> str | None:
    """Walk every span of the layer through a tar reader on the audit thread; the first
    difference from the file table, or None (and the layer is marked audited).
    AuditStopped once ``still_wanted`` says the layer is gone."""
    loop = asyncio.get_running_loop()
    stream = _SpanStream(layer, fetcher, loop, still_wanted)

    def walk() -> str | None:
        with io.BufferedReader(stream, buffer_size=1 << 20) as reader:
            return first_difference(layer.entries, reader)

    verdict = await loop.run_in_executor(_AUDITS, walk)
    if verdict is None:
        layer.mark_audited()
    return verdict
