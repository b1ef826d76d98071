"""Hard links whose target name is replaced later in the same layer, end to end: the
layer pushed to the real registry, converted (full eStargz, with and without a prefetch
list, and index-only), served through the real FUSE mount, and compared with what GNU
tar unpacks from the original layer (as is the eStargz blob itself, unpacked whole).
A link shares the inode its target name had when the link was written; a later file of
that name is a new inode, as unpacking gives it."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
from pathlib import Path

import pytest

from agent.fs.mount import FuseMount
from agent.fs.operations import LayerFS
from agent.layers.discovery import LayerDiscovery
from agent.lazy_provider import layer_name
from converter.convert import ConvertOptions, convert_image
from converter.prefetch import PrefetchList
from fetcher.chunk_cache import ChunkCache
from fetcher.read_path import ReadPath
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from rig.images import BuiltImage, ImageSpec, build_image
from rig.layers import Directory, Entry, File, Hardlink, LayerSpec, SparseishFile
from rig.rootfs_digest import describe_tree, tree_differences

SMALL = {"chunk_size": 256 << 10, "span": 1 << 20}

REPLACED_TARGETS: list[Entry] = [
    Directory("d", mtime=1_600_000_000),
    File("a", b"version one\n", mode=0o640, uid=1000, gid=1001, mtime=1_600_000_001),
    Hardlink("b", "a"),
    Hardlink("b2", "a"),
    Hardlink("c", "a"),
    File("big", SparseishFile(600 << 10, seed=1, data_every=64 << 10), mtime=1_600_000_002),
    Hardlink("big-link", "big"),
    File("d/x", b"inside d\n", mode=0o600, mtime=1_600_000_003),
    Hardlink("keep", "d/x"),
    # The replacements: each name above that a link was made to is now a new file.
    File("a", b"the second version, longer\n", mode=0o644, uid=2, mtime=1_700_000_001),
    Hardlink("f", "a"),
    File("big", SparseishFile(700 << 10, seed=2, data_every=64 << 10), mtime=1_700_000_002),
    File("c", b"c is a file of its own now\n", mtime=1_700_000_003),
    File("d", b"d is a file now\n", mtime=1_700_000_004),
]


@pytest.fixture(scope="module")
def built_replaced_targets(image_layout: Path) -> BuiltImage:
    spec = ImageSpec([LayerSpec(REPLACED_TARGETS)])
    return build_image(spec, image_layout, "hardlinks-replaced")


def _link_groups(root: Path) -> dict[str, tuple[int, tuple[str, ...]]]:
    """Per regular file: its link count and every path sharing its inode."""
    inodes: dict[tuple[int, int], list[str]] = {}
    counts: dict[str, int] = {}
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                rel = os.path.relpath(path, root)
                inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
                counts[rel] = st.st_nlink
    return {
        path: (counts[path], tuple(sorted(group))) for group in inodes.values() for path in group
    }


def _gnu_tar_unpack(blob: Path, target: Path) -> Path:
    """The layer as GNU tar unpacks it (owners kept: the tests run as root). A file
    that replaces a directory takes it with it, as containerd's unpack does."""
    target.mkdir()
    done = subprocess.run(
        ["tar", "--extract", "--gzip", "--same-owner", "--same-permissions",
         "--numeric-owner", "--recursive-unlink", "--file", str(blob), "--directory",
         str(target)],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert done.returncode == 0, f"GNU tar cannot unpack {blob.name}: {done.stderr}"
    return target


# With a prefetch list, the converter pulls the named entries ahead of the rest; the
# replacements must still come after the links made to the names they replace.
PREFETCH = PrefetchList.parse_lines(["/a", "/big", "/d"])


@pytest.mark.parametrize(
    ("mode", "prefetch"),
    [("full", PrefetchList(())), ("full", PREFETCH), ("index", PrefetchList(()))],
    ids=["full", "full-prefetch", "index"],
)
async def test_links_to_replaced_names_serve_what_gnu_tar_unpacks(
    mode, prefetch, image_pusher, built_replaced_targets, tmp_path
):
    built = built_replaced_targets
    (layer,) = built.layers
    reference = _gnu_tar_unpack(built.blob_path(layer.digest), tmp_path / "reference")
    expected, expected_links = describe_tree(reference), _link_groups(reference)
    # What the test stands on: GNU tar links the first "a", and the later one is apart.
    assert (reference / "b").read_bytes() == b"version one\n"
    assert expected_links["b"] == (2, ("b", "b2"))
    assert expected_links["a"] == (2, ("a", "f"))

    pushed = await image_pusher.push(built)
    ref = ImageReference.parse(pushed.reference)
    async with RegistryClient() as client:
        result = await convert_image(
            client, ref, ConvertOptions(mode=mode, prefetch=prefetch, **SMALL)
        )
        (converted,) = result.platforms[0].layers
        if converted.estargz is not None:  # still a layer any runtime can pull and unpack
            blob = tmp_path / "converted.estargz"
            await client.download_blob(ref, converted.estargz.blob_digest, blob)
            unpacked = _gnu_tar_unpack(blob, tmp_path / "converted")
            for marker in ("stargz.index.json", ".prefetch.landmark", ".no.prefetch.landmark"):
                (unpacked / marker).unlink(missing_ok=True)
            problems = tree_differences(expected, describe_tree(unpacked))
            assert problems == [], "\n".join(problems)
            assert _link_groups(unpacked) == expected_links
        cache = ChunkCache(tmp_path / "cache", 1 << 30)
        read_path = ReadPath.build(client, cache)
        fs = LayerFS(read_path.reader)
        mount = await FuseMount.new(fs, tmp_path / "mnt")
        try:
            found = await LayerDiscovery(client).discover(str(ref), built.digest, layer.digest)
            assert found.layer.kind == ("estargz" if mode == "full" else "index")
            name = layer_name(found.layer)
            fs.add_layer(name, found.layer)
            served = tmp_path / "mnt" / name
            actual = await asyncio.to_thread(describe_tree, served)
            actual_links = await asyncio.to_thread(_link_groups, served)
        finally:
            await mount.stop()
            await read_path.close()
    problems = tree_differences(expected, actual)
    assert problems == [], "\n".join(problems)
    assert actual_links == expected_links
