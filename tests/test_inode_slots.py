"""Inode numbers are a function of the layer and the connection's slot table alone.

An agent that takes over a live FUSE connection (issue 23) must answer the node IDs the
kernel holds without having seen the lookups that made them. Numbers used to come from
one counter shared by every tree, in the order concurrent pulls built them: the same
layers built in another order got other numbers.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from agent.fs.inode_slots import SLOT_BITS, InodeSlots, InodeSlotsError
from agent.fs.operations import LayerFS
from agent.layers.indexed_layer import IndexedLayer
from fetcher.chunk_cache import ChunkCache
from fetcher.chunks import BlobSource
from fetcher.read_path import ReadPath
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from formats.layer_index_builder import build_layer_index
from formats.layer_tree import InodeAllocator
from formats.media_types import OCI_LAYER_GZIP
from formats.toc import HostileLayerError


def _layer(tag: str, files: int) -> IndexedLayer:
    """An index-only layer of ``files`` small files in a few directories, and a link."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for number in range(files):
            data = f"{tag}-{number}".encode()
            info = tarfile.TarInfo(f"{tag}/d{number % 7}/f{number}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo(f"{tag}/link")
        link.type, link.linkname = tarfile.LNKTYPE, f"{tag}/d0/f0"
        tar.addfile(link)
    blob = gzip.compress(buf.getvalue())
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    index = build_layer_index([blob], layer_digest=digest, media_type=OCI_LAYER_GZIP)
    return IndexedLayer(BlobSource(ImageReference.parse("r.test/a:1"), digest, len(blob)), index)


def _numbers(fs: LayerFS, name: str) -> dict[str, int]:
    """Path -> inode of every node of a mounted layer."""
    mounted = fs.layer(name)
    assert mounted is not None
    return {path: node.inode for path, node in mounted.tree._by_path.items()}


async def _fs(tmp_path: Path, client: RegistryClient, slots: InodeSlots) -> LayerFS:
    read_path = ReadPath.build(client, ChunkCache(tmp_path / "cache", max_bytes=1 << 20))
    return LayerFS(read_path.reader, slots=slots)


async def test_a_resumed_table_numbers_every_layer_as_before_in_any_order(tmp_path: Path) -> None:
    layers = {f"layer-{n}": _layer(f"l{n}", 300 + 50 * n) for n in range(4)}
    table = tmp_path / "fuse-inodes.json"
    async with RegistryClient() as client:
        first = await _fs(tmp_path, client, InodeSlots.fresh(table))
        with ThreadPoolExecutor(4) as pool:  # as concurrent pulls build them
            built = pool.map(first.build_tree, layers, layers.values())
            trees = dict(zip(layers, built, strict=True))
        for name, layer in layers.items():
            first.add_layer(name, layer, trees[name])
        before = {name: _numbers(first, name) for name in layers}
        blocks = [set(numbers.values()) for numbers in before.values()]  # links share one
        every = [inode for block in blocks for inode in block]
        assert len(every) == len(set(every))  # no two layers share a number
        assert min(every) >= 1 << SLOT_BITS  # the root (1) is below every block

        successor = await _fs(tmp_path, client, InodeSlots.resume(table))
        for name in reversed(layers):
            successor.add_layer(name, layers[name])
        assert {name: _numbers(successor, name) for name in layers} == before


async def test_a_layer_mounted_again_gets_its_numbers_again(tmp_path: Path) -> None:
    async with RegistryClient() as client:
        fs = await _fs(tmp_path, client, InodeSlots.fresh())
        fs.add_layer("a", _layer("a", 20))
        numbers = _numbers(fs, "a")
        fs.remove_layer("a")
        fs.add_layer("b", _layer("b", 20))
        fs.add_layer("a", _layer("a", 20))
        assert _numbers(fs, "a") == numbers
        assert not set(_numbers(fs, "b").values()) & set(numbers.values())


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        '{"version": 2, "slots": {}}',
        '{"version": 1, "slots": {"a": 1, "b": 1}}',
        '{"version": 1, "slots": {"a": 0}}',
        '{"version": 1, "slots": {"a": "1"}}',
        '{"version": 1}',
    ],
)
def test_a_table_that_cannot_be_trusted_is_refused_not_resumed(
    tmp_path: Path, content: str
) -> None:
    table = tmp_path / "fuse-inodes.json"
    table.write_text(content)
    with pytest.raises(InodeSlotsError):
        InodeSlots.resume(table)
    assert InodeSlots.fresh(table).slot("a") == 1  # a new connection starts over


def test_a_tree_larger_than_its_block_is_refused() -> None:
    inodes = InodeAllocator(first=10, limit=12)
    assert [inodes.take(), inodes.take()] == [10, 11]
    with pytest.raises(HostileLayerError, match="inode block"):
        inodes.take()
