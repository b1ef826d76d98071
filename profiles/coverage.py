"""Byte coverage of a file over many runs: how many runs read each byte.

A profile must merge associatively (nodes fold in their runs in any grouping), so a
file's ranges are kept as a piecewise-constant count of runs per byte instead of a
union: adding two coverages is a pointwise sum, which is associative and commutative,
and "ranges that at least half of the runs read" is a threshold on it at planning time.
Segments are ``(start, end, runs)`` with [start, end) sorted, disjoint, runs >= 1, and
neighbours that touch with the same count merged: one canonical form per coverage, so
equal coverages serialize to equal bytes.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

Segment = tuple[int, int, int]
Segments = tuple[Segment, ...]
Ranges = tuple[tuple[int, int], ...]

COARSEN_START = 4096
_Ints = npt.NDArray[np.int64]


def _canonical(bounds: _Ints, level: _Ints) -> Segments:
    """Elementary intervals [bounds[i], bounds[i+1]) at ``level[i]`` -> canonical segments."""
    if level.size == 0:
        return ()
    change = np.ones(level.size, dtype=bool)
    change[1:] = level[1:] != level[:-1]
    first = np.flatnonzero(change)
    starts = bounds[first]
    ends = bounds[np.append(first[1:], level.size)]
    levels = level[first]
    keep = levels > 0
    return tuple(
        zip(
            starts[keep].tolist(),
            ends[keep].tolist(),
            levels[keep].tolist(),
            strict=True,
        )
    )


def _summed(starts: _Ints, ends: _Ints, counts: _Ints) -> tuple[_Ints, _Ints]:
    """Pointwise sum of weighted intervals, by a difference array over their bounds."""
    bounds, inverse = np.unique(np.concatenate([starts, ends]), return_inverse=True)
    delta = np.zeros(bounds.size, dtype=np.int64)
    np.add.at(delta, inverse, np.concatenate([counts, -counts]))
    return bounds, np.cumsum(delta)[:-1]


def _arrays(segments: Iterable[Segment]) -> tuple[_Ints, _Ints, _Ints]:
    table = np.array(list(segments), dtype=np.int64).reshape(-1, 3)
    return table[:, 0], table[:, 1], table[:, 2]


def single_run(ranges: Iterable[tuple[int, int]]) -> Segments:
    """Coverage of one run: each byte it read counts once, however often it was read."""
    table = np.array(list(ranges), dtype=np.int64).reshape(-1, 2)
    if table.shape[0] == 0:
        return ()
    bounds, level = _summed(table[:, 0], table[:, 1], np.ones(table.shape[0], dtype=np.int64))
    return _canonical(bounds, np.minimum(level, 1))


def add(*coverages: Segments) -> Segments:
    """The coverage of all the runs behind ``coverages`` together."""
    segments = [s for coverage in coverages for s in coverage]
    if not segments:
        return ()
    return _canonical(*_summed(*_arrays(segments)))


def _pointwise_max(starts: _Ints, ends: _Ints, counts: _Ints) -> Segments:
    bounds = np.unique(np.concatenate([starts, ends]))
    lo = np.searchsorted(bounds, starts)
    lengths = np.searchsorted(bounds, ends) - lo
    offsets = np.repeat(np.cumsum(lengths) - lengths, lengths)
    cells = np.arange(int(lengths.sum()), dtype=np.int64) - offsets + np.repeat(lo, lengths)
    level = np.zeros(bounds.size - 1, dtype=np.int64)
    np.maximum.at(level, cells, np.repeat(counts, lengths))
    return _canonical(bounds, level)


def coarsen(coverage: Segments, limit: int) -> Segments:
    """At most ``limit`` segments, by rounding bounds out to ever larger aligned blocks.

    Only files read in thousands of scattered pieces get here. Rounding out keeps every
    byte that was read (prefetching a little more beats missing a piece), and a block
    shared by two segments takes the larger count, which never exceeds the file's runs.
    """
    granularity = COARSEN_START
    while len(coverage) > limit:
        starts, ends, counts = _arrays(coverage)
        coverage = _pointwise_max(
            starts // granularity * granularity, -(-ends // granularity) * granularity, counts
        )
        granularity *= 2
    return coverage


def at_least(coverage: Segments, runs: int) -> Ranges:
    """The byte ranges read by at least ``runs`` runs, touching neighbours merged."""
    merged: list[list[int]] = []
    for start, end, count in coverage:
        if count < runs:
            continue
        if merged and merged[-1][1] == start:
            merged[-1][1] = end
        else:
            merged.append([start, end])
    return tuple((start, end) for start, end in merged)


def size_of(ranges: Ranges) -> int:
    """Bytes in disjoint ``ranges``."""
    return sum(end - start for start, end in ranges)
