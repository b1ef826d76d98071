"""Learning profiles from run traces: thresholds, ordering, failed runs, associative
merging across nodes, and the converter's prefetch list."""

from __future__ import annotations

import signal
from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from profiles.format import MAX_SAMPLES, MAX_SEGMENTS_PER_FILE, Profile, parse, serialize
from profiles.learn import ProfileMergeError, from_trace, learn, merge, merge_all
from profiles.plan import PrefetchEntry, median_first_access, prefetch_plan
from profiles.trace import FileAccess, Outcome, RunTrace, TraceError, run_outcome

IMAGE = "sha256:" + "1" * 64
BASE, APP = "sha256:" + "a" * 64, "sha256:" + "b" * 64
LAYERS = (BASE, APP)


def run(
    files: Mapping[str, tuple[int, tuple[tuple[int, int], ...]]],
    started: int,
    node: str = "node-1",
    outcome: Outcome = Outcome.OK,
    sources: frozenset[str] = frozenset({"ebpf"}),
) -> RunTrace:
    """A trace; ``files`` maps `layer-letter:path` to (first access ns, ranges)."""
    accesses = tuple(
        FileAccess(BASE if key.startswith("a:") else APP, key[2:], ranges, first)
        for key, (first, ranges) in files.items()
    )
    return RunTrace(IMAGE, LAYERS, accesses, outcome, node, sources, "ebpf" in sources, started)


def plan_paths(profile: Profile, threshold: float | None = None) -> list[str]:
    return [entry.path for entry in prefetch_plan(profile, threshold)]


def test_threshold_keeps_files_most_runs_needed() -> None:
    every = {"a:bin/sh": (1, ((0, 100),))}
    traces = [
        run({**every, "b:app/common": (5, ((0, 10),)), "b:app/rare": (9, ((0, 10),))}, 1),
        run({**every, "b:app/common": (5, ((0, 10),))}, 2),
        run(every, 3),
        run(every, 4),
    ]
    profile = learn(traces)
    assert plan_paths(profile) == ["/bin/sh", "/app/common"]  # 2 of 4 >= 0.5
    assert plan_paths(profile, threshold=0.75) == ["/bin/sh"]
    assert plan_paths(learn(traces, threshold=0.25)) == ["/bin/sh", "/app/common", "/app/rare"]
    rare = next(f for f in profile.files if f.path == "app/rare")
    assert rare.runs == 1  # kept in the profile: a later merge may lift it over the bar


def test_byte_ranges_need_the_threshold_too() -> None:
    traces = [
        run({"a:lib/libc.so": (1, ((0, 4096), (8192, 12288)))}, 1),
        run({"a:lib/libc.so": (1, ((0, 4096),))}, 2),
        run({"a:lib/libc.so": (1, ((0, 2048), (8192, 9000), (100_000, 100_001)))}, 3),
    ]
    (entry,) = prefetch_plan(learn(traces))  # needs 2 of 3 runs per byte
    assert entry == PrefetchEntry(BASE, "/lib/libc.so", ((0, 4096), (8192, 9000)))
    (everything,) = prefetch_plan(learn(traces), threshold=0.3)
    assert everything.ranges == ((0, 4096), (8192, 12288), (100_000, 100_001))


def test_ranges_within_a_run_are_merged_and_counted_once() -> None:
    trace = run({"a:f": (1, ((0, 10), (5, 30), (30, 40), (100, 110), (0, 10)))}, 1)
    (stat,) = from_trace(trace).files
    assert stat.coverage == ((0, 40, 1), (100, 110, 1))
    assert from_trace(trace).runs.bytes_read == ((1, 50),)


def test_order_is_by_median_first_access() -> None:
    # "early" has one slow outlier run: its mean (338) is later than "middle" (20),
    # its median (8) is not.
    times = {"early": (5, 8, 1000), "middle": (20, 20, 20), "late": (30, 35, 31)}
    traces = [
        run({f"a:{name}": (t[i], ((0, 10),)) for name, t in times.items()}, i) for i in range(3)
    ]
    profile = learn(traces)
    assert plan_paths(profile) == ["/early", "/middle", "/late"]
    early = next(f for f in profile.files if f.path == "early")
    assert median_first_access(early) == 8


def test_equal_first_access_puts_the_smaller_entry_first() -> None:
    trace = run({"a:big": (7, ((0, 1 << 20),)), "b:small": (7, ((0, 10),))}, 1)
    assert plan_paths(learn([trace])) == ["/small", "/big"]


def test_crashed_and_timed_out_runs_teach_nothing() -> None:
    good = {"a:bin/app": (1, ((0, 100),))}
    traces = [
        run(good, 1),
        run({**good, "a:var/crash.log": (2, ((0, 50),))}, 2, outcome=Outcome.CRASHED),
        run({"a:etc/retry": (2, ((0, 50),))}, 3, outcome=Outcome.TIMED_OUT),
    ]
    profile = learn(traces)
    assert [f.path for f in profile.files] == ["bin/app"]
    assert (profile.runs.count, profile.runs.crashed, profile.runs.timed_out) == (1, 1, 1)
    assert plan_paths(profile) == ["/bin/app"]  # 1 of 1 successful runs, not 1 of 3


def test_only_failed_runs_plan_nothing() -> None:
    crashed = run({"a:x": (1, ((0, 1),))}, 1, outcome=Outcome.CRASHED)
    assert prefetch_plan(learn([crashed])) == []


