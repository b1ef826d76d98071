"""Prefetch paths as the agent's one resolver turns them into chunks: the converter's
prefetch list on a mounted layer (files by name, directories written with a trailing `/`
with everything below them, by the same rule as a learned profile's entries), and a
learned profile's files found in an index that is decoded but not yet checked or
mounted. How sources meet overlays: tests/test_plan_sources.py."""

from __future__ import annotations

import gzip
import hashlib
import io
import random
import tarfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest

from agent.fs.operations import MountedLayer
from agent.image_sessions import ImageSession, PlanSource
from agent.layers.discovery import EarlyLayer
from agent.layers.indexed_layer import IndexedLayer
from agent.layers.lazy_layer import ReadAheadBudget
from agent.plan_resolver import entry_chunks, resolve_ready
from fetcher.chunk_cache import ChunkCache
from fetcher.chunks import BlobSource, ChunkSpec, Priority
from fetcher.mediatypes import OCI_LAYER_GZIP
from fetcher.read_path import ReadPath
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from fetcher.scheduler import ChunkFetcher
from formats import layer_index, layer_index_codec
from formats.gzip_index import DEFAULT_PIECE
from formats.layer_index_builder import build_layer_index
from formats.layer_tree import InodeAllocator, LayerTree
from profiles.plan import PrefetchEntry
from rig.fault_proxy import Fault, FaultProxy

SPAN = 64 * 1024
REFERENCE = ImageReference.parse("127.0.0.1:5000/app:1")


def _mounted() -> MountedLayer:
    return _mounted_with_blob()[0]


def _mounted_with_blob(piece: int = DEFAULT_PIECE) -> tuple[MountedLayer, bytes]:
    """A real index-only layer of incompressible files and small spans, so files fall
    in different chunks; and its blob."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for number, name in enumerate(
            ["app/main.py", "app/lib/a.py", "app/lib/b.py", "etc/conf", "app/main.py"]
        ):
            data = random.Random(number).randbytes(100_000 + 30_000 * number)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("etc/conf-link")
        link.type, link.linkname = tarfile.LNKTYPE, "etc/conf"
        tar.addfile(link)
    blob = gzip.compress(buf.getvalue(), 6)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    index = build_layer_index(
        [blob[i : i + 8192] for i in range(0, len(blob), 8192)],
        layer_digest=digest,
        media_type=OCI_LAYER_GZIP,
        span=SPAN,
        piece=piece,
    )
    source = BlobSource(REFERENCE, digest, len(blob))
    layer = IndexedLayer(source, index)
    tree = LayerTree(layer.entries, InodeAllocator())
    return MountedLayer("layer", layer, tree, time.time()), blob


def _keys(chunks: list[ChunkSpec]) -> list[str]:
    return [chunk.key for chunk in chunks]


def _of(mounted: MountedLayer, *paths: str) -> list[str]:
    keys: dict[str, None] = {}
    for path in paths:
        node = mounted.tree.lookup(path)
        assert node is not None
        keys.update(dict.fromkeys(_keys(entry_chunks(mounted.layer, node.entry))))
    return list(keys)


def prefetch_chunks(mounted: MountedLayer, paths: list[str]) -> list[ChunkSpec]:
    """What the converter's list ``paths`` resolves to in a one-layer image."""
    session = ImageSession(REFERENCE, "sha256:" + "0" * 64, ["layer"], prepared=True)
    session.mounted["layer"] = mounted
    session.add_plan(PlanSource.LISTED, [PrefetchEntry(None, path, None) for path in paths])
    chunks: dict[str, ChunkSpec] = {}
    for _, _, resolved in resolve_ready(session, {}):
        chunks.update((chunk.key, chunk) for chunk in resolved)
    return list(chunks.values())


def enqueue_ready(
    fetcher: ChunkFetcher, session: ImageSession, early: dict[str, EarlyLayer]
) -> int:
    """What the planner does with the resolver's answer; returns the chunk count."""
    queued = 0
    for _, blob, chunks in resolve_ready(session, early):
        fetcher.enqueue(blob, chunks, Priority.PREFETCH)
        queued += len(chunks)
    return queued


def test_files_and_directories_become_their_chunks_once_each() -> None:
    mounted = _mounted()
    assert _keys(prefetch_chunks(mounted, ["/etc/conf"])) == _of(mounted, "etc/conf")
    whole_dir = _keys(prefetch_chunks(mounted, ["/app/lib/"]))
    assert whole_dir == _of(mounted, "app/lib/b.py", "app/lib/a.py") or whole_dir == _of(
        mounted, "app/lib/a.py", "app/lib/b.py"
    )
    everything = _keys(prefetch_chunks(mounted, ["/"]))
    assert sorted(everything) == sorted(set(everything))  # no chunk twice
    assert set(everything) == set(
        _of(mounted, "app/main.py", "app/lib/a.py", "app/lib/b.py", "etc/conf")
    )


