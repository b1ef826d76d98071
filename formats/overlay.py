"""How an image's layers stack into its root file system: the one statement of the rule.

The agent (which layer a traced read or a profile's path belongs to), the profile
recorder (the same, from containerd's layer directories), and the converter (whether a
prefetch list's path exists in the image) all ask "which layer provides this path?".
Each used to answer with rules of its own, and the agent's ignored whited-out and
opaque parents, so it could attribute a read to a layer whose file the image deletes.

Each layer is seen as overlayfs sees a lower directory: a whiteout is a character
device 0/0 (the tar's ``.wh.<name>``), an opaque directory carries
``trusted.overlay.opaque=y`` (the tar's ``.wh..wh..opq``), and what a layer itself holds
after its own entries were applied in tar order is `formats.layer_tree`'s business. The
rule across layers, from the top: a path is provided by the first layer that has it,
unless a layer at or above it whites it out or one of its parents, holds a non-directory
where a parent should be, or has an opaque parent (then only that layer can provide it).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Protocol

OPAQUE_XATTR = "trusted.overlay.opaque"
"""The xattr that makes a directory of a lower layer hide everything below it."""


class Presence(enum.Enum):
    """What one layer holds at one path."""

    ABSENT = enum.auto()
    WHITEOUT = enum.auto()
    DIRECTORY = enum.auto()
    OPAQUE_DIRECTORY = enum.auto()
    OTHER = enum.auto()
    """A file, link, device or fifo: anything that is neither a directory nor deleted."""


class LayerView(Protocol):
    """One layer, asked one path at a time (normalized, relative, "" for the root)."""

    def presence(self, path: str) -> Presence:
        """What this layer holds at ``path``, as its own entries leave it."""
        ...


def whiteout_device(is_char: bool, rdev_major: int, rdev_minor: int) -> bool:
    """Whether an inode is overlayfs's whiteout (a character device 0/0)."""
    return is_char and rdev_major == 0 and rdev_minor == 0


def providing_layer(path: str, layers: Sequence[LayerView]) -> int | None:
    """Index in ``layers`` (topmost first) of the layer whose entry the merged root
    file system shows at ``path``; None when no layer provides it or one above deletes
    or hides it. The root itself is every layer's and belongs to none."""
    if not path:
        return None
    parents = _parents(path)
    for index, layer in enumerate(layers):
        for parent in parents:
            held = layer.presence(parent)
            if held in (Presence.WHITEOUT, Presence.OTHER):
                return None  # deleted here, or a non-directory hides what lies below
            if held is Presence.OPAQUE_DIRECTORY:
                return index if _provides(layer.presence(path)) else None
        held = layer.presence(path)
        if held is Presence.WHITEOUT:
            return None
        if held is not Presence.ABSENT:
            return index
    return None


def _provides(held: Presence) -> bool:
    return held not in (Presence.ABSENT, Presence.WHITEOUT)


def _parents(path: str) -> list[str]:
    """Every directory above ``path``, from the root (which an opaque marker at the
    layer's top makes opaque too)."""
    parts = path.split("/")
    return ["/".join(parts[:depth]) for depth in range(len(parts))]
