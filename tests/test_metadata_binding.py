"""One blob, two metadata views: nothing derived from one may serve the other.

Two images can share a layer blob while their index artifacts lay its spans out
differently (converted with other settings), and anyone who can push to a repository
can add an index of their own. Cached spans and mounted trees are therefore named after
the index they came from. Real registry, converter, fetcher, chunk cache and FUSE mount.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.fs.mount import FuseMount
from agent.fs.operations import ROOT_TIMEOUT, LayerFS
from agent.layers.discovery import LayerDiscovery
from agent.layers.indexed_layer import IndexedLayer
from agent.lazy_provider import layer_name
from converter.convert import ConvertOptions, convert_image
from fetcher.chunk_cache import ChunkCache
from fetcher.read_path import ReadPath
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from formats.layer_index import LayerIndex
from rig.images import ImageSpec, build_image
from rig.layers import Directory, File, LayerSpec

FILES = {f"data/f{i}.bin": random.Random(i).randbytes(200 << 10) for i in range(6)}
SETUID_FILE = "data/f2.bin"


def _spec(top: str) -> ImageSpec:
    """Two images that share their data layer byte for byte and differ on top."""
    data: list[Directory | File] = [Directory("data")]
    data += [File(path, content) for path, content in FILES.items()]
    return ImageSpec(layers=(LayerSpec(data), LayerSpec([File("top.txt", top.encode())])))


class Node:
    """An agent's FUSE side in this process: cache, fetcher, mount, discovery."""

    def __init__(self, client: RegistryClient, root: Path) -> None:
        self.cache = ChunkCache(root / "cache", 1 << 30)
        self.read_path = ReadPath.build(client, self.cache)
        self.fs = LayerFS(self.read_path.reader)
        self.mountpoint = root / "mnt"
        self.discovery = LayerDiscovery(client)

    async def mount_layer(self, reference: str, manifest: str, layer: str) -> str:
        found = await self.discovery.discover(reference, manifest, layer)
        name = layer_name(found.layer)
        self.fs.add_layer(name, found.layer)
        return name

    def read_all(self, name: str) -> dict[str, bytes]:
        return {path: (self.mountpoint / name / path).read_bytes() for path in FILES}


@pytest.fixture
async def two_images(registry, image_pusher, tmp_path):
    """Image X converted with 64 KiB spans, image Y with 256 KiB spans: one data blob,
    two index artifacts."""
    pushed = []
    for top, span in (("x", 64 << 10), ("y", 256 << 10)):
        built = await asyncio.to_thread(build_image, _spec(top), tmp_path / "layout", top)
        image = await image_pusher.push(built)
        async with RegistryClient() as client:
            await convert_image(
                client, ImageReference.parse(image.reference), ConvertOptions(span=span)
            )
        pushed.append((image, built))
    assert pushed[0][1].layers[0].digest == pushed[1][1].layers[0].digest
    return pushed


@pytest.fixture
async def node(tmp_path) -> AsyncIterator[Node]:
    async with RegistryClient() as client:
        node = Node(client, tmp_path)
        mount = await FuseMount.new(node.fs, node.mountpoint)
        try:
            yield node
        finally:
            await mount.stop()
            await node.read_path.close()


async def test_a_cached_span_of_one_index_is_never_served_for_another(two_images, node):
    (x, x_built), (y, _) = two_images
    blob = x_built.layers[0].digest
    name_x = await node.mount_layer(x.reference, x.digest, blob)
    assert await asyncio.to_thread(node.read_all, name_x) == FILES
    await node.read_path.fetcher.wait_idle()
    assert node.cache.holds(blob)
    node.fs.remove_layer(name_x)  # its snapshot went; its cached spans stay
    await asyncio.sleep(ROOT_TIMEOUT + 0.5)  # the kernel forgets the mount root's entries

    name_y = await node.mount_layer(y.reference, y.digest, blob)
    assert await asyncio.to_thread(node.read_all, name_y) == FILES


async def test_a_tree_mounted_for_one_index_is_never_lent_to_another(two_images, node):
    (x, x_built), _ = two_images
    blob = x_built.layers[0].digest
    name_x = await node.mount_layer(x.reference, x.digest, blob)
    honest = node.fs.layer(name_x)
    assert honest is not None and isinstance(honest.layer, IndexedLayer)
    # The same blob's index as someone with push rights could rewrite it: one file setuid.
    index: LayerIndex = dataclasses.replace(
        honest.layer.index,
        entries=[
            dataclasses.replace(e, mode=0o4755) if e.name == SETUID_FILE else e
            for e in honest.layer.index.entries
        ],
        source_digest="",
    )
    hostile = IndexedLayer(honest.layer.blob, index)
    name_hostile = layer_name(hostile)
    node.fs.add_layer(name_hostile, hostile)

    assert name_hostile != name_x
    # stat off the loop: this process's event loop is the FUSE server
    mount = node.mountpoint
    mode_x = (await asyncio.to_thread(os.stat, mount / name_x / SETUID_FILE)).st_mode
    mode_hostile = (await asyncio.to_thread(os.stat, mount / name_hostile / SETUID_FILE)).st_mode
    assert not mode_x & stat.S_ISUID, "the honest image's file became setuid"
    assert mode_hostile & stat.S_ISUID
