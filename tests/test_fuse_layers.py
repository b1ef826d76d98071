"""Lazy layers through the real FUSE mount, stacked by the real overlayfs, compared with
what containerd's own overlayfs snapshotter unpacks for the same image."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from pathlib import Path

import pytest

from agent.fs.mount import FuseMount
from agent.fs.operations import LayerFS
from agent.layers.discovery import LayerDiscovery
from agent.lazy_provider import layer_name
from converter.convert import ConvertOptions, convert_image
from fetcher.chunk_cache import ChunkCache
from fetcher.read_path import ReadPath
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from rig.rootfs_digest import describe_tree, tree_differences
from rig.snapshot_view import image_chain_id, mounted_view

SMALL = {"chunk_size": 256 << 10, "span": 1 << 20}


@contextlib.contextmanager
def overlay(lowerdirs: list[Path], target: Path):
    target.mkdir(parents=True, exist_ok=True)
    options = "lowerdir=" + ":".join(str(d) for d in lowerdirs)
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", options, str(target)],
        check=True,
        capture_output=True,
        text=True,
    )
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=False)


@pytest.fixture(scope="module")
def reference_tree(containerd, pushed_features, tmp_path_factory):
    """The feature image as containerd's overlayfs snapshotter unpacks it."""
    containerd.ctr("images", "pull", "--plain-http", pushed_features.reference)
    top = image_chain_id(pushed_features.built.config_bytes)
    with mounted_view(containerd, top, tmp_path_factory.mktemp("reference")) as root:
        return describe_tree(root)


@pytest.mark.parametrize("mode", ["index", "full"])
async def test_lazy_rootfs_equals_overlayfs_unpack(
    mode, image_pusher, built_features, reference_tree, tmp_path
):
    pushed = await image_pusher.push(built_features)
    ref = ImageReference.parse(pushed.reference)
    async with RegistryClient() as client:
        await convert_image(client, ref, ConvertOptions(mode=mode, **SMALL))
        cache = ChunkCache(tmp_path / "cache", 1 << 30)
        read_path = ReadPath.build(client, cache)
        fs = LayerFS(read_path.reader)
        mount = await FuseMount.new(fs, tmp_path / "mnt")
        try:
            discovery = LayerDiscovery(client)
            names = []
            for layer in built_features.layers:
                found = await discovery.discover(str(ref), built_features.digest, layer.digest)
                assert found.layer.kind == ("estargz" if mode == "full" else "index")
                name = layer_name(found.layer)
                fs.add_layer(name, found.layer)
                names.append(name)
            lowers = [tmp_path / "mnt" / n for n in reversed(names)]

            def walk() -> dict:
                with overlay(lowers, tmp_path / "rootfs") as root:
                    return describe_tree(root)

            ours = await asyncio.to_thread(walk)
            problems = tree_differences(reference_tree, ours)
            assert problems == [], "\n".join(problems)
            assert read_path.stats.requests, "nothing was fetched lazily"
        finally:
            await mount.stop()
            await read_path.close()
