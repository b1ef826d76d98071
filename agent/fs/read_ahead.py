"""Which chunks to fetch ahead of a read miss: only while a layer's misses run in order.

A start often reads the files of one directory one after another, and they sit next to
each other in the layer, so fetching the chunks after a miss turns one round trip per
file into one per group. But as often it reads here and there (a Python start imports
modules from all over site-packages), and then the chunks fetched ahead of every miss
are bytes nobody reads, which share the link with the reads that wait. So, as the
kernel does within a file, the agent reads ahead only once a layer's misses show an
order: a miss at the chunk right after the previous miss (or after what was fetched
ahead of it) reads ahead; a miss anywhere else does not.
"""

from __future__ import annotations

from agent.layers.lazy_layer import LazyLayer, ReadAheadBudget
from fetcher.chunks import ChunkSpec


class SequentialReadAhead:
    """Per mounted layer: what to fetch ahead of each read miss. Use within one loop."""

    def __init__(self, layer: LazyLayer, budget: ReadAheadBudget) -> None:
        self._layer = layer
        self._budget = budget
        self._last: ChunkSpec | None = None
        """The chunk the last miss ended at, or the last one fetched ahead of it."""
        self._ahead: frozenset[str] = frozenset()
        """Keys of the chunks last fetched ahead: a read of one still on the wire counts
        as a miss, and is in order (it was foreseen), not a new start."""

    def after_miss(self, missed: ChunkSpec) -> list[ChunkSpec]:
        """The chunks to fetch ahead of ``missed`` (none unless it follows the last)."""
        if missed.key in self._ahead:
            return []
        ahead = self._layer.chunks_after(missed, self._budget) if self._follows(missed) else []
        self._last = ahead[-1] if ahead else missed
        self._ahead = frozenset(chunk.key for chunk in ahead)
        return ahead

    def _follows(self, missed: ChunkSpec) -> bool:
        """Whether ``missed`` is the chunk right after the last one, in blob order."""
        if self._last is None:
            return False
        just_it = ReadAheadBudget(missed.fetch_length, missed.decoded_size)
        following = self._layer.chunks_after(self._last, just_it)
        return bool(following) and following[0].key == missed.key
