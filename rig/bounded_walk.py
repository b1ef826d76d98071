"""Describe a mounted tree from a child process that is killed if it stops making progress.

A lazily served tree can fail in ways a test must survive: a read that never returns
would hang the test itself, and an entry that cannot be read must be told apart from
one that reads wrong. So the walk runs in a child process (`python -m rig.bounded_walk
ROOT`) that describes each entry with `rig.rootfs_digest.describe_path` and reports it
as a JSON line, an error (errno name and all) included; the parent kills the child
once one entry has taken longer than its bound, and says which entry that was.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rig.rootfs_digest import describe_path

Facts = list[Any]
"""An entry's `describe_path` facts as JSON has them (tuples become lists, xattr values
hex)."""


@dataclass
class WalkResult:
    """What the walk saw: per relative path, facts or the error reading it raised."""

    facts: dict[str, Facts] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    """Path -> errno name (``EIO``...); a directory's means its listing failed."""
    slowest: tuple[float, str] = (0.0, "")
    """The longest any one entry took, and which."""
    hung: str | None = None
    """The entry the child was killed on, having taken longer than the bound."""


def _json_facts(facts: tuple[object, ...]) -> Facts:
    kind, mode, uid, gid, detail, xattrs, mtime = facts
    if isinstance(detail, tuple):
        detail = list(detail)
    pairs = [[name, value.hex()] for name, value in xattrs]  # type: ignore[attr-defined]
    return [kind, mode, uid, gid, detail, pairs, mtime]


def _entries(root: str, relative: str = "") -> Iterator[tuple[str, int]]:
    """(relative path, 0) for every entry, depth first in name order, and (directory,
    errno) for a directory whose listing fails (which is not descended)."""
    try:
        with os.scandir(os.path.join(root, relative)) as listing:
            names = sorted((entry.name, entry.is_dir(follow_symlinks=False)) for entry in listing)
    except OSError as exc:
        yield relative, exc.errno or errno.EIO
        return
    for name, is_dir in names:
        path = os.path.join(relative, name)
        yield path, 0
        if is_dir:
            yield from _entries(root, path)


def _child(root: str) -> None:
    """The walk itself: one JSON line before and one after each entry."""
    for path, listing_error in _entries(root):
        if listing_error:
            error = errno.errorcode.get(listing_error, str(listing_error))
            print(json.dumps({"path": path, "error": error, "op": "readdir"}), flush=True)
            continue
        print(json.dumps({"begin": path}), flush=True)
        started = time.monotonic()
        try:
            record: dict[str, Any] = {
                "path": path,
                "facts": _json_facts(describe_path(os.path.join(root, path))),
            }
        except OSError as exc:
            record = {"path": path, "error": errno.errorcode.get(exc.errno or 0, str(exc))}
        record["seconds"] = round(time.monotonic() - started, 3)
        print(json.dumps(record), flush=True)


def bounded_walk(root: Path, entry_bound: float, total_bound: float = 600.0) -> WalkResult:
    """Describe every entry below ``root`` in a child process; kill it when one entry
    takes longer than ``entry_bound`` seconds (``hung`` then names it) or the whole
    walk longer than ``total_bound``."""
    result = WalkResult()
    child = subprocess.Popen(
        [sys.executable, "-m", "rig.bounded_walk", str(root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, name="bounded-walk", daemon=True).start()
    deadline = time.monotonic() + total_bound
    current: str | None = None
    try:
        while True:
            wait = min(entry_bound, max(deadline - time.monotonic(), 0.0))
            try:
                line = lines.get(timeout=wait)
            except queue.Empty:
                result.hung = current if current is not None else "(listing)"
                break
            if line is None:
                break
            record = json.loads(line)
            if "begin" in record:
                current = record["begin"]
                continue
            current = None
            path = record["path"]
            if "facts" in record:
                result.facts[path] = record["facts"]
            else:
                result.errors[path] = record["error"]
            if record.get("seconds", 0.0) > result.slowest[0]:
                result.slowest = (record["seconds"], path)
    finally:
        if child.poll() is None:
            child.kill()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            result.hung = result.hung or "(child could not be killed)"
    if child.returncode not in (0, None) and result.hung is None:
        assert child.stderr is not None
        raise RuntimeError(f"the walk of {root} failed: {child.stderr.read()[-2000:]}")
    return result


if __name__ == "__main__":
    _child(sys.argv[1])
