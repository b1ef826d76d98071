"""How benchmarks hand over their numbers: a markdown table for people, JSON for tools.

Every benchmark prints a table that can be pasted into the README as is, and keeps the
raw measurements (every repetition, the machine, the inputs) next to it, so a figure in
the README can always be traced back to the run that produced it.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
"""Default output directory (git-ignored)."""
REPO_ROOT = Path(__file__).resolve().parent.parent


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table; columns whose header ends in a unit or ``%`` align right.

    Cells are already formatted: the benchmark decides precision, the table only lays
    them out.
    """
    numeric = [_is_numeric_column(i, rows) for i in range(len(headers))]
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---:" if right else "---" for right in numeric) + "|",
    ]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells, the table {len(headers)} columns")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


NOT_AVAILABLE = "n/a"
"""A cell with no figure; it does not make a column of figures left-aligned."""


def _is_numeric_column(index: int, rows: Sequence[Sequence[str]]) -> bool:
    cells = [
        row[index] for row in rows if index < len(row) and row[index] not in ("", NOT_AVAILABLE)
    ]
    return bool(cells) and all(cell[:1].isdigit() or cell[:1] in "-+." for cell in cells)


def machine() -> dict[str, Any]:
    """What the figures depend on besides the code: CPU count, model, kernel."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def git_revision(repo: Path = REPO_ROOT) -> dict[str, Any]:
    """The commit the measured code is at, and the tracked files that differ from it.

    A figure is traceable to a commit only if the tree was clean there; with changes
    in flight (several people share a machine), the list says which files were not.
    """

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, check=False
        )

    try:
        head = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no")
    except OSError:
        return {"commit": None}
    if head.returncode:
        return {"commit": None}
    changed = [line[3:] for line in status.stdout.splitlines()]
    return {"commit": head.stdout.strip(), "dirty": bool(changed), "changed_files": changed}


def write_results(
    kind: str, document: Mapping[str, Any], table: str, results_dir: Path = RESULTS_DIR
) -> Path:
    """Save ``document`` (plus the machine and the git revision) as JSON and ``table`` as
    .md; return the JSON path."""
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = results_dir / f"{kind}-{stamp}.json"
    payload = {
        "benchmark": kind,
        "when": stamp,
        "machine": machine(),
        "git": git_revision(),
        **document,
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    path.with_suffix(".md").write_text(table + "\n")
    return path
