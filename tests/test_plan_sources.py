"""Every source of a prefetch plan goes through one resolver, by the merged view's rules.

A plan entry comes from the image's learned profile, an eStargz layer's landmark area or
the converter's prefetch list (`agent.image_sessions.PlanSource`). Until issue 22 the
last two were resolved in each layer alone, as it mounted: both copies of a file an
upper layer replaces were fetched, and files a whiteout or an opaque directory deletes.
Here one image holds all of those cases, and each source is asked for the same paths:
only the copies a container sees are fetched, whatever the source.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import random
import tarfile
from pathlib import Path
from typing import Any

import pytest

from agent.fs.operations import MountedLayer
from agent.image_sessions import ImageSession, ImageSessions, PlanSource
from agent.layers.estargz_layer import EstargzLayer
from agent.layers.indexed_layer import IndexedLayer
from agent.layers.lazy_layer import LazyLayer
from agent.plan_resolver import entry_chunks, resolve_ready
from agent.prefetch_planner import PrefetchPlanner
from fetcher.chunk_cache import ChunkCache
from fetcher.chunks import BlobSource
from fetcher.read_path import ReadPath
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from formats.estargz import FOOTER_SIZE, parse_footer, parse_toc, write_estargz
from formats.layer_index_builder import build_layer_index
from formats.layer_tree import InodeAllocator, LayerTree
from formats.media_types import OCI_LAYER_GZIP
from profiles.plan import PrefetchEntry

LANDMARKED = ["/etc/conf", "/app/old.py", "/app/lib/a.py"]
"""The lower layer's builder put these first (its landmark area)."""


