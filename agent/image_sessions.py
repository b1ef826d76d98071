"""What the agent knows about each image it serves on this node.

Prefetching by a learned profile and recording a startup both need the image's layers
in overlay order (a path belongs to the topmost layer that has it) and, for each layer,
the lazily mounted tree that serves it. One session per image manifest holds that.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from agent.fs.operations import MountedLayer
from fetcher.reference import ImageReference
from formats.overlay import Presence, providing_layer
from profiles.plan import PrefetchEntry


class PlanSource(enum.IntEnum):
    """Where a prefetch plan entry comes from. Every source resolves by the same rules
    (`agent.plan_resolver`); the order is the order entries go to the fetcher: the
    learned plan first (it is ordered by need; the image's own profile, or, without
    one, a predecessor's: `profiles.inherit`), then what the image itself names (the
    eStargz landmark area, the converter's list), which is not."""

    LEARNED = 0
    INHERITED = 1
    LANDMARK = 2
    LISTED = 3


@dataclass
class ImageSession:
    """One image (manifest digest) as served here."""

    reference: ImageReference
    manifest_digest: str
    layer_order: list[str]
    """The image's layer digests, bottom to top (as in its manifest)."""
    mounted: dict[str, MountedLayer] = field(default_factory=dict)
    """Image layer digest -> the lazily served layer (possibly another blob: a twin)."""
    starts_recorded: int = 0
    recording: bool = False
    plans: dict[PlanSource, list[PrefetchEntry]] = field(default_factory=dict)
    """The prefetch plan, by source (the learned or inherited one once fetched from the
    registry)."""
    planned: set[tuple[PlanSource, int]] = field(default_factory=set)
    """Plan entries (source, position) already handed to the fetcher."""
    prepared: bool = False
    """containerd has prepared the image's top layer (lazily or not): its pull mounts
    no more layers here, so the merged view of ``mounted`` is final."""

    def add_plan(self, source: PlanSource, entries: Iterable[PrefetchEntry]) -> None:
        """Add entries of one source, each once (every layer of an image brings the
        image's own list again)."""
        plan = self.plans.setdefault(source, [])
        known = set(plan)
        for entry in entries:
            if entry not in known:
                known.add(entry)
                plan.append(entry)

    def plan_entries(self) -> Iterator[tuple[tuple[PlanSource, int], PrefetchEntry]]:
        """Every plan entry with its (source, position), sources in fetch order."""
        for source in sorted(self.plans):
            for position, entry in enumerate(self.plans[source]):
                yield (source, position), entry

    def topmost(self, path: str) -> tuple[str, MountedLayer] | None:
        """The layer that provides ``path`` (relative, normalized) in the merged view
        (`formats.overlay`); None when it is deleted or hidden, or not provided by a
        lazily served layer. A layer this agent does not serve counts as holding
        nothing: what it would hide costs a fetch here, never a wrong byte."""
        layers = [self.mounted.get(digest) for digest in reversed(self.layer_order)]
        views = [_NOTHING if m is None else m.tree for m in layers]
        found = providing_layer(path, views)
        if found is None:
            return None
        mounted = layers[found]
        assert mounted is not None  # _NOTHING provides nothing
        return self.layer_order[-1 - found], mounted


class _HoldsNothing:
    """A layer served by containerd itself: the agent cannot see into it."""

    def presence(self, path: str) -> Presence:
        return Presence.ABSENT


_NOTHING = _HoldsNothing()


class ImageSessions:
    """Sessions by manifest digest, and which sessions use each mounted layer."""

    def __init__(self) -> None:
        self.by_manifest: dict[str, ImageSession] = {}
        self.by_layer_name: dict[str, set[str]] = {}

    def layer_ready(
        self,
        reference: ImageReference,
        manifest_digest: str,
        layer_order: list[str],
        layer_digest: str,
        mounted: MountedLayer,
    ) -> tuple[ImageSession, bool]:
        """Record a mounted layer of an image; returns (session, session is new)."""
        session = self.by_manifest.get(manifest_digest)
        created = session is None
        if session is None:
            session = ImageSession(reference, manifest_digest, layer_order)
            self.by_manifest[manifest_digest] = session
        session.mounted[layer_digest] = mounted
        self.by_layer_name.setdefault(mounted.name, set()).add(manifest_digest)
        return session, created

    def using(self, layer_name: str) -> list[ImageSession]:
        """The sessions of images that include this mounted layer."""
        return [
            self.by_manifest[m]
            for m in self.by_layer_name.get(layer_name, ())
            if m in self.by_manifest
        ]
