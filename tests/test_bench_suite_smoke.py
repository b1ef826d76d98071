"""`accelctl bench` end to end on the small synthetic image, one repetition.

The suite's figures go into the README, so a broken suite must be found before someone
needs them: this runs every mode for real (cold nodes behind the shaped link, a learned
profile per lazy form) and checks that the JSON, the markdown table and the chart come
out complete and plausible.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from matplotlib import image as mpimg

from accelctl.main import cli
from bench.stargz_peer import PEER_MODES
from rig.stargz_process import missing_binary_message

PEER = missing_binary_message() is None
"""Whether the suite also runs the peer (stargz-snapshotter) modes on this machine."""
MODES = (
    "overlayfs",
    "overlayfs-warm",
    "lazy-index",
    "lazy-full",
    "lazy-index+profile",
    "lazy-full+profile",
    *(PEER_MODES if PEER else ()),
)


# The peer's two conversions and two cold starts add about a minute.
@pytest.mark.timeout(260 if PEER else 170)
def test_suite_runs_every_mode_and_writes_its_report(tmp_path: Path) -> None:
    results, docs = tmp_path / "results", tmp_path / "docs"
    # containerd's and the agent's sockets live under the work dir: keep its path short.
    with tempfile.TemporaryDirectory(prefix="acceld-bsu-") as workdir:
        args = [
            "bench", "--images", "synthetic", "--synthetic-mb", "16", "--repeat", "1",
            "--cache-dir", str(tmp_path / "cache"), "--workdir", workdir,
            "--results-dir", str(results), "--docs-dir", str(docs),
        ]  # fmt: skip
        outcome = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert outcome.exit_code == 0, outcome.output[-4000:]

    (path,) = results.glob("suite-*.json")
    document = json.loads(path.read_text())
    (image,) = document["images"]
    assert image["name"] == "synthetic-16m"
    rows = {row["mode"]: row for row in document["rows"]}
    assert tuple(rows) == MODES
    for row in rows.values():
        assert row["runs"] == 1 and row["speedup"] > 0, row
        assert 0 < row["ready_seconds"] < 120, row
    assert rows["overlayfs"]["mb_before_ready"] * 1e6 >= image["compressed_bytes"]
    for mode in MODES[2:]:
        assert rows[mode]["mb_before_ready"] * 1e6 < image["compressed_bytes"] / 2, rows[mode]

    # The start reads one small file through a busybox shell: the profile must say so.
    for form in ("index", "full"):
        learned = image["learned"][form]
        assert learned["profile_runs"] == 1 and learned["files"] >= 1, learned
        assert 0 < learned["app_read_bytes"] < 8 << 20, learned
    first_limit = image["first_limit_seconds"]
    warm = rows["overlayfs-warm"]["ready_seconds"]
    assert warm < first_limit < warm + 1.0
    for mode in MODES:
        row = rows[mode]
        assert row["times_limit_old"] == pytest.approx(row["ready_seconds"] / first_limit)
        assert warm < row["limit_seconds"] < warm + 1.0, row
        assert row["times_limit"] == pytest.approx(row["ready_seconds"] / row["limit_seconds"])
        assert 0 < row["mb_limit"] < 8, row
    # The learned ranges are priced in each form; a lazy run's causes add up.
    for form in ("index", "full"):
        cost = image["learned"][form]["cost"]
        assert 0 < cost["limit_bytes"] <= cost["piece_bytes"] <= cost["span_bytes"], cost
    for mode in (m for m in MODES if m.startswith("lazy-")):
        causes = rows[mode]["over_fetch_mb"]
        parts = sum(v for k, v in causes.items() if k != "before_ready")
        assert parts == pytest.approx(causes["before_ready"]), causes
        assert rows[mode]["agent_cpu_seconds"] > 0, rows[mode]
    for mode in MODES:
        assert rows[mode]["steal_seconds"] >= 0, rows[mode]  # a number for every mode
    assert all(run["steal_seconds"] >= 0 for run in image["runs"])

    table = path.with_suffix(".md").read_text()
    for mode in MODES:
        assert f"| synthetic-16m | {mode} |" in table
    assert "median time-to-ready speedup vs full pull over 1 image(s)" in table
    assert "--rate-mbit 300 --rtt-ms 5" in table
    assert document["summary_line"] in outcome.output
    if PEER:
        assert "acceld+profile vs stargz-optimized" in document["summary_line"]
        for mode in PEER_MODES:
            run = next(r for r in image["runs"] if r["mode"] == mode)
            assert run["lazy_layers"] == 3 and run["fallback_layers"] == 0, run
            assert image["conversions"][mode]["output_bytes"] > 0

    chart = mpimg.imread(path.with_suffix(".png"))
    assert chart.shape[0] > 200 and chart.shape[1] > 300
    assert (docs / "startup-suite.png").read_bytes() == path.with_suffix(".png").read_bytes()
    assert (docs / "startup-suite.md").read_text() == table
    assert json.loads((docs / "startup-suite.json").read_text()) == document
    assert "#### Bytes before ready, by cause" in table
