"""Checkpoints built in one streaming pass let any byte range of a real gzip file be
inflated from only the compressed slice plan_range names, whoever made the gzip."""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import random
import subprocess
import tarfile
import zlib

import pytest

from formats import gzip_index
from formats.gzip_index import (
    WINDOW_SIZE,
    Checkpoint,
    CorruptSpanError,
    GzipCheckpointer,
    GzipCheckpoints,
    GzipFormatError,
    SpanDecoder,
    decompress_window,
    inflate_range,
    inflate_span,
    plan_range,
)

SPAN = 64 * 1024


def _text(rnd: random.Random, size: int) -> bytes:
    words = [
        bytes(rnd.choice(b"abcdefghijklmnop_/.") for _ in range(rnd.randint(2, 12)))
        for _ in range(400)
    ]
    out = bytearray()
    while len(out) < size:
        out += b" ".join(rnd.choices(words, k=64)) + b"\n"
    return bytes(out[:size])


def _layer_tar() -> bytes:
    """A tar mixing compressible text, incompressible noise (deflate then emits stored
    blocks), long zero runs and non-file entries."""
    rnd = random.Random(7)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        directory = tarfile.TarInfo("usr/lib")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        for number in range(40):
            kind = number % 4
            size = rnd.randint(0, 90_000)
            if kind == 0:
                data = _text(rnd, size)
            elif kind == 1:
                data = rnd.randbytes(size)
            elif kind == 2:
                data = bytes(size)
            else:
                data = _text(rnd, size // 2) + rnd.randbytes(size // 2)
            info = tarfile.TarInfo(f"usr/lib/file{number:02d}.bin")
            info.size = len(data)
            info.mode = 0o755 if number % 3 else 0o644
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("usr/lib/link")
        link.type = tarfile.SYMTYPE
        link.linkname = "file00.bin"
        tar.addfile(link)
    return buf.getvalue()


RAW = _layer_tar()


def _cli(command: list[str], data: bytes) -> bytes:
    return subprocess.run(command, input=data, capture_output=True, check=True).stdout


def _multi_member(data: bytes) -> bytes:
    """Members of mixed levels, an empty one, and one whose header carries a file name
    (FNAME): a read crossing into it must parse that header."""
    cuts = [0, 1000, 1000, 300_000, len(data) // 2, len(data)]
    members = [
        gzip.compress(data[a:b], 1 + i % 9) for i, (a, b) in enumerate(itertools.pairwise(cuts))
    ]
    named = io.BytesIO()
    with gzip.GzipFile("layer-part.tar", "wb", 6, named, mtime=1) as writer:
        writer.write(data[cuts[3] : cuts[4]])
    assert named.getvalue()[3] & 0x08  # FNAME flag set
    members[3] = named.getvalue()
    return b"".join(members)


def _raw_deflate_level0(data: bytes) -> bytes:
    """gzip framing around deflate level 0: only stored blocks."""
    compressor = zlib.compressobj(0, zlib.DEFLATED, 31)
    return compressor.compress(data) + compressor.flush()


MAKERS = {
    "python-1": lambda d: gzip.compress(d, 1),
    "python-6": lambda d: gzip.compress(d, 6),
    "python-9": lambda d: gzip.compress(d, 9),
    "gzip-cli": lambda d: _cli(["gzip", "-c", "-6"], d),
    "pigz-cli": lambda d: _cli(["pigz", "-c", "-p", "2", "-b", "128"], d),
    "pigz-independent": lambda d: _cli(["pigz", "-c", "-i", "-b", "128"], d),
    "zlib-level-0": _raw_deflate_level0,
    "multi-member": _multi_member,
}


def _chunks(data: bytes, seed: int) -> list[bytes]:
    rnd = random.Random(seed)
    out, pos = [], 0
    while pos < len(data):
        size = rnd.choice([1, 7, 512, 4096, 65536, 300_000])
        out.append(data[pos : pos + size])
        pos += size
    return out


def _index(compressed: bytes, span: int = SPAN, seed: int = 1) -> tuple[bytes, GzipCheckpoints]:
    checkpointer = GzipCheckpointer(span)
    inflated = b"".join(checkpointer.inflate(_chunks(compressed, seed)))
    return inflated, checkpointer.result()


def _read(compressed: bytes, found: GzipCheckpoints, offset: int, length: int) -> bytes:
    plan = plan_range(found.checkpoints, found.compressed_size, offset, length)
    number = plan.checkpoint
    return inflate_range(
        found.checkpoints[number],
        found.windows[number],
        compressed[plan.fetch_start : plan.fetch_end],
        offset,
        length,
    )


def _span_bounds(found: GzipCheckpoints, number: int) -> tuple[int, int]:
    start = found.checkpoints[number].uncompressed_offset
    if number + 1 < len(found.checkpoints):
        return start, found.checkpoints[number + 1].uncompressed_offset
    return start, found.uncompressed_size


def _read_span(compressed: bytes, found: GzipCheckpoints, number: int, window: bytes) -> bytes:
    start, end = _span_bounds(found, number)
    plan = plan_range(found.checkpoints, found.compressed_size, start, end - start)
    assert plan.checkpoint == number
    return inflate_span(
        found.checkpoints,
        found.span_digests,
        found.uncompressed_size,
        number,
        window,
        compressed[plan.fetch_start : plan.fetch_end],
    )


@pytest.fixture(scope="module", params=sorted(MAKERS))
def indexed(request: pytest.FixtureRequest) -> tuple[str, bytes, GzipCheckpoints]:
    compressed = MAKERS[request.param](RAW)
    inflated, found = _index(compressed)
    assert inflated == RAW
    return request.param, compressed, found


def test_checkpoints_cover_the_stream(indexed: tuple[str, bytes, GzipCheckpoints]) -> None:
    _, compressed, found = indexed
    points = found.checkpoints
    assert found.compressed_size == len(compressed)
    assert found.uncompressed_size == len(RAW)
    assert points[0].uncompressed_offset == 0
    assert len(points) >= len(RAW) // (2 * SPAN)
    assert len(found.windows) == len(found.span_digests) == len(points)
    assert [decompress_window(stored) for stored in found.stored_windows] == found.windows
    for before, after in itertools.pairwise(points):
        assert after.uncompressed_offset - before.uncompressed_offset >= SPAN
        assert after.compressed_offset > before.compressed_offset
    assert all(
        0 <= p.bit_offset <= 7 and len(w) <= WINDOW_SIZE
        for p, w in zip(points, found.windows, strict=True)
    )


def test_every_span_inflates_from_its_slice_and_matches_its_digest(
    indexed: tuple[str, bytes, GzipCheckpoints],
) -> None:
    _, compressed, found = indexed
    for number in range(len(found.checkpoints)):
        start, end = _span_bounds(found, number)
        assert _read_span(compressed, found, number, found.windows[number]) == RAW[start:end]
        assert hashlib.sha256(RAW[start:end]).digest() == found.span_digests[number]


def test_spans_inflate_by_the_fast_path_or_fall_back_to_the_same_bytes(
    indexed: tuple[str, bytes, GzipCheckpoints],
) -> None:
    """The zlib-ng path for whole spans either gives the span's exact bytes or steps
    aside (None); inflate_span then takes the general path. It must be taken for most
    spans of a one-member layer, or it is dead weight."""
    name, compressed, found = indexed
    taken = 0
    for number, point in enumerate(found.checkpoints):
        start, end = _span_bounds(found, number)
        plan = plan_range(found.checkpoints, found.compressed_size, start, end - start)
        fast = gzip_index._inflate_in_member(
            point, found.windows[number], compressed[plan.fetch_start : plan.fetch_end], end - start
        )
        assert fast is None or fast == RAW[start:end], (name, number)
        taken += fast is not None
    if name in ("python-1", "python-6", "python-9", "gzip-cli"):
        assert taken >= len(found.checkpoints) // 2, (name, taken)


def test_a_fast_inflate_that_goes_wrong_is_caught_by_the_span_digest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Shifting a mid-byte checkpoint's bytes misplaces byte-aligned stored blocks and adds
    made-up bits at the end: whatever the fast path returns is held to the digest."""
    compressed = MAKERS["python-6"](RAW)
    _, found = _index(compressed)
    number = next(i for i, p in enumerate(found.checkpoints) if p.bit_offset)
    start, end = _span_bounds(found, number)
    monkeypatch.setattr(gzip_index, "_inflate_in_member", lambda *_: b"\0" * (end - start))
    assert _read_span(compressed, found, number, found.windows[number]) == RAW[start:end]
    corrupt = bytearray(compressed)
    corrupt[found.checkpoints[number].compressed_offset + 200] ^= 0x55
    with pytest.raises(CorruptSpanError):
        _read_span(bytes(corrupt), found, number, found.windows[number])


def _streamed_span(
    compressed: bytes, found: GzipCheckpoints, number: int, seed: int
) -> tuple[SpanDecoder, bytes]:
    start, end = _span_bounds(found, number)
    plan = plan_range(found.checkpoints, found.compressed_size, start, end - start)
    decoder = SpanDecoder(
        found.checkpoints,
        found.span_digests,
        found.uncompressed_size,
        number,
        found.windows[number],
    )
    for piece in _chunks(compressed[plan.fetch_start : plan.fetch_end], seed):
        decoder.feed(piece)
    return decoder, decoder.finish()


def test_spans_fed_piece_by_piece_decode_as_whole_ones(
    indexed: tuple[str, bytes, GzipCheckpoints],
) -> None:
    """The streaming decoder returns exactly the verified span whatever the pieces, and
    for a span inside one gzip member it does the work while fed (no second pass)."""
    maker, compressed, found = indexed
    for number in range(len(found.checkpoints)):
        start, end = _span_bounds(found, number)
        decoder, data = _streamed_span(compressed, found, number, seed=number)
        assert data == RAW[start:end]
        if maker.startswith("python"):
            assert not decoder._whole_buffer


def test_streamed_spans_take_zlib_ng_and_switch_to_the_exact_path_mid_stream() -> None:
    """Fed spans are inflated by zlib-ng on the shifted bytes while they arrive; where
    that fails (a stored block after a mid-byte checkpoint: RAW's noise files), the
    bytes so far go through the exact path and the rest follows it, still streamed.
    Both happen in the corpus, so both are exercised."""
    compressed = MAKERS["python-6"](RAW)
    _, found = _index(compressed)
    ways: dict[str, int] = {"zlib-ng": 0, "exact": 0}
    for number in range(len(found.checkpoints)):
        start, end = _span_bounds(found, number)
        plan = plan_range(found.checkpoints, found.compressed_size, start, end - start)
        decoder = SpanDecoder(
            found.checkpoints, found.span_digests, len(RAW), number, found.windows[number]
        )
        for piece in _chunks(compressed[plan.fetch_start : plan.fetch_end], number):
            decoder.feed(piece)
        assert not decoder._whole_buffer and not decoder._wanted, number
        ways["exact" if decoder._fast is None else "zlib-ng"] += 1
        assert decoder.finish() == RAW[start:end]
    assert ways["zlib-ng"] > len(found.checkpoints) // 2, ways
    assert ways["exact"], ways


def test_a_streamed_fast_path_that_goes_wrong_is_caught_by_the_span_digest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the shift makes of a span is held to the digest: bytes that miss it go to
    the exact path, which returns the span or refuses corrupt input."""
    compressed = MAKERS["python-6"](RAW)
    _, found = _index(compressed)
    number = next(i for i, p in enumerate(found.checkpoints) if p.bit_offset)
    monkeypatch.setattr(gzip_index._ShiftedStream, "feed", lambda self, data, limit: b"\0" * limit)
    start, end = _span_bounds(found, number)
    _, data = _streamed_span(compressed, found, number, seed=3)
    assert data == RAW[start:end]
    corrupt = bytearray(compressed)
    corrupt[found.checkpoints[number].compressed_offset + 200] ^= 0x55
    with pytest.raises(CorruptSpanError):
        _streamed_span(bytes(corrupt), found, number, seed=3)


def test_the_shift_is_the_bit_strings_shift() -> None:
    """The fast paths read a mid-byte checkpoint's bytes shifted down to its bit: numpy's
    shift is the little-endian bit string's, zeros coming in past the end."""
    rnd = random.Random(5)
    for size in (1, 2, 3, 1000):
        data = rnd.randbytes(size)
        for bits in range(1, 8):
            shifted = gzip_index._shifted_down(data, bits).tobytes()
            assert shifted == (int.from_bytes(data, "little") >> bits).to_bytes(size, "little")


def test_a_streamed_span_cut_short_is_refused() -> None:
    compressed = gzip.compress(RAW, 6)
    _, found = _index(compressed)
    start, end = _span_bounds(found, 1)
    plan = plan_range(found.checkpoints, found.compressed_size, start, end - start)
    decoder = SpanDecoder(found.checkpoints, found.span_digests, len(RAW), 1, found.windows[1])
    decoder.feed(compressed[plan.fetch_start : (plan.fetch_start + plan.fetch_end) // 2])
    with pytest.raises(CorruptSpanError, match="span 1: compressed data ended"):
        decoder.finish()


def test_random_ranges_including_ones_crossing_checkpoints(
    indexed: tuple[str, bytes, GzipCheckpoints],
) -> None:
    name, compressed, found = indexed
    rnd = random.Random(name)
    cases = [(0, 1), (0, len(RAW)), (len(RAW) - 1, 1), (len(RAW), 0)]
    for point in found.checkpoints[1:]:
        cases.append((point.uncompressed_offset - 3, 7))  # straddles the checkpoint
        cases.append((point.uncompressed_offset, 1))
    for _ in range(60):
        offset = rnd.randrange(len(RAW))
        cases.append((offset, min(rnd.choice([1, 4096, 100_000, 3 * SPAN]), len(RAW) - offset)))
    for offset, length in cases:
        assert _read(compressed, found, offset, length) == RAW[offset : offset + length], (
            offset,
            length,
        )


def test_the_awkward_cases_are_exercised() -> None:
    """Mid-byte checkpoints need inflatePrime, stored blocks break a naive byte shift,
    member starts need header parsing: the corpus above must contain all three."""
    _, python6 = _index(MAKERS["python-6"](RAW))
    assert sum(1 for p in python6.checkpoints if p.bit_offset) >= len(python6.checkpoints) // 3
    _, stored = _index(_raw_deflate_level0(RAW))
    assert len(stored.checkpoints) > 5
    # Members smaller than a span (as eStargz writes them): a member's last block is
    # never a checkpoint, so every checkpoint after the first sits at a member start.
    small_members = b"".join(gzip.compress(RAW[i : i + 10_000]) for i in range(0, len(RAW), 10_000))
    inflated, members = _index(small_members)
    assert inflated == RAW
    assert len(members.checkpoints) > 5
    for number, (point, window) in enumerate(
        zip(members.checkpoints, members.windows, strict=True)
    ):
        assert point.bit_offset == 0 and not window
        assert small_members[point.compressed_offset - 10 : point.compressed_offset - 8] == (
            b"\x1f\x8b"
        )
        start, end = _span_bounds(members, number)
        assert _read_span(small_members, members, number, window) == RAW[start:end]


def test_windows_keep_only_referenced_bytes() -> None:
    """Windows are the true history before their checkpoint, with bytes the span never
    copies zeroed and the unused start cut off: far less to store."""
    _, found = _index(gzip.compress(RAW, 6))
    kept = 0
    for point, window in zip(found.checkpoints[1:], found.windows[1:], strict=True):
        history = RAW[point.uncompressed_offset - len(window) : point.uncompressed_offset]
        assert all(w in (0, h) for w, h in zip(window, history, strict=True))
        kept += len(window) - window.count(0)
    assert 0 < kept < 0.5 * WINDOW_SIZE * (len(found.windows) - 1)
    assert any(not w for w in found.windows[1:])  # spans of noise need no history


def test_every_kept_window_byte_is_needed() -> None:
    """Sampled: zeroing any byte a window kept changes what the span inflates to."""
    compressed = gzip.compress(RAW, 6)
    _, found = _index(compressed)
    rnd = random.Random(9)
    checked = 0
    for point, window in zip(found.checkpoints, found.windows, strict=True):
        used = [i for i, byte in enumerate(window) if byte]
        start = point.uncompressed_offset
        expected = RAW[start : start + WINDOW_SIZE]
        for i in rnd.sample(used, min(8, len(used))):
            damaged = bytearray(window)
            damaged[i] = 0
            got = _inflate_prefix(compressed, found, point, bytes(damaged), len(expected))
            assert got != expected
            checked += 1
    assert checked >= 20


def _inflate_prefix(
    compressed: bytes, found: GzipCheckpoints, point: Checkpoint, window: bytes, length: int
) -> bytes:
    plan = plan_range(found.checkpoints, found.compressed_size, point.uncompressed_offset, length)
    fetched = compressed[plan.fetch_start : plan.fetch_end]
    return inflate_range(point, window, fetched, point.uncompressed_offset, length)


def test_small_and_empty_inputs() -> None:
    for raw in (b"", b"x", b"hello" * 100, RAW[: SPAN - 1]):
        compressed = gzip.compress(raw)
        inflated, found = _index(compressed)
        assert inflated == raw
        assert len(found.checkpoints) == 1
        assert _read_span(compressed, found, 0, found.windows[0]) == raw
        if raw:
            assert (
                _read(compressed, found, len(raw) // 2, len(raw) - len(raw) // 2)
                == raw[len(raw) // 2 :]
            )


def test_corrupt_compressed_bytes_are_caught_when_a_span_is_verified() -> None:
    compressed = gzip.compress(RAW, 6)
    _, found = _index(compressed)
    caught = 0
    rnd = random.Random(3)
    for number in range(len(found.checkpoints)):
        start, end = _span_bounds(found, number)
        plan = plan_range(found.checkpoints, found.compressed_size, start, end - start)
        damaged = bytearray(compressed)
        damaged[rnd.randrange(plan.fetch_start + 1, plan.fetch_end - 1)] ^= 0x55
        with pytest.raises(CorruptSpanError, match=f"span {number}") as whole:
            _read_span(bytes(damaged), found, number, found.windows[number])
        with pytest.raises(CorruptSpanError) as streamed:  # fed piece by piece: same verdict
            _streamed_span(bytes(damaged), found, number, seed=number)
        assert str(streamed.value) == str(whole.value)
        caught += 1
    assert caught == len(found.checkpoints)


def test_a_wrong_window_never_yields_silently_wrong_bytes() -> None:
    compressed = gzip.compress(RAW, 9)
    _, found = _index(compressed)
    rnd = random.Random(5)
    rejected = 0
    for number, window in enumerate(found.windows):
        if not window:
            continue
        wrong = rnd.randbytes(len(window))
        start, end = _span_bounds(found, number)
        try:
            data = _read_span(compressed, found, number, wrong)
        except CorruptSpanError:
            rejected += 1
        else:
            assert data == RAW[start:end]  # the span never looks back into its window
    assert rejected >= 1


def test_a_slice_cut_short_raises_instead_of_returning_less() -> None:
    compressed = gzip.compress(RAW, 6)
    _, found = _index(compressed)
    start, end = _span_bounds(found, 1)
    plan = plan_range(found.checkpoints, found.compressed_size, start, end - start)
    short = compressed[plan.fetch_start : (plan.fetch_start + plan.fetch_end) // 2]
    with pytest.raises(CorruptSpanError, match="ended after"):
        inflate_range(found.checkpoints[1], found.windows[1], short, start, end - start)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty input"),
        (b"this is not gzip at all", "inflate failed"),
        (gzip.compress(RAW)[:-100], "truncated"),
        (gzip.compress(b"abc") + b"trailing garbage", "inflate failed"),
        (gzip.compress(b"abc") + bytes(16), "inflate failed"),
    ],
    ids=["empty", "not-gzip", "truncated", "garbage-after", "zeros-after"],
)
def test_malformed_streams_are_refused(data: bytes, message: str) -> None:
    checkpointer = GzipCheckpointer(SPAN)
    with pytest.raises(GzipFormatError, match=message):
        for _ in checkpointer.inflate(_chunks(data, 2)):
            pass


def test_chunking_does_not_change_the_index() -> None:
    compressed = gzip.compress(RAW, 6)
    _, one = _index(compressed, seed=1)
    _, other = _index(compressed, seed=99)
    checkpointer = GzipCheckpointer(SPAN)
    for _ in checkpointer.inflate([compressed]):
        pass
    assert one == other == checkpointer.result()
