"""Manifest parsing is strict and platform selection matches containerd's rules."""

import json

import pytest

from fetcher import mediatypes as mt
from fetcher.errors import ManifestError, UnsupportedMediaTypeError
from fetcher.manifest import ImageIndex, ImageManifest, Platform, parse_manifest

D = "sha256:" + "b" * 64


def _manifest(**overrides):
    doc = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": {"mediaType": mt.OCI_CONFIG, "digest": D, "size": 10},
        "layers": [{"mediaType": mt.OCI_LAYER_GZIP, "digest": D, "size": 20}],
    }
    doc.update(overrides)
    return json.dumps(doc).encode()


def test_image_manifest():
    parsed = parse_manifest(_manifest(annotations={"a": "b"}))
    assert isinstance(parsed, ImageManifest)
    assert parsed.layers[0].size == 20
    assert parsed.annotations == {"a": "b"}


def test_docker_manifest_by_content_type():
    body = json.loads(_manifest())
    del body["mediaType"]
    parsed = parse_manifest(json.dumps(body).encode(), mt.DOCKER_MANIFEST)
    assert parsed.media_type == mt.DOCKER_MANIFEST


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        _manifest(schemaVersion=3),
        _manifest(layers=[{"mediaType": "x", "digest": "sha256:zz", "size": 1}]),
        _manifest(layers=[{"mediaType": "x", "digest": D, "size": -1}]),
        _manifest(layers=[{"mediaType": "x", "digest": D, "size": True}]),
        _manifest(layers="nope"),
        _manifest(config=None),
        _manifest(annotations={"a": 1}),
        _manifest(mediaType=mt.OCI_INDEX),
        b" " * (5 * 1024 * 1024),
    ],
)
def test_malformed_refused(body):
    with pytest.raises(ManifestError):
        parse_manifest(body)


def test_schema1_and_unknown_types_refused():
    with pytest.raises(UnsupportedMediaTypeError):
        parse_manifest(json.dumps({"schemaVersion": 1, "fsLayers": []}).encode())
    with pytest.raises(UnsupportedMediaTypeError):
        parse_manifest(_manifest(mediaType="application/x-unknown"))


def test_content_type_contradiction_refused():
    with pytest.raises(ManifestError):
        parse_manifest(_manifest(), mt.DOCKER_MANIFEST)


def _index():
    entries = [
        ("linux", "arm", "v6"),
        ("linux", "arm64", None),
        ("linux", "amd64", None),
        ("windows", "amd64", None),
    ]
    doc = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_INDEX,
        "manifests": [
            {
                "mediaType": mt.OCI_MANIFEST,
                "digest": "sha256:" + str(i) * 64,
                "size": 1,
                "platform": {"os": o, "architecture": a, **({"variant": v} if v else {})},
            }
            for i, (o, a, v) in enumerate(entries)
        ],
    }
    parsed = parse_manifest(json.dumps(doc).encode())
    assert isinstance(parsed, ImageIndex)
    return parsed


def test_platform_selection():
    index = _index()
    assert index.select(Platform.parse("linux/amd64")).digest == "sha256:" + "2" * 64
    assert index.select(Platform.parse("linux/arm64/v8")).digest == "sha256:" + "1" * 64
    assert index.select(Platform.parse("linux/arm/v6")).digest == "sha256:" + "0" * 64
    with pytest.raises(ManifestError, match="available: linux/arm/v6"):
        index.select(Platform.parse("linux/arm/v7"))


def test_platform_parse_errors():
    with pytest.raises(ValueError):
        Platform.parse("linux")
    assert str(Platform.parse("linux/arm/v7")) == "linux/arm/v7"
