"""The converter's prefetch list, as the agent turns it into chunks of a mounted layer:
files by name, directories (written with a trailing `/`) with everything below them,
by the same rule as a learned profile's entries."""

from __future__ import annotations

import gzip
import hashlib
import io
import random
import tarfile
import time

from agent.fs.operations import MountedLayer
from agent.fs.tree import InodeAllocator, LayerTree
from agent.layers.indexed_layer import IndexedLayer
from agent.lazy_provider import prefetch_chunks
from agent.profile_prefetch import node_chunks
from fetcher.chunks import BlobSource, ChunkSpec
from fetcher.mediatypes import OCI_LAYER_GZIP
from fetcher.reference import ImageReference
from formats.layer_index import build_layer_index

SPAN = 64 * 1024


def _mounted() -> MountedLayer:
    """A real index-only layer of incompressible files and small spans, so files fall
    in different chunks."""
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
    )
    source = BlobSource(ImageReference.parse("127.0.0.1:5000/app:1"), digest, len(blob))
    layer = IndexedLayer(source, index)
    return MountedLayer("layer", layer, LayerTree(layer.entries, InodeAllocator()), time.time())


def _keys(chunks: list[ChunkSpec]) -> list[str]:
    return [chunk.key for chunk in chunks]


def _of(mounted: MountedLayer, *paths: str) -> list[str]:
    keys: dict[str, None] = {}
    for path in paths:
        node = mounted.tree.lookup(path)
        assert node is not None
        keys.update(dict.fromkeys(_keys(node_chunks(mounted.layer, node))))
    return list(keys)


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
