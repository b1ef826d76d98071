"""Prefetch what the fleet learned an image's startup reads, in the order it reads it.

At the first Prepare of an image the profile is fetched from the registry, alongside the
lookup of that first layer, so it is at hand by the time the layer is mounted; each plan
entry is handed to the fetcher at PREFETCH priority as soon as the layer holding it is
mounted (or, for an index-only layer, as soon as its index is decoded and the entry's
file is found in it), so the bytes are on their way while containerd still prepares the
layers above and before the container asks for them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from agent.image_sessions import ImageSession
from agent.layers.discovery import EarlyLayer
from agent.layers.lazy_layer import LazyLayer
from common.logging import get_logger
from fetcher.chunks import BlobSource, ChunkSpec, Priority
from fetcher.errors import RegistryError
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from fetcher.scheduler import ChunkFetcher
from formats.estargz_extents import WantedFile
from formats.header_check import HeaderMismatchError
from formats.layer_tree import Node
from formats.plan_path import PlanPath, PlanPathError
from formats.toc import TocEntry
from profiles.format import ProfileFormatError
from profiles.plan import PrefetchEntry, prefetch_plan
from profiles.registry_sync import fetch_profile

log = get_logger(__name__)


async def load_plan(
    client: RegistryClient, reference: ImageReference, manifest_digest: str
) -> list[PrefetchEntry]:
    """The image's learned prefetch plan; empty when it has no profile or the profile
    cannot be had (prefetching is an optimisation, never a reason to fail a pull)."""
    try:
        profile = await fetch_profile(client, reference, manifest_digest)
    except (RegistryError, ProfileFormatError, ValueError) as exc:
        log.warning("profile.fetch_failed", image=str(reference), error=str(exc))
        return []
    plan = prefetch_plan(profile) if profile is not None else []
    log.info(
        "profile.loaded",
        image=str(reference),
        entries=len(plan),
        runs=profile.runs.count if profile else 0,
    )
    return plan


def _files_for(
    session: ImageSession, entry: PrefetchEntry, early: Mapping[str, EarlyLayer]
) -> list[tuple[LazyLayer, TocEntry]] | None:
    """The regular files one plan entry names, with their layers; None while its layer
    is not mounted yet and, if decoded already, its file is not found there (the tree
    then decides)."""
    try:
        path = PlanPath.parse(entry.path).name
    except PlanPathError:
        return []  # profiles come from any node: never trusted
    if entry.layer is not None:
        mounted = session.mounted.get(entry.layer)
        if mounted is None:
            return _early_file(early.get(entry.layer), path)
    else:
        top = session.topmost(path)
        if top is None:
            return [] if len(session.mounted) == len(session.layer_order) else None
        mounted = top[1]
    node = mounted.tree.lookup(path)
    return [(mounted.layer, file) for file in node_files(node)] if node is not None else []


def warm_files(plan: Sequence[PrefetchEntry], layer_digest: str) -> list[WantedFile]:
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
            continue  # profiles come from any node: never trusted
        if not path.whole_directory:
            wanted.append((path.name, entry.ranges))
    return wanted


def _early_file(early: EarlyLayer | None, path: str) -> list[tuple[LazyLayer, TocEntry]] | None:
    """A plan entry's file in a layer decoded but not mounted yet: what lets the fetch
    start while the layer's table is checked and its tree built."""
    entry = early.files.live_entry(path) if early is not None else None
    if early is None or entry is None:
        return None
    return [(early.layer, entry)]


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


def node_files(node: Node) -> list[TocEntry]:
    """The regular file of a file node; for a directory, every regular file below it.
    The one rule by which both a learned profile and the converter's prefetch list turn
    a path into files."""
    targets = [node]
    if node.is_dir:
        stack = [node]
        targets = []
        while stack:
            current = stack.pop()
            for child in (current.children or {}).values():
                (stack if child.is_dir else targets).append(child)
    return [target.entry for target in targets if target.entry.type in ("reg", "hardlink")]


def node_chunks(
    layer: LazyLayer, node: Node, ranges: Sequence[tuple[int, int]] | None = None
) -> list[ChunkSpec]:
    """The chunks holding ``ranges`` of a file node (the whole file without ranges); for
    a directory, those of every regular file below it."""
    return [chunk for file in node_files(node) for chunk in entry_chunks(layer, file, ranges)]


def enqueue_ready(
    fetcher: ChunkFetcher, session: ImageSession, early: Mapping[str, EarlyLayer]
) -> int:
    """Hand the fetcher every plan entry whose layer is now mounted, or decoded (``early``,
    by layer digest) with the entry's file found in it; returns the chunk count."""
    if not session.plan:
        return 0
    ready: list[tuple[PrefetchEntry, list[tuple[LazyLayer, TocEntry]]]] = []
    for index, entry in enumerate(session.plan):
        if index in session.planned:
            continue
        files = _files_for(session, entry, early)
        if files is not None:
            session.planned.add(index)
            ready.append((entry, files))
    # Each layer hears every read first: its chunks are then made to fit all of them.
    reads: dict[int, tuple[LazyLayer, list[tuple[TocEntry, int, int]]]] = {}
    for entry, files in ready:
        for layer, file in files:
            told = reads.setdefault(id(layer), (layer, []))[1]
            wanted = _wanted(file, entry.ranges)
            told.extend((file, start, end - start) for start, end in wanted)
    for layer, told in reads.values():
        layer.expect_reads(told)
    queued = 0
    for entry, files in ready:
        by_blob: dict[BlobSource, list[ChunkSpec]] = {}
        for layer, file in files:
            by_blob.setdefault(layer.blob, []).extend(entry_chunks(layer, file, entry.ranges))
        for blob, chunks in by_blob.items():
            fetcher.enqueue(blob, chunks, Priority.PREFETCH)
            queued += len(chunks)
    return queued


def _wanted(file: TocEntry, ranges: Sequence[tuple[int, int]] | None) -> Sequence[tuple[int, int]]:
    """The byte ranges of ``file`` to prefetch: ``ranges``, or without them all of it."""
    return ranges or ((0, file.size),)
