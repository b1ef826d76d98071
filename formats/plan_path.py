"""Paths as prefetch lists, profiles and traces write them, and as layer trees name them.

A plan (the converter's prefetch list, a learned profile's entries, the writer's
reordering) names a path absolutely, with a trailing ``/`` for a whole directory; a
layer's tree names it relative and normalized (`formats.toc.normalize_name`). Each
reader used to convert on its own, some with ``lstrip("/")`` and no normalization, so
``//etc/x`` could match in one place and not in another. One parser, one printer.
"""

from __future__ import annotations

from dataclasses import dataclass

from formats.toc import HostileLayerError, normalize_name


class PlanPathError(ValueError):
    """Not an absolute path inside the root file system."""


@dataclass(frozen=True, slots=True)
class PlanPath:
    """A plan's path: the name inside the root, and whether it means the whole
    directory (a trailing ``/``) or the entry itself."""

    name: str
    whole_directory: bool

    @classmethod
    def parse(cls, text: str) -> PlanPath:
        """Read ``/a/b`` or ``/a/b/``. Refuses what is not absolute or leaves the root:
        plans come from other nodes and from users, so never trusted."""
        if not text.startswith("/"):
            raise PlanPathError(f"path must be absolute: {text!r}")
        name = root_name(text)
        if name is None:
            raise PlanPathError(f"path leaves the root file system: {text!r}")
        return cls(name, text.endswith("/") or not name)

    def __str__(self) -> str:
        return "/" + self.name + ("/" if self.whole_directory and self.name else "")


def root_name(path: str) -> str | None:
    """An absolute (or root-relative) path as a layer tree names it; None when it is no
    name inside the root (``..`` above it, a NUL, an overlong name)."""
    try:
        return normalize_name(path.lstrip("/"))
    except HostileLayerError:
        return None
