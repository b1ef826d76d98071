"""Learning a profile from run traces, and merging profiles from many nodes.

Every node learns from its own starts and pushes what it saw; any reader merges all of
it. That only works if merging does not care how the runs were grouped, so `merge` is
associative and commutative: per-file run counts and per-byte run counts add up,
sample sets (first-access times, bytes per run) keep the K samples of the most recent
runs under one total order, node and source counts add up, and the decision "which
files does a start need" (the threshold) is taken only when planning, never while
merging: a file that one node saw in 1 of 2 runs and another in 2 of 2 must count as
3 of 4, not be dropped early. The exceptions are the hard size caps (files, segments
per file, nodes), which only bite on profiles far larger than real startups produce.

Runs that crashed or timed out are counted but teach nothing: their reads may belong
to error handling that a healthy start never performs.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import replace

from profiles import coverage
from profiles.format import (
    DEFAULT_THRESHOLD,
    MAX_FILES,
    MAX_NODES,
    MAX_SAMPLES,
    MAX_SEGMENTS_PER_FILE,
    MAX_SUPERSEDES,
    FileStat,
    Profile,
    RunStats,
    Sample,
)
from profiles.trace import Outcome, RunTrace, access_name


class ProfileMergeError(ValueError):
    """Profiles that cannot be merged (different images) or whose merge would not fit."""


def _recent(*groups: tuple[Sample, ...]) -> tuple[Sample, ...]:
    """The samples of the MAX_SAMPLES most recent runs (ties by value: a total order)."""
    return tuple(sorted(s for group in groups for s in group)[-MAX_SAMPLES:])


def _source_key(sources: frozenset[str]) -> str:
    return "+".join(sorted(sources))


def _empty_stats() -> RunStats:
    return RunStats(0, 0, 0, 0, (), (), ())


def _check_threshold(threshold: float) -> float:
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    return float(threshold)


def from_trace(trace: RunTrace, threshold: float = DEFAULT_THRESHOLD) -> Profile:
    """The profile of one run (what a node pushes after each container start)."""
    threshold = _check_threshold(threshold)
    if trace.outcome is not Outcome.OK:
        stats = replace(
            _empty_stats(),
            crashed=int(trace.outcome is Outcome.CRASHED),
            timed_out=int(trace.outcome is Outcome.TIMED_OUT),
        )
        return Profile(trace.image, trace.layers, threshold, (), stats)
    ranges: dict[tuple[str, str], list[tuple[int, int]]] = {}
    first: dict[tuple[str, str], int] = {}
    for access in trace.accesses:
        key = (access.layer, access_name(access))
        ranges.setdefault(key, []).extend(access.ranges)
        first[key] = min(first.get(key, access.first_access_ns), access.first_access_ns)
    files = [
        FileStat(
            layer=layer,
            path=path,
            runs=1,
            coverage=coverage.coarsen(
                coverage.single_run(ranges[layer, path]), MAX_SEGMENTS_PER_FILE
            ),
            first_access=((trace.started_at_ns, first[layer, path]),),
        )
        for (layer, path), read in ranges.items()
    ]
    total = sum(end - start for f in files for start, end, _ in f.coverage)
    stats = RunStats(
        count=1,
        crashed=0,
        timed_out=0,
        page_cache_blind=int(not trace.page_cache_visible),
        nodes=((trace.node, 1),),
        sources=((_source_key(trace.sources), 1),),
        bytes_read=((trace.started_at_ns, total),),
    )
    return Profile(
        trace.image, trace.layers, threshold, _canonical_files(files, trace.layers), stats
    )


def _canonical_files(files: list[FileStat], layers: tuple[str, ...]) -> tuple[FileStat, ...]:
    """Files in canonical order, the least-used dropped beyond MAX_FILES."""
    if len(files) > MAX_FILES:
        files = sorted(files, key=lambda f: (-f.runs, min(t for _, t in f.first_access)))
        files = files[:MAX_FILES]
    position = {layer: i for i, layer in enumerate(layers)}
    return tuple(sorted(files, key=lambda f: (position[f.layer], f.path)))


def _merge_counts(
    a: tuple[tuple[str, int], ...], b: tuple[tuple[str, int], ...], limit: int
) -> tuple[tuple[str, int], ...]:
    totals = dict(a)
    for name, count in b:
        totals[name] = totals.get(name, 0) + count
    kept = sorted(totals.items(), key=lambda item: (-item[1], item[0]))[:limit]
    return tuple(sorted(kept))


def _merge_stats(a: RunStats, b: RunStats) -> RunStats:
    return RunStats(
        count=a.count + b.count,
        crashed=a.crashed + b.crashed,
        timed_out=a.timed_out + b.timed_out,
        page_cache_blind=a.page_cache_blind + b.page_cache_blind,
        nodes=_merge_counts(a.nodes, b.nodes, MAX_NODES),
        sources=_merge_counts(a.sources, b.sources, len(a.sources) + len(b.sources)),
        bytes_read=_recent(a.bytes_read, b.bytes_read),
    )


def _merge_file(a: FileStat, b: FileStat) -> FileStat:
    return FileStat(
        layer=a.layer,
        path=a.path,
        runs=a.runs + b.runs,
        coverage=coverage.coarsen(coverage.add(a.coverage, b.coverage), MAX_SEGMENTS_PER_FILE),
        first_access=_recent(a.first_access, b.first_access),
    )


def merge(a: Profile, b: Profile) -> Profile:
    """Both profiles' runs in one profile; associative and commutative below the caps."""
    if (a.image, a.layers) != (b.image, b.layers):
        raise ProfileMergeError(f"profiles of different images: {a.image} and {b.image}")
    files = {(f.layer, f.path): f for f in a.files}
    for f in b.files:
        key = (f.layer, f.path)
        files[key] = _merge_file(files[key], f) if key in files else f
    supersedes = sorted(set(a.supersedes) | set(b.supersedes))
    if len(supersedes) > MAX_SUPERSEDES:
        raise ProfileMergeError(f"merged profile would supersede over {MAX_SUPERSEDES} artifacts")
    return Profile(
        image=a.image,
        layers=a.layers,
        threshold=max(a.threshold, b.threshold),
        files=_canonical_files(list(files.values()), a.layers),
        runs=_merge_stats(a.runs, b.runs),
        supersedes=tuple(supersedes),
    )


def merge_all(profiles: Iterable[Profile]) -> Profile:
    """Fold any number (at least one) of profiles of the same image."""
    return functools.reduce(merge, profiles)


def learn(
    traces: Iterable[RunTrace],
    threshold: float = DEFAULT_THRESHOLD,
) -> Profile:
    """One profile from the traces of many runs (of one image, from any nodes)."""
    runs = [from_trace(trace, threshold) for trace in traces]
    if not runs:
        raise ValueError("learning a profile needs at least one run trace")
    return merge_all(runs)
