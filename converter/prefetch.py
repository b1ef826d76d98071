"""Prefetch file lists: what an operator says startup needs, checked against the image.

A list names absolute paths; a trailing `/` means "everything under this directory".
It is validated against the files the converted image really contains (after whiteouts),
so a typo is reported instead of silently prefetching nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from formats.layer_tree import InodeAllocator, LayerTree
from formats.overlay import providing_layer
from formats.plan_path import PlanPath, PlanPathError
from formats.toc import TocEntry

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
            try:
                path = PlanPath.parse(line)
            except PlanPathError as exc:
                raise PrefetchListError(f"{source}:{number}: {exc}") from None
            entries.append((path.name, path.whole_directory))
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
        return [str(PlanPath(name, is_dir)) for name, is_dir in self.entries]

    def missing(self, layers: Sequence[Sequence[TocEntry]]) -> list[str]:
        """Paths of the list that the image (layers bottom to top) does not show, by
        the overlay rule the agent and the recorder use (`formats.overlay`)."""
        inodes = InodeAllocator()
        trees = [LayerTree(list(entries), inodes) for entries in reversed(layers)]
        missing = []
        for name, is_dir in self.entries:
            if not name:
                continue  # the root is always there
            found = providing_layer(name, trees)
            node = None if found is None else trees[found].lookup(name)
            if node is None or (is_dir and not node.is_dir):
                missing.append(str(PlanPath(name, is_dir)))
        return missing
