"""A file table is a claim; the layer's own tar headers are the truth.

Someone who can push to a repository can push an index artifact for a digest-pinned
image whose span digests are all true while its file table lies: another file's data
under a name, a mode made setuid. Rows are checked against the tar header that precedes
each file's data in the verified stream before the data is first served; a lie makes
the artifact distrusted (EIO for its layer, a plain pull for the next image that refers
to it). The units run on real tar streams; the end-to-end tests push a lying artifact
to the real registry and read through a real FUSE mount.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import gzip
import hashlib
import io
import json
import random
import subprocess
import sys
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent import metrics
from agent.fs.mount import FuseMount
from agent.fs.operations import LayerFS
from agent.layers.discovery import LayerDiscovery, NoAccelerationError
from agent.layers.distrust import DistrustedMetadata
from agent.layers.indexed_layer import IndexedLayer
from agent.layers.layer_audit import AuditStopped, audit_layer, first_difference
from agent.lazy_provider import layer_name
from converter.convert import ConvertOptions, convert_image
from fetcher import mediatypes as mt
from fetcher.chunk_cache import ChunkCache
from fetcher.chunks import BlobSource
from fetcher.read_path import ReadPath
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from formats import layer_index_codec
from formats.accelerated import ANNOTATION_CONVERSION, ARTIFACT_TYPE_INDEX
from formats.gzip_index import compress_window, decompress_window, inflate_range
from formats.header_check import HeaderMismatchError, check_header, member_end
from formats.layer_index_builder import build_layer_index
from formats.toc import MAX_EXTENDED_HEADER, HostileLayerError, TocEntry, iter_tar_entries
from rig.images import ImageSpec, build_image
from rig.layers import Directory, File, LayerSpec

SIZE = 150 << 10
FILES = {f"data/f{i}.bin": random.Random(i).randbytes(SIZE) for i in range(6)}


def _member(info: tarfile.TarInfo, data: bytes, gnu: bool = False) -> bytes:
    info.size, info.mode, info.uid, info.uname = len(data), 0o644, 1000, "app"
    info.mtime = info.mtime or 1_700_000_000
    return (
        info.tobuf(tarfile.GNU_FORMAT if gnu else tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        + data
        + b"\0" * (-len(data) % 512)
    )


def _tar() -> bytes:
    """A layer with the header shapes tar writers produce: ustar, pax long names and
    xattrs, GNU long names, links, empty files."""
    members = [_member(tarfile.TarInfo(name), data) for name, data in FILES.items()]
    long_pax = tarfile.TarInfo("deep/" + "d" * 120 + "/file.txt")
    long_pax.pax_headers = {"SCHILY.xattr.user.k": "v", "mtime": "1700000000.25"}
    members.append(_member(long_pax, b"pax named\n"))
    members.append(_member(tarfile.TarInfo("empty"), b""))
    link = tarfile.TarInfo("data/link")
    link.type, link.linkname = tarfile.LNKTYPE, "data/f0.bin"
    members.append(_member(link, b""))
    sym = tarfile.TarInfo("sym")
    sym.type, sym.linkname = tarfile.SYMTYPE, "data/f1.bin"
    members.append(_member(sym, b""))
    members.append(_member(tarfile.TarInfo("gnu/" + "g" * 150), b"gnu!\n", gnu=True))
    directory = tarfile.TarInfo("data")
    directory.type = tarfile.DIRTYPE
    members.append(_member(directory, b""))
    return b"".join(members) + b"\0" * 1024


def _rows(stream: bytes) -> list[TocEntry]:
    return [entry for entry, _, _ in iter_tar_entries(io.BytesIO(stream))]


def _chain(stream: bytes, rows: list[TocEntry], number: int) -> bytes:
    start = member_end(rows[number - 1].offset + rows[number - 1].size) if number else 0
    return stream[start : rows[number].offset]


def test_every_row_of_a_real_tar_matches_its_header():
    stream = _tar()
    rows = _rows(stream)
    files = [i for i, row in enumerate(rows) if row.type == "reg" and row.size]
    assert len(files) >= len(FILES) + 2
    for number in files:
        check_header(_chain(stream, rows, number), rows[number])


@pytest.mark.parametrize(
    "lie",
    [
        {"name": "bin/sudo"},
        {"mode": 0o4755},
        {"uid": 0},
        {"gid": 42},
        {"uname": "root"},
        {"mtime": 0.0},
        {"size": SIZE - 1},
        {"xattrs": {"security.capability": b"\x01"}},
    ],
    ids=lambda lie: next(iter(lie)),
)
def test_a_row_that_lies_about_its_file_is_caught(lie):
    stream = _tar()
    rows = _rows(stream)
    number = 2
    with pytest.raises(HeaderMismatchError):
        check_header(_chain(stream, rows, number), dataclasses.replace(rows[number], **lie))


def test_a_row_pointing_at_another_files_data_is_caught():
    """Swap two same-sized files' offsets: each row's "headers" are then the other's."""
    stream = _tar()
    rows = _rows(stream)
    swapped = list(rows)
    swapped[1] = dataclasses.replace(rows[1], offset=rows[3].offset)
    swapped[3] = dataclasses.replace(rows[3], offset=rows[1].offset)
    for number in (1, 3):
        start = member_end(swapped[number - 1].offset + swapped[number - 1].size)
        chain = stream[start : swapped[number].offset] if start < swapped[number].offset else b""
        with pytest.raises(HeaderMismatchError):
            check_header(chain, swapped[number])


