"""LayerTree hard links: made where they stand in the tar, to the file their target
name holds at that point, as GNU tar and containerd's unpack make them; later entries
that replace the target name, the link name or a directory above either leave the
link's inode alone."""

from __future__ import annotations

import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from formats.layer_tree import InodeAllocator, LayerTree, Node
from formats.toc import TocEntry


def reg(name: str, size: int = 1, mode: int = 0o644) -> TocEntry:
    return TocEntry(name, "reg", size=size, mode=mode)


def link(name: str, target: str) -> TocEntry:
    return TocEntry(name, "hardlink", link_name=target)


def build(entries: list[TocEntry]) -> LayerTree:
    tree = LayerTree(entries, InodeAllocator())
    assert_consistent(tree)
    return tree


def assert_consistent(tree: LayerTree) -> None:
    """Every path is where lookup finds it, every reachable node is known to FUSE
    (and no other), and a file's link count is the number of names it has."""
    names: dict[int, int] = {}
    stack: list[tuple[Node, str]] = [(tree.root, "")]
    while stack:
        directory, path = stack.pop()
        assert directory.children is not None
        for raw, child in directory.children.items():
            child_path = f"{path}/{raw.decode()}" if path else raw.decode()
            assert tree.lookup(child_path) is child
            assert tree.nodes.get(child.inode) is child
            names[child.inode] = names.get(child.inode, 0) + 1
            if child.is_dir:
                stack.append((child, child_path))
    assert set(names) | {tree.root.inode} == set(tree.nodes)
    for inode, count in names.items():
        assert tree.nodes[inode].nlink == count


def test_link_keeps_the_file_its_target_name_held_when_it_was_written() -> None:
    old, new = reg("a", 3, 0o640), reg("a", 5, 0o600)
    tree = build([old, link("b", "a"), new, link("c", "a")])
    b, a, c = tree.lookup("b"), tree.lookup("a"), tree.lookup("c")
    assert b is not None and b.entry is old and b.nlink == 1
    assert a is not None and a is c and a.entry is new and a.nlink == 2
    assert b.inode != a.inode
    assert stat.S_IMODE(b.mode) == 0o640


def test_link_to_a_link_follows_it_to_its_file_of_that_time() -> None:
    old = reg("a")
    tree = build([old, link("b", "a"), reg("a"), link("c", "b")])
    assert tree.lookup("c") is tree.lookup("b")
    assert tree.lookup("c").entry is old  # type: ignore[union-attr]
    assert tree.lookup("b").nlink == 2  # type: ignore[union-attr]


def test_replacing_the_link_name_unlinks_only_that_name() -> None:
    first = reg("a")
    tree = build([first, link("b", "a"), link("c", "a"), reg("b")])
    a = tree.lookup("a")
    assert a is not None and a.entry is first and a is tree.lookup("c") and a.nlink == 2
    assert tree.lookup("b") is not a


def test_replacing_a_file_by_a_link_to_it_changes_nothing() -> None:
    tree = build([reg("a"), link("b", "a"), link("b", "a")])
    assert tree.lookup("b") is tree.lookup("a")
    assert tree.lookup("a").nlink == 2  # type: ignore[union-attr]


def test_linked_file_outlives_the_directory_it_was_in() -> None:
    inside = reg("d/x")
    tree = build([inside, link("keep", "d/x"), reg("d")])
    keep = tree.lookup("keep")
    assert keep is not None and keep.entry is inside and keep.nlink == 1
    assert tree.lookup("d/x") is None
    assert tree.lookup("d").entry.type == "reg"  # type: ignore[union-attr]


def test_file_linked_only_inside_a_replaced_directory_goes_with_it() -> None:
    tree = build([reg("d/x"), link("d/y", "d/x"), reg("d")])
    assert {node.entry.name for node in tree.regular_files()} == {"d"}


def test_whiteout_of_the_target_name_leaves_the_link_its_file() -> None:
    first = reg("dir/a")
    tree = build([first, link("b", "dir/a"), reg("dir/.wh.a", 0)])
    b, a = tree.lookup("b"), tree.lookup("dir/a")
    assert b is not None and b.entry is first and b.nlink == 1
    assert a is not None and stat.S_ISCHR(a.mode)


