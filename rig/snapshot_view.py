"""Mount the root file system containerd would give a container, without running one.

Creates a read-only view snapshot on top of an image's top layer (by chain ID), asks
containerd for its mounts and mounts them, so tests can walk exactly what a container
of that image sees, with any snapshotter (containerd's overlayfs as the reference, or
acceld).
"""

from __future__ import annotations

import contextlib
import json
import shlex
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

from common.digest import chain_id
from rig.containerd import ContainerdServer
from rig.rootfs_digest import FileFacts, describe_tree


def image_chain_id(config_json: bytes) -> str:
    """The chain ID of an image's top layer, from its config's rootfs.diff_ids."""
    return chain_id(json.loads(config_json)["rootfs"]["diff_ids"])


@contextlib.contextmanager
def mounted_view(
    containerd: ContainerdServer,
    parent_chain_id: str,
    target: Path,
    snapshotter: str = "overlayfs",
    namespace: str | None = None,
) -> Iterator[Path]:
    """Mount a view of ``parent_chain_id`` at ``target``; unmount and remove on exit."""
    key = f"view-{uuid.uuid4().hex[:12]}"
    common = ["snapshots", "--snapshotter", snapshotter]
    target.mkdir(parents=True, exist_ok=True)
    try:
        # One call creates the view and prints its mounts: containerd's GC may remove an
        # unleased view between two calls (the mount itself stays valid).
        command = containerd.ctr(
            *common, "view", "--target", str(target), key, parent_chain_id, namespace=namespace
        ).stdout.strip()
        argv = shlex.split(command)
        if not argv or argv[0] != "mount":
            raise RuntimeError(f"unexpected mount command from ctr: {command!r}")
        subprocess.run(argv, check=True, capture_output=True, text=True)
        try:
            yield target
        finally:
            subprocess.run(["umount", str(target)], check=False, capture_output=True)
    finally:
        containerd.ctr(*common, "rm", key, namespace=namespace, check=False)


def view_tree(
    containerd: ContainerdServer,
    parent_chain_id: str,
    target: Path,
    snapshotter: str = "overlayfs",
    namespace: str | None = None,
) -> dict[str, FileFacts]:
    """Every entry of the root file system a container of ``parent_chain_id`` would see
    (`mounted_view`, described by `describe_tree`), for comparing snapshotters."""
    with mounted_view(containerd, parent_chain_id, target, snapshotter, namespace) as root:
        return describe_tree(root)
