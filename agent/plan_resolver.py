"""The one resolver that turns prefetch plan entries into chunks, for every source.

A plan entry (`profiles.plan.PrefetchEntry`) comes from the image's learned profile,
its eStargz landmark area or the converter's list (`agent.image_sessions.PlanSource`);
each is resolved here by the same rules, over the image's session:

- A path is taken from the layer the merged view takes it from (`formats.overlay`).
  An entry naming no layer (the converter's list, an inherited plan's changed layers)
  waits until every layer of the image is mounted or decoded (or containerd has
  prepared its top layer), so that no copy a layer above holds is fetched: a decoded
  index-only table is asked only which regular files it holds (its whiteouts are
  judged once it is checked and mounted), so a file such a layer deletes may cost its
  bytes, never a wrong byte. An entry naming a layer (learned, landmark) is taken from
  that layer as soon as it is mounted, unless a layer mounted above provides the path:
  fetching early is what a plan is for, and a copy hidden by a layer not mounted yet
  costs bytes, never a wrong byte.
- A directory entry (trailing ``/``) means every regular file the merged view shows
  below it, each from the layer that provides it.
- A file of a named layer that is decoded but not yet checked and mounted is found in
  its table (``early``), so its fetch starts while the tree is built.
- Each layer is told every read first (``expect_reads``), so a layer whose chunks are
  larger than those reads makes them smaller before they are asked for.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

from agent.image_sessions import ImageSession, PlanSource
from agent.layers.discovery import EarlyLayer
from agent.layers.lazy_layer import LazyLayer
from fetcher.chunks import BlobSource, ChunkSpec
from formats.estargz_extents import WantedFile
from formats.header_check import HeaderMismatchError
from formats.layer_tree import Node
from formats.overlay import LayerView, Presence, providing_layer
from formats.plan_path import PlanPath, PlanPathError
from formats.toc import TocEntry
from profiles.plan import PrefetchEntry

ResolvedFile = tuple[LazyLayer, TocEntry]


def resolve_ready(
    session: ImageSession, early: Mapping[str, EarlyLayer]
) -> list[tuple[PlanSource, BlobSource, list[ChunkSpec]]]:
    """The chunks of every plan entry that can be resolved now (its layer mounted, or
    decoded with the entry's file found in it: ``early``, by layer digest), in plan
    order, each marked planned; the layers holding them have been told the reads."""
    ready: list[tuple[PlanSource, PrefetchEntry, list[ResolvedFile]]] = []
    for key, entry in session.plan_entries():
        if key in session.planned:
            continue
        files = _files_for(session, entry, early)
        if files is not None:
            session.planned.add(key)
        if files:
            ready.append((key[0], entry, files))
    reads: dict[int, tuple[LazyLayer, list[tuple[TocEntry, int, int]]]] = {}
    for _, entry, files in ready:
        for layer, file in files:
            told = reads.setdefault(id(layer), (layer, []))[1]
            told.extend((file, start, end - start) for start, end in _wanted(file, entry.ranges))
    for layer, told in reads.values():
        layer.expect_reads(told)
    resolved: list[tuple[PlanSource, BlobSource, list[ChunkSpec]]] = []
    for source, entry, files in ready:
        by_blob: dict[BlobSource, list[ChunkSpec]] = {}
        for layer, file in files:
            by_blob.setdefault(layer.blob, []).extend(entry_chunks(layer, file, entry.ranges))
        resolved.extend((source, blob, chunks) for blob, chunks in by_blob.items())
    return resolved


def _files_for(
    session: ImageSession, entry: PrefetchEntry, early: Mapping[str, EarlyLayer]
) -> list[ResolvedFile] | None:
    """The regular files one plan entry names, with their layers; None while it cannot
    be resolved yet."""
    try:
        path = PlanPath.parse(entry.path)
    except PlanPathError:
        return []  # plans come from other nodes and from image annotations: never trusted
    if entry.layer is not None and entry.layer not in session.mounted:
        return None if path.whole_directory else _early_file(early.get(entry.layer), path.name)
    if entry.layer is None and not session.prepared:
        return None if path.whole_directory else _before_prepared(session, path.name, early)
    if not path.name:  # the root: every layer's, and none's (`formats.overlay`)
        return _directory_files(session, path.name, entry.layer)
    top = session.topmost(path.name)
    if top is None:
        return []
    digest, mounted = top
    if entry.layer not in (None, digest):
        return []  # a layer above provides the path
    node = mounted.tree.lookup(path.name)
    if node is None or node.is_dir != path.whole_directory:
        return []
    if not path.whole_directory:
        return [(mounted.layer, file) for file in _regular(node)]
    return _directory_files(session, path.name, entry.layer)


def _directory_files(session: ImageSession, name: str, layer: str | None) -> list[ResolvedFile]:
    """The regular files the merged view shows below directory ``name`` (only those
    from ``layer``, if named)."""
    files: list[ResolvedFile] = []
    for digest, mounted in session.mounted.items():
        if layer not in (None, digest):
            continue
        node = mounted.tree.lookup(name)
        if node is None or not node.is_dir:
            continue
        for path, below in _below(name, node):
            top = session.topmost(path)
            if top is not None and top[1] is mounted:
                files.extend((mounted.layer, file) for file in _regular(below))
    return files


def _below(name: str, directory: Node) -> Iterator[tuple[str, Node]]:
    """(path, node) of every non-directory below ``directory`` (at path ``name``)."""
    stack = [(name, directory)]
    while stack:
        path, current = stack.pop()
        for raw, child in (current.children or {}).items():
            child_path = raw.decode("utf-8", "surrogateescape")
            child_path = f"{path}/{child_path}" if path else child_path
            if child.is_dir:
                stack.append((child_path, child))
            else:
                yield child_path, child


def _before_prepared(
    session: ImageSession, name: str, early: Mapping[str, EarlyLayer]
) -> list[ResolvedFile] | None:
    """The file a by-path entry names, before the image is prepared: once every layer
    is mounted or decoded, from the one the merged view would take it from; None while
    a layer that could hold it above is neither."""
    views: list[LayerView] = []
    for digest in reversed(session.layer_order):
        mounted = session.mounted.get(digest)
        decoded = early.get(digest)
        if mounted is not None:
            views.append(mounted.tree)
        elif decoded is not None:
            views.append(_DecodedTable(decoded))
        else:
            return None
    found = providing_layer(name, views)
    if found is None:
        return []
    view = views[found]
    if isinstance(view, _DecodedTable):
        entry = view.early.files.live_entry(name)
        return [(view.early.layer, entry)] if entry is not None else []
    mounted = session.mounted[session.layer_order[-1 - found]]
    node = mounted.tree.lookup(name)
    return [] if node is None or node.is_dir else [(mounted.layer, f) for f in _regular(node)]


class _DecodedTable:
    """A decoded, unchecked index-only table as a `formats.overlay.LayerView` that knows
    only its regular files (see the module: what it cannot tell costs bytes)."""

    def __init__(self, early: EarlyLayer) -> None:
        self.early = early

    def presence(self, path: str) -> Presence:
        return Presence.OTHER if self.early.files.live_entry(path) else Presence.ABSENT


def _early_file(early: EarlyLayer | None, path: str) -> list[ResolvedFile] | None:
    """A plan entry's file in a layer decoded but not mounted yet: what lets the fetch
    start while the layer's table is checked and its tree built."""
    entry = early.files.live_entry(path) if early is not None else None
    if early is None or entry is None:
        return None
    return [(early.layer, entry)]


def warm_files(plan: Iterable[PrefetchEntry], layer_digest: str) -> list[WantedFile]:
    """The plan's files that may come from this layer, for warming its members before
    its TOC is validated (those of no named layer too: fetching one that the layers
    above then hide costs bytes, not correctness; directories are left to the tree)."""
    wanted: list[WantedFile] = []
    for entry in plan:
        if entry.layer not in (None, layer_digest):
            continue
        try:
            path = PlanPath.parse(entry.path)
        except PlanPathError:
            continue  # plans come from other nodes: never trusted
        if not path.whole_directory:
            wanted.append((path.name, entry.ranges))
    return wanted


def entry_chunks(
    layer: LazyLayer, entry: TocEntry, ranges: Sequence[tuple[int, int]] | None = None
) -> list[ChunkSpec]:
    """The chunks holding ``ranges`` of one file (the whole file without ranges)."""
    chunks: dict[str, ChunkSpec] = {}
    for start, end in _wanted(entry, ranges):
        length = max(0, end - start)
        try:
            header = layer.header_plan(entry, start, length)
        except HeaderMismatchError:
            header = []  # a lying row: its first read distrusts the layer, not prefetch
        plan = header + layer.read_plan(entry, start, length)
        chunks.update((piece.chunk.key, piece.chunk) for piece in plan)
    return list(chunks.values())


def _regular(node: Node) -> list[TocEntry]:
    """The file a node serves, if it is a regular file (or a hard link to one)."""
    return [node.entry] if node.entry.type in ("reg", "hardlink") else []


def _wanted(file: TocEntry, ranges: Sequence[tuple[int, int]] | None) -> Sequence[tuple[int, int]]:
    """The byte ranges of ``file`` to prefetch: ``ranges``, or without them all of it."""
    return ranges or ((0, file.size),)
