"""A layer's file tree as overlayfs must see it as a lower directory.

Built from the layer's TOC. The tar's OCI whiteouts become what overlayfs itself uses:
`.wh.<name>` turns into a character device 0/0 called `<name>`, and `.wh..wh..opq`
turns into the `trusted.overlay.opaque=y` xattr on its directory. Later tar entries of
the same name replace earlier ones (tar semantics), hardlinks share one inode, and
directories the tar only implies are created with containerd's defaults (0755, root).

A hardlink is made where it stands in the tar, to the file its target name holds at
that point, as unpacking does: a later entry that replaces the target name (or a
directory above it) makes a new inode, and the link keeps the old one.
"""

from __future__ import annotations

import itertools
import posixpath
import stat
from dataclasses import dataclass, field

from formats.overlay import OPAQUE_XATTR, Presence, whiteout_device
from formats.toc import OPAQUE_MARKER, WHITEOUT_PREFIX, HostileLayerError, TocEntry

_OPAQUE = OPAQUE_XATTR.encode()
_TYPE_BITS = {
    "reg": stat.S_IFREG,
    "dir": stat.S_IFDIR,
    "symlink": stat.S_IFLNK,
    "hardlink": stat.S_IFREG,
    "char": stat.S_IFCHR,
    "block": stat.S_IFBLK,
    "fifo": stat.S_IFIFO,
}


@dataclass(slots=True)
class Node:
    """One inode of a layer tree. ``entry`` carries metadata and, for files, the data's
    location (interpreted by the layer's reader)."""

    inode: int
    entry: TocEntry
    children: dict[bytes, Node] | None = None
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    nlink: int = 1
    parent: Node | None = None
    _listing: list[tuple[bytes, Node]] | None = field(default=None, repr=False, compare=False)

    def listing(self) -> list[tuple[bytes, Node]]:
        """The directory's children sorted by name, sorted once: readdir pages through
        it by position, and sorting again for every page made listing a directory
        quadratic in its size, on the event loop every FUSE answer shares. A tree is
        immutable once built, so the order never goes stale."""
        if self._listing is None:
            self._listing = sorted((self.children or {}).items())
        return self._listing

    @property
    def mode(self) -> int:
        """st_mode: file type bits plus permission bits."""
        return _TYPE_BITS[self.entry.type] | (self.entry.mode & 0o7777)

    @property
    def is_dir(self) -> bool:
        return self.children is not None


class InodeAllocator:
    """Inode numbers unique across every layer of the mount (the kernel needs that),
    from ``first`` up to (not including) ``limit``.

    Trees are built on worker threads, off the event loop; taking the next number of an
    itertools.count is one C call, which the GIL makes atomic, so two trees built at
    once never share a number."""

    def __init__(self, first: int = 2, limit: int | None = None) -> None:
        self._numbers = itertools.count(first)
        self._limit = limit

    def take(self) -> int:
        """A fresh inode number; HostileLayerError once the block is used up (a layer
        whose tree has more nodes than any real one)."""
        number = next(self._numbers)
        if self._limit is not None and number >= self._limit:
            raise HostileLayerError(f"layer tree has more nodes than its inode block ({number})")
        return number


def _visible_xattrs(entry: TocEntry) -> dict[bytes, bytes]:
    """The xattrs a container sees: containerd refuses `trusted.*` ("admin attributes")
    from archives, so must we; otherwise a layer could forge overlayfs's own
    `trusted.overlay.*` metadata."""
    return {k.encode(): v for k, v in entry.xattrs.items() if not k.startswith("trusted.")}


def _nested(first: str, second: str) -> bool:
    """Whether one of two different normalized names is a directory above the other."""
    return first.startswith(second + "/") or second.startswith(first + "/")


def _implied_dir(name: str) -> TocEntry:
    return TocEntry(name=name, type="dir", mode=0o755)


