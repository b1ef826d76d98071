"""Both conversion modes against the real registry: round trips, refusals, idempotence."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import tarfile
import zlib

import msgpack
import pytest

from agent.layers.discovery import EarlyLayer, LayerDiscovery, NoAccelerationError, open_estargz
from agent.layers.indexed_layer import IndexedLayer
from common.digest import sha256_digest
from converter import convert as convert_module
from converter.convert import ConvertOptions, convert_image
from converter.errors import ConversionError
from converter.prefetch import PrefetchList
from fetcher import mediatypes as mt
from fetcher.chunks import BlobSource
from fetcher.errors import NotFoundError
from fetcher.manifest import ImageIndex, ImageManifest
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient, referrers_tag
from formats import layer_index_codec
from formats.accelerated import (
    ANNOTATION_LAYER_DIGEST,
    ANNOTATION_PREFETCH,
    ANNOTATION_SOURCE_DIGEST,
    ARTIFACT_TYPE_INDEX,
)
from formats.estargz import TOC_DIGEST_ANNOTATION
from rig.images import HELLO_PATH, ImageSpec, build_image
from rig.layers import File, LayerSpec
from tests.layer_check import assert_layer_matches

SMALL = {"chunk_size": 256 << 10, "span": 1 << 20}


async def _tags(client: RegistryClient, ref: ImageReference) -> list[str]:
    try:
        return await client.list_tags(ref)
    except NotFoundError:
        return []


async def test_index_mode_round_trip(pushed_features, registry):
    ref = ImageReference.parse(pushed_features.reference)
    built = pushed_features.built
    async with RegistryClient() as client:
        result = await convert_image(client, ref, ConvertOptions(mode="index", **SMALL))
        assert not result.skipped
        # A stored window per span and 36 bytes per 64 KiB piece: a few % of a small image.
        assert result.output_bytes < 0.03 * result.source_bytes
        artifact = (await client.get_manifest(result.target)).parsed
        assert isinstance(artifact, ImageManifest)
        assert artifact.artifact_type == ARTIFACT_TYPE_INDEX
        assert artifact.subject is not None and artifact.subject.digest == built.digest
        found = await client.referrers(ref, built.digest, ARTIFACT_TYPE_INDEX)
        assert [d.digest for d in found] == [result.result_digest]
        for desc, source in zip(artifact.layers, built.layers, strict=True):
            assert desc.annotations[ANNOTATION_LAYER_DIGEST] == source.digest
            index = layer_index_codec.parse(await client.get_blob(ref, desc.digest))
            layer = IndexedLayer(BlobSource(ref, source.digest, source.size), index)
            await assert_layer_matches(
                client, layer, built.blob_path(source.digest), source.media_type
            )
        again = await convert_image(client, ref, ConvertOptions(mode="index", **SMALL))
        assert again.skipped and again.result_digest == result.result_digest


async def test_a_conversion_is_reused_only_with_the_same_settings(pushed_features):
    ref = ImageReference.parse(pushed_features.reference)
    async with RegistryClient() as client:
        first = await convert_image(client, ref, ConvertOptions(mode="full", **SMALL))
        same = await convert_image(client, ref, ConvertOptions(mode="full", **SMALL))
        assert same.skipped and same.result_digest == first.result_digest
        packed = ConvertOptions(mode="full", chunk_size=SMALL["chunk_size"], min_chunk_size=0)
        redone = await convert_image(client, ref, packed)
        assert not redone.skipped and redone.result_digest != first.result_digest
        listed = PrefetchList.parse_lines([HELLO_PATH])
        with_list = ConvertOptions(mode="full", prefetch=listed, **SMALL)
        assert not (await convert_image(client, ref, with_list)).skipped


async def test_a_reconversion_by_a_newer_converter_is_the_one_served(
    image_pusher, built_features, monkeypatch
):
    """Registries keep every index artifact pushed for an image: after a newer
    converter redoes a conversion, the agent must serve the newer one (spans in pieces),
    whichever the referrers list names first."""
    pushed = await image_pusher.push(built_features)
    ref = ImageReference.parse(pushed.reference)
    built = pushed.built
    async with RegistryClient() as client:
        monkeypatch.setattr(convert_module, "CONVERTER_FORMAT", convert_module.CONVERTER_FORMAT - 1)
        older = await convert_image(client, ref, ConvertOptions(mode="index", span=2 << 20))
        monkeypatch.undo()
        newer = await convert_image(client, ref, ConvertOptions(mode="index", span=1 << 20))
        assert not newer.skipped and newer.result_digest != older.result_digest
        assert len(await client.referrers(ref, built.digest, ARTIFACT_TYPE_INDEX)) == 2
        for source in built.layers:
            found = await LayerDiscovery(client).discover(str(ref), built.digest, source.digest)
            assert isinstance(found.layer, IndexedLayer)
            assert found.layer.index.span_size == 1 << 20


async def test_full_mode_round_trip_and_discovery(pushed_features):
    ref = ImageReference.parse(pushed_features.reference)
    built = pushed_features.built
    async with RegistryClient() as client:
        result = await convert_image(client, ref, ConvertOptions(mode="full", **SMALL))
        manifest = (await client.get_manifest(result.target)).parsed
        assert isinstance(manifest, ImageManifest)
        assert manifest.annotations[ANNOTATION_SOURCE_DIGEST] == built.digest
        assert result.output_bytes <= 1.10 * result.source_bytes
        config = json.loads(await client.get_blob(ref, manifest.config.digest))
        assert len(config["rootfs"]["diff_ids"]) == len(manifest.layers)
        for desc, source in zip(manifest.layers, built.layers, strict=True):
            blob = BlobSource(result.target, desc.digest, desc.size)
            layer = await open_estargz(client, blob, desc.annotations[TOC_DIGEST_ANNOTATION])
            await assert_layer_matches(
                client, layer, built.blob_path(source.digest), source.media_type
            )
        # The agent finds the twin for the original image's layers.
        discovery = LayerDiscovery(client)
        source_layer = built.layers[1]
        found = await discovery.discover(str(ref), built.digest, source_layer.digest)
        assert found.layer.kind == "estargz"
        assert found.layer.blob.digest == manifest.layers[1].digest


async def test_the_layers_above_are_looked_up_while_the_first_is_prepared(
    pushed_features, registry
):
    """containerd prepares layers one by one; the agent must not wait for each Prepare
    to start fetching that layer's index."""
    ref = ImageReference.parse(pushed_features.reference)
    built = pushed_features.built
    assert len(built.layers) >= 2
    async with RegistryClient() as client:
        result = await convert_image(client, ref, ConvertOptions(mode="index", **SMALL))
        artifact = (await client.get_manifest(result.target)).parsed
        index_blobs = {f"/blobs/{desc.digest}" for desc in artifact.layers}
        discovery = LayerDiscovery(client)
        earlier = len(registry.requests())  # other tests of this image read its indexes too
        first = await discovery.discover(str(ref), built.digest, built.layers[0].digest)
        assert first.layer.kind == "index"
        for _ in range(200):  # the background lookups finish on their own
            gets = [r.path for r in registry.requests()[earlier:] if r.method == "GET"]
            fetched = {b for b in index_blobs if any(path.endswith(b) for path in gets)}
            if fetched == index_blobs:
                break
            await asyncio.sleep(0.05)
        assert fetched == index_blobs
        before = len(registry.requests())
        for source in built.layers[1:]:
            found = await discovery.discover(str(ref), built.digest, source.digest)
            assert found.layer.kind == "index"
            assert found.layer.blob.digest == source.digest
        assert len(registry.requests()) == before  # all of it was already here


