"""An index-only layer checked against the layer itself, as the background fill brings it.

Reads check what they can before anything is served: each span against the digest the
index claims for it, each regular file's row against its own tar header. Three claims of
an index artifact no read can check:
- the windows and checkpoints spans are inflated from: a forged window, its span's
  digest signed again to match, inflates the blob's own bytes into other ones;
- the rows of directories, links, devices and whiteouts, which no file's data is read by;
- against a registry that lies consistently, the blob itself: lazily read ranges cannot
  be checked against the layer digest, which covers the whole blob.
The fill settles all three at once. It downloads the blob in one stream, which the layer
digest covers (the registry client checks it at the end), inflates it from its start
with no stored window, checks every span of that true stream against the index's digest
for it (caching it, which is what the fill is for), and walks the true tar against the
file table row for row. The first difference distrusts the artifact.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hashlib
import io
from collections.abc import AsyncIterator, Callable, Iterator
from typing import BinaryIO

from agent.layers.indexed_layer import IndexedLayer
from common.byte_streams import IteratorReader
from common.logging import get_logger
from fetcher.chunk_cache import ChunkCache
from fetcher.errors import DigestMismatchError
from formats.fast_zlib import MemberInflater
from formats.toc import HostileLayerError, TocEntry, iter_tar_entries

log = get_logger(__name__)
_AUDITS = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="acceld-audit")
"""One audit at a time, on a thread of its own. Never the loop's default executor: an
audit waits there for the download, and a few layers audited at once took every thread
the snapshotter's own work needs, so containers waited on their snapshots."""
_POLL_S = 1.0
MAX_CACHED_SPAN = 64 << 20
"""Spans larger than this are checked (their digest is taken piece by piece) but not
held whole to be cached: the index, not we, chose their size."""


class AuditStopped(Exception):
    """The layer (or the agent) went away before its audit finished: no verdict."""


class _Differs(Exception):
    """The layer's own bytes contradict the index (the message says where)."""


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


class _SpanCheck:
    """Cuts the true uncompressed stream at the index's span bounds and holds each span
    to the digest the index claims for it; ``store`` is handed each span that passes."""

    def __init__(
        self,
        bounds: list[tuple[int, int]],
        digests: list[bytes],
        store: Callable[[int, bytes], None],
    ) -> None:
        self._bounds, self._digests, self._store = bounds, digests, store
        self._number = self._position = 0
        self._hasher = hashlib.sha256()
        self._held: list[bytes] = []

    def add(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._number >= len(self._bounds):
                raise _Differs("the layer holds more bytes than the index says")
            start, end = self._bounds[self._number]
            piece = view[: end - self._position]
            self._hasher.update(piece)
            if end - start <= MAX_CACHED_SPAN:
                self._held.append(bytes(piece))
            self._position += len(piece)
            view = view[len(piece) :]
            if self._position == end:
                self._close_span()

    def _close_span(self) -> None:
        if self._hasher.digest() != self._digests[self._number]:
            raise _Differs(f"span {self._number} of the layer is not what the index says")
        if self._held:
            self._store(self._number, b"".join(self._held))
        self._number += 1
        self._hasher = hashlib.sha256()
        self._held = []

    def finish(self) -> None:
        if self._number != len(self._bounds):
            raise _Differs(f"the layer ends at {self._position}, before the index says")


def verify_layer(
    layer: IndexedLayer, compressed: Iterator[bytes], store: Callable[[int, bytes], None]
) -> str | None:
    """Check the index of ``layer`` against the blob's bytes ``compressed`` (from the
    start, in order): every span and every row. The first difference, or None."""
    index = layer.index
    spans = _SpanCheck(layer.span_bounds, index.span_digests, store)

    def true_stream() -> Iterator[bytes]:
        inflater = MemberInflater() if index.is_gzip else None
        for block in compressed:
            for data in inflater.feed(block) if inflater is not None else (block,):
                spans.add(data)
                yield data
        spans.finish()

    stream = true_stream()
    try:
        with io.BufferedReader(IteratorReader(stream), buffer_size=1 << 20) as reader:
            verdict = first_difference(layer.entries, reader)
        if verdict is None:
            for _ in stream:  # the end-of-archive padding: its spans and the blob digest
                pass
        return verdict
    except _Differs as exc:
        return str(exc)


class _FromLoop:
    """An async iterator of the event loop, iterated from the audit thread."""

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        loop: asyncio.AbstractEventLoop,
        still_wanted: Callable[[], bool],
    ) -> None:
        self._chunks, self._loop, self._still_wanted = chunks, loop, still_wanted
        self.bytes = 0

    async def _next(self) -> bytes | None:
        if not self._still_wanted():
            raise AuditStopped()
        try:
            chunk = await anext(self._chunks)
        except StopAsyncIteration:
            return None
        self.bytes += len(chunk)
        return chunk

    def __iter__(self) -> Iterator[bytes]:
        while True:
            try:
                future = asyncio.run_coroutine_threadsafe(self._next(), self._loop)
            except RuntimeError:  # the loop is closed: the agent is shutting down
                raise AuditStopped() from None
            while True:
                try:
                    chunk = future.result(_POLL_S)
                    break
                except concurrent.futures.TimeoutError:
                    if not self._loop.is_running():
                        future.cancel()
                        raise AuditStopped() from None
            if chunk is None:
                return
            yield chunk


async def audit_layer(
    layer: IndexedLayer,
    blob_stream: AsyncIterator[bytes],
    cache: ChunkCache,
    still_wanted: Callable[[], bool],
) -> tuple[str | None, int]:
    """Stream the blob (``blob_stream``, digest-checked at its end) through
    ``verify_layer`` on the audit thread, caching the spans it checks. Returns the first
    difference or None (the layer is then marked audited), and the bytes downloaded.
    AuditStopped once ``still_wanted`` says the layer is gone; registry errors pass."""
    loop = asyncio.get_running_loop()
    source = _FromLoop(blob_stream, loop, still_wanted)
    keys = [chunk.key for chunk in layer.all_chunks()]
    failed_store: list[str] = []

    def store(number: int, data: bytes) -> None:
        if failed_store or cache.contains(layer.blob.digest, keys[number]):
            return
        try:
            cache.put(layer.blob.digest, keys[number], data)
        except OSError as exc:  # a full disk: the audit goes on, the fill does not
            failed_store.append(str(exc))

    try:
        verdict = await loop.run_in_executor(_AUDITS, verify_layer, layer, iter(source), store)
    except DigestMismatchError as exc:
        verdict = f"the blob the registry sent is not the layer: {exc}"
    finally:
        await blob_stream.aclose()  # type: ignore[attr-defined]
    if failed_store:
        log.warning("audit.cache_store_failed", layer=layer.blob.digest, error=failed_store[0])
    if verdict is None:
        layer.mark_audited()
    return verdict, source.bytes