@pytest.mark.parametrize(
    "entries",
    [
        [link("b", "a"), reg("a")],  # the target comes later
        [TocEntry("a", "dir", mode=0o755), link("b", "a")],  # a directory
        [reg("a"), reg("d/a"), TocEntry("d", "dir"), reg("d"), link("b", "d/a")],  # gone
        [reg("x"), link("x/y", "x")],  # would need its target to be a directory
        [reg("d/t"), link("d", "d/t")],  # would replace the directory holding its target
    ],
)
def test_dangling_link_serves_nothing(entries: list[TocEntry]) -> None:
    before = build([e for e in entries if e.type != "hardlink"])
    tree = build(entries)
    assert tree.lookup("b") is None and tree.lookup("x/y") is None
    assert {n: node.entry.type for n, node in _paths(tree).items()} == {
        n: node.entry.type for n, node in _paths(before).items()
    }


def _paths(tree: LayerTree) -> dict[str, Node]:
    out: dict[str, Node] = {}
    stack: list[tuple[Node, str]] = [(tree.root, "")]
    while stack:
        directory, path = stack.pop()
        for raw, child in (directory.children or {}).items():
            child_path = f"{path}/{raw.decode()}" if path else raw.decode()
            out[child_path] = child
            stack.append((child, child_path))
    return out


# --- against a model of unpacking ---------------------------------------------------

_NAMES = ["a", "b", "d", "d/a", "d/b", "d/e", "d/e/a"]
_KINDS = ["reg", "reg", "dir", "hardlink", "hardlink", "whiteout"]


@st.composite
def _layers(draw: st.DrawFn) -> list[TocEntry]:
    entries: list[TocEntry] = []
    for _ in range(draw(st.integers(1, 14))):
        kind, name = draw(st.sampled_from(_KINDS)), draw(st.sampled_from(_NAMES))
        if kind == "hardlink":
            written = [e.name for e in entries if e.type == "reg"]  # mostly not dangling
            entries.append(link(name, draw(st.sampled_from(written or _NAMES))))
        elif kind == "whiteout":
            head, _, base = name.rpartition("/")
            entries.append(reg(f"{head}/.wh.{base}" if head else f".wh.{base}", 0))
        else:
            entries.append(TocEntry(name, kind, mode=0o755 if kind == "dir" else 0o644))
    return entries


def _unpacked(entries: list[TocEntry]) -> dict[str, object]:
    """Path -> "dir", or the entry that made the file's inode, as containerd's unpack
    leaves them. Where unpacking would fail, as the tree has it: a whiteout leaves a
    device of its own, a file where a directory is needed is replaced by one, and a
    dangling hard link changes nothing."""
    view: dict[str, object] = {}
    made: object
    for entry in entries:
        head, _, base = entry.name.rpartition("/")
        name, made = entry.name, entry
        if base.startswith(".wh."):
            name = f"{head}/{base[4:]}" if head else base[4:]
            made = ("whiteout", entry)
        elif entry.type == "hardlink":
            made = view.get(entry.link_name)
            if made is None or made == "dir" or _within(name, entry.link_name):
                continue  # unpacking fails on it; the tree serves nothing for it
        parent = name
        while parent := parent.rpartition("/")[0]:
            if view.get(parent) != "dir":
                view[parent] = "dir"  # implied, or a file in the way replaced
        if entry.type != "dir" or view.get(name) != "dir":
            for path in [p for p in view if p == name or p.startswith(name + "/")]:
                del view[path]
            view[name] = "dir" if entry.type == "dir" else made
    return view


def _within(first: str, second: str) -> bool:
    return first.startswith(second + "/") or second.startswith(first + "/")


@settings(max_examples=300, deadline=None, derandomize=True)
@given(entries=_layers())
def test_tree_is_what_unpacking_leaves(entries: list[TocEntry]) -> None:
    expected = _unpacked(entries)
    tree = build(entries)
    paths = _paths(tree)
    assert set(paths) == set(expected)
    made_by: dict[int, object] = {}
    for path, node in paths.items():
        want = expected[path]
        if want == "dir":
            assert node.is_dir
            continue
        assert made_by.setdefault(node.inode, want) is want, path  # one inode, one file
        if isinstance(want, tuple):
            assert stat.S_ISCHR(node.mode)
        else:
            assert node.entry is want
    files = [want for want in expected.values() if want != "dir"]
    assert len(made_by) == len({id(want) for want in files})