def test_bytes_that_are_no_header_chain_are_caught():
    stream = _tar()
    rows = _rows(stream)
    chain = _chain(stream, rows, 2)
    for bogus in (b"", chain[:511], chain + b"\0" * 512, FILES["data/f0.bin"][:1024]):
        with pytest.raises(HeaderMismatchError):
            check_header(bogus, rows[2])


def test_an_oversized_pax_record_is_refused_before_it_is_read():
    """tarfile reads an extended record whole: the cap applies before it does."""
    info = tarfile.TarInfo("big")
    info.pax_headers = {"comment": "x" * (MAX_EXTENDED_HEADER + 1)}
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(HostileLayerError, match="extended tar header"):
        _rows(out.getvalue())


def test_a_chain_of_extended_headers_is_bounded():
    """Global pax headers one after another: each small, the chain refused as a whole."""
    out = io.BytesIO()
    for _ in range(40):
        record = b"30 comment=" + b"c" * 16 + b"\n"
        header = tarfile.TarInfo("pax_global_header")
        header.type, header.size = tarfile.XGLTYPE, len(record)
        out.write(header.tobuf(tarfile.USTAR_FORMAT))
        out.write(record + b"\0" * (-len(record) % 512))
    out.write(tarfile.TarInfo("file").tobuf(tarfile.USTAR_FORMAT) + b"\0" * 1024)
    with pytest.raises(HostileLayerError, match="extended tar header"):
        _rows(out.getvalue())


# -- end to end: a lying artifact in a real registry, read through a real FUSE mount --


def _spec() -> ImageSpec:
    data: list[Directory | File] = [Directory("data")]
    data += [File(path, content) for path, content in FILES.items()]
    return ImageSpec(layers=(LayerSpec(data),))


async def _push_lying_index(client: RegistryClient, ref: ImageReference, subject: str) -> str:
    """Add an index artifact whose table lies and that claims a newer converter format,
    so that discovery prefers it (all that push rights take: new blobs and manifests
    under their own digests); the lying index's digest."""
    (honest_desc,) = await client.referrers(ref, subject, ARTIFACT_TYPE_INDEX)
    honest = await client.get_manifest(ref.with_digest(honest_desc.digest))
    doc = json.loads(honest.body)
    blob_desc = doc["layers"][0]
    index = layer_index_codec.parse(await client.get_blob(ref, blob_desc["digest"], 1 << 26))
    rows = {entry.name: i for i, entry in enumerate(index.entries)}
    a, b = rows["data/f1.bin"], rows["data/f3.bin"]
    entries = list(index.entries)
    entries[a] = dataclasses.replace(entries[a], offset=index.entries[b].offset)
    entries[b] = dataclasses.replace(entries[b], offset=index.entries[a].offset)
    entries.sort(key=lambda entry: entry.offset)  # the format stores offsets as gaps
    lying = layer_index_codec.serialize(
        dataclasses.replace(index, entries=entries, source_digest="")
    )
    digest = await client.push_blob(ref, lying)
    blob_desc.update(digest=digest, size=len(lying))
    settings = json.loads(doc["annotations"][ANNOTATION_CONVERSION])
    doc["annotations"][ANNOTATION_CONVERSION] = json.dumps({**settings, "format": 1 << 20})
    await client.push_referrer(ref, json.dumps(doc).encode(), mt.OCI_MANIFEST)
    return digest