async def test_full_mode_image_runs_with_overlayfs(pushed_busybox, containerd, registry):
    ref = ImageReference.parse(pushed_busybox.reference)
    async with RegistryClient() as client:
        result = await convert_image(client, ref, ConvertOptions(mode="full"))
    target = str(result.target)
    containerd.ctr("images", "pull", "--plain-http", target)
    out = containerd.run_container(target, "converted-full")
    assert out.stdout.strip() == "hello from acceld"


async def test_zstd_refused_in_index_mode_and_converted_in_full(image_pusher, built_features_zstd):
    pushed = await image_pusher.push(built_features_zstd)
    ref = ImageReference.parse(pushed.reference)
    async with RegistryClient() as client:
        with pytest.raises(ConversionError, match=r"layer \d+ \(sha256:.*zstd"):
            await convert_image(client, ref, ConvertOptions(mode="index"))
        assert not [t for t in await _tags(client, ref) if t != "latest"]
        result = await convert_image(client, ref, ConvertOptions(mode="full", **SMALL))
        manifest = (await client.get_manifest(result.target)).parsed
        assert isinstance(manifest, ImageManifest)
        assert all(layer.media_type == mt.OCI_LAYER_GZIP for layer in manifest.layers)


async def test_uncompressed_layers_index_holds_only_the_toc(
    image_pusher, built_features_uncompressed
):
    pushed = await image_pusher.push(built_features_uncompressed)
    ref = ImageReference.parse(pushed.reference)
    built = pushed.built
    async with RegistryClient() as client:
        result = await convert_image(client, ref, ConvertOptions(mode="index"))
        artifact = (await client.get_manifest(result.target)).parsed
        for desc, source in zip(artifact.layers, built.layers, strict=True):
            index = layer_index_codec.parse(await client.get_blob(ref, desc.digest))
            assert index.checkpoints == []
            layer = IndexedLayer(BlobSource(ref, source.digest, source.size), index)
            await assert_layer_matches(
                client, layer, built.blob_path(source.digest), source.media_type
            )


