"""The startup suite's new-version scenario (`accelctl bench --new-versions`).

Its figures decide whether profile inheritance (issue 24) met its targets, so the
scenario must measure what it says: v2 really shares v1's lower layers by digest in
both accelerated forms and v3 shares none, an inherited start never finds the
version's own profile while its own-profile start does, and the rows, ratios and
outputs come out complete. The end-to-end test runs it for real on minbase (cold
nodes behind the shaped link, one repetition); nothing in it is timed against a bound,
so it holds on a loaded machine.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from matplotlib import image as mpimg

from accelctl.main import cli
from bench import catalog
from bench.compressed_limit import RangeCost
from bench.learning import Learned
from bench.new_versions import (
    VersionOutcome,
    mode_name,
    version_rows,
    versions_summary,
    versions_table,
)
from bench.startup import RunResult

FORMS = ("index", "full")
VERSION_MODES = {
    f"lazy-{form}{suffix}" for form in FORMS for suffix in ("+inherited", "", "+profile")
}
V1 = "sha256:" + "1" * 64
V2 = "sha256:" + "2" * 64


def _run(
    mode: str,
    ready: float,
    link_bytes: int,
    origin: str | None = None,
    source: str | None = None,
    entries: int | None = None,
) -> RunResult:
    run = RunResult(mode, 1, 0.1, ready, link_bytes)
    run.profile_origin, run.inherited_from, run.profile_entries = origin, source, entries
    return run


def test_rows_hold_the_ratios_the_issue_sets_targets_for() -> None:
    cost = RangeCost(
        read_bytes=40_000_000, limit_bytes=30_000_000, span_bytes=36_000_000, piece_bytes=33_000_000
    )
    learned = Learned("index", 1, 10, 40_000_000, {}, 1.0, cost=cost)
    outcome = VersionOutcome(
        "v2",
        "app layer",
        {"index": V2},
        {"index": 3},
        {"index": 2},
        {},
        {"index": learned},
        [
            _run(mode_name("index", "inherited"), 1.2, 50_000_000, "inherited", V1, 7),
            _run(mode_name("index", "inherited"), 1.4, 54_000_000, "inherited", V1, 7),
            _run(mode_name("index", "none"), 2.6, 60_000_000),
            _run(mode_name("index", "own"), 1.0, 42_000_000, "own"),
        ],
    )
    (row,) = version_rows("app", [outcome], [0.2, 0.3, 0.4], {"index": V1}, 300.0)
    # The compressed bytes holding what the start read, not the bytes it read.
    limit = 0.3 + 30_000_000 * 8 / 300e6
    assert row.runs == 2 and row.inherited_seconds == pytest.approx(1.3)
    assert row.limit_seconds == pytest.approx(limit)
    assert row.inherited_vs_own == pytest.approx(1.3)
    assert row.none_vs_own == pytest.approx(2.6)
    assert row.inherited_vs_limit == pytest.approx(1.3 / limit)
    assert row.before_ready_vs_read == pytest.approx(52_000_000 / 40_000_000)
    assert row.mb_before_ready == pytest.approx(52.0) and row.mb_read_by_app == 40.0
    assert row.origin == "inherited from v1"

    summary = versions_summary([row])
    assert "v2 (app layer changed): inherited vs own profile 1.30x (target <= 1.15x: MISSED)" in (
        summary
    )
    assert "bytes before ready vs read 1.30x (target <= 1.5x: met)" in summary
    assert "| app | v2 | app layer | index | 2 | 1.30 | 2.60 | 1.00 |" in versions_table([row])

    # An agent that does not log an origin yet: said so, with its plan's size if known.
    for run in outcome.runs:
        run.profile_origin, run.inherited_from = None, None
    (row,) = version_rows("app", [outcome], [0.3], {"index": V1}, 300.0)
    assert row.origin == "not logged (7 entries)"


def test_catalog_versions_change_what_the_scenario_says() -> None:
    for name in ("python-fat-api", "node-http", "minbase"):
        v2, v3 = catalog.CATALOG[name].versions
        assert (v2.tag, v2.change, v3.tag, v3.change) == ("v2", "app layer", "v3", "every layer")
        first = {f.path: f.content for f in catalog.CATALOG[name].spec.app_files}
        for version in (v2, v3):
            files = {f.path: f.content for f in version.app_files}
            assert first.keys() < files.keys()  # the same script, edited, and a new file
            assert all(files[path] != content for path, content in first.items())
        assert v2.app_files != v3.app_files  # v3's app layer differs from v2's too


@pytest.mark.timeout(900)
def test_new_version_scenario_on_minbase(tmp_path: Path) -> None:
    results, docs = tmp_path / "results", tmp_path / "docs"
    # The registry's storage is this test's own (profiles are unlisted and listed in
    # it); the Debian builds are shared with every other benchmark on the machine.
    cache = tmp_path / "cache"
    cache.mkdir()
    (catalog.DEFAULT_CACHE / "debian").mkdir(parents=True, exist_ok=True)
    (cache / "debian").symlink_to(catalog.DEFAULT_CACHE / "debian")
    # containerd's and the agent's sockets live under the work dir: keep its path short.
    with tempfile.TemporaryDirectory(prefix="acceld-bnv-") as workdir:
        args = [
            "bench", "--images", "minbase", "--repeat", "1", "--new-versions",
            "--cache-dir", str(cache), "--workdir", workdir,
            "--results-dir", str(results), "--docs-dir", str(docs),
        ]  # fmt: skip
        outcome = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert outcome.exit_code == 0, outcome.output[-4000:]

    (path,) = results.glob("suite-*.json")
    document = json.loads(path.read_text())
    (image,) = document["images"]
    scenario = image["new_versions"]
    first = scenario["first_digests"]
    assert set(first) == set(FORMS)
    versions = {version["tag"]: version for version in scenario["versions"]}
    assert list(versions) == ["v2", "v3"]
    for form in FORMS:
        # minbase has two layers: the base is v1's in v2 (by digest, in each form's
        # blobs), the app is not; v3 shares neither.
        assert versions["v2"]["layers"][form] == versions["v3"]["layers"][form] == 2
        assert versions["v2"]["shared_with_v1"][form] == 1
        assert versions["v3"]["shared_with_v1"][form] == 0
    digests = [first[form] for form in FORMS]
    digests += [v["digests"][form] for v in versions.values() for form in FORMS]
    assert len(set(digests)) == len(digests)

    for tag, version in versions.items():
        assert set(version["learned"]) == set(FORMS)
        for learned in version["learned"].values():
            assert learned["profile_runs"] == 1 and learned["app_read_bytes"] > 0, learned
        runs = {run["mode"]: run for run in version["runs"]}
        assert set(runs) == VERSION_MODES and len(version["runs"]) == len(VERSION_MODES)
        own_digests = set(version["digests"].values())
        for mode, run in runs.items():
            assert run["fallback_layers"] == 0 and run["lazy_layers"] >= 2, (tag, run)
            assert run["ready_seconds"] > 0, (tag, run)
            if mode.endswith("+profile"):
                # Its own profile was listed again for this start.
                assert run["profile_origin"] in (None, "own"), (tag, run)
                assert run["profile_entries"] is None or run["profile_entries"] > 0, run
            elif mode.endswith("+inherited"):
                # Its own profile was unlisted: whatever the agent took, not that.
                assert run["profile_origin"] != "own", (tag, run)
                assert run["inherited_from"] not in own_digests, (tag, run)
            else:
                assert run["profile_origin"] is None and run["profile_entries"] is None, run

    rows = {(row["version"], row["form"]): row for row in document["version_rows"]}
    assert set(rows) == {(tag, form) for tag in ("v2", "v3") for form in FORMS}
    limit = image["physical_limit_seconds"]
    for (tag, _form), row in rows.items():
        assert row["image"] == "minbase" and row["runs"] == 1, row
        assert row["change"] == versions[tag]["change"]
        assert row["inherited_vs_own"] == pytest.approx(
            row["inherited_seconds"] / row["own_seconds"]
        )
        assert row["inherited_vs_limit"] == pytest.approx(
            row["inherited_seconds"] / row["limit_seconds"]
        )
        assert row["before_ready_vs_read"] == pytest.approx(
            row["mb_before_ready"] / row["mb_read_by_app"]
        )
        # v1's local start plus the version's own bytes: near v1's limit, as minbase's
        # versions read much the same.
        assert row["limit_seconds"] == pytest.approx(limit, rel=0.5)

    table = path.with_suffix(".md").read_text()
    assert "#### New versions" in table
    for tag, change in (("v2", "app layer"), ("v3", "every layer")):
        for form in FORMS:
            assert f"| minbase | {tag} | {change} | {form} | 1 |" in table
    assert document["versions_summary"] in table
    assert "v2 (app layer changed): inherited vs own profile" in document["versions_summary"]
    assert "v3 (every layer changed)" in document["versions_summary"]
    assert document["versions_summary"] in outcome.output
    assert "--new-versions" in document["command"] and "--new-versions" in table

    # Two rows of panels: the image's modes, then one panel per version.
    chart = mpimg.imread(path.with_suffix(".png"))
    assert chart.shape[0] > 900 and chart.shape[1] > 600, chart.shape
    assert (docs / "startup-suite.png").read_bytes() == path.with_suffix(".png").read_bytes()
    assert (docs / "startup-suite.md").read_text() == table
