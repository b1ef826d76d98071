"""Snapshot metadata in SQLite: what exists, its kind, parent, labels and usage.

containerd keeps its own record of every snapshot it asked for and expects ours to
survive an agent restart, so every RPC is one SQLite transaction in WAL mode and a
crash loses at most the RPC in flight. The rules that the SQL enforces (names unique
across keys and names, parents must be committed, no removal under children, labels
replaced on commit) are those of containerd's own snapshot metadata store, because
containerd's metadata layer and GC rely on them.

Not thread-safe by design: the snapshotter drives one `Metastore` from one thread.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from agent.snapshotter.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)

MAX_LABEL_BYTES = 4096
"""containerd's cap on one label's key plus value, in bytes."""

_SCHEMA_VERSION = 1
_SCHEMA = (
    """CREATE TABLE snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    parent_id INTEGER REFERENCES snapshots(id),
    kind INTEGER NOT NULL,
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    labels TEXT NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    inodes INTEGER NOT NULL DEFAULT 0,
    remote INTEGER NOT NULL DEFAULT 0,
    remote_path TEXT
)""",
    "CREATE INDEX snapshots_by_parent ON snapshots(parent_id)",
)
_SELECT = """
SELECT s.id, s.name, p.name, s.kind, s.created_ns, s.updated_ns, s.labels,
       s.size, s.inodes, s.remote_path
FROM snapshots AS s LEFT JOIN snapshots AS p ON p.id = s.parent_id
"""


class Kind(IntEnum):
    """Snapshot kinds, numbered as in containerd's API."""

    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3


@dataclass(frozen=True)
class Info:
    """What containerd sees of a snapshot (Stat, List, Update)."""

    name: str
    parent: str
    kind: Kind
    created_ns: int
    updated_ns: int
    labels: dict[str, str]


@dataclass(frozen=True)
class Record:
    """A snapshot as stored: its info plus what only the snapshotter needs."""

    id: int
    info: Info
    size: int
    inodes: int
    remote_path: Path | None

    @property
    def remote(self) -> bool:
        """Whether the tree is a lazily served layer rather than a local directory."""
        return self.remote_path is not None


@dataclass(frozen=True)
class Layer:
    """One snapshot in a parent chain: where its file tree lives is decided by the caller."""

    id: int
    remote_path: Path | None


@dataclass(frozen=True)
class Snapshot:
    """An active snapshot or view and its parents, immediate parent first (for mounts)."""

    id: int
    kind: Kind
    parents: tuple[Layer, ...]


def validate_labels(labels: dict[str, str]) -> None:
    """Refuse labels containerd itself would refuse (key plus value over 4096 bytes)."""
    for key, value in labels.items():
        size = len(key.encode()) + len(value.encode())
        if size > MAX_LABEL_BYTES:
            raise InvalidArgumentError(
                f"label key and value length ({size} bytes) greater than maximum size "
                f"({MAX_LABEL_BYTES} bytes)"
            )


def _without_empty(labels: dict[str, str]) -> dict[str, str]:
    # containerd stores no empty label values: setting one to "" deletes it.
    return {key: value for key, value in labels.items() if value != ""}


