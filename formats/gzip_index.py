"""Random access into an untouched gzip layer: checkpoints built in one streaming pass.

A deflate stream can only be decoded from its start, unless one remembers, at some block
boundary, the exact bit where the next block begins and the 32 KiB of output before it
(the only history a back-reference can reach). Such a checkpoint lets the agent fetch a
small compressed byte range with an HTTP Range request and inflate from there, which is
what SOCI's zTOC and zlib's zran example do.

Python's ``zlib`` module cannot do this: it has no ``Z_BLOCK`` flush (to stop at block
boundaries), no ``inflatePrime`` (most boundaries fall mid-byte) and no access to the
sliding window. The system zlib has all three, so it is driven here through ctypes. The
alternatives (indexed_gzip, rapidgzip) need a seekable file, while the converter streams
layers straight from the registry.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import zlib
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from formats.fast_zlib import ZLIB

WINDOW_SIZE = 32 * 1024
DEFAULT_SPAN = 1024 * 1024
"""A read can only start inflating at its span's checkpoint, so it costs the compressed
bytes from there (on average half a span before what it wants, a whole span unplanned);
each checkpoint costs a stored window (up to 32 KiB, mostly less) in the index fetched
before the first read. Finer spans cut the first faster than they grow the second down
to about 1 MiB (`bench.compressed_limit` prices both; docs/bench/startup-notes.md)."""
DEFAULT_PIECE = 64 * 1024
"""Spans are also digested piece by piece, and where each piece's compressed bytes end is
kept, so that a reader who needs only the start of a span fetches and checks only that
(a piece costs 36 bytes of index, 16 per span)."""
_READ_OUT_CHUNK = 256 * 1024
# Big steps for the builder: each return from zlib re-takes the GIL, which the tar
# walking thread may hold for a whole switch interval (5 ms), so fewer, longer calls
# let the two threads overlap.
_BUILD_OUT_CHUNK = 4 * 1024 * 1024

_Z_OK = 0
_Z_STREAM_END = 1
_Z_NEED_DICT = 2
_Z_BUF_ERROR = -5
_Z_NO_FLUSH = 0
_Z_BLOCK = 5
_GZIP_WBITS = 16 + 15
_RAW_WBITS = -15
_GZIP_TRAILER = 8
_WINDOW_LEVEL = 6
# data_type bits reported by inflate() after a Z_BLOCK return (zlib.h).
_DT_UNUSED_BITS = 7
_DT_LAST_BLOCK = 64
_DT_AT_BOUNDARY = 128


class GzipIndexError(ValueError):
    """Base of every failure to index or randomly read a gzip stream."""


class GzipFormatError(GzipIndexError):
    """The layer is not a well-formed (possibly multi-member) gzip stream."""


class CorruptSpanError(GzipIndexError):
    """Inflated bytes cannot be trusted: corrupt or short input, wrong window, bad digest."""


class _ZStream(ctypes.Structure):
    _fields_ = [
        ("next_in", ctypes.c_void_p),
        ("avail_in", ctypes.c_uint),
        ("total_in", ctypes.c_ulong),
        ("next_out", ctypes.c_void_p),
        ("avail_out", ctypes.c_uint),
        ("total_out", ctypes.c_ulong),
        ("msg", ctypes.c_char_p),
        ("state", ctypes.c_void_p),
        ("zalloc", ctypes.c_void_p),
        ("zfree", ctypes.c_void_p),
        ("opaque", ctypes.c_void_p),
        ("data_type", ctypes.c_int),
        ("adler", ctypes.c_ulong),
        ("reserved", ctypes.c_ulong),
    ]


def _load_zlib() -> ctypes.CDLL:
    lib = ctypes.CDLL(ctypes.util.find_library("z") or "libz.so.1")
    stream_p = ctypes.POINTER(_ZStream)
    lib.zlibVersion.restype = ctypes.c_char_p
    lib.inflateInit2_.argtypes = [stream_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.inflate.argtypes = [stream_p, ctypes.c_int]
    lib.inflateEnd.argtypes = [stream_p]
    lib.inflateReset.argtypes = [stream_p]
    lib.inflateReset2.argtypes = [stream_p, ctypes.c_int]
    lib.inflatePrime.argtypes = [stream_p, ctypes.c_int, ctypes.c_int]
    lib.inflateSetDictionary.argtypes = [stream_p, ctypes.c_char_p, ctypes.c_uint]
    lib.inflateGetDictionary.argtypes = [stream_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint)]
    return lib


_zlib = _load_zlib()
_ZLIB_VERSION = _zlib.zlibVersion()


class _Inflater:
    """One zlib inflate stream with the low-level controls Python's zlib module hides.

    Input buffers are referenced (not copied) while zlib reads them, so the caller's
    ``bytes`` object is kept alive in ``_input`` until the next ``set_input``.
    """

    def __init__(self, window_bits: int, error: type[GzipIndexError], out_size: int) -> None:
        self._error = error
        self._stream = _ZStream()
        self.out_size = out_size
        self._out = ctypes.create_string_buffer(out_size)
        self._out_addr = ctypes.addressof(self._out)
        self._input = b""
        rc = _zlib.inflateInit2_(
            ctypes.byref(self._stream), window_bits, _ZLIB_VERSION, ctypes.sizeof(_ZStream)
        )
        if rc != _Z_OK:
            raise MemoryError(f"inflateInit2 failed ({rc})")

    def close(self) -> None:
        _zlib.inflateEnd(ctypes.byref(self._stream))

    def set_input(self, data: bytes) -> None:
        self._input = data
        self._stream.next_in = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value
        self._stream.avail_in = len(data)

    def skip_input(self, count: int) -> None:
        """Step over bytes zlib must not see (a gzip trailer handled by hand)."""
        self._stream.next_in = (self._stream.next_in or 0) + count
        self._stream.avail_in -= count

    @property
    def avail_in(self) -> int:
        return int(self._stream.avail_in)

    @property
    def data_type(self) -> int:
        return int(self._stream.data_type)

    def inflate(self, flush: int, max_out: int) -> tuple[int, bytes]:
        """Run inflate once with room for ``max_out`` bytes (at most ``out_size``);
        return its code and the bytes it produced."""
        stream = self._stream
        max_out = min(max_out, self.out_size)
        stream.next_out = self._out_addr
        stream.avail_out = max_out
        rc = _zlib.inflate(ctypes.byref(stream), flush)
        produced = max_out - stream.avail_out
        if rc not in (_Z_OK, _Z_STREAM_END, _Z_BUF_ERROR):
            reason = stream.msg.decode(errors="replace") if stream.msg else f"code {rc}"
            if rc == _Z_NEED_DICT:
                reason = "stream asks for a preset dictionary"
            raise self._error(f"inflate failed: {reason}")
        return rc, ctypes.string_at(self._out_addr, produced) if produced else b""

    def reset(self, window_bits: int | None = None) -> None:
        rc = (
            _zlib.inflateReset(ctypes.byref(self._stream))
            if window_bits is None
            else _zlib.inflateReset2(ctypes.byref(self._stream), window_bits)
        )
        if rc != _Z_OK:
            raise self._error(f"inflateReset failed ({rc})")

    def prime(self, bits: int, value: int) -> None:
        if _zlib.inflatePrime(ctypes.byref(self._stream), bits, value) != _Z_OK:
            raise self._error("inflatePrime failed")

    def set_dictionary(self, window: bytes) -> None:
        rc = _zlib.inflateSetDictionary(ctypes.byref(self._stream), window, len(window))
        if rc != _Z_OK:
            raise self._error(f"inflateSetDictionary failed ({rc})")

    def window(self) -> bytes:
        """The up to 32 KiB of history inflate would use for the next back-reference."""
        buf = ctypes.create_string_buffer(WINDOW_SIZE)
        size = ctypes.c_uint(0)
        if _zlib.inflateGetDictionary(ctypes.byref(self._stream), buf, ctypes.byref(size)):
            raise self._error("inflateGetDictionary failed")
        return buf.raw[: size.value]


@dataclass(frozen=True)
class Checkpoint:
    """Where inflation can resume: deflate data starts at bit ``bit_offset`` (LSB first)
    of the byte at ``compressed_offset`` and yields uncompressed byte
    ``uncompressed_offset`` next. ``bit_offset`` 0 means a byte boundary."""

    compressed_offset: int
    bit_offset: int
    uncompressed_offset: int

    @property
    def fetch_end(self) -> int:
        """End (exclusive) of the compressed bytes holding every bit before this point."""
        return self.compressed_offset + (1 if self.bit_offset else 0)


@dataclass
class GzipCheckpoints:
    """What one streaming pass over a gzip layer learned about random access to it."""

    checkpoints: list[Checkpoint]
    windows: list[bytes]
    stored_windows: list[bytes]  # compress_window(windows[i]), made in the same pass
    span_digests: list[bytes]
    compressed_size: int
    uncompressed_size: int
    piece_digests: list[list[bytes]]
    """Per span, the sha256 of each of its pieces but the last (see ``inflate_prefix``)."""
    piece_ends: list[list[int]]
    """Per span, where the compressed bytes that inflate to each of those pieces end."""


class GzipCheckpointer:
    """Inflate a gzip stream chunk by chunk, recording a checkpoint about every ``span``
    uncompressed bytes and the sha256 of each span, while handing the uncompressed
    bytes on (the caller walks the tar in the same pass).

    Only the block boundary after the span is reached is asked for (``Z_BLOCK``); the
    rest of the stream is inflated with ordinary flushes in big steps, which keeps the
    pass about as fast as a plain decompression. A checkpoint at the start of a gzip
    member gets an empty window: a new member never refers back.
    """

    def __init__(self, span: int = DEFAULT_SPAN, piece: int = DEFAULT_PIECE) -> None:
        if span < WINDOW_SIZE:
            raise ValueError(f"span must be at least {WINDOW_SIZE} bytes")
        if piece <= 0:
            raise ValueError("a piece must have a positive size")
        self.span = span
        self.piece = min(piece, span)  # a span of one piece: fetched whole
        self._piece_digests: list[list[bytes]] = []
        self._piece_ends: list[list[int]] = []
        self._piece_hash = hashlib.sha256()
        self._inflater = _Inflater(_GZIP_WBITS, GzipFormatError, _BUILD_OUT_CHUNK)
        self._checkpoints: list[Checkpoint] = []
        self._windows: list[bytes] = []
        self._stored: list[bytes] = []
        self._digests: list[bytes] = []
        self._span_hash = hashlib.sha256()
        self._compressed = 0
        self._uncompressed = 0
        self._member_out = 0
        self._in_member = False
        self._members = 0
        self._finished = False
        self._probes: list[_WindowProbe] = []
        self._previous_chunk_end = b""

    def inflate(self, chunks: Iterable[bytes]) -> Generator[bytes, None, None]:
        """Consume every compressed chunk, yielding the uncompressed bytes in order."""
        try:
            for chunk in chunks:
                if chunk:
                    yield from self._feed(bytes(chunk))
            self._finish()
        finally:
            self._inflater.close()

    def result(self) -> GzipCheckpoints:
        if not self._finished:
            raise RuntimeError("result() before the whole stream was inflated")
        return GzipCheckpoints(
            self._checkpoints,
            self._windows,
            self._stored,
            self._digests,
            self._compressed,
            self._uncompressed,
            self._piece_digests,
            self._piece_ends,
        )

    def _feed(self, chunk: bytes) -> Iterator[bytes]:
        inflater = self._inflater
        inflater.set_input(chunk)
        while inflater.avail_in or self._in_member:
            if not self._in_member:
                inflater.reset()
                self._in_member = True
                self._member_out = 0
                self._members += 1
            due = self._next_checkpoint_due()
            piece_due = self._next_piece_due()
            if due > 0:
                rc, data = inflater.inflate(_Z_NO_FLUSH, min(due, piece_due or due))
            else:
                rc, data = inflater.inflate(_Z_BLOCK, _BUILD_OUT_CHUNK)
            if data:
                self._span_hash.update(data)
                self._piece_hash.update(data)
                for probe in self._probes:
                    probe.add_output(data)
                self._uncompressed += len(data)
                self._member_out += len(data)
                yield data
            consumed = len(chunk) - inflater.avail_in
            if piece_due and len(data) == piece_due:  # (pieces end before ``due``)
                # Every bit that inflated to the piece has been consumed by now.
                self._piece_digests[-1].append(self._piece_hash.digest())
                self._piece_ends[-1].append(self._compressed + consumed)
                self._piece_hash = hashlib.sha256()
            if rc == _Z_STREAM_END:
                self._in_member = False
            elif due <= 0 and inflater.data_type & _DT_AT_BOUNDARY:
                self._record_checkpoint(chunk, consumed)
            if rc == _Z_BUF_ERROR or (not inflater.avail_in and not data):
                break
        self._compressed += len(chunk)
        self._previous_chunk_end = chunk[-1:]
        for probe in self._probes:
            probe.add_input(chunk)
        self._settle_windows(final=False)

    def _next_checkpoint_due(self) -> int:
        """Uncompressed bytes still to go before a checkpoint is wanted (<= 0: now)."""
        if not self._checkpoints:
            return 0
        return self._checkpoints[-1].uncompressed_offset + self.span - self._uncompressed

    def _next_piece_due(self) -> int:
        """Uncompressed bytes still to go before the span's next piece ends; 0 when no
        further piece of this span will end before the span is at least ``span`` long
        (its last piece runs on to the checkpoint)."""
        if not self._checkpoints:
            return 0
        into = self._uncompressed - self._checkpoints[-1].uncompressed_offset
        boundary = (into // self.piece + 1) * self.piece
        return boundary - into if boundary < self.span else 0

    def _record_checkpoint(self, chunk: bytes, consumed: int) -> None:
        data_type = self._inflater.data_type
        if data_type & _DT_LAST_BLOCK:
            return
        bit_position = (self._compressed + consumed) * 8 - (data_type & _DT_UNUSED_BITS)
        if self._checkpoints:
            self._digests.append(self._span_hash.digest())
            self._span_hash = hashlib.sha256()
        self._piece_digests.append([])
        self._piece_ends.append([])
        self._piece_hash = hashlib.sha256()
        self._checkpoints.append(
            Checkpoint(bit_position // 8, bit_position % 8, self._uncompressed)
        )
        self._windows.append(self._inflater.window() if self._member_out else b"")
        self._stored.append(b"")  # set with the final window when its probe settles
        if self._windows[-1]:
            start = bit_position // 8 - self._compressed
            head = self._previous_chunk_end + chunk if start < 0 else chunk[start:]
            self._probes.append(_WindowProbe(len(self._checkpoints) - 1, head))

    def _settle_windows(self, final: bool) -> None:
        """Trim the windows whose probes have seen enough output (all at the end)."""
        waiting = []
        for probe in self._probes:
            if final or probe.complete:
                number = probe.number
                self._windows[number] = _minimal_window(
                    self._checkpoints[number], self._windows[number], probe
                )
                self._stored[number] = compress_window(self._windows[number])
            else:
                waiting.append(probe)
        self._probes = waiting

    def _finish(self) -> None:
        if self._in_member:
            raise GzipFormatError(
                f"gzip stream truncated after {self._compressed} bytes (member incomplete)"
            )
        if not self._members:
            raise GzipFormatError("empty input is not a gzip stream")
        self._digests.append(self._span_hash.digest())
        self._settle_windows(final=True)
        self._finished = True


class _WindowProbe:
    """What is needed to find which window bytes the data after a checkpoint uses: the
    compressed bytes from the checkpoint on and the first 32 KiB they inflate to (only
    those can reach back into the window)."""

    def __init__(self, number: int, compressed_head: bytes) -> None:
        self.number = number
        self.compressed = bytearray(compressed_head)
        self.output = bytearray()
        self._fresh = True

    @property
    def complete(self) -> bool:
        return len(self.output) >= WINDOW_SIZE

    def add_output(self, data: bytes) -> None:
        if len(self.output) < WINDOW_SIZE:
            self.output += data[: WINDOW_SIZE - len(self.output)]

    def add_input(self, chunk: bytes) -> None:
        """Called after each fed chunk (before settling); the chunk that created the
        probe is already in."""
        if self._fresh:
            self._fresh = False
        else:
            self.compressed += chunk


_POSITIONS = np.arange(WINDOW_SIZE, dtype=np.uint16)
_TAG_LOW = (_POSITIONS & 0xFF).astype(np.uint8).tobytes()
_TAG_HIGH = (_POSITIONS >> 8).astype(np.uint8).tobytes()
_TAG_HIGH_FLIPPED = ((_POSITIONS >> 8) | 0x80).astype(np.uint8).tobytes()


def _minimal_window(checkpoint: Checkpoint, window: bytes, probe: _WindowProbe) -> bytes:
    """The window with every byte the following data never copies set to zero (and the
    unused start cut off), so it compresses to a fraction: typically most of the 32 KiB
    is never referenced.

    zlib does not report match distances, but inflate copies window bytes verbatim and
    decodes the same symbols whatever the window holds. So the span's start is inflated
    with windows whose bytes are their own positions (low byte, then high byte twice,
    once with bit 7 flipped): output bytes that differ between the two high-byte runs
    came from the window, and the two tags name the position they came from. The result
    is checked by inflating with it; on any doubt the full window is kept.
    """
    size = len(window)
    expected = bytes(probe.output)
    compressed = bytes(probe.compressed)
    start = checkpoint.uncompressed_offset
    try:
        low, high, flipped = (
            np.frombuffer(
                _inflate_from(checkpoint, tags[-size:], compressed, start, len(expected)), np.uint8
            )
            for tags in (_TAG_LOW, _TAG_HIGH, _TAG_HIGH_FLIPPED)
        )
        if not len(low) == len(high) == len(flipped) == len(expected):
            return window
        copied = high != flipped
        positions = (high[copied].astype(np.int64) << 8) | low[copied]
        # Tags count from the start of the full-size tag array, of which the window
        # uses the last ``size`` bytes.
        positions -= WINDOW_SIZE - size
        keep = np.zeros(size, dtype=bool)
        keep[positions] = True
        if not keep.any():
            return b""
        # History before the first referenced byte is dropped: zlib refuses (never
        # misreads) a distance reaching past a shorter dictionary.
        first = int(keep.argmax())
        kept = np.where(keep, np.frombuffer(window, np.uint8), 0).astype(np.uint8)
        minimal = kept[first:].tobytes()
        if _inflate_from(checkpoint, minimal, compressed, start, len(expected)) != expected:
            return window
    except (CorruptSpanError, IndexError):
        return window
    return minimal


@dataclass(frozen=True)
class RangePlan:
    """How to read some uncompressed bytes: inflate from checkpoint number ``checkpoint``
    using compressed bytes ``[fetch_start, fetch_end)`` of the layer."""

    checkpoint: int
    fetch_start: int
    fetch_end: int


def plan_range(
    checkpoints: Sequence[Checkpoint], compressed_size: int, offset: int, length: int
) -> RangePlan:
    """Pick the checkpoint at or before ``offset`` and the compressed bytes needed to
    inflate through ``offset + length``: up to the first checkpoint at or after that end
    (its partial byte included), or to the end of the layer."""
    if not checkpoints:
        raise GzipIndexError("no checkpoints: not a gzip layer index")
    if offset < 0 or length < 0:
        raise ValueError("negative offset or length")
    first = _last_at_or_before(checkpoints, offset)
    end = offset + length
    after = _last_at_or_before(checkpoints, end - 1) + 1 if length else first + 1
    if after < len(checkpoints) and checkpoints[after].uncompressed_offset >= end:
        fetch_end = checkpoints[after].fetch_end
    else:
        fetch_end = compressed_size
    return RangePlan(first, checkpoints[first].compressed_offset, fetch_end)


def _last_at_or_before(checkpoints: Sequence[Checkpoint], offset: int) -> int:
    lo, hi = 0, len(checkpoints)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if checkpoints[mid].uncompressed_offset <= offset:
            lo = mid
        else:
            hi = mid
    return lo


def inflate_range(
    checkpoint: Checkpoint,
    window: bytes,
    compressed: bytes,
    start: int,
    length: int,
) -> bytes:
    """Uncompressed bytes ``[start, start + length)`` of the layer, inflated from
    ``checkpoint`` given its ``window`` and the layer's compressed bytes from
    ``checkpoint.compressed_offset`` onwards (at least through ``plan_range``'s end).

    Raises CorruptSpanError when zlib rejects the data or it ends too soon; a wrong
    window can still yield wrong bytes silently, which is what span digests catch.
    """
    if start < checkpoint.uncompressed_offset or length < 0:
        raise ValueError("range starts before its checkpoint")
    data = _inflate_from(checkpoint, window, bytes(compressed), start, length)
    if len(data) != length:
        raise CorruptSpanError(
            f"compressed data ended after {len(data)} of {length} bytes "
            f"at uncompressed offset {start}"
        )
    return data


def inflate_span(
    checkpoints: Sequence[Checkpoint],
    span_digests: Sequence[bytes],
    uncompressed_size: int,
    number: int,
    window: bytes,
    compressed: bytes,
    *,
    fast: bool = True,
) -> bytes:
    """The whole of span ``number`` (checkpoint ``number`` to the next one, or to the end),
    checked against its sha256: bytes that come back are the layer's bytes. Not
    ``fast``: straight to the general path (the fast one was tried and failed)."""
    start, end = span_bounds(checkpoints, uncompressed_size, number)
    return _inflate_checked(
        checkpoints[number],
        window,
        compressed,
        end - start,
        lambda data: hashlib.sha256(data).digest() == span_digests[number],
        f"span {number}",
        _span_mismatch(number, start, end),
        fast=fast,
    )


def inflate_prefix(
    checkpoint: Checkpoint,
    window: bytes,
    compressed: bytes,
    piece: int,
    piece_digests: Sequence[bytes],
) -> bytes:
    """The first ``len(piece_digests)`` pieces (``piece`` bytes each) of the span that
    starts at ``checkpoint``, each checked against its sha256, from the compressed bytes
    from the checkpoint to where the last of them ends. A span's digest covers all of
    it, so without pieces a reader who needs its first 100 KiB fetches all 4 MiB."""
    length = piece * len(piece_digests)
    return _inflate_checked(
        checkpoint,
        window,
        compressed,
        length,
        lambda data: _pieces_match(data, piece, piece_digests),
        "span prefix",
        CorruptSpanError(
            f"span prefix at uncompressed {checkpoint.uncompressed_offset}+{length} "
            "does not match its piece digests"
        ),
    )


def _inflate_checked(
    checkpoint: Checkpoint,
    window: bytes,
    compressed: bytes,
    length: int,
    matches: Callable[[bytes], bool],
    what: str,
    mismatch: CorruptSpanError,
    *,
    fast: bool = True,
) -> bytes:
    """``length`` bytes inflated from ``checkpoint`` that ``matches`` accepts: by the
    fastest zlib when that works (and ``fast``), else by the general path, which decides
    and names what is wrong (CorruptSpanError prefixed with ``what``, or ``mismatch``)."""
    data = _inflate_in_member(checkpoint, window, compressed, length) if fast else None
    if data is not None and matches(data):
        return data
    try:
        data = inflate_range(checkpoint, window, compressed, checkpoint.uncompressed_offset, length)
    except CorruptSpanError as exc:
        raise CorruptSpanError(f"{what}: {exc}") from None
    if not matches(data):
        raise mismatch
    return data


def _pieces_match(data: bytes, piece: int, digests: Sequence[bytes]) -> bool:
    view = memoryview(data)
    return all(
        hashlib.sha256(view[number * piece : (number + 1) * piece]).digest() == digest
        for number, digest in enumerate(digests)
    )


def _inflate_in_member(
    checkpoint: Checkpoint, window: bytes, compressed: bytes, length: int
) -> bytes | None:
    """The ``length`` bytes after ``checkpoint``, inflated by the fastest zlib at hand
    (zlib-ng inflates faster than the system zlib this module drives through ctypes)
    when that works, as it does for most spans. Python's zlib bindings have no
    inflatePrime, so a checkpoint inside a byte is reached by shifting the bytes down to
    its bit; that misplaces the byte-aligned stored blocks after it and adds up to 7
    made-up zero bits at the end, so the result is only for callers that check it
    against a digest. None (a stored
    block after a shift, data that runs into the next member, ends early or does not
    inflate) means "take the general path"."""
    if not length:
        return b""  # (a max_length of 0 would mean "no limit" to zlib)
    data = _shifted_down(compressed, checkpoint.bit_offset) if checkpoint.bit_offset else compressed
    try:
        out = ZLIB.decompressobj(_RAW_WBITS, zdict=window).decompress(data, length)
    except ZLIB.error:
        return None
    return out if len(out) == length else None


def _shifted_down(data: bytes, bits: int) -> np.ndarray:
    """``data`` read as one little-endian bit string, shifted down by ``bits`` (1 to 7):
    each byte takes the high bits of its own and the low bits of the next (zeros past
    the end). numpy shifts the bytes in place of building one Python int of the whole
    buffer, which costs a copy each way on the path every demand span takes."""
    octets = np.frombuffer(data, np.uint8)
    out = octets >> bits
    out[:-1] |= octets[1:] << (8 - bits)
    return out


def span_bounds(
    checkpoints: Sequence[Checkpoint], uncompressed_size: int, number: int
) -> tuple[int, int]:
    """Uncompressed ``(start, end)`` of span ``number``: its checkpoint to the next one,
    or to the end of the layer."""
    start = checkpoints[number].uncompressed_offset
    if number + 1 < len(checkpoints):
        return start, checkpoints[number + 1].uncompressed_offset
    return start, uncompressed_size


def _span_mismatch(number: int, start: int, end: int) -> CorruptSpanError:
    return CorruptSpanError(f"span {number} (uncompressed {start}-{end}) does not match its digest")


class _ShiftedStream:
    """``_inflate_in_member`` fed piece by piece: zlib-ng (faster than the system zlib
    the exact path drives through ctypes) inflating the compressed bytes from a
    checkpoint as they arrive, each piece shifted down to the checkpoint's bit. It has
    the whole-buffer trick's limits: a stored block after a mid-byte checkpoint comes
    out misplaced (a zlib error, or wrong bytes), so what it returns is only for
    callers that check a digest, and any error means "take the exact path"."""

    def __init__(self, checkpoint: Checkpoint, window: bytes) -> None:
        self._shift = checkpoint.bit_offset
        self._last = b""
        """The last byte received: its high bits (the shifted stream's next byte) are
        completed by the next piece's low bits."""
        self._inflater = ZLIB.decompressobj(_RAW_WBITS, zdict=window)

    @property
    def ended(self) -> bool:
        """The deflate stream ended (or what the shift made of it seemed to)."""
        return bool(self._inflater.eof)

    def feed(self, data: bytes, limit: int) -> bytes:
        """At most ``limit`` bytes that ``data`` completes (ZLIB.error when it does not
        inflate)."""
        if self._shift:
            held = self._last + data
            self._last = held[-1:]
            return self._inflater.decompress(_shifted_down(held, self._shift)[:-1], limit)
        return self._inflater.decompress(data, limit)

    def flush(self, limit: int) -> bytes:
        """No more input: the last byte's high bits too, with made-up zeros above them."""
        if not self._last:
            return b""
        return self._inflater.decompress(bytes([self._last[0] >> self._shift]), limit)


class SpanDecoder:
    """``inflate_span`` fed piece by piece while the span's compressed bytes arrive, so
    that inflating and hashing a span overlap its download instead of following it (on
    a demand read both are waited for: the whole span's inflate and hash).

    Like ``inflate_span`` it inflates by zlib-ng first (`_ShiftedStream`); once that
    fails, what was received so far is inflated again by the exact path and the rest
    follows it. ``feed`` never raises: anything else unusual (corrupt input, a gzip
    member boundary inside the span) leaves the verdict to ``finish``, which then runs
    ``inflate_span`` over everything received, as it does when the fast bytes miss the
    digest, so the outcome is exactly that of the whole-buffer path.
    """

    def __init__(
        self,
        checkpoints: Sequence[Checkpoint],
        span_digests: Sequence[bytes],
        uncompressed_size: int,
        number: int,
        window: bytes,
    ) -> None:
        self._span = (checkpoints, span_digests, uncompressed_size, number, window)
        self._start, self._end = span_bounds(checkpoints, uncompressed_size, number)
        self._wanted = self._end - self._start
        self._received: list[bytes] = []
        self._pieces: list[bytes] = []
        self._hash = hashlib.sha256()
        self._fast: _ShiftedStream | None = None
        with contextlib.suppress(ZLIB.error):  # (a window zlib-ng refuses: the exact path)
            self._fast = _ShiftedStream(checkpoints[number], window)
        self._inflater: _Inflater | None = None
        self._whole_buffer = False
        """Set when only the whole-buffer path can decide (it then names the problem)."""

    def feed(self, data: bytes) -> None:
        """Inflate and hash what ``data`` completes of the span."""
        if not data:
            return
        self._received.append(data)
        if self._whole_buffer or not self._wanted:
            return
        if self._fast is not None:
            try:
                self._take(self._fast.feed(data, self._wanted))
            except ZLIB.error:
                self._exact_from_start()
                return
            if self._wanted and self._fast.ended:
                # A member ends inside the span, or misplaced bits looked like an end:
                # the exact path tells which.
                self._exact_from_start()
            return
        try:
            self._inflate(data)
        except CorruptSpanError:
            self._whole_buffer = True

    def _take(self, out: bytes) -> None:
        if out:
            self._pieces.append(out)
            self._hash.update(out)
            self._wanted -= len(out)

    def _exact_from_start(self) -> None:
        """The fast path failed: inflate what arrived so far by the exact one."""
        self._fast = None
        self._pieces, self._hash = [], hashlib.sha256()
        self._wanted = self._end - self._start
        try:
            self._inflate(b"".join(self._received))
        except CorruptSpanError:
            self._whole_buffer = True

    def _inflate(self, data: bytes) -> None:
        inflater = self._inflater
        if inflater is None:
            checkpoints, _, _, number, window = self._span
            inflater, data = _inflater_at(checkpoints[number], window, data)
            self._inflater = inflater
        inflater.set_input(data)
        while self._wanted:
            rc, out = inflater.inflate(_Z_NO_FLUSH, self._wanted)
            self._take(out)
            if rc == _Z_STREAM_END and self._wanted:
                self._whole_buffer = True  # the span goes on in the next gzip member
                return
            if not out:
                return  # wants more input

    def finish(self) -> bytes:
        """The verified span, or CorruptSpanError (as ``inflate_span`` would raise it)."""
        fast, self._fast = self._fast, None
        if fast is not None and self._wanted and not self._whole_buffer:
            try:
                self._take(fast.flush(self._wanted))
            except ZLIB.error:
                self._whole_buffer = True
        self.close()
        checkpoints, span_digests, uncompressed_size, number, window = self._span
        if not (self._whole_buffer or self._wanted):
            if self._hash.digest() == span_digests[number]:
                return b"".join(self._pieces)
            if fast is None:  # the exact path made these bytes: they are wrong
                raise _span_mismatch(number, self._start, self._end)
        # The exact path decides (the fast one, tried while fed, would fail again).
        return inflate_span(
            checkpoints,
            span_digests,
            uncompressed_size,
            number,
            window,
            b"".join(self._received),
            fast=False,
        )

    def close(self) -> None:
        """Free the inflate state (also when the download is given up)."""
        self._fast = None
        if self._inflater is not None:
            self._inflater.close()
            self._inflater = None


def _inflate_from(
    checkpoint: Checkpoint, window: bytes, compressed: bytes, start: int, length: int
) -> bytes:
    """Inflate from a checkpoint, crossing gzip member boundaries, and return up to
    ``length`` bytes from ``start`` (fewer if the compressed data runs out)."""
    if checkpoint.bit_offset and not compressed:
        return b""
    inflater, compressed = _inflater_at(checkpoint, window, compressed)
    try:
        inflater.set_input(compressed)
        skip = start - checkpoint.uncompressed_offset
        pieces: list[bytes] = []
        wanted = length
        raw = True
        while wanted:
            rc, data = inflater.inflate(_Z_NO_FLUSH, skip + wanted)
            if skip:
                cut = min(skip, len(data))
                skip -= cut
                data = data[cut:]
            if data:
                pieces.append(data)
                wanted -= len(data)
            if rc == _Z_STREAM_END:
                if not _enter_next_member(inflater, raw):
                    break
                raw = False
            elif rc == _Z_BUF_ERROR:
                break
        return b"".join(pieces)
    finally:
        inflater.close()


def _inflater_at(
    checkpoint: Checkpoint, window: bytes, compressed: bytes
) -> tuple[_Inflater, bytes]:
    """A raw inflater positioned at ``checkpoint`` (its partial byte primed, its window
    set), and the compressed bytes left to feed it. ``compressed`` must not be empty
    when the checkpoint starts inside a byte."""
    inflater = _Inflater(_RAW_WBITS, CorruptSpanError, _READ_OUT_CHUNK)
    try:
        if checkpoint.bit_offset:
            inflater.prime(8 - checkpoint.bit_offset, compressed[0] >> checkpoint.bit_offset)
            compressed = compressed[1:]
        if window:
            inflater.set_dictionary(window)
    except BaseException:
        inflater.close()
        raise
    return inflater, compressed


def _enter_next_member(inflater: _Inflater, raw: bool) -> bool:
    """At the end of a member, get ready to parse the next member's gzip header. The
    member we started inside was inflated raw (its header lies before the checkpoint),
    so its trailer is stepped over by hand; later ones zlib reads and checks itself.
    False when no next member is in the input."""
    trailer = _GZIP_TRAILER if raw else 0
    if inflater.avail_in <= trailer:
        return False
    if raw:
        inflater.skip_input(trailer)
        inflater.reset(_GZIP_WBITS)
    else:
        inflater.reset()
    return True


def compress_window(window: bytes) -> bytes:
    """Windows are stored zlib-compressed: they are mostly zeros (unreferenced bytes)
    and text or code. Level 6, not 9: on such zero runs level 9 is ~10x slower (5 ms a
    window, measured) for ~3% fewer bytes."""
    return zlib.compress(window, _WINDOW_LEVEL) if window else b""


def decompress_window(stored: bytes) -> bytes:
    """Inverse of compress_window, refusing anything that inflates past 32 KiB."""
    if not stored:
        return b""
    return inflate_bounded(stored, WINDOW_SIZE, GzipIndexError, "stored window")


def inflate_bounded(stored: bytes, limit: int, error: type[Exception], what: str) -> bytes:
    """``stored`` as one whole zlib stream of at most ``limit`` bytes, else ``error``:
    stored metadata is hostile until checked, so inflating stops one byte past the
    limit instead of building whatever a small stream expands to."""
    inflater = zlib.decompressobj()
    try:
        data = inflater.decompress(stored, limit + 1)
    except zlib.error as exc:
        raise error(f"{what} does not decompress: {exc}") from None
    if len(data) > limit or not inflater.eof or inflater.unused_data:
        raise error(f"{what} is not one zlib stream of at most {limit} bytes")
    return data
