"""The index-only form of a layer: what the agent needs to serve an untouched layer.

With it the agent serves a layer's files straight from the untouched registry blob: the
file table says where a file's bytes lie in the uncompressed tar, the checkpoints say
which compressed byte range to fetch and where to start inflating, and the span and file
digests prove what was inflated. Since version 2 each span is also digested in pieces,
with where each piece's compressed bytes end, so that a reader who needs only the start
of a span fetches and checks only that.

This module is the data model and the reads it plans and checks. Around it:
formats/layer_index_builder.py makes one from a layer's blob,
formats/layer_index_codec.py turns one into the artifact's bytes and back (treating
those bytes as hostile), and formats/layer_index_table.py states the rules every row
of the file table is held to.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from formats.gzip_index import (
    WINDOW_SIZE,
    Checkpoint,
    CorruptSpanError,
    RangePlan,
    SpanDecoder,
    decompress_window,
    inflate_prefix,
    inflate_range,
    inflate_span,
    plan_range,
    span_bounds,
)
from formats.media_types import GZIP_LAYERS
from formats.toc import TocEntry

MIN_PIECE = 4096
"""Smaller pieces would cost more index (36 bytes each) than they save fetching."""
MIN_SPAN = WINDOW_SIZE
MAX_SPAN = 1 << 30
MAX_LAYER_SIZE = 1 << 44
DIGEST_BYTES = 32
"""A sha256 digest, as the artifact stores span, piece and file digests."""


class IndexFormatError(ValueError):
    """The bytes are not a valid layer index: never use any part of them."""


class UnsupportedLayerError(ValueError):
    """The layer's media type has no random-access index form (zstd, unknown)."""


@dataclass
class LayerIndex:
    """Everything the agent needs to serve one untouched layer lazily.

    ``checkpoints``, ``windows`` (zlib-compressed; empty where the span needs no history,
    e.g. at a gzip member start) and ``span_digests`` run in parallel; all three are
    empty for an uncompressed tar, whose bytes are read directly at the entries' offsets.
    """

    layer_digest: str
    media_type: str
    compressed_size: int
    uncompressed_size: int
    span_size: int
    checkpoints: list[Checkpoint] = field(default_factory=list)
    windows: list[bytes] = field(default_factory=list)
    span_digests: list[bytes] = field(default_factory=list)
    entries: list[TocEntry] = field(default_factory=list)
    piece_size: int = 0
    """0: spans are only fetched whole (a plain tar layer, or a version 1 index)."""
    piece_digests: list[list[bytes]] = field(default_factory=list)
    piece_ends: list[list[int]] = field(default_factory=list)
    source_digest: str = field(default="", compare=False)
    """The digest of the artifact bytes this was parsed from (empty for an index built in
    memory until ``layer_index_codec.fingerprint`` fills it in): what an agent binds its
    view of the layer to."""

    @property
    def is_gzip(self) -> bool:
        return self.media_type in GZIP_LAYERS

    def window(self, number: int) -> bytes:
        return decompress_window(self.windows[number])

    def plan_read(self, offset: int, length: int) -> RangePlan:
        """Which checkpoint to inflate from and which blob bytes to fetch for
        uncompressed ``[offset, offset + length)`` (checkpoint -1 for a plain tar: the
        bytes are fetched as they are)."""
        if offset < 0 or length < 0 or offset + length > self.uncompressed_size:
            raise ValueError(f"range {offset}+{length} outside the layer")
        if not self.is_gzip:
            return RangePlan(-1, offset, offset + length)
        return plan_range(self.checkpoints, self.compressed_size, offset, length)

    def read(self, plan: RangePlan, fetched: bytes, offset: int, length: int) -> bytes:
        """Uncompressed ``[offset, offset + length)`` from the bytes ``plan`` fetched."""
        if not self.is_gzip:
            return bytes(fetched[offset - plan.fetch_start : offset - plan.fetch_start + length])
        number = plan.checkpoint
        return inflate_range(self.checkpoints[number], self.window(number), fetched, offset, length)

    def span_range(self, number: int) -> tuple[int, int]:
        """Uncompressed ``(start, end)`` of span ``number``."""
        return span_bounds(self.checkpoints, self.uncompressed_size, number)

    def read_plain_span(self, number: int, fetched: bytes) -> bytes:
        """Span ``number`` of an uncompressed tar layer (the fetched bytes themselves),
        checked against its digest."""
        start = number * self.span_size
        expected = min(self.span_size, self.uncompressed_size - start)
        if (
            len(fetched) != expected
            or hashlib.sha256(fetched).digest() != (self.span_digests[number])
        ):
            raise CorruptSpanError(f"span {number} of {self.layer_digest} fails its digest")
        return fetched

    def pieces(self, number: int) -> int:
        """How many of span ``number``'s leading pieces can be read without the rest."""
        return len(self.piece_ends[number]) if self.piece_size else 0

    def prefix_fetch(self, number: int, count: int) -> tuple[int, int]:
        """Compressed ``(start, end)`` to fetch for the first ``count`` pieces of span
        ``number`` (``1 <= count <= pieces(number)``)."""
        return self.checkpoints[number].compressed_offset, self.piece_ends[number][count - 1]

    def read_prefix(self, number: int, count: int, fetched: bytes) -> bytes:
        """The first ``count`` pieces of span ``number``, each checked against its
        digest (CorruptSpanError otherwise), from the bytes ``prefix_fetch`` names."""
        return inflate_prefix(
            self.checkpoints[number],
            self.window(number),
            fetched,
            self.piece_size,
            self.piece_digests[number][:count],
        )

    def span_decoder(self, number: int) -> SpanDecoder:
        """``read_span`` fed while the span's bytes arrive (same outcome, earlier)."""
        return SpanDecoder(
            self.checkpoints,
            self.span_digests,
            self.uncompressed_size,
            number,
            self.window(number),
        )

    def read_span(self, number: int, fetched: bytes) -> bytes:
        """The whole span ``number``, digest-checked (CorruptSpanError otherwise), from
        the blob bytes ``plan_read(*span)`` says to fetch."""
        return inflate_span(
            self.checkpoints,
            self.span_digests,
            self.uncompressed_size,
            number,
            self.window(number),
            fetched,
        )


def checked_int(value: object, name: str, maximum: int, minimum: int = 0) -> int:
    """``value`` as an integer in ``minimum..maximum`` (a bool is none), or
    IndexFormatError naming the field."""
    if type(value) is not int or not minimum <= value <= maximum:
        raise IndexFormatError(f"{name} must be an integer in {minimum}..{maximum}")
    return value


def checked_text(value: object, name: str, max_chars: int) -> str:
    """``value`` as a string of at most ``max_chars`` characters without NUL, or
    IndexFormatError naming the field."""
    if type(value) is not str or len(value) > max_chars or "\0" in value:
        raise IndexFormatError(f"{name} must be a string without NUL, at most {max_chars}")
    return value