@pytest.fixture
async def lying_image(registry, image_pusher, tmp_path):
    built = await asyncio.to_thread(build_image, _spec(), tmp_path / "layout", "lying")
    image = await image_pusher.push(built)
    ref = ImageReference.parse(image.reference)
    async with RegistryClient() as client:
        await convert_image(client, ref, ConvertOptions(span=64 << 10))
        artifact = await _push_lying_index(client, ref, image.digest)
    return image, built.layers[0].digest, artifact


@pytest.fixture
async def node(tmp_path) -> AsyncIterator[tuple[LayerFS, FuseMount, LayerDiscovery]]:
    async with RegistryClient() as client:
        cache = ChunkCache(tmp_path / "cache", 1 << 30)
        read_path = ReadPath.build(client, cache)
        distrust = DistrustedMetadata(tmp_path / "distrusted.json")
        fs = LayerFS(read_path.reader, distrust=distrust)
        mount = await FuseMount.new(fs, tmp_path / "mnt")
        try:
            yield fs, mount, LayerDiscovery(client, distrust=distrust)
        finally:
            await mount.stop()
            await read_path.close()


def _read(path: Path) -> bytes | int:
    try:
        return path.read_bytes()
    except OSError as exc:
        return exc.errno or -1


async def test_a_lying_table_gets_eio_never_another_files_bytes(lying_image, node, tmp_path):
    (image, blob, artifact), (fs, mount, discovery) = lying_image, node
    found = await discovery.discover(image.reference, image.digest, blob)
    name = layer_name(found.layer)
    fs.add_layer(name, found.layer)
    counted = metrics.DISTRUSTED_METADATA.labels("index")._value.get()

    # Off the loop: this process's event loop is the FUSE server.
    first = await asyncio.to_thread(_read, mount.mountpoint / name / "data/f1.bin")
    assert first == errno.EIO, "a file was served under another file's row"
    assert metrics.DISTRUSTED_METADATA.labels("index")._value.get() == counted + 1
    # One lie condemns the artifact: even files whose rows are true are refused now.
    honest_row = await asyncio.to_thread(_read, mount.mountpoint / name / "data/f0.bin")
    assert honest_row == errno.EIO

    # The next pull of an image that refers to it takes another form (here the honest
    # artifact the converter pushed), also after a restart: the verdict is on disk.
    again = await LayerDiscovery(discovery.client, distrust=discovery.distrust).discover(
        image.reference, image.digest, blob
    )
    assert again.layer.metadata_digest != artifact
    fs.add_layer(layer_name(again.layer), again.layer)
    for path, content in FILES.items():
        got = await asyncio.to_thread(_read, mount.mountpoint / layer_name(again.layer) / path)
        assert got == content, path
    for _ in range(50):
        if (tmp_path / "distrusted.json").exists():
            break
        await asyncio.sleep(0.05)
    assert DistrustedMetadata(tmp_path / "distrusted.json").reason(artifact) is not None


async def test_an_honest_table_serves_every_file(registry, image_pusher, tmp_path, node):
    fs, mount, discovery = node
    built = await asyncio.to_thread(build_image, _spec(), tmp_path / "layout", "honest")
    image = await image_pusher.push(built)
    async with RegistryClient() as client:
        await convert_image(client, ImageReference.parse(image.reference), ConvertOptions())
    found = await discovery.discover(image.reference, image.digest, built.layers[0].digest)
    name = layer_name(found.layer)
    fs.add_layer(name, found.layer)
    for path, content in FILES.items():
        got = await asyncio.to_thread(_read, mount.mountpoint / name / path)
        assert got == content, path


async def test_a_distrusted_index_and_no_other_form_means_a_plain_pull(
    registry, image_pusher, tmp_path, node
):
    _, _, discovery = node
    built = await asyncio.to_thread(build_image, _spec(), tmp_path / "layout", "only")
    image = await image_pusher.push(built)
    ref = ImageReference.parse(image.reference)
    async with RegistryClient() as client:
        await convert_image(client, ref, ConvertOptions())
        (artifact,) = await client.referrers(ref, image.digest, ARTIFACT_TYPE_INDEX)
        manifest = await client.get_manifest(ref.with_digest(artifact.digest))
    index_digest = json.loads(manifest.body)["layers"][0]["digest"]
    discovery.distrust.mark(index_digest, "index", "test", "caught lying earlier")
    with pytest.raises(NoAccelerationError) as refused:
        await discovery.discover(image.reference, image.digest, built.layers[0].digest)
    assert refused.value.reason == "distrusted-metadata"