def test_a_file_named_twice_in_the_tar_prefetches_only_the_copy_containers_see() -> None:
    mounted = _mounted()
    live = mounted.tree.lookup("app/main.py")
    assert live is not None and live.entry.size == 100_000 + 30_000 * 4
    last = mounted.layer.read_plan(live.entry, live.entry.size - 1, 1)[0].chunk.key
    first_copy = next(e for e in mounted.layer.entries if e.name == "app/main.py")
    stale = mounted.layer.read_plan(first_copy, 0, 1)[0].chunk.key
    keys = _keys(prefetch_chunks(mounted, ["/app/main.py"]))
    assert last in keys
    assert stale not in keys


def test_kind_mismatches_absent_and_hostile_paths_prefetch_nothing() -> None:
    mounted = _mounted()
    # A trailing `/` names a directory: on a file it matches nothing, and a directory
    # without one is not a file (as the converter's list means them).
    for paths in (["/etc/conf/"], ["/app/lib"], ["/nope"], ["/../etc/conf"], ["/a\0b"]):
        assert prefetch_chunks(mounted, paths) == [], paths


def _decoded(mounted: MountedLayer) -> EarlyLayer:
    assert isinstance(mounted.layer, IndexedLayer)
    decoded = layer_index_codec.parse_spans(layer_index_codec.serialize(mounted.layer.index))
    return EarlyLayer(IndexedLayer(mounted.layer.blob, decoded.index, decoded), decoded)


def test_a_decoded_index_finds_each_file_where_the_tree_shows_it() -> None:
    mounted = _mounted()
    early = _decoded(mounted)
    for path in ("app/main.py", "app/lib/a.py", "app/lib/b.py", "etc/conf", "etc/conf-link"):
        node = mounted.tree.lookup(path)
        assert node is not None
        assert early.files.live_entry(path) == node.entry, path  # a duplicate: the live copy
        for ranges in (None, [(0, 1)], [(70_000, 140_000), (5, 6)], [(10**9, 10**9 + 1)]):
            assert _keys(entry_chunks(early.layer, node.entry, ranges)) == _keys(
                entry_chunks(mounted.layer, node.entry, ranges)
            ), (path, ranges)
    for path in ("app", "app/lib", "", "nope", "app/main.py/x"):
        assert early.files.live_entry(path) is None, path  # directories wait for the tree


def _table(mounted: MountedLayer, change: Callable[[list[list[Any]]], None]) -> EarlyLayer:
    """The layer's index with its file table rows changed by ``change``."""
    assert isinstance(mounted.layer, IndexedLayer)
    document = msgpack.unpackb(layer_index_codec.serialize(mounted.layer.index))
    rows = msgpack.unpackb(zlib.decompress(document["toc"]))
    change(rows)
    document["toc"] = zlib.compress(msgpack.packb(rows))
    document["entry_count"] = len(rows)
    decoded = layer_index_codec.parse_spans(msgpack.packb(document))
    return EarlyLayer(IndexedLayer(mounted.layer.blob, decoded.index, decoded), decoded)


def _set(row: int, field: int, value: Any) -> Callable[[list[list[Any]]], None]:
    def change(rows: list[list[Any]]) -> None:
        rows[row][field] = value

    return change


def test_an_odd_or_hostile_table_finds_nothing_early_and_still_fails_its_check() -> None:
    mounted = _mounted()
    names = [entry.name for entry in mounted.layer.entries]
    conf, link = names.index("etc/conf"), names.index("etc/conf-link")
    odd = {
        "a row of the wrong shape": lambda rows: rows.append([]),
        "a name of the wrong type": _set(0, 0, 7),
        "an offset gap of the wrong type": _set(0, 13, "1"),
        "the file past the layer's end": _set(conf, 13, 1 << 40),
        "the file not normalized": _set(conf, 0, "etc/./conf"),
        "the file's size too big": _set(conf, 2, 1 << 62),
        "a hardlink to nothing": _set(link, 9, "etc/none"),
        "a hardlink to a directory": _set(link, 9, "etc"),
    }
    for why, change in odd.items():
        early = _table(mounted, change)
        target = "etc/conf-link" if "hardlink" in why else "etc/conf"
        assert early.files.live_entry(target) is None, why
        if "hardlink" not in why:  # a dangling hardlink is served as nothing, not refused
            with pytest.raises(layer_index.IndexFormatError):
                early.files.checked()
    # One bad row costs only its own early answer.
    early = _table(mounted, _set(conf, 3, -1))
    assert early.files.live_entry("etc/conf") is None
    live = mounted.tree.lookup("app/lib/a.py")
    assert live is not None and early.files.live_entry("app/lib/a.py") == live.entry


