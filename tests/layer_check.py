"""Compare a lazily readable layer with the original layer tar, file by file.

Used by converter and agent tests: every regular file's bytes read back through the
layer's chunks (fetched by HTTP Range from the real registry and verified) and every
entry's metadata must equal what tarfile reads from the original blob.
"""

from __future__ import annotations

import gzip
import tarfile
from pathlib import Path

import zstandard

from agent.layers.lazy_layer import LazyLayer
from fetcher import mediatypes as mt
from fetcher.registry import RegistryClient
from formats.toc import entry_from_tarinfo

META_FIELDS = ("type", "mode", "uid", "gid", "link_name", "dev_major", "dev_minor", "xattrs")


def original_entries(blob: Path, media_type: str) -> dict[str, tuple[dict[str, object], bytes]]:
    """name -> (metadata, content) of the original layer (last entry of a name wins)."""
    raw = blob.read_bytes()
    if media_type in mt.GZIP_LAYERS:
        raw = gzip.decompress(raw)
    elif media_type in mt.ZSTD_LAYERS:
        raw = zstandard.ZstdDecompressor().stream_reader(raw).read()
    out: dict[str, tuple[dict[str, object], bytes]] = {}
    import io

    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        for info in tar:
            entry = entry_from_tarinfo(info)
            data = tar.extractfile(info).read() if info.isreg() else b""  # type: ignore[union-attr]
            meta = {f: getattr(entry, f) for f in META_FIELDS}
            meta["mtime"] = int(entry.mtime)
            out[entry.name] = (meta, data)
    return out


async def read_file(client: RegistryClient, layer: LazyLayer, name: str, size: int) -> bytes:
    """A file's bytes through the layer's read plan, each chunk range-fetched + verified."""
    entry = next(e for e in reversed(layer.entries) if e.name == name)
    parts = []
    for piece in layer.read_plan(entry, 0, size):
        fetched = await client.get_range(
            layer.blob.ref,
            layer.blob.digest,
            piece.chunk.fetch_start,
            piece.chunk.fetch_end - piece.chunk.fetch_start,
        )
        parts.append(piece.chunk.decode(fetched)[piece.start : piece.start + piece.length])
    return b"".join(parts)


async def assert_layer_matches(
    client: RegistryClient, layer: LazyLayer, original: Path, media_type: str
) -> int:
    """Assert every entry's metadata and bytes match; return the number of files read."""
    expected = original_entries(original, media_type)
    served = {e.name: e for e in layer.entries}
    assert set(served) == set(expected), set(served) ^ set(expected)
    files = 0
    for name, (meta, data) in expected.items():
        entry = served[name]
        got = {f: getattr(entry, f) for f in META_FIELDS}
        got["mtime"] = int(entry.mtime)
        assert got == meta, name
        if entry.type == "reg":
            assert entry.size == len(data), name
            assert await read_file(client, layer, name, entry.size) == data, name
            files += 1
    return files
