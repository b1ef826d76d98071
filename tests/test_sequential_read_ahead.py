"""Read-ahead after a miss only while a layer's misses run in blob order
(agent/fs/read_ahead.py), on a real eStargz layer made by the converter."""

from __future__ import annotations

from agent.fs.read_ahead import SequentialReadAhead
from agent.layers.estargz_layer import EstargzLayer
from agent.layers.lazy_layer import ReadAheadBudget
from fetcher.chunks import BlobSource
from fetcher.reference import ImageReference
from tests.test_estargz import CHUNK, _convert, _open_blob, _varied_tar


def _layer() -> EstargzLayer:
    blob, result = _convert(_varied_tar(), min_chunk_size=4 * CHUNK)
    toc = _open_blob(blob, expected_digest=result.toc_digest)
    source = BlobSource(ImageReference.parse("r.test/a:b"), "sha256:" + "0" * 64, len(blob))
    return EstargzLayer(source, toc)


def test_misses_read_ahead_only_once_they_follow_one_another() -> None:
    layer = _layer()
    members = layer.all_chunks()
    assert len(members) >= 16
    budget = ReadAheadBudget(sum(m.fetch_length for m in members[9:12]), 1 << 40)
    ahead = SequentialReadAhead(layer, budget)
    # A first miss, then one elsewhere: no order yet, nothing fetched ahead.
    assert ahead.after_miss(members[3]) == []
    assert ahead.after_miss(members[7]) == []
    # The chunk right after the last miss: the order shows, what follows comes along.
    assert ahead.after_miss(members[8]) == members[9:12]
    # A read of one of those while it is still on the wire counts as a miss: foreseen,
    # so nothing more, and the order holds.
    assert ahead.after_miss(members[10]) == []
    # Right after what was fetched ahead: still in order.
    expected = layer.chunks_after(members[12], budget)
    assert expected
    assert ahead.after_miss(members[12]) == expected
    # Backwards, or skipping past the chunk that follows: not in order.
    assert ahead.after_miss(members[2]) == []
    assert ahead.after_miss(members[5]) == []
    # Each layer keeps its own order.
    other = SequentialReadAhead(layer, budget)
    assert other.after_miss(members[6]) == []