def test_a_by_path_entry_goes_once_every_layer_is_mounted_or_decoded() -> None:
    """Before the image is prepared, an entry naming no layer (an inherited plan's
    changed layers) is placed as soon as no layer above could still hold its path: from
    the topmost one that does, a decoded table's copy included."""
    lower = _mounted()
    upper = _decoded(_mounted())
    session = ImageSession(REFERENCE, "sha256:" + "0" * 64, ["lower", "upper"])
    session.mounted["lower"] = lower
    session.add_plan(
        PlanSource.INHERITED,
        [PrefetchEntry(None, "/etc/conf", None), PrefetchEntry(None, "/no/such", None)],
    )
    assert resolve_ready(session, {}) == []  # the upper layer could hold either
    assert session.planned == set()
    ((source, blob, chunks),) = resolve_ready(session, {"upper": upper})
    assert source is PlanSource.INHERITED
    assert blob is upper.layer.blob and blob is not lower.layer.blob
    entry = upper.files.live_entry("etc/conf")
    assert entry is not None
    assert _keys(chunks) == _keys(entry_chunks(upper.layer, entry))
    assert session.planned == {(PlanSource.INHERITED, 0), (PlanSource.INHERITED, 1)}


async def test_a_plan_prefetches_from_a_decoded_layer_and_the_tree_takes_over_at_mount(
    registry: Any, repo_name: str, tmp_path: Path
) -> None:
    """With a real registry and fetcher: the profile's file is fetched before its layer
    is mounted, a directory entry waits for the tree, and nothing is planned twice."""
    mounted, blob_bytes = _mounted_with_blob()
    early = _decoded(mounted)
    assert isinstance(mounted.layer, IndexedLayer)
    reference = ImageReference.parse(f"{registry.host}/{repo_name}")
    digest = mounted.layer.blob.digest
    async with RegistryClient() as client:
        assert await client.push_blob(reference, blob_bytes) == digest
        blob = BlobSource(reference, digest, len(blob_bytes))
        mounted = MountedLayer("layer", IndexedLayer(blob, mounted.layer.index), mounted.tree, 0)
        early = EarlyLayer(IndexedLayer(blob, early.layer.index, early.files), early.files)
        session = ImageSession(reference, "sha256:" + "0" * 64, [digest])
        session.add_plan(
            PlanSource.LEARNED,
            [PrefetchEntry(digest, "/etc/conf", None), PrefetchEntry(digest, "/app/lib/", None)],
        )
        cache = ChunkCache(tmp_path / "cache", max_bytes=64 << 20)
        read_path = ReadPath.build(client, cache)
        fetcher = read_path.fetcher
        try:
            conf = _of(mounted, "etc/conf")
            assert enqueue_ready(fetcher, session, {digest: early}) == len(conf)
            assert session.planned == {(PlanSource.LEARNED, 0)}
            await fetcher.wait_idle()
            assert all(cache.contains(digest, key) for key in conf)
            session.mounted[digest] = mounted
            lib = _of(mounted, "app/lib/a.py") + _of(mounted, "app/lib/b.py")  # shared: twice
            assert enqueue_ready(fetcher, session, {}) == len(lib)
            assert session.planned == {(PlanSource.LEARNED, 0), (PlanSource.LEARNED, 1)}
            assert enqueue_ready(fetcher, session, {digest: early}) == 0
            await fetcher.wait_idle()
            assert all(cache.contains(digest, key) for key in lib)
            assert fetcher.stats.bytes_fetched[Priority.PREFETCH] > 0
        finally:
            await read_path.close()


