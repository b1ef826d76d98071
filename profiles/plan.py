"""What the agent prefetches for an image, in order: the profile turned into a plan.

The threshold is applied here, not when merging (see `profiles.learn`): a file makes
the plan when at least ``threshold`` of the successful runs opened it, and of its bytes
only those that many runs read. Entries come in the order a start first touches them
(median over the recent runs, robust to one slow outlier run); at equal times the
smaller entry goes first, so more files are ready sooner for the same bytes.

The same entries carry the image's own hints (the converter's list, eStargz landmarks)
on the node, where one resolver places every source in the image's layers
(`agent.plan_resolver`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from formats.plan_path import PlanPath
from profiles.coverage import Ranges, at_least, size_of
from profiles.format import FileStat, Profile


class PrefetchEntry(NamedTuple):
    """One prefetch: ``path`` is absolute, a trailing `/` means a directory's subtree;
    ``layer`` None means "the layer the merged view takes it from"; ``ranges`` None means
    the whole file (or subtree)."""

    layer: str | None
    path: str
    ranges: Ranges | None


def needed_runs(threshold: float, runs: int) -> int:
    """How many of ``runs`` runs must have needed something for it to be prefetched."""
    return max(1, math.ceil(threshold * runs - 1e-9))


def median_first_access(stat: FileStat) -> float:
    """Median ns from start to first access over the kept (recent) runs."""
    return float(np.median(np.array([t for _, t in stat.first_access], dtype=np.int64)))


def prefetch_plan(profile: Profile, threshold: float | None = None) -> list[PrefetchEntry]:
    """The ordered prefetch list for ``profile`` (``threshold`` overrides the profile's)."""
    need = needed_runs(profile.threshold if threshold is None else threshold, profile.runs.count)
    position = {layer: i for i, layer in enumerate(profile.layers)}
    keyed: list[tuple[tuple[float, int, int, str], PrefetchEntry]] = []
    for stat in profile.files:
        ranges = at_least(stat.coverage, need) if stat.runs >= need else ()
        if not ranges:
            continue
        key = (median_first_access(stat), size_of(ranges), position[stat.layer], stat.path)
        keyed.append((key, PrefetchEntry(stat.layer, str(PlanPath(stat.path, False)), ranges)))
    keyed.sort(key=lambda item: item[0])
    return [entry for _, entry in keyed]
