"""The hook through which lazily served (remote) layers become committed snapshots.

During a CRI pull, containerd asks to Prepare each layer with the label
``containerd.io/snapshot.ref`` = the layer's chain ID. If the hook can serve that layer
lazily (from the agent's FUSE tree), the snapshotter commits it under the chain ID at
once and answers ALREADY_EXISTS, and containerd skips downloading and unpacking it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

REMOTE_REF_LABEL = "containerd.io/snapshot.ref"
"""Label containerd puts on a layer's Prepare: the chain ID to commit the layer under."""


class RemoteLayers(Protocol):
    """What the snapshotter needs from whatever serves layers lazily."""

    async def prepare_layer(
        self, key: str, parent: str | None, labels: dict[str, str]
    ) -> Path | None:
        """Called on Prepare when labels carry ``containerd.io/snapshot.ref``.

        Return the directory holding the layer's file tree (served lazily, read-only)
        or None to fall back to a normal snapshot that containerd unpacks into.
        """
        ...

    async def release_layer(self, snapshot_labels: dict[str, str], path: Path) -> None:
        """The remote snapshot served from ``path`` was removed: stop serving it."""
        ...

    async def restore_layer(self, labels: dict[str, str]) -> Path | None:
        """After an agent restart, serve a committed remote snapshot's layer again.

        Returns where it is served now (None: it cannot be served any more).
        """
        ...

    def layer_usage(self, path: Path) -> tuple[int, int]:
        """(bytes, inodes) the layer at ``path`` accounts for, as if it were unpacked."""
        ...


class NoRemoteLayers:
    """The hook of an agent that serves nothing lazily (FUSE disabled or unavailable).

    Every layer falls back to an ordinary overlayfs snapshot, so the agent then behaves
    exactly like containerd's overlayfs snapshotter.
    """

    async def prepare_layer(
        self, key: str, parent: str | None, labels: dict[str, str]
    ) -> Path | None:
        """Never serve lazily."""
        return None

    async def release_layer(self, snapshot_labels: dict[str, str], path: Path) -> None:
        """Nothing was ever served, so nothing to release."""

    async def restore_layer(self, labels: dict[str, str]) -> Path | None:
        """Remote snapshots left by an agent that had lazy layers cannot be served here."""
        return None

    def layer_usage(self, path: Path) -> tuple[int, int]:
        """No lazily served layer occupies anything."""
        return 0, 0