async def test_a_plan_fetches_only_the_span_prefixes_it_reads(
    registry: Any, repo_name: str, tmp_path: Path
) -> None:
    """Told the plan's reads first, an index-only layer fetches a span only as far as
    its pieces hold them, checks them, and serves later reads within that start from
    it; reads beyond it take the whole span."""
    mounted, blob_bytes = _mounted_with_blob(piece=16 * 1024)
    layer = mounted.layer
    assert isinstance(layer, IndexedLayer)
    reference = ImageReference.parse(f"{registry.host}/{repo_name}")
    digest = layer.blob.digest
    heads = ["/app/main.py", "/app/lib/a.py", "/app/lib/b.py", "/etc/conf"]
    async with RegistryClient() as client:
        assert await client.push_blob(reference, blob_bytes) == digest
        blob = BlobSource(reference, digest, len(blob_bytes))
        mounted = MountedLayer("layer", IndexedLayer(blob, layer.index), mounted.tree, 0)
        whole = {
            path: entry_chunks(mounted.layer, _entry(mounted, path), ((0, 100),)) for path in heads
        }
        session = ImageSession(reference, "sha256:" + "0" * 64, [digest])
        session.mounted[digest] = mounted
        session.add_plan(
            PlanSource.LEARNED, [PrefetchEntry(digest, path, ((0, 100),)) for path in heads]
        )
        cache = ChunkCache(tmp_path / "cache", max_bytes=64 << 20)
        read_path = ReadPath.build(client, cache)
        fetcher = read_path.fetcher
        try:
            assert enqueue_ready(fetcher, session, {}) == len(heads)
            await fetcher.wait_idle()
            for path in heads:
                entry = _entry(mounted, path)
                (piece,) = mounted.layer.read_plan(entry, 0, 100)
                assert await read_path.reader.read(blob, [piece]) == [_file_bytes(path)[:100]]
                assert piece.chunk.key.startswith(whole[path][0].key)
            prefixes = [
                mounted.layer.read_plan(_entry(mounted, path), 0, 100)[0].chunk for path in heads
            ]
            assert any("p" in chunk.key for chunk in prefixes)
            fetched = fetcher.stats.bytes_fetched[Priority.PREFETCH]
            spans = {chunk.key: chunk.fetch_length for chunks in whole.values() for chunk in chunks}
            assert fetched < sum(spans.values())
            # Beyond its prefix a read takes the whole span; read-ahead goes on after it.
            entry = _entry(mounted, "/app/lib/a.py")
            assert {p.chunk.key for p in mounted.layer.read_plan(entry, 0, entry.size)} >= {
                chunk.key for chunk in whole["/app/lib/a.py"]
            }
            budget = ReadAheadBudget(1 << 30, 1 << 30)
            for chunk in prefixes:
                after = mounted.layer.chunks_after(chunk, budget)
                assert all("p" not in later.key for later in after)
        finally:
            await read_path.close()


async def test_a_span_prefix_that_arrives_damaged_is_fetched_again(
    registry: Any, repo_name: str, tmp_path: Path
) -> None:
    """A prefix is held to its piece digests like a span to its digest: a flipped byte
    on the wire means one fetch more, never a wrong byte."""
    mounted, blob_bytes = _mounted_with_blob(piece=16 * 1024)
    layer = mounted.layer
    assert isinstance(layer, IndexedLayer)
    heads = ["/app/main.py", "/app/lib/a.py", "/app/lib/b.py", "/etc/conf"]
    layer.expect_reads((_entry(mounted, path), 0, 100) for path in heads)
    path = next(p for p in heads if "p" in layer.read_plan(_entry(mounted, p), 0, 100)[0].chunk.key)
    with FaultProxy(registry.url) as proxy:
        async with RegistryClient() as client:
            pushed = ImageReference.parse(f"{registry.host}/{repo_name}")
            digest = await client.push_blob(pushed, blob_bytes)
            blob = BlobSource(
                ImageReference.parse(f"{proxy.host}/{repo_name}"), digest, len(blob_bytes)
            )
            mounted = MountedLayer("layer", IndexedLayer(blob, layer.index), mounted.tree, 0)
            session = ImageSession(blob.ref, "sha256:" + "0" * 64, [digest])
            session.mounted[digest] = mounted
            session.add_plan(PlanSource.LEARNED, [PrefetchEntry(digest, path, ((0, 100),))])
            flips = proxy.add(Fault("flip", path_contains=digest, after_bytes=100))
            cache = ChunkCache(tmp_path / "cache", max_bytes=64 << 20)
            read_path = ReadPath.build(client, cache)
            fetcher = read_path.fetcher
            try:
                assert enqueue_ready(fetcher, session, {}) == 1
                await fetcher.wait_idle()
                (piece,) = mounted.layer.read_plan(_entry(mounted, path), 0, 100)
                assert "p" in piece.chunk.key
                assert await read_path.reader.read(blob, [piece]) == [_file_bytes(path)[:100]]
                assert flips.hits == 1
                assert (fetcher.stats.corrupt_refetches, fetcher.stats.corrupt_chunks) == (1, 0)
            finally:
                await read_path.close()


def _entry(mounted: MountedLayer, path: str) -> Any:
    node = mounted.tree.lookup(path.lstrip("/"))
    assert node is not None
    return node.entry


def _file_bytes(path: str) -> bytes:
    """The data ``_mounted_with_blob`` wrote last under ``path``."""
    names = ["app/main.py", "app/lib/a.py", "app/lib/b.py", "etc/conf", "app/main.py"]
    number = len(names) - 1 - names[::-1].index(path.lstrip("/"))
    return random.Random(number).randbytes(100_000 + 30_000 * number)
