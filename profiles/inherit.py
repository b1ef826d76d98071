"""A predecessor's profile turned into a plan for an image that has none of its own.

Every release of a service is a new digest, and a profile belongs to one digest: without
this, the first starts of each new version run unplanned on every node until one of them
has recorded one. What a version reads at startup is mostly what the one before it read,
so its plan is the best guess there is, mapped into the new image's layers:

- an entry of a layer the new image still has (same digest) is kept exactly: that layer's
  files are byte for byte the ones the predecessor's starts read;
- an entry of a changed layer goes by path (``layer`` None): the resolver takes it from
  the topmost layer of the new image that holds the path, and drops it where no layer
  does. Its file-relative ranges and its place in the order are kept; ranges past a
  shortened file's end are clipped when resolved. Only a predecessor from the same
  repository lends its changed layers' paths: another repository's image shares a base,
  not an application, so only the entries of the layers it shares are taken;
- the plan is cut, in order (the latest-needed entries go), at the bytes a start of the
  predecessor typically read: a guess never prefetches more than a start of the image it
  was learned from needed, however many runs of different paths were merged into it.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from profiles.coverage import size_of
from profiles.format import Profile
from profiles.plan import PrefetchEntry, prefetch_plan


@dataclass(frozen=True)
class InheritedPlan:
    """The plan taken from ``source`` (a predecessor's manifest digest), with what the
    mapping did: entries kept ``exact`` (shared layer), mapped ``by_path``, ``dropped``
    (a changed layer of another repository's image) and ``cut`` (past the byte bound)."""

    source: str
    entries: tuple[PrefetchEntry, ...]
    exact: int
    by_path: int
    dropped: int
    cut: int
    shared_layers: int

    @property
    def planned_bytes(self) -> int:
        """Bytes the plan names (before clipping to the new image's file sizes)."""
        return sum(size_of(entry.ranges or ()) for entry in self.entries)


def typical_read_bytes(profile: Profile) -> int:
    """The median bytes one recorded start of the profile's image read."""
    samples = [value for _, value in profile.runs.bytes_read]
    return int(statistics.median(samples)) if samples else 0


def inherit(profile: Profile, layers: tuple[str, ...], by_path: bool) -> InheritedPlan:
    """``profile``'s plan for an image with ``layers`` (bottom to top); ``by_path``: map
    the entries of layers it does not share (same repository only, see the module)."""
    shared = set(profile.layers) & set(layers)
    budget = typical_read_bytes(profile)
    entries: list[PrefetchEntry] = []
    exact = mapped = dropped = cut = 0
    planned = 0
    for entry in prefetch_plan(profile):
        if entry.layer in shared:
            kept = entry
        elif by_path:
            kept = entry._replace(layer=None)
        else:
            dropped += 1
            continue
        size = size_of(entry.ranges or ())
        if planned + size > budget:
            cut += 1
            continue
        planned += size
        entries.append(kept)
        if kept.layer is None:
            mapped += 1
        else:
            exact += 1
    return InheritedPlan(
        source=profile.image,
        entries=tuple(entries),
        exact=exact,
        by_path=mapped,
        dropped=dropped,
        cut=cut,
        shared_layers=len(shared),
    )
