"""Which layer provides a path: the one rule (formats/overlay.py) against the kernel's
overlayfs, and every place that asks it.

Layer stacks are drawn from a small name space so that whiteouts, opaque directories,
files replacing directories and their parents meet often. Each layer's tree
(`formats.layer_tree`, the agent's view of a layer) is written out as a real lower
directory, the stack is mounted read-only with overlayfs, and every name is asked
of the mount: whether it exists and, by a ``user.layer`` xattr or a symlink's target,
which layer's entry it shows. The rule must agree over the trees (the agent, the
converter) and over the directories (the profile recorder), and so must the agent's
image session, the recorder's `LayerDirectory` and the converter's prefetch-list check.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.fs.operations import LazyLayer, MountedLayer
from agent.image_sessions import ImageSession
from converter.prefetch import PrefetchList
from fetcher.reference import ImageReference
from formats.layer_tree import InodeAllocator, LayerTree, Node
from formats.overlay import OPAQUE_XATTR, Presence, providing_layer
from formats.toc import OPAQUE_MARKER, WHITEOUT_PREFIX, TocEntry
from tracer.containerd_start import LayerDirectory

NAMES = ("a", "a/b", "a/b/c", "a/d", "e", "e/f", "e/f/g")
LAYER_XATTR = "user.layer"
_KINDS = ("file", "dir", "symlink", "whiteout", "opaque")


def _entry(kind: str, name: str, layer: int) -> TocEntry:
    head, _, base = name.rpartition("/")
    if kind == "whiteout":
        return TocEntry(f"{head}/{WHITEOUT_PREFIX}{base}".lstrip("/"), "reg")
    if kind == "opaque":
        return TocEntry(f"{name}/{OPAQUE_MARKER}", "reg")
    if kind == "symlink":
        return TocEntry(name, "symlink", link_name=f"layer-{layer}")
    return TocEntry(name, "dir" if kind == "dir" else "reg", mode=0o755)


_layer = st.lists(st.tuples(st.sampled_from(_KINDS), st.sampled_from(NAMES)), max_size=6)
_stacks = st.lists(_layer, min_size=2, max_size=4)


def _trees(stack: list[list[tuple[str, str]]]) -> list[LayerTree]:
    """Layer trees, topmost first (``stack`` is bottom first, as a manifest lists)."""
    inodes = InodeAllocator()
    built = [
        LayerTree([_entry(kind, name, number) for kind, name in layer], inodes)
        for number, layer in enumerate(stack)
    ]
    return built[::-1]


def _write(node: Node, where: Path, layer: int) -> None:
    """One node of a layer tree as overlayfs's lower directory holds it."""
    entry = node.entry
    if node.is_dir:
        where.mkdir(exist_ok=True)
        os.setxattr(where, LAYER_XATTR, str(layer).encode())
        if node.xattrs.get(OPAQUE_XATTR.encode()) == b"y":
            os.setxattr(where, OPAQUE_XATTR, b"y")
        for raw, child in (node.children or {}).items():
            _write(child, where / os.fsdecode(raw), layer)
    elif entry.type == "symlink":
        os.symlink(entry.link_name, where)
    elif entry.type == "char":
        os.mknod(where, stat.S_IFCHR | 0o600, os.makedev(entry.dev_major, entry.dev_minor))
    else:
        where.write_bytes(b"")
        os.setxattr(where, LAYER_XATTR, str(layer).encode())


@contextlib.contextmanager
def _overlay(dirs: list[Path], target: Path) -> Iterator[Path]:
    target.mkdir()
    lower = ":".join(str(d) for d in dirs)
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={lower}", str(target)],
        check=True,
    )
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


def _shown_by(merged: Path, name: str) -> int | None:
    """The layer (topmost first) whose entry the kernel's overlay shows at ``name``."""
    path = merged / name
    try:
        st_ = path.lstat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    if stat.S_ISLNK(st_.st_mode):
        return int(os.readlink(path).removeprefix("layer-"))
    return int(os.getxattr(path, LAYER_XATTR, follow_symlinks=False))