_HUGE_PAX_CHILD = """
import io, sys, tarfile
from formats.toc import HostileLayerError, iter_tar_entries

class Stream(io.RawIOBase):
    '''A pax header announcing 300 MB of records, then zeros, made as it is read.'''
    def __init__(self):
        header = tarfile.TarInfo("././@PaxHeader")
        header.type, header.size = tarfile.XHDTYPE, 300 << 20
        self.head, self.left = header.tobuf(tarfile.USTAR_FORMAT), 300 << 20
    def readable(self):
        return True
    def readinto(self, buffer):
        if self.head:
            n = min(len(buffer), len(self.head))
            buffer[:n], self.head = self.head[:n], self.head[n:]
            return n
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n

try:
    list(iter_tar_entries(io.BufferedReader(Stream())))
    print("accepted")
except HostileLayerError as exc:
    # VmHWM, not ru_maxrss: that counts the parent's pages the child had before exec.
    with open("/proc/self/status") as status:
        peak = next(line for line in status if line.startswith("VmHWM:")).split()[1]
    print("refused", int(peak) // 1024)
"""


def test_a_huge_pax_header_is_refused_in_bounded_memory():
    """A 300 MB pax record once took the converter's tar walk to 827 MB."""
    result = subprocess.run(
        [sys.executable, "-c", _HUGE_PAX_CHILD], capture_output=True, text=True, check=True
    )
    verdict, _, peak_mib = result.stdout.strip().partition(" ")
    assert verdict == "refused", result.stdout + result.stderr
    assert int(peak_mib) < 128, f"peak RSS {peak_mib} MiB"


async def test_an_artifact_deleted_from_the_referrers_list_does_not_hide_the_others(
    registry, image_pusher, tmp_path, node
):
    """The tag-schema list is edited by clients: after a deletion it still names the
    deleted artifact, and discovery must go on to the ones that remain."""
    fs, mount, discovery = node
    built = await asyncio.to_thread(build_image, _spec(), tmp_path / "layout", "stale")
    image = await image_pusher.push(built)
    ref = ImageReference.parse(image.reference)
    async with RegistryClient() as client:
        await convert_image(client, ref, ConvertOptions())
        (first,) = await client.referrers(ref, image.digest, ARTIFACT_TYPE_INDEX)
        await convert_image(client, ref, ConvertOptions(span=64 << 10))
        await client.delete_manifest(ref.with_digest(first.digest))
        listed = await client.referrers(ref, image.digest, ARTIFACT_TYPE_INDEX)
    assert first.digest in {d.digest for d in listed} and len(listed) == 2
    found = await discovery.discover(image.reference, image.digest, built.layers[0].digest)
    name = layer_name(found.layer)
    fs.add_layer(name, found.layer)
    for path, content in FILES.items():
        assert await asyncio.to_thread(_read, mount.mountpoint / name / path) == content


# -- the whole table against the whole stream, once the fill has brought the layer --


def test_the_whole_table_of_a_real_tar_matches_and_each_kind_of_lie_is_found():
    stream = _tar()
    rows = _rows(stream)
    assert first_difference(rows, io.BytesIO(stream)) is None
    lies = {
        "symlink target": [
            dataclasses.replace(r, link_name="/etc/shadow") if r.type == "symlink" else r
            for r in rows
        ],
        "hardlink mode": [
            dataclasses.replace(r, mode=0o4755) if r.type == "hardlink" else r for r in rows
        ],
        "directory mode": [
            dataclasses.replace(r, mode=0o777) if r.type == "dir" else r for r in rows
        ],
        "a row missing": rows[:-1],
        "a row too many": [*rows, dataclasses.replace(rows[0], name="extra", offset=len(stream))],
    }
    for lie, table in lies.items():
        assert first_difference(table, io.BytesIO(stream)) is not None, lie


async def _audited(
    client: RegistryClient, layer: IndexedLayer, cache: ChunkCache, wanted: bool = True
) -> str | None:
    stream = client.iter_blob(layer.blob.ref, layer.blob.digest)
    verdict, downloaded = await audit_layer(layer, stream, cache, lambda: wanted)
    assert verdict is not None or downloaded == layer.blob.size, (verdict, downloaded)
    return verdict