async def test_multiplatform_index_converts_per_platform(image_pusher, built_busybox_index):
    pushed = await image_pusher.push(built_busybox_index)
    ref = ImageReference.parse(pushed.reference)
    async with RegistryClient() as client:
        result = await convert_image(client, ref, ConvertOptions(mode="index"))
        assert len(result.platforms) == 2
        top = (await client.get_manifest(result.target)).parsed
        assert isinstance(top, ImageIndex)
        assert {str(d.platform) for d in top.manifests} == {
            str(p.platform) for p in result.platforms
        }


async def test_prefetch_list_recorded_and_missing_paths_reported(pushed_busybox, tmp_path):
    ref = ImageReference.parse(pushed_busybox.reference)
    plist = PrefetchList.parse_lines(["/" + HELLO_PATH.lstrip("/"), "/bin/", "/no/such/file"])
    async with RegistryClient() as client:
        for mode in ("index", "full"):
            result = await convert_image(
                client, ref, ConvertOptions(mode=mode, prefetch=plist, force=True)
            )
            assert result.platforms[0].missing_prefetch == ["/no/such/file"]
            doc = (await client.get_manifest(result.target)).parsed
            assert json.loads(doc.annotations[ANNOTATION_PREFETCH]) == plist.as_paths()
        full = (await client.get_manifest(result.target)).parsed
        layer = await open_estargz(
            client,
            BlobSource(ref, full.layers[1].digest, full.layers[1].size),
            full.layers[1].annotations[TOC_DIGEST_ANNOTATION],
        )
        assert layer.toc.prefetch_end is not None


def _hostile_layer(name: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    return gzip.compress(buf.getvalue())


async def _push_single_layer(
    client: RegistryClient, ref: ImageReference, layer: bytes, media_type: str = mt.OCI_LAYER_GZIP
) -> str:
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
    ).encode()
    config_digest = await client.push_blob(ref, config)
    layer_digest = await client.push_blob(ref, layer)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": mt.OCI_MANIFEST,
            "config": {"mediaType": mt.OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": media_type, "digest": layer_digest, "size": len(layer)}],
        }
    ).encode()
    await client.push_manifest(ref, manifest, mt.OCI_MANIFEST)
    return layer_digest