class Metastore:
    """The snapshot table and the containerd rules over it; use inside `transaction()`."""

    def __init__(self, path: Path) -> None:
        # Owner-only before sqlite opens it: its -wal/-shm files copy the database's mode,
        # and labels carry image references other users of the node need not learn.
        path.touch(mode=0o600, exist_ok=True)
        path.chmod(0o600)
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        with self.transaction():
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version > _SCHEMA_VERSION:
                raise RuntimeError(f"{path}: schema version {version} is newer than this agent")
            if version == 0:
                for statement in _SCHEMA:
                    self._conn.execute(statement)
                self._conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

    def close(self) -> None:
        """Close the database (the WAL is checkpointed)."""
        self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction: committed on success, rolled back on any exception."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def get(self, name: str) -> Record | None:
        """The snapshot called ``name`` (a key or a committed name), if any."""
        row = self._conn.execute(_SELECT + " WHERE s.name = ?", (name,)).fetchone()
        return _record(row) if row else None

    def record(self, name: str) -> Record:
        """The snapshot called ``name``, or NOT_FOUND."""
        found = self.get(name)
        if found is None:
            raise NotFoundError(f"snapshot {name} does not exist")
        return found

    def records(self) -> list[Record]:
        """Every snapshot, oldest first."""
        return [_record(row) for row in self._conn.execute(_SELECT + " ORDER BY s.id")]

    def ids(self) -> set[int]:
        """Ids of every snapshot (their directories are the ones to keep)."""
        return {row[0] for row in self._conn.execute("SELECT id FROM snapshots")}

    def create(
        self,
        kind: Kind,
        key: str,
        parent: str,
        labels: dict[str, str],
        remote_path: Path | None = None,
    ) -> Snapshot:
        """Add a snapshot of ``kind`` under ``key`` on top of the committed ``parent``."""
        if not key:
            raise InvalidArgumentError("snapshot key must not be empty")
        validate_labels(labels)
        if self.get(key) is not None:
            raise AlreadyExistsError(f"snapshot {key} already exists")
        parent_record = self.committed_parent(parent)
        parent_id = parent_record.id if parent_record is not None else None
        now = time.time_ns()
        cursor = self._conn.execute(
            "INSERT INTO snapshots (name, parent_id, kind, created_ns, updated_ns, labels,"
            " remote, remote_path) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                key,
                parent_id,
                int(kind),
                now,
                now,
                json.dumps(_without_empty(labels)),
                int(remote_path is not None),
                str(remote_path) if remote_path is not None else None,
            ),
        )
        assert cursor.lastrowid is not None
        return Snapshot(cursor.lastrowid, kind, self._chain(parent_id))

    def committed_parent(self, parent: str) -> Record | None:
        """The parent a new snapshot would stack on (None for ""), if it can be one."""
        if not parent:
            return None
        found = self.get(parent)
        if found is None:
            raise NotFoundError(f"missing parent {parent!r}")
        if found.info.kind != Kind.COMMITTED:
            raise FailedPreconditionError(f"parent {parent!r} is not committed snapshot")
        return found

    def snapshot(self, key: str) -> Snapshot:
        """An active snapshot or view with its parent chain (what Mounts needs)."""
        found = self.record(key)
        if found.info.kind not in (Kind.ACTIVE, Kind.VIEW):
            raise FailedPreconditionError(f"requested snapshot {key} not active or view")
        parent_id = self._conn.execute(
            "SELECT parent_id FROM snapshots WHERE id = ?", (found.id,)
        ).fetchone()[0]
        return Snapshot(found.id, found.info.kind, self._chain(parent_id))

    def layers_of(self, name: str) -> tuple[Layer, ...]:
        """The committed snapshot ``name`` and its ancestors: what a snapshot on it
        would mount ("" has none)."""
        if not name:
            return ()
        return self._chain(self.record(name).id)

    def commit_active(
        self, key: str, name: str, labels: dict[str, str], usage: tuple[int, int]
    ) -> Record:
        """Turn the active snapshot ``key`` into the committed ``name``; labels are replaced."""
        if not name:
            raise InvalidArgumentError("snapshot name must not be empty")
        validate_labels(labels)
        if self.get(name) is not None:
            raise AlreadyExistsError(f"snapshot {name} already exists")
        active = self.get(key)
        if active is None:
            raise NotFoundError(f"failed to get active snapshot {key!r}")
        if active.info.kind != Kind.ACTIVE:
            raise FailedPreconditionError(f"requested snapshot {key} not active")
        now = time.time_ns()
        self._conn.execute(
            "UPDATE snapshots SET name = ?, kind = ?, created_ns = ?, updated_ns = ?,"
            " labels = ?, size = ?, inodes = ? WHERE id = ?",
            (
                name,
                int(Kind.COMMITTED),
                now,
                now,
                json.dumps(_without_empty(labels)),
                usage[0],
                usage[1],
                active.id,
            ),
        )
        return self.record(name)

    def commit_remote(
        self, name: str, parent: str, labels: dict[str, str], remote_path: Path
    ) -> Record:
        """Record a lazily served layer directly as the committed snapshot ``name``."""
        self.create(Kind.COMMITTED, name, parent, labels, remote_path)
        return self.record(name)

    def remove(self, key: str) -> Record:
        """Forget ``key``; refused while other snapshots are built on it."""
        found = self.get(key)
        if found is None:
            raise NotFoundError(f"snapshot {key} does not exist")
        child = self._conn.execute(
            "SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1", (found.id,)
        ).fetchone()
        if child is not None:
            raise FailedPreconditionError(f"cannot remove snapshot {key} with child")
        self._conn.execute("DELETE FROM snapshots WHERE id = ?", (found.id,))
        return found

    def update_labels(
        self, name: str, change: Callable[[dict[str, str]], dict[str, str]]
    ) -> Record:
        """Replace the labels of ``name`` with ``change(current labels)``."""
        found = self.record(name)
        labels = _without_empty(change(dict(found.info.labels)))
        validate_labels(labels)
        self._conn.execute(
            "UPDATE snapshots SET labels = ?, updated_ns = ? WHERE id = ?",
            (json.dumps(labels), time.time_ns(), found.id),
        )
        return self.record(name)

    def set_remote_path(self, snapshot_id: int, remote_path: Path) -> None:
        """Point a remote snapshot at where its layer is served after a restart."""
        self._conn.execute(
            "UPDATE snapshots SET remote_path = ? WHERE id = ? AND remote = 1",
            (str(remote_path), snapshot_id),
        )

    def _chain(self, parent_id: int | None) -> tuple[Layer, ...]:
        chain: list[Layer] = []
        while parent_id is not None:
            row = self._conn.execute(
                "SELECT id, parent_id, remote_path FROM snapshots WHERE id = ?", (parent_id,)
            ).fetchone()
            chain.append(Layer(row[0], Path(row[2]) if row[2] is not None else None))
            parent_id = row[1]
        return tuple(chain)


def _record(row: tuple[object, ...]) -> Record:
    snapshot_id, name, parent, kind, created, updated, labels, size, inodes, remote = row
    assert isinstance(snapshot_id, int) and isinstance(name, str)
    assert isinstance(kind, int) and isinstance(created, int) and isinstance(updated, int)
    assert isinstance(labels, str) and isinstance(size, int) and isinstance(inodes, int)
    info = Info(name, str(parent or ""), Kind(kind), created, updated, json.loads(labels))
    return Record(snapshot_id, info, size, inodes, Path(str(remote)) if remote else None)