def test_run_statistics_record_nodes_sources_and_blindness() -> None:
    traces = [
        run({"a:x": (1, ((0, 10),))}, 1, node="n1"),
        run({"a:x": (1, ((0, 20),))}, 2, node="n2", sources=frozenset({"fuse"})),
        run({"a:x": (1, ((0, 30),))}, 3, node="n1", sources=frozenset({"ebpf", "fuse"})),
    ]
    stats = learn(traces).runs
    assert stats.nodes == (("n1", 2), ("n2", 1))
    assert stats.sources == (("ebpf", 1), ("ebpf+fuse", 1), ("fuse", 1))
    assert stats.page_cache_blind == 1
    assert stats.bytes_read == ((1, 10), (2, 20), (3, 30))


def test_fuse_only_trace_cannot_claim_page_cache_visibility() -> None:
    with pytest.raises(TraceError, match="page-cache"):
        RunTrace(IMAGE, LAYERS, (), Outcome.OK, "n", frozenset({"fuse"}), True, 1)


@pytest.mark.parametrize(
    ("access", "message"),
    [
        (FileAccess(BASE, "../etc/shadow", ((0, 1),), 1), "escapes"),
        (FileAccess(BASE, "x", ((5, 5),), 1), "range"),
        (FileAccess(BASE, "x", ((0, 1),), -1), "negative"),
        (FileAccess("sha256:" + "f" * 64, "x", ((0, 1),), 1), "not in the image"),
        (FileAccess(BASE, "/", ((0, 1),), 1), "root"),
    ],
)
def test_invalid_traces_are_refused(access: FileAccess, message: str) -> None:
    with pytest.raises(TraceError, match=message):
        RunTrace(IMAGE, LAYERS, (access,), Outcome.OK, "n", frozenset({"ebpf"}), True, 1)


def test_merging_different_images_is_refused() -> None:
    other = RunTrace(
        "sha256:" + "2" * 64, LAYERS, (), Outcome.OK, "n", frozenset({"ebpf"}), True, 1
    )
    with pytest.raises(ProfileMergeError, match="different images"):
        merge(from_trace(run({}, 1)), from_trace(other))


def test_recent_samples_are_bounded_and_merge_order_free() -> None:
    traces = [run({"a:x": (1000 + i, ((0, 10),))}, started=i) for i in range(MAX_SAMPLES + 9)]
    profiles = [from_trace(t) for t in traces]
    forward = merge_all(profiles)
    backward = merge_all(reversed(profiles))
    (stat,) = forward.files
    assert forward == backward
    assert stat.runs == MAX_SAMPLES + 9
    assert [t for t, _ in stat.first_access] == list(range(9, MAX_SAMPLES + 9))
    assert len(forward.runs.bytes_read) == MAX_SAMPLES


def test_scattered_reads_are_coarsened_without_losing_bytes() -> None:
    ranges = tuple((i * 10_000, i * 10_000 + 100) for i in range(MAX_SEGMENTS_PER_FILE * 3))
    (stat,) = from_trace(run({"a:db": (1, ranges)}, 1)).files
    assert len(stat.coverage) <= MAX_SEGMENTS_PER_FILE
    covered = [(s, e) for s, e, _ in stat.coverage]
    for start, end in ranges:
        assert any(s <= start and end <= e for s, e in covered)


_PATHS = st.sampled_from(["a:bin/sh", "a:lib/libc", "b:app/x", "b:app/y", "b:etc/z"])
_RANGES = st.lists(
    st.tuples(st.integers(0, 5000), st.integers(1, 3000)).map(lambda t: (t[0], t[0] + t[1])),
    max_size=3,
).map(tuple)
_TRACES = st.builds(
    run,
    st.dictionaries(_PATHS, st.tuples(st.integers(0, 10**6), _RANGES), max_size=5),
    st.integers(0, 50),
    st.sampled_from(["n1", "n2", "n3"]),
    st.sampled_from(list(Outcome)),
    st.sampled_from([frozenset({"ebpf"}), frozenset({"fuse"}), frozenset({"ebpf", "fuse"})]),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(_TRACES, min_size=3, max_size=9), st.data())
def test_merge_is_associative_and_matches_learning_at_once(
    traces: list[RunTrace], data: st.DataObject
) -> None:
    cut1 = data.draw(st.integers(1, len(traces) - 2))
    cut2 = data.draw(st.integers(cut1 + 1, len(traces) - 1))
    a, b, c = (learn(part) for part in (traces[:cut1], traces[cut1:cut2], traces[cut2:]))
    left = merge(merge(a, b), c)
    right = merge(a, merge(b, c))
    assert left == right == learn(traces)
    assert merge(a, b) == merge(b, a)
    assert serialize(left) == serialize(right)
    assert parse(serialize(left)) == left


@pytest.mark.parametrize(
    ("status", "hit_deadline", "outcome"),
    [
        (None, False, Outcome.OK),
        (0, False, Outcome.OK),
        (1 << 8, False, Outcome.CRASHED),
        (int(signal.SIGSEGV), False, Outcome.CRASHED),
        (int(signal.SIGABRT) | 0x80, False, Outcome.CRASHED),  # with a core dump
        (int(signal.SIGKILL), False, Outcome.OK),  # stopped from outside, not broken
        (int(signal.SIGTERM), True, Outcome.TIMED_OUT),
        (None, True, Outcome.TIMED_OUT),
        (2 << 8, True, Outcome.CRASHED),
    ],
)
def test_run_outcome_from_exit_status_and_window(
    status: int | None, hit_deadline: bool, outcome: Outcome
) -> None:
    assert run_outcome(status, hit_deadline) is outcome