class LayerTree:
    """Builds and holds the node table of one layer."""

    def __init__(self, entries: list[TocEntry], inodes: InodeAllocator) -> None:
        self._inodes = inodes
        self.root = Node(inodes.take(), _implied_dir(""), children={})
        self.nodes: dict[int, Node] = {self.root.inode: self.root}
        self._by_path: dict[str, Node] = {"": self.root}
        # Names are normalized (formats/toc.py), so rpartition splits them as posixpath
        # would, at a fraction of the cost: a layer can hold tens of thousands of
        # entries and this runs while containerd waits on the pull.
        for entry in entries:
            head, _, base = entry.name.rpartition("/")
            if entry.type == "hardlink":
                self._link(entry)
            elif not base.startswith(WHITEOUT_PREFIX):
                if entry.name:
                    self._add_child(self._directory(head), base, entry)
                else:
                    self._update_root(entry)
            elif base == OPAQUE_MARKER:
                self._directory(head).xattrs[_OPAQUE] = b"y"
            else:
                whiteout = TocEntry(
                    name=entry.whiteout_target,
                    type="char",
                    mode=0,
                    uid=entry.uid,
                    gid=entry.gid,
                    mtime=entry.mtime,
                )
                self._add_child(self._directory(head), base[len(WHITEOUT_PREFIX) :], whiteout)

    def _update_root(self, entry: TocEntry) -> None:
        self.root.entry = entry
        self.root.xattrs.update(_visible_xattrs(entry))

    def _directory(self, path: str) -> Node:
        """The directory node at ``path``, creating implied parents; a non-directory in
        the way is replaced, as unpacking the tar would do. A loop, not recursion: a
        4 KiB name holds 2000 levels, past Python's recursion limit."""
        node = self._by_path.get(path)
        if node is not None and node.children is not None:
            return node
        missing: list[str] = []
        while node is None or not node.is_dir:  # ends at the root at the latest
            missing.append(path)
            path = path.rpartition("/")[0]
            node = self._by_path.get(path)
        for name in reversed(missing):
            node = self._add_child(node, name.rpartition("/")[2], _implied_dir(name))
        return node

    def _add_child(self, parent: Node, base: str, entry: TocEntry) -> Node:
        """Put ``entry`` into ``parent`` under the name ``base``."""
        assert parent.children is not None
        raw = base.encode("utf-8", "surrogateescape")
        existing = parent.children.get(raw)
        if existing is not None and existing.is_dir and entry.type == "dir":
            existing.entry = entry  # a later header for a directory updates its metadata
            existing.xattrs.update(_visible_xattrs(entry))
            return existing
        if existing is not None:
            self._drop(existing, entry.name)
        node = Node(
            self._inodes.take(),
            entry,
            {} if entry.type == "dir" else None,
            _visible_xattrs(entry) if entry.xattrs else {},
            1,
            parent,
        )
        parent.children[raw] = node
        self.nodes[node.inode] = node
        self._by_path[entry.name] = node
        return node

    def _drop(self, node: Node, path: str) -> None:
        """Forget a node replaced at ``path`` and, for a directory, everything below it
        (the paths it was reached by, not its entry's name: a hardlinked file keeps its
        other names, and stays in ``nodes`` while any is left). A loop, for the same
        reason as in ``_directory``."""
        stack = [(node, path)]
        while stack:
            node, path = stack.pop()
            if self._by_path.get(path) is node:
                del self._by_path[path]
            node.nlink -= 1
            if node.nlink > 0:
                continue
            self.nodes.pop(node.inode, None)
            for raw, child in (node.children or {}).items():
                name = raw.decode("utf-8", "surrogateescape")
                stack.append((child, posixpath.join(path, name)))

    def _link(self, link: TocEntry) -> None:
        """Give the file now at the link's target name the link's name too."""
        target = self._by_path.get(link.link_name)
        if target is None or target.is_dir or _nested(link.name, link.link_name):
            # Dangling: no file there yet (or any more), a directory, or names nested
            # in each other (the link would replace the directory holding its target,
            # or needs its target file to be a directory). Unpacking fails on it too,
            # so serve nothing for it.
            return
        head, _, name = link.name.rpartition("/")
        parent = self._directory(head)
        assert parent.children is not None
        base = name.encode("utf-8", "surrogateescape")
        existing = parent.children.get(base)
        if existing is target:
            return
        if existing is not None:
            self._drop(existing, link.name)
        parent.children[base] = target
        target.nlink += 1
        self._by_path[link.name] = target

    def lookup(self, path: str) -> Node | None:
        """The node at a normalized relative path (first name of hardlinked files)."""
        return self._by_path.get(path)

    def presence(self, path: str) -> Presence:
        """What this layer holds at ``path`` (`formats.overlay.LayerView`)."""
        node = self._by_path.get(path)
        if node is None:
            return Presence.ABSENT
        if node.is_dir:
            opaque = node.xattrs.get(_OPAQUE) == b"y"
            return Presence.OPAQUE_DIRECTORY if opaque else Presence.DIRECTORY
        entry = node.entry
        if whiteout_device(entry.type == "char", entry.dev_major, entry.dev_minor):
            return Presence.WHITEOUT
        return Presence.OTHER

    def regular_files(self) -> list[Node]:
        """Every distinct regular-file node (hardlinks counted once)."""
        return [n for n in self.nodes.values() if n.entry.type in ("reg", "hardlink")]