def _tar(members: dict[str, bytes | None]) -> bytes:
    """A layer tar: a file per name with bytes, an empty marker file (whiteout) for None."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data or b"")
            tar.addfile(info, io.BytesIO(data or b""))
    return buf.getvalue()


def _data(name: str) -> bytes:
    """Incompressible, so that each file has gzip members (or spans) of its own."""
    return random.Random(name).randbytes(300_000)


def _layers(reference: ImageReference) -> tuple[bytes, EstargzLayer, bytes, IndexedLayer]:
    """The lower layer as eStargz with a landmark area, the upper as index-only: the
    upper replaces /etc/conf, deletes /app/old.py and makes /opt opaque."""
    lower_names = ("etc/conf", "app/old.py", "app/lib/a.py", "opt/x/y")
    lower_tar = _tar({name: _data("lower/" + name) for name in lower_names})
    out = io.BytesIO()
    write_estargz(io.BytesIO(lower_tar), out, prefetch=LANDMARKED)
    lower_blob = out.getvalue()
    toc_offset = parse_footer(lower_blob[-FOOTER_SIZE:], len(lower_blob))
    toc = parse_toc(lower_blob[toc_offset : len(lower_blob) - FOOTER_SIZE], toc_offset, None)
    lower = EstargzLayer(BlobSource(reference, _digest(lower_blob), len(lower_blob)), toc)
    upper_blob = gzip.compress(
        _tar(
            {
                "etc/conf": _data("upper/etc/conf"),
                "app/.wh.old.py": None,
                "opt/.wh..wh..opq": None,
                "opt/z": _data("upper/opt/z"),
            }
        )
    )
    index = build_layer_index(
        [upper_blob], layer_digest=_digest(upper_blob), media_type=OCI_LAYER_GZIP, span=64 << 10
    )
    upper = IndexedLayer(BlobSource(reference, _digest(upper_blob), len(upper_blob)), index)
    return lower_blob, lower, upper_blob, upper


def _digest(blob: bytes) -> str:
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def _mount(layer: LazyLayer) -> MountedLayer:
    return MountedLayer(layer.blob.digest, layer, LayerTree(layer.entries, InodeAllocator()), 0)


def _chunks_of(
    mounted: MountedLayer, *paths: str, ranges: tuple[tuple[int, int], ...] | None = None
) -> set[str]:
    keys: set[str] = set()
    for path in paths:
        node = mounted.tree.lookup(path)
        assert node is not None, path
        keys.update(chunk.key for chunk in entry_chunks(mounted.layer, node.entry, ranges))
    return keys


def _sources(lower: str, upper: str) -> dict[str, tuple[PlanSource, list[PrefetchEntry]]]:
    """Each source asking for the deleted, replaced and kept files, as it would name them."""
    return {
        "learned": (
            PlanSource.LEARNED,
            [PrefetchEntry(lower, path, ((0, 10),)) for path in [*LANDMARKED, "/opt/x/y"]]
            + [PrefetchEntry(upper, "/etc/conf", ((0, 10),))],
        ),
        "landmark": (
            PlanSource.LANDMARK,
            [PrefetchEntry(lower, path, None) for path in LANDMARKED],
        ),
        "listed": (
            PlanSource.LISTED,
            [PrefetchEntry(None, path, None) for path in ("/etc/conf", "/app/", "/opt/")],
        ),
    }


@pytest.mark.parametrize("source", ["learned", "landmark", "listed"])
def test_every_source_fetches_only_what_the_merged_view_shows(source: str) -> None:
    reference = ImageReference.parse("127.0.0.1:5000/app:1")
    _, lower, _, upper = _layers(reference)
    lower_mount, upper_mount = _mount(lower), _mount(upper)
    digests = [lower.blob.digest, upper.blob.digest]
    session = ImageSession(reference, "sha256:" + "0" * 64, digests, prepared=True)
    session.mounted.update(zip(digests, (lower_mount, upper_mount), strict=True))
    kind, entries = _sources(*digests)[source]
    session.add_plan(kind, entries)
    fetched = {chunk.key for _, _, chunks in resolve_ready(session, {}) for chunk in chunks}
    head = ((0, 10),)  # what the learned entries read (asked after the layers heard it)
    expected = {
        "learned": _chunks_of(lower_mount, "app/lib/a.py", ranges=head)
        | _chunks_of(upper_mount, "etc/conf", ranges=head),
        "landmark": _chunks_of(lower_mount, "app/lib/a.py"),
        "listed": _chunks_of(lower_mount, "app/lib/a.py")
        | _chunks_of(upper_mount, "etc/conf", "opt/z"),
    }[source]
    hidden = _chunks_of(lower_mount, "etc/conf", "app/old.py", "opt/x/y")
    assert fetched == expected
    assert not fetched & hidden
    assert len(session.planned) == len(entries)


async def test_the_planner_places_the_images_hints_once_its_top_layer_is_prepared(
    registry: Any, repo_name: str, tmp_path: Path
) -> None:
    """Through the planner as the provider drives it (layers mount bottom up), from the
    real registry: the lower layer's landmark files go at its mount, before anyone can
    know what the layer above hides (the two it replaces or deletes cost bytes, never a
    wrong byte); the converter's list waits for the top layer, then fetches only the
    copies a container sees."""
    reference = ImageReference.parse(f"{registry.host}/{repo_name}")
    lower_blob, lower, upper_blob, upper = _layers(reference)
    lower_mount, upper_mount = _mount(lower), _mount(upper)
    order = [lower.blob.digest, upper.blob.digest]
    manifest = "sha256:" + "1" * 64
    async with RegistryClient() as client:
        for blob in (lower_blob, upper_blob):
            await client.push_blob(reference, blob)
        cache = ChunkCache(tmp_path / "cache", max_bytes=64 << 20)
        read_path = ReadPath.build(client, cache)
        fetcher = read_path.fetcher
        sessions = ImageSessions()
        planner = PrefetchPlanner(client, fetcher, cache, sessions, profiles=False)
        hints = ["/etc/conf", "/app/", "/opt/"]
        try:
            image = (reference, manifest, order)
            planner.layer_mounted(lower_mount, hints, image, order[0])
            session = sessions.by_manifest[manifest]
            assert not session.prepared
            assert session.planned == {(PlanSource.LANDMARK, n) for n in range(3)}
            await fetcher.wait_idle()
            planner.layer_mounted(upper_mount, hints, image, order[1])
            assert session.prepared
            await fetcher.wait_idle()
            held = {
                key
                for mounted in (lower_mount, upper_mount)
                for key in _chunks_of(mounted, *_files(mounted))
                if read_path.store.contains(mounted.layer.blob.digest, key)
            }
            wanted = _chunks_of(lower_mount, "app/lib/a.py") | _chunks_of(
                upper_mount, "etc/conf", "opt/z"
            )
            assert wanted <= held
            assert held - wanted == _chunks_of(lower_mount, "etc/conf", "app/old.py")
        finally:
            await planner.close()
            await read_path.close()


def _files(mounted: MountedLayer) -> list[str]:
    names = ("etc/conf", "app/old.py", "app/lib/a.py", "opt/x/y", "opt/z")
    return [name for name in names if mounted.tree.lookup(name) is not None]


def test_landmark_files_are_the_builders_list_in_blob_order() -> None:
    _, lower, _, upper = _layers(ImageReference.parse("127.0.0.1:5000/app:1"))
    assert sorted(lower.landmark_files()) == sorted(LANDMARKED)
    assert upper.landmark_files() == []
