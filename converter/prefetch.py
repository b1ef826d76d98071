"""Prefetch file lists: what an operator says startup needs, checked against the image.

A list names absolute paths; a trailing `/` means "everything under this directory".
It is validated against the files the converted image really contains (after whiteouts),
so a typo is reported instead of silently prefetching nothing.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from formats.toc import HostileLayerError, TocEntry, normalize_name

MAX_PREFETCH_PATHS = 100_000


class PrefetchListError(ValueError):
    """A prefetch list that cannot be used (not absolute, escapes the root, too long)."""


@dataclass(frozen=True)
class PrefetchList:
    """Normalized entries: (relative path, is_directory)."""

    entries: tuple[tuple[str, bool], ...]

    @classmethod
    def parse_lines(cls, lines: Iterable[str], source: str = "prefetch list") -> PrefetchList:
        """Parse one path per line; blank lines and `#` comments are ignored."""
        entries: list[tuple[str, bool]] = []
        for number, raw in enumerate(lines, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if not line.startswith("/"):
                raise PrefetchListError(f"{source}:{number}: path must be absolute: {line!r}")
            try:
                name = normalize_name(line[1:])
            except HostileLayerError as exc:
                raise PrefetchListError(f"{source}:{number}: {exc}") from None
            entries.append((name, line.endswith("/")))
            if len(entries) > MAX_PREFETCH_PATHS:
                raise PrefetchListError(f"{source}: more than {MAX_PREFETCH_PATHS} paths")
        return cls(tuple(dict.fromkeys(entries)))

    @classmethod
    def load(cls, path: Path) -> PrefetchList:
        """Read a prefetch list file."""
        try:
            text = path.read_text()
        except OSError as exc:
            raise PrefetchListError(f"{path}: cannot read: {exc.strerror}") from None
        return cls.parse_lines(text.splitlines(), str(path))

    def as_paths(self) -> list[str]:
        """Back to the absolute-path form (directories keep their trailing `/`)."""
        return ["/" + name + ("/" if is_dir and name else "") for name, is_dir in self.entries]

    def missing(self, layers: Sequence[Sequence[TocEntry]]) -> list[str]:
        """Paths of the list that the image (layers bottom to top) does not contain."""
        present = merged_tree(layers)
        missing = []
        for name, is_dir in self.entries:
            kind = present.get(name)
            if kind is None or (is_dir and kind != "dir" and name):
                missing.append("/" + name + ("/" if is_dir else ""))
        return missing


def merged_tree(layers: Sequence[Sequence[TocEntry]]) -> dict[str, str]:
    """Path -> entry type of the image's root file system, applying OCI whiteouts."""
    tree: dict[str, str] = {"": "dir"}
    for entries in layers:
        for entry in entries:
            if entry.is_opaque_marker:
                parent = posixpath.dirname(entry.name)
                prefix = parent + "/" if parent else ""
                for name in [n for n in tree if n.startswith(prefix) and n != parent]:
                    del tree[name]
        for entry in entries:
            if entry.is_opaque_marker:
                continue
            if entry.is_whiteout:
                target = entry.whiteout_target
                for name in [n for n in tree if n == target or n.startswith(target + "/")]:
                    del tree[name]
                continue
            tree[entry.name] = entry.type
            parent = posixpath.dirname(entry.name)
            while parent and parent not in tree:
                tree[parent] = "dir"
                parent = posixpath.dirname(parent)
    return tree
