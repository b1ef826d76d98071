"""Listing a large directory through the real FUSE mount: every entry, once, in order,
with each directory sorted once rather than for every page the kernel asks for."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.fs.mount import FuseMount
from agent.fs.operations import LayerFS
from agent.layers.indexed_layer import IndexedLayer
from fetcher.chunk_cache import ChunkCache
from fetcher.chunks import BlobSource
from fetcher.mediatypes import OCI_LAYER_TAR
from fetcher.read_path import ReadPath
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from formats.layer_index import LayerIndex
from formats.layer_tree import InodeAllocator, LayerTree
from formats.toc import TocEntry

FILES = 40_000
"""As many as the directory whose `ls` once held the agent's event loop for 46 s."""


def _big_directory_layer() -> IndexedLayer:
    """A plain-tar layer of one directory with FILES empty files (metadata only: a
    listing reads no file data)."""
    entries = [TocEntry(name="big", type="dir", mode=0o755)]
    entries += [TocEntry(name=f"big/f{i:05d}", type="reg", size=0) for i in range(FILES)]
    size = 512 * (len(entries) + 2)
    index = LayerIndex(
        layer_digest="sha256:" + "2" * 64,
        media_type=OCI_LAYER_TAR,
        compressed_size=size,
        uncompressed_size=size,
        span_size=1 << 20,
        entries=entries,
    )
    ref = ImageReference.parse("127.0.0.1:1/unused/image:tag")
    return IndexedLayer(BlobSource(ref, index.layer_digest, size), index)


@pytest.fixture
async def mounted(tmp_path: Path) -> AsyncIterator[tuple[Path, IndexedLayer]]:
    async with RegistryClient() as client:
        cache = ChunkCache(tmp_path / "cache", 1 << 20)
        read_path = ReadPath.build(client, cache)
        fs = LayerFS(read_path.reader)
        layer = _big_directory_layer()
        fs.add_layer("layer", layer)
        mount = await FuseMount.new(fs, tmp_path / "mnt")
        try:
            yield tmp_path / "mnt" / "layer", layer
        finally:
            await mount.stop()
            await read_path.close()


async def test_a_large_directory_lists_every_entry_once_in_order(mounted) -> None:
    root, _ = mounted
    names = await asyncio.to_thread(os.listdir, root / "big")
    assert names == [f"f{i:05d}" for i in range(FILES)]
    again = await asyncio.to_thread(os.listdir, root / "big")
    assert again == names


def test_a_directory_is_sorted_once() -> None:
    tree = LayerTree(_big_directory_layer().entries, InodeAllocator())
    big = tree.lookup("big")
    assert big is not None
    listing = big.listing()
    assert big.listing() is listing
    assert [name for name, _ in listing] == sorted(big.children or {})
