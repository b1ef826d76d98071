"""Snapshot directories and the mounts containerd performs over them.

The layout and mounts are those of containerd's own overlayfs snapshotter, so a
container cannot tell the two apart: ``<root>/snapshots/<id>/fs`` holds a snapshot's
files (the overlay upperdir while active, a lowerdir once committed), ``work`` is the
overlay workdir. A remote snapshot has no directory here: its tree is wherever the
remote-layer hook serves it, and that path stands in for ``fs`` in lowerdirs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISDIR

from agent.snapshotter.metastore import Kind, Layer, Snapshot

_OVERLAY_INDEX_PARAMETER = Path("/sys/module/overlay/parameters/index")


@dataclass(frozen=True)
class Mount:
    """One mount containerd performs; ``target`` is always empty for a rootfs."""

    type: str
    source: str
    options: tuple[str, ...]


def overlay_supports_index_option() -> bool:
    """Whether the kernel's overlay knows ``index=``: then mounts pass ``index=off``.

    containerd turns the inodes index off so that a lowerdir can appear under several
    overlays at once (every container of an image shares its layers).
    """
    return _OVERLAY_INDEX_PARAMETER.exists()


class SnapshotDirs:
    """Where snapshot trees live under the snapshotter root."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.snapshots = root / "snapshots"
        self.snapshots.mkdir(mode=0o700, parents=True, exist_ok=True)

    def snapshot_dir(self, snapshot_id: int) -> Path:
        """Everything that belongs to one local snapshot."""
        return self.snapshots / str(snapshot_id)

    def fs_dir(self, snapshot_id: int) -> Path:
        """The snapshot's file tree (overlay upperdir while active)."""
        return self.snapshot_dir(snapshot_id) / "fs"

    def work_dir(self, snapshot_id: int) -> Path:
        """The overlay workdir of an active snapshot."""
        return self.snapshot_dir(snapshot_id) / "work"

    def layer_dir(self, layer: Layer) -> Path:
        """The tree a parent contributes as a lowerdir: local ``fs`` or the hook's path."""
        return layer.remote_path if layer.remote_path is not None else self.fs_dir(layer.id)

    def new_directory(self, kind: Kind) -> Path:
        """A fresh ``new-*`` directory with ``fs`` (and ``work`` if active), not yet named.

        Created before the snapshot's id exists and renamed once the metadata is
        written, so a crash leaves either nothing or an orphan that Cleanup removes.
        """
        temp = Path(tempfile.mkdtemp(prefix="new-", dir=self.snapshots))
        (temp / "fs").mkdir(mode=0o755)
        if kind == Kind.ACTIVE:
            (temp / "work").mkdir(mode=0o711)
        return temp

    def install(self, temp: Path, snapshot: Snapshot) -> None:
        """Give a ``new-*`` directory its snapshot id, owned like the parent's tree.

        The chown keeps user-namespaced images working: their layers belong to a
        shifted uid, and the container's root directory must too.
        """
        if snapshot.parents:
            owner = os.stat(self.layer_dir(snapshot.parents[0]))
            os.lchown(temp / "fs", owner.st_uid, owner.st_gid)
        temp.rename(self.snapshot_dir(snapshot.id))

    def drop_work_dir(self, snapshot_id: int) -> None:
        """A committed snapshot is only ever a lowerdir: its workdir is dead weight."""
        shutil.rmtree(self.work_dir(snapshot_id), ignore_errors=True)

    def orphans(self, known_ids: set[int]) -> list[Path]:
        """Directories under ``snapshots/`` that no snapshot owns (crash or removal leftovers)."""
        return [
            entry
            for entry in self.snapshots.iterdir()
            if not (entry.name.isdigit() and int(entry.name) in known_ids)
        ]


def mounts(snapshot: Snapshot, dirs: SnapshotDirs, index_off: bool) -> list[Mount]:
    """The mounts that assemble ``snapshot``, exactly as containerd's overlayfs builds them.

    Overlay needs at least one lowerdir, so a snapshot without parents is a bind mount
    of its own tree; a view of a single layer is a read-only bind of that layer.
    """
    if not snapshot.parents:
        access = "ro" if snapshot.kind == Kind.VIEW else "rw"
        return [Mount("bind", str(dirs.fs_dir(snapshot.id)), (access, "rbind"))]
    options = ["index=off"] if index_off else []
    if snapshot.kind == Kind.ACTIVE:
        options += [
            f"workdir={dirs.work_dir(snapshot.id)}",
            f"upperdir={dirs.fs_dir(snapshot.id)}",
        ]
    elif len(snapshot.parents) == 1:
        return [Mount("bind", str(dirs.layer_dir(snapshot.parents[0])), ("ro", "rbind"))]
    lowers = ":".join(str(dirs.layer_dir(parent)) for parent in snapshot.parents)
    options.append(f"lowerdir={lowers}")
    return [Mount("overlay", "overlay", tuple(options))]


def disk_usage(top: Path) -> tuple[int, int]:
    """(bytes, inodes) under ``top`` as containerd counts them: allocated blocks, each
    inode once however many hard links reach it, directories included."""
    seen: set[tuple[int, int]] = set()
    size = 0
    pending = [top]
    while pending:
        path = pending.pop()
        try:
            stat = os.lstat(path)
        except FileNotFoundError:
            continue
        inode = (stat.st_dev, stat.st_ino)
        if inode not in seen:
            seen.add(inode)
            size += stat.st_blocks * 512
        if S_ISDIR(stat.st_mode):
            with os.scandir(path) as entries:
                pending.extend(Path(entry.path) for entry in entries)
    return size, len(seen)
