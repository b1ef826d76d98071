"""The converter benchmark still runs end to end, and its image builder diffs trees right.

Benchmarks are not tests: these only prove that `python -m bench.convert --quick`
produces a complete, plausible result (so a broken benchmark is found before someone
needs its figures), and that the layer diff behind every Debian image turns one tree
into another exactly. The quick image reuses the machine's benchmark cache; on a cold
cache the first run also runs debootstrap (about a minute more).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from bench.debian_image import PathState, debian_mirror, diff_entries, snapshot_tree
from rig.layers import (
    Directory,
    File,
    Hardlink,
    HostFile,
    LayerSpec,
    Symlink,
    Whiteout,
    merged_view,
)

REPO = Path(__file__).resolve().parents[1]


def test_convert_benchmark_quick_run(tmp_path: Path) -> None:
    results = tmp_path / "results"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.convert",
            "--quick",
            "--repeat",
            "1",
            "--results-dir",
            str(results),
            "--workdir",
            str(tmp_path / "work"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    assert "| index |" in proc.stdout and "| full |" in proc.stdout
    (json_path,) = results.glob("convert-*.json")
    document = json.loads(json_path.read_text())
    measured = document["measurements"]
    summary = {row["mode"]: row for row in document["summary"]}
    assert measured["image"] == "minbase"
    assert measured["uncompressed_bytes"] > measured["compressed_bytes"] > 10_000_000
    index, full = summary["index"], summary["full"]
    # An index with no checkpoints would be tiny and useless: demand one per ~4 MiB span.
    assert measured["index"][0]["checkpoints"] >= measured["uncompressed_bytes"] // (8 << 20)
    assert 0 < index["percent_of_base"] < 5
    assert 80 < full["percent_of_base"] < 150
    for row in (index, full):
        assert row["seconds"] > 0 and row["baseline_seconds"] > 0
        assert row["ratio"] == pytest.approx(row["seconds"] / row["baseline_seconds"])
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())


def _make_tree(root: Path) -> None:
    (root / "etc").mkdir(parents=True)
    (root / "etc/keep.conf").write_text("unchanged\n")
    (root / "etc/edit.conf").write_text("before\n")
    (root / "gone").mkdir()
    (root / "gone/inner.txt").write_text("removed with its directory\n")
    (root / "usr/lib").mkdir(parents=True)
    (root / "usr/lib/old.so").write_bytes(b"\x7fELF old")
    (root / "dev").mkdir()
    (root / "dev/null-ish").write_text("runtime dirs ship empty\n")


def test_tree_diff_reproduces_the_installed_tree(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _make_tree(root)
    before = snapshot_tree(root)
    assert "dev" in before and "dev/null-ish" not in before
    # What an installer does: replace by rename, add, delete, link.
    replacement = root / "etc/edit.conf.dpkg-new"
    replacement.write_text("after\n")
    os.replace(replacement, root / "etc/edit.conf")
    (root / "gone/inner.txt").unlink()
    (root / "gone").rmdir()
    (root / "usr/lib/old.so").unlink()
    (root / "usr/lib/python3").mkdir()
    (root / "usr/lib/python3/mod.py").write_text("print('hi')\n")
    os.link(root / "usr/lib/python3/mod.py", root / "usr/lib/python3/alias.py")
    os.symlink("python3/mod.py", root / "usr/lib/mod-link.py")
    after = snapshot_tree(root)

    entries = diff_entries(root, before, after)
    by_path = {entry.path: entry for entry in entries}
    assert isinstance(by_path["gone"], Whiteout) and "gone/inner.txt" not in by_path
    assert isinstance(by_path["usr/lib/old.so"], Whiteout)
    link = by_path["usr/lib/python3/mod.py"]  # the later name in tar order links back
    assert isinstance(link, Hardlink) and link.target == "usr/lib/python3/alias.py"
    assert isinstance(by_path["usr/lib/mod-link.py"], Symlink)
    assert isinstance(by_path["usr/lib"], Directory)
    assert "etc/keep.conf" not in by_path

    # Stacked on a layer of the old tree, the diff must give exactly the new tree.
    view = merged_view([LayerSpec(_placeholders(before)), LayerSpec(entries)])
    assert sorted(view) == sorted(after)
    edited = view["etc/edit.conf"]
    assert isinstance(edited, File) and edited.content == HostFile(root / "etc/edit.conf")


def _placeholders(states: dict[str, PathState]) -> list[File | Directory]:
    """Entries standing for an old tree's paths (its file contents are gone by now)."""
    return [Directory(rel) if stat.S_ISDIR(s.mode) else File(rel) for rel, s in states.items()]


def test_mirror_comes_from_the_apt_configuration(tmp_path: Path) -> None:
    parts = tmp_path / "sources.list.d"
    parts.mkdir()
    (parts / "other.list.disabled").write_text("deb http://ignored.example/debian bookworm main\n")
    (parts / "security.sources").write_text(
        "Types: deb\nURIs: http://security.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n"
    )
    (parts / "debian.sources").write_text(
        "Types: deb\n# a comment\nURIs: http://mirror.example/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n"
    )
    assert debian_mirror("bookworm", tmp_path) == "http://mirror.example/debian"
    with pytest.raises(RuntimeError, match="trixie"):
        debian_mirror("trixie", tmp_path)
