"""What the FUSE layer asks the fetcher for: chunks of layer blobs, at a priority.

A chunk is the unit that is fetched, verified and cached as one file. Its fetch range is
compressed bytes of the blob; ``decode`` turns them into the verified content, so the
fetcher never needs to know whether the layer is eStargz or an indexed plain gzip.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Protocol

from fetcher.reference import ImageReference

_KEY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,199}$")


class Priority(IntEnum):
    """Lower value wins: a blocked read beats a profile prefetch beats background fill."""

    DEMAND = 0
    PREFETCH = 1
    BACKGROUND = 2


def validate_chunk_key(key: str) -> str:
    """Return ``key`` or raise: keys become file names, and names starting with a dot are
    reserved for the cache's temporary files, so a key can never collide with one."""
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ValueError(f"invalid chunk key {key!r}: want [A-Za-z0-9_][A-Za-z0-9._-]*")
    return key


@dataclass(frozen=True)
class BlobSource:
    """A layer blob and the repository to read it from."""

    ref: ImageReference
    digest: str
    size: int


class ChunkDecoder(Protocol):
    """``ChunkSpec.decode`` split up: inflating and checking a chunk while its bytes
    arrive takes that work off the time a blocked read waits after the last byte."""

    def feed(self, data: bytes) -> None:
        """The next bytes of the fetch range (never raises: ``finish`` judges)."""

    def finish(self) -> bytes:
        """The verified content, or raise as ``decode`` would."""

    def close(self) -> None:
        """Release resources of a decoder that will not be finished."""


@dataclass(frozen=True)
class ChunkSpec:
    """One cacheable chunk: GET blob bytes [fetch_start, fetch_end), then ``decode`` them.

    ``decode`` must raise (ValueError subclasses such as ChunkDigestError or
    CorruptSpanError) rather than return bytes it could not verify. It is left out of
    equality so specs built twice for the same chunk compare equal.
    """

    key: str
    fetch_start: int
    fetch_end: int
    decoded_size: int
    """Bytes ``decode`` returns: what the chunk costs in memory while it is handed out."""
    decode: Callable[[bytes], bytes] = field(compare=False, hash=False, repr=False)
    streaming: Callable[[], ChunkDecoder] | None = field(
        default=None, compare=False, hash=False, repr=False
    )
    """Makes a decoder fed as the bytes arrive, with ``decode``'s outcome; None where
    the format has none."""

    def __post_init__(self) -> None:
        validate_chunk_key(self.key)
        if not 0 <= self.fetch_start < self.fetch_end:
            raise ValueError(
                f"chunk {self.key}: invalid fetch range [{self.fetch_start}, {self.fetch_end})"
            )

    @property
    def fetch_length(self) -> int:
        """Compressed bytes this chunk needs from the blob."""
        return self.fetch_end - self.fetch_start


class ChunkFetchError(Exception):
    """Base of the fetcher's own failures (registry failures keep their fetcher.errors type)."""


class CorruptChunkError(ChunkFetchError):
    """The registry kept returning bytes that do not decode to the chunk's digest."""

    def __init__(self, blob_digest: str, key: str, reason: str) -> None:
        super().__init__(f"blob {blob_digest} chunk {key}: corrupt after a refetch: {reason}")
        self.blob_digest = blob_digest
        self.key = key
        self.reason = reason


class FetchTimeoutError(ChunkFetchError, TimeoutError):
    """A demand read waited longer than the fetcher's demand_timeout (the FUSE layer
    answers EIO instead of leaving a process stuck in uninterruptible sleep)."""

    def __init__(self, blob_digest: str, key: str, waited: float) -> None:
        super().__init__(f"blob {blob_digest} chunk {key}: no data after {waited:.1f}s")
        self.blob_digest = blob_digest
        self.key = key


class FetcherClosedError(ChunkFetchError):
    """The fetcher was closed while the chunk was still queued or in flight."""