@pytest.mark.parametrize("mode", ["index", "full"])
@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("dotdot", "escapes the layer"),
        ("absolute", "absolute entry name"),
        ("corrupt-gzip", "layer sha256:"),
        ("not-gzip", "layer sha256:"),
        ("storage-corrupted", "hash"),
        ("truncated", "hash|bytes"),
    ],
)
async def test_hostile_input_refused_nothing_pushed(registry, repo_name, mode, case, match):
    ref = ImageReference.parse(f"{registry.host}/{repo_name}:v1")
    layer = _hostile_layer("ok.txt")
    if case == "dotdot":
        layer = _hostile_layer("../../etc/evil")
    elif case == "absolute":
        layer = _hostile_layer("/etc/evil")
    elif case == "corrupt-gzip":
        layer = layer[:20] + bytes(b ^ 0x55 for b in layer[20:40]) + layer[40:]
    elif case == "not-gzip":
        layer = b"this is not gzip at all" * 100
    async with RegistryClient() as client:
        digest = await _push_single_layer(client, ref, layer)
        if case in ("storage-corrupted", "truncated"):
            path = registry.storage_dir / (
                "docker/registry/v2/blobs/sha256/" + digest[7:9] + "/" + digest[7:] + "/data"
            )
            data = path.read_bytes()
            path.write_bytes(
                data[: len(data) // 2] if case == "truncated" else data[:-30] + bytes(30)
            )
        with pytest.raises(ConversionError, match=match):
            await convert_image(client, ref, ConvertOptions(mode=mode))
        assert await _tags(client, ref) == ["v1"]
        manifest_digest = await client.manifest_digest(ref)
        assert manifest_digest is not None
        with pytest.raises(NotFoundError):
            await client.get_manifest(ref.with_tag(referrers_tag(manifest_digest)))


async def test_accelerated_tags_are_not_converted_again(registry, repo_name):
    ref = ImageReference.parse(f"{registry.host}/{repo_name}:v1_accelerated")
    async with RegistryClient() as client:
        with pytest.raises(ConversionError, match="already an accelerated form"):
            await convert_image(client, ref, ConvertOptions())


async def test_docker_schema2_source(image_pusher, built_busybox_docker):
    pushed = await image_pusher.push(built_busybox_docker)
    ref = ImageReference.parse(pushed.reference)
    async with RegistryClient() as client:
        for mode in ("index", "full"):
            result = await convert_image(client, ref, ConvertOptions(mode=mode))
            assert result.platforms[0].layers


def test_build_image_with_layer_spec(tmp_path):
    """The hostile-input cases above build layers by hand; make sure the rig agrees on
    what a normal single-file layer looks like, so the refusals are about the input."""
    built = build_image(ImageSpec(layers=[LayerSpec([File("ok.txt", b"ok")])]), tmp_path / "layout")
    assert len(built.layers) == 1


def _two_file_layer() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, fill in (("app/a.txt", b"a"), ("app/b.txt", b"b")):
            info = tarfile.TarInfo(name)
            info.size = 5000
            tar.addfile(info, io.BytesIO(fill * info.size))
    return gzip.compress(buf.getvalue())


async def test_a_hostile_index_file_table_is_refused_after_its_early_look(registry, repo_name):
    """A registry serves an index artifact whose spans are sound but whose file table
    names a file un-normalized: the decoded table is shown for early prefetch (and finds
    the sound file in it, not the hostile one), then the full check refuses the layer
    with a reason that names the row, and the agent falls back for that layer."""
    ref = ImageReference.parse(f"{registry.host}/{repo_name}:v1")
    async with RegistryClient() as client:
        layer_digest = await _push_single_layer(client, ref, _two_file_layer())
        result = await convert_image(client, ref, ConvertOptions(mode="index", **SMALL))
        image_digest = await client.manifest_digest(ref)
        assert image_digest is not None
        artifact = json.loads((await client.get_manifest(result.target)).body)
        descriptor = artifact["layers"][0]
        document = msgpack.unpackb(await client.get_blob(ref, descriptor["digest"]))
        rows = msgpack.unpackb(zlib.decompress(document["toc"]))
        names = [row[0] for row in rows]
        rows[names.index("app/b.txt")][0] = "app/./b.txt"
        document["toc"] = zlib.compress(msgpack.packb(rows))
        hostile = msgpack.packb(document)
        descriptor["digest"] = await client.push_blob(ref, hostile)
        descriptor["size"] = len(hostile)
        body = json.dumps(artifact).encode()
        hostile_digest = await client.push_manifest(
            ref.with_digest(sha256_digest(body)), body, mt.OCI_MANIFEST
        )
        listing = {
            "schemaVersion": 2,
            "mediaType": mt.OCI_INDEX,
            "manifests": [
                {
                    "mediaType": mt.OCI_MANIFEST,
                    "digest": hostile_digest,
                    "size": len(body),
                    "artifactType": ARTIFACT_TYPE_INDEX,
                }
            ],
        }
        await client.push_manifest(
            ref.with_tag(referrers_tag(image_digest)), json.dumps(listing).encode(), mt.OCI_INDEX
        )

        shown: list[tuple[str, str, EarlyLayer]] = []
        discovery = LayerDiscovery(client, use_referrers=True)
        discovery.on_early = lambda *told: shown.append(told)
        with pytest.raises(NoAccelerationError, match="not normalized") as refused:
            await discovery.discover(f"{ref}", image_digest, layer_digest)
        assert refused.value.reason == "bad-index"
        assert [(m, d) for m, d, _ in shown] == [(image_digest, layer_digest)]
        early = shown[0][2]
        assert early.files.live_entry("app/a.txt") is not None
        assert early.files.live_entry("app/b.txt") is None
        assert early.files.live_entry("app/./b.txt") is None
