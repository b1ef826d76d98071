"""Inode numbers a later agent can give again: a block of numbers per layer, by name.

The kernel keeps the node IDs it was given (our inode numbers: pyfuse3 makes them one)
for as long as the FUSE connection lives, and an agent that takes over a live
connection must answer every one of them without having seen the lookups that made
them. A layer's tree numbers its nodes in a fixed order from the layer's metadata alone
(`formats.layer_tree`), so the numbers are a pure function of where the layer's block
starts. Blocks used to come from one counter shared by every tree, in whatever order
concurrent pulls built them, which no successor could repeat.

Each layer name (blob and metadata: `agent.lazy_provider.layer_name`) gets a slot once
per connection and keeps it, also when the layer is removed and mounted again (the
same name gives the same tree, so the same numbers); no other layer ever gets it. The
slot table is written to a file before the numbers are handed out, for a successor
that resumes the connection (``resume``); a new connection starts a new table
(``fresh``).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from common.logging import get_logger
from formats.layer_tree import InodeAllocator

log = get_logger(__name__)

SLOT_BITS = 32
"""A layer's block holds 2**32 numbers: more nodes than any index or TOC may list."""
MAX_SLOTS = (1 << 31) - 1
"""Slots 1..MAX_SLOTS keep every number below 2**63; pyfuse3's root inode (1) is below
them all."""


class InodeSlotsError(Exception):
    """The slot table of a connection to resume cannot be read: resuming it could hand
    out numbers the kernel already holds for other files."""


class InodeSlots:
    """Layer name -> slot, persisted at ``path`` (None: kept in memory, for a mount no
    other agent will take over). Safe from worker threads (trees are built there)."""

    def __init__(self, path: Path | None, slots: dict[str, int], resumed: bool) -> None:
        self.path = path
        self.resumed = resumed
        """The table of a connection an earlier agent served."""
        self._slots = slots
        self._lock = threading.Lock()

    @classmethod
    def fresh(cls, path: Path | None = None) -> InodeSlots:
        """The table of a new connection (a previous one's file is replaced)."""
        slots = cls(path, {}, resumed=False)
        slots._save()
        return slots

    @classmethod
    def resume(cls, path: Path) -> InodeSlots:
        """The table of the connection being taken over."""
        try:
            document = json.loads(path.read_text())
            slots = document["slots"]
            if document.get("version") != 1 or not isinstance(slots, dict):
                raise ValueError("not a version 1 slot table")
            if not all(
                isinstance(n, str) and type(s) is int and 0 < s <= MAX_SLOTS
                for n, s in slots.items()
            ) or len(set(slots.values())) != len(slots):
                raise ValueError("slots must be distinct integers in range, by name")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InodeSlotsError(f"{path}: {exc}") from None
        return cls(path, dict(slots), resumed=True)

    def allocator(self, name: str) -> InodeAllocator:
        """The numbers of layer ``name``'s tree (its slot is saved before it is used)."""
        slot = self.slot(name)
        return InodeAllocator(first=slot << SLOT_BITS, limit=(slot + 1) << SLOT_BITS)

    def slot(self, name: str) -> int:
        """Layer ``name``'s slot, given now if it has none."""
        with self._lock:
            slot = self._slots.get(name)
            if slot is None:
                slot = max(self._slots.values(), default=0) + 1
                if slot > MAX_SLOTS:
                    raise InodeSlotsError("every inode slot of this connection is used")
                self._slots[name] = slot
                self._save()
            return slot

    def _save(self) -> None:
        """Write the table (called with the lock held, or before it is shared)."""
        if self.path is None:
            return
        partial = self.path.with_name(self.path.name + ".partial")
        document = {"version": 1, "slots": self._slots}
        with open(partial, "w", encoding="utf-8") as out:
            json.dump(document, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, self.path)
