"""A precise description of a mounted root file system, for "is it exactly the same" checks.

Lazy or not, a container must see the same tree as with containerd's own overlayfs:
every path's type, mode, owner, size, content hash, link target, device number, xattrs
and mtime. Tests and benchmarks compare two such descriptions and list the differences.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

FileFacts = tuple[object, ...]


def _xattrs(path: str) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    out = []
    for name in sorted(names):
        try:
            out.append((name, os.getxattr(path, name, follow_symlinks=False)))
        except OSError:
            continue
    return tuple(out)


def _content_hash(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def describe_path(path: str, with_dir_mtimes: bool = True) -> FileFacts:
    """The facts of one entry (not following a symlink); OSError if any part of it
    cannot be read."""
    st = os.lstat(path)
    kind = stat.S_IFMT(st.st_mode)
    detail: object = None
    if stat.S_ISREG(kind):
        detail = (st.st_size, _content_hash(path))
    elif stat.S_ISLNK(kind):
        detail = os.readlink(path)
    elif stat.S_ISCHR(kind) or stat.S_ISBLK(kind):
        detail = (os.major(st.st_rdev), os.minor(st.st_rdev))
    mtime = st.st_mtime_ns // 1_000_000_000
    if stat.S_ISDIR(kind) and not with_dir_mtimes:
        mtime = 0
    return (
        kind,
        stat.S_IMODE(st.st_mode),
        st.st_uid,
        st.st_gid,
        detail,
        _xattrs(path),
        mtime,
    )


def describe_tree(root: Path, with_dir_mtimes: bool = True) -> dict[str, FileFacts]:
    """Relative path -> facts, for every entry below ``root`` (not following symlinks)."""
    facts: dict[str, FileFacts] = {}
    base = str(root)
    for directory, dirs, files in os.walk(base):
        dirs.sort()
        for name in sorted(dirs + files):
            full = os.path.join(directory, name)
            facts[os.path.relpath(full, base)] = describe_path(full, with_dir_mtimes)
    return facts


def tree_differences(
    expected: dict[str, FileFacts], actual: dict[str, FileFacts], limit: int = 20
) -> list[str]:
    """Human-readable differences (at most ``limit``), empty when the trees are equal."""
    problems = []
    for path in sorted(set(expected) | set(actual)):
        if path not in actual:
            problems.append(f"missing: {path}")
        elif path not in expected:
            problems.append(f"unexpected: {path}")
        elif expected[path] != actual[path]:
            problems.append(f"differs: {path}: expected {expected[path]!r}, got {actual[path]!r}")
        if len(problems) >= limit:
            break
    return problems
