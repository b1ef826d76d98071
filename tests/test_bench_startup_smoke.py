"""`python -m bench.startup --quick` end to end on a small synthetic image.

The benchmark's figures are only worth something if every mode really ran as labelled:
the full pull downloaded the whole image, the lazy runs served every layer lazily and
fetched much less before the container printed its ready line.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(150)
def test_quick_startup_benchmark_measures_every_mode(tmp_path: Path) -> None:
    results = tmp_path / "results"
    # containerd's sockets live under the work dir: keep its path short.
    with tempfile.TemporaryDirectory(prefix="acceld-bs-") as workdir:
        command = [
            sys.executable, "-m", "bench.startup", "--quick", "--data-mb", "16",
            "--no-background-fill", "--cache-dir", str(tmp_path / "cache"),
            "--workdir", workdir, "--results-dir", str(results),
        ]  # fmt: skip
        proc = subprocess.run(
            command, cwd=REPO, capture_output=True, text=True, timeout=120, check=False
        )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    assert "| lazy-index |" in proc.stdout
    assert "time-to-ready speedup of lazy vs full pull" in proc.stdout

    (path,) = results.glob("startup-*.json")
    document = json.loads(path.read_text())
    runs = {run["mode"]: run for run in document["runs"]}
    assert set(runs) == {"overlayfs", "overlayfs-warm", "lazy-index", "lazy-full"}
    image_bytes = document["image_compressed_bytes"]
    assert runs["overlayfs"]["link_bytes_before_ready"] >= image_bytes
    assert runs["overlayfs-warm"]["link_bytes_before_ready"] < 100_000
    for mode in ("lazy-index", "lazy-full"):
        run = runs[mode]
        assert run["fallback_layers"] == 0, run
        assert run["lazy_layers"] >= 3, run
        assert run["link_bytes_before_ready"] < image_bytes / 2, run
        assert 0 < run["pull_seconds"] < run["ready_seconds"], run
    assert document["conversions"]["index"]["output_bytes"] > 0