def _forged_window(layer: IndexedLayer, blob: bytes) -> IndexedLayer:
    """The index of ``layer`` with one span's stored window changed and that span's
    digest signed again to match: every claim checks out, the bytes are not the layer's."""
    index = layer.index
    number = next(i for i, w in enumerate(index.windows) if i and decompress_window(w))
    window = decompress_window(index.windows[number])
    forged = bytes(b ^ 0x55 for b in window)
    start, end = index.span_range(number)
    plan = index.plan_read(start, end - start)
    point = index.checkpoints[number]
    output = inflate_range(
        point, forged, blob[plan.fetch_start : plan.fetch_end], start, end - start
    )
    windows = list(index.windows)
    windows[number] = compress_window(forged)
    digests = list(index.span_digests)
    digests[number] = hashlib.sha256(output).digest()
    lying = dataclasses.replace(
        index,
        windows=windows,
        span_digests=digests,
        piece_size=0,
        piece_digests=[],
        piece_ends=[],
        source_digest="",
    )
    return IndexedLayer(layer.blob, lying)


async def test_the_fill_audits_a_layer_against_its_own_blob(registry, image_pusher, tmp_path):
    """The fill streams the blob once, from its start: the spans it checks and caches,
    and the rows it walks, are the layer's own. What no read can check (a directory's
    mode, a forged window whose span is signed again) is caught there. Real registry."""
    spec = ImageSpec(
        layers=(LayerSpec([Directory("etc"), *[File(p, c) for p, c in FILES.items()]]),)
    )
    built = await asyncio.to_thread(build_image, spec, tmp_path / "layout", "audit")
    image = await image_pusher.push(built)
    ref = ImageReference.parse(image.reference)
    async with RegistryClient() as client:
        await convert_image(client, ref, ConvertOptions(span=64 << 10))
        found = await LayerDiscovery(client).discover(
            image.reference, image.digest, built.layers[0].digest
        )
        honest = found.layer
        assert isinstance(honest, IndexedLayer)
        cache = ChunkCache(tmp_path / "cache", 1 << 30)
        assert await _audited(client, honest, cache) is None
        assert all(cache.contains(honest.blob.digest, c.key) for c in honest.all_chunks())
        some_file = next(e for e in honest.entries if e.type == "reg" and e.size)
        assert honest.header_plan(some_file, 0, 1) == []  # audited: nothing left to read

        index = honest.index
        lying_dir = dataclasses.replace(
            index,
            entries=[
                dataclasses.replace(e, mode=0o777) if e.name == "etc" else e for e in index.entries
            ],
            source_digest="",
        )
        fresh = ChunkCache(tmp_path / "fresh", 1 << 30)
        verdict = await _audited(client, IndexedLayer(honest.blob, lying_dir), fresh)
        assert verdict is not None and "'etc'" in verdict

        blob = await client.get_blob(ref, honest.blob.digest, 1 << 26)
        forged = _forged_window(honest, blob)
        verdict = await _audited(client, forged, fresh)
        assert verdict is not None and "span" in verdict

        with pytest.raises(AuditStopped):
            await _audited(client, IndexedLayer(honest.blob, lying_dir), fresh, wanted=False)


def _indexed(stream: bytes, entries: list[TocEntry] | None = None) -> IndexedLayer:
    blob = gzip.compress(stream)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    index = build_layer_index(
        [blob], layer_digest=digest, media_type=mt.OCI_LAYER_GZIP, span=64 << 10
    )
    if entries is not None:
        index.entries = entries
    source = BlobSource(ImageReference.parse("127.0.0.1:5000/app:1"), digest, len(blob))
    return IndexedLayer(source, index)


def test_a_row_with_no_room_for_its_header_is_a_lie_before_anything_is_fetched():
    stream = _tar()
    honest = _indexed(stream)
    rows = list(honest.entries)
    number = next(i for i, row in enumerate(rows) if i and row.type == "reg" and row.size)
    assert honest.header_plan(rows[number], 0, 1)  # the header lies before the data
    previous = rows[number - 1]
    rows[number] = dataclasses.replace(rows[number], offset=previous.offset + previous.size)
    lying = _indexed(stream, rows)
    with pytest.raises(HeaderMismatchError, match="no tar header chain"):
        lying.header_plan(rows[number], 0, 1)
    lying.expect_reads([(rows[number], 0, 1)])  # prefetch plans nothing, raises nothing