def _session(trees: list[LayerTree]) -> ImageSession:
    order = [f"sha256:{n:064x}" for n in range(len(trees))]  # bottom first
    session = ImageSession(ImageReference.parse("registry.test/r:t"), "sha256:" + "f" * 64, order)
    for digest, tree in zip(order, reversed(trees), strict=True):
        # topmost() reads only the tree; no layer behind it is ever asked for bytes.
        session.mounted[digest] = MountedLayer(digest, cast(LazyLayer, None), tree, 0.0)
    return session


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(stack=_stacks)
def test_every_reader_of_a_stack_agrees_with_the_kernels_overlay(stack, tmp_path_factory):
    work = tmp_path_factory.mktemp("stack", numbered=True)
    trees = _trees(stack)
    layers = len(trees)
    dirs = []
    for position, tree in enumerate(trees):
        layer_dir = work / f"l{position}"
        _write(tree.root, layer_dir, layers - 1 - position)
        dirs.append(layer_dir)
    session = _session(trees)
    with _overlay(dirs, work / "merged") as merged:
        for name in NAMES:
            shown = _shown_by(merged, name)
            expected = None if shown is None else layers - 1 - shown
            assert providing_layer(name, trees) == expected, name
            assert providing_layer(name, [LayerDirectory(d) for d in dirs]) == expected, name
            found = session.topmost(name)
            assert (None if found is None else session.layer_order.index(found[0])) == (
                None if shown is None else shown
            ), name
            bottom_first = [[_entry(k, n, i) for k, n in layer] for i, layer in enumerate(stack)]
            missing = PrefetchList.parse_lines(["/" + name]).missing(bottom_first)
            assert (missing == []) == (expected is not None), name


def _tree(*entries: TocEntry) -> LayerTree:
    return LayerTree(list(entries), InodeAllocator())


def test_a_read_under_a_whited_out_directory_belongs_to_no_layer():
    """The case the agent's session got wrong: it looked up only the path itself in each
    layer, so a file below a directory the upper layer deletes was credited to the lower
    layer (and prefetched, and recorded into profiles there)."""
    lower = _tree(TocEntry("usr/lib/x.so", "reg"))
    upper = _tree(TocEntry(f"usr/{WHITEOUT_PREFIX}lib", "reg"))
    session = _session([upper, lower])
    assert session.topmost("usr/lib/x.so") is None
    assert providing_layer("usr/lib", [upper, lower]) is None
    opaque = _tree(TocEntry(f"usr/{OPAQUE_MARKER}", "reg"), TocEntry("usr/y", "reg"))
    assert _session([opaque, lower]).topmost("usr/lib/x.so") is None
    replaced = _tree(TocEntry("usr", "reg"))
    assert _session([replaced, lower]).topmost("usr/lib/x.so") is None


def test_a_layer_the_agent_does_not_serve_holds_nothing_it_can_see():
    lower = _tree(TocEntry("bin/sh", "reg"))
    session = _session([_tree(TocEntry("bin/sh", "reg")), lower])
    del session.mounted[session.layer_order[1]]  # the top layer, pulled by containerd
    found = session.topmost("bin/sh")
    assert found is not None and found[0] == session.layer_order[0]


@pytest.mark.parametrize(
    ("entries", "path", "presence"),
    [
        ((TocEntry("d", "dir"),), "d", Presence.DIRECTORY),
        ((TocEntry(f"d/{OPAQUE_MARKER}", "reg"),), "d", Presence.OPAQUE_DIRECTORY),
        ((TocEntry(f"{WHITEOUT_PREFIX}d", "reg"),), "d", Presence.WHITEOUT),
        ((TocEntry("d", "char", dev_major=1, dev_minor=3),), "d", Presence.OTHER),
        ((TocEntry("d/x", "reg"), TocEntry("d", "reg")), "d/x", Presence.ABSENT),
    ],
)
def test_a_layer_tree_reports_what_it_holds(entries, path, presence):
    assert _tree(*entries).presence(path) is presence
