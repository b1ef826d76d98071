"""Real OCI / Docker images for tests, the demo and benchmarks, built from declarative specs.

Images are written as an OCI image layout (``oci-layout``, ``index.json``,
``blobs/sha256``) so that independent tools (skopeo, umoci, containerd) can read the
very same bytes acceld serves, and pushed to the rig's registry with acceld's own
registry client. Every byte is deterministic: a spec built twice has the same digests,
which lets tests pin expectations to digests and lets caches be checked across runs.

The ready-made specs at the bottom are shared by the whole suite: `busybox_image_spec`
is small and runnable, `feature_image_spec` carries every tar feature the lazy loader
must present exactly as containerd's overlayfs unpack would.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from common.digest import sha256_digest
from common.logging import get_logger
from fetcher import mediatypes as mt
from fetcher.manifest import Descriptor, Platform
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from rig.layers import (
    BlockDevice,
    CharDevice,
    Compression,
    Directory,
    Entry,
    Fifo,
    File,
    Hardlink,
    HostFile,
    LayerBlob,
    LayerSpec,
    OpaqueDir,
    SparseishFile,
    Symlink,
    Whiteout,
    write_layer,
)

log = get_logger(__name__)

ManifestFormat = Literal["oci", "docker"]

CREATED = "2023-11-14T22:13:20Z"
"""The fixed creation time written into configs (matches rig.layers.DEFAULT_MTIME)."""

REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
DEFAULT_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_OCI_LAYER_TYPES = {
    Compression.GZIP: mt.OCI_LAYER_GZIP,
    Compression.ZSTD: mt.OCI_LAYER_ZSTD,
    Compression.NONE: mt.OCI_LAYER_TAR,
}


@dataclass(frozen=True)
class ImageConfig:
    """The runtime part of an image config (``config`` in the JSON)."""

    cmd: Sequence[str] | None = None
    entrypoint: Sequence[str] | None = None
    env: Sequence[str] = (DEFAULT_PATH_ENV,)
    working_dir: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The ``config`` object with Docker's capitalised keys; unset fields left out."""
        out: dict[str, Any] = {"Env": list(self.env)}
        if self.cmd is not None:
            out["Cmd"] = list(self.cmd)
        if self.entrypoint is not None:
            out["Entrypoint"] = list(self.entrypoint)
        if self.working_dir:
            out["WorkingDir"] = self.working_dir
        if self.labels:
            out["Labels"] = dict(self.labels)
        return out


@dataclass(frozen=True)
class ImageSpec:
    """One single-platform image: its layers (lowest first), platform, config and format."""

    layers: Sequence[LayerSpec]
    platform: Platform = field(default_factory=Platform.host)
    config: ImageConfig = field(default_factory=ImageConfig)
    manifest_format: ManifestFormat = "oci"


@dataclass(frozen=True)
class BuiltImage:
    """An image written into an OCI layout; ``tag`` is its ref name there (None in an index)."""

    spec: ImageSpec
    layout: Path
    tag: str | None
    manifest: Descriptor
    manifest_bytes: bytes
    config: Descriptor
    config_bytes: bytes
    layers: tuple[Descriptor, ...]
    diff_ids: tuple[str, ...]

    @property
    def digest(self) -> str:
        """The manifest digest, which is what a registry returns for the push."""
        return self.manifest.digest

    def blob_path(self, digest: str) -> Path:
        """Where blob ``digest`` of this image lives in the layout."""
        return blob_path(self.layout, digest)


@dataclass(frozen=True)
class BuiltIndex:
    """A multi-platform index (OCI image index or Docker manifest list) in an OCI layout."""

    layout: Path
    tag: str
    index: Descriptor
    index_bytes: bytes
    images: tuple[BuiltImage, ...]

    @property
    def digest(self) -> str:
        """The index digest."""
        return self.index.digest


def blob_path(layout: Path, digest: str) -> Path:
    """Path of a blob inside an OCI layout."""
    algorithm, hexpart = digest.split(":", 1)
    return layout / "blobs" / algorithm / hexpart


def oci_layout_reference(layout: Path, tag: str) -> str:
    """The `oci:` transport name skopeo and umoci use for a tagged image in a layout."""
    return f"oci:{layout}:{tag}"


# -- layout writing ------------------------------------------------------------------------


def _init_layout(layout: Path) -> None:
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    marker = layout / "oci-layout"
    if not marker.exists():
        marker.write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))


def _json_bytes(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def _store(layout: Path, data: bytes, media_type: str) -> Descriptor:
    digest = sha256_digest(data)
    path = blob_path(layout, digest)
    if not path.exists():
        temp = path.with_name(f".tmp-{uuid.uuid4().hex}")
        temp.write_bytes(data)
        os.replace(temp, path)
    return Descriptor(media_type=media_type, digest=digest, size=len(data))


def _store_layer(layout: Path, spec: LayerSpec) -> LayerBlob:
    temp = layout / "blobs" / "sha256" / f".tmp-{uuid.uuid4().hex}"
    try:
        blob = write_layer(spec, temp)
        final = blob_path(layout, blob.digest)
        os.replace(temp, final)
    finally:
        temp.unlink(missing_ok=True)
    return LayerBlob(final, blob.digest, blob.size, blob.diff_id, blob.compression)


def _layer_media_type(compression: Compression, manifest_format: ManifestFormat) -> str:
    if manifest_format == "oci":
        return _OCI_LAYER_TYPES[compression]
    if compression is not Compression.GZIP:
        raise ValueError(f"Docker schema 2 has no media type for {compression.value} layers")
    return mt.DOCKER_LAYER_GZIP


def _config_json(spec: ImageSpec, diff_ids: Sequence[str]) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "created": CREATED,
        "architecture": spec.platform.architecture,
        "os": spec.platform.os,
    }
    if spec.platform.variant:
        doc["variant"] = spec.platform.variant
    doc["config"] = spec.config.to_json()
    doc["rootfs"] = {"type": "layers", "diff_ids": list(diff_ids)}
    doc["history"] = [{"created": CREATED, "created_by": layer.created_by} for layer in spec.layers]
    return doc


def _write_image(
    spec: ImageSpec, layout: Path, tag: str | None, reused: Sequence[LayerBlob] = ()
) -> BuiltImage:
    """``reused`` are the lowest layers, already in ``layout``; the rest of ``spec.layers``
    are written now (the first ``len(reused)`` only give their history lines)."""
    blobs = [*reused, *(_store_layer(layout, layer) for layer in spec.layers[len(reused) :])]
    layers = tuple(
        Descriptor(
            _layer_media_type(blob.compression, spec.manifest_format), blob.digest, blob.size
        )
        for blob in blobs
    )
    diff_ids = tuple(blob.diff_id for blob in blobs)
    oci = spec.manifest_format == "oci"
    config_bytes = _json_bytes(_config_json(spec, diff_ids))
    config = _store(layout, config_bytes, mt.OCI_CONFIG if oci else mt.DOCKER_CONFIG)
    manifest_type = mt.OCI_MANIFEST if oci else mt.DOCKER_MANIFEST
    manifest_bytes = _json_bytes(
        {
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": config.to_json(),
            "layers": [layer.to_json() for layer in layers],
        }
    )
    stored = _store(layout, manifest_bytes, manifest_type)
    manifest = Descriptor(stored.media_type, stored.digest, stored.size, platform=spec.platform)
    log.info("image.built", layout=str(layout), tag=tag, digest=manifest.digest)
    return BuiltImage(
        spec, layout, tag, manifest, manifest_bytes, config, config_bytes, layers, diff_ids
    )


def _tag_in_layout(layout: Path, descriptor: Descriptor, tag: str) -> None:
    """Point ``tag`` at ``descriptor`` in index.json, replacing what the tag named before."""
    index_path = layout / "index.json"
    index: dict[str, Any] = {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": []}
    if index_path.exists():
        index = json.loads(index_path.read_text())
    entry = descriptor.to_json()
    entry["annotations"] = {**entry.get("annotations", {}), REF_NAME_ANNOTATION: tag}
    index["manifests"] = [
        m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME_ANNOTATION) != tag
    ] + [entry]
    temp = index_path.with_name(f".index-{uuid.uuid4().hex}.json")
    temp.write_bytes(_json_bytes(index))
    os.replace(temp, index_path)


def build_image(spec: ImageSpec, layout: Path, tag: str = "latest") -> BuiltImage:
    """Write ``spec`` into the OCI layout at ``layout`` (created or extended) as ``tag``.

    Docker-format images are valid in a layout, but skopeo 1.9's ``oci:`` transport only
    finds OCI manifests there: push them to a registry to read them with skopeo.
    """
    _init_layout(layout)
    built = _write_image(spec, layout, tag)
    _tag_in_layout(layout, built.manifest, tag)
    return built


def build_image_on(
    parent: BuiltImage,
    keep: int,
    upper: Sequence[LayerSpec],
    config: ImageConfig,
    layout: Path,
    tag: str = "latest",
) -> BuiltImage:
    """An image of ``parent``'s lowest ``keep`` layers, byte for byte, plus ``upper``.

    What `docker build` makes of a Dockerfile whose early steps hit its cache: a new
    version that shares its lower layers with the old one by digest. Rebuilding those
    layers instead would not do, when they come from tools that stamp times (apt, dpkg).
    The kept blobs are hard-linked into ``layout`` (copied across file systems).
    """
    if not 0 <= keep <= len(parent.layers):
        raise ValueError(f"keep={keep}: the parent has {len(parent.layers)} layers")
    _init_layout(layout)
    by_type = {media_type: compression for compression, media_type in _OCI_LAYER_TYPES.items()}
    by_type[mt.DOCKER_LAYER_GZIP] = Compression.GZIP
    reused = []
    for layer, diff_id in zip(parent.layers[:keep], parent.diff_ids[:keep], strict=True):
        target = blob_path(layout, layer.digest)
        if not target.exists():
            try:
                os.link(parent.blob_path(layer.digest), target)
            except OSError:
                shutil.copyfile(parent.blob_path(layer.digest), target)
        reused.append(
            LayerBlob(target, layer.digest, layer.size, diff_id, by_type[layer.media_type])
        )
    spec = ImageSpec(
        layers=[*parent.spec.layers[:keep], *upper],
        platform=parent.spec.platform,
        config=config,
        manifest_format=parent.spec.manifest_format,
    )
    built = _write_image(spec, layout, tag, reused)
    _tag_in_layout(layout, built.manifest, tag)
    return built


def build_index(specs: Sequence[ImageSpec], layout: Path, tag: str = "latest") -> BuiltIndex:
    """Write one image per spec plus an index over them (a Docker manifest list for docker).

    All specs must share one manifest format: a manifest list pointing at OCI manifests
    is not something registries or runtimes agree on.
    """
    formats = {spec.manifest_format for spec in specs}
    if len(formats) != 1:
        raise ValueError(f"an index needs specs of one manifest format, got {sorted(formats)}")
    _init_layout(layout)
    images = tuple(_write_image(spec, layout, None) for spec in specs)
    index_type = mt.OCI_INDEX if formats == {"oci"} else mt.DOCKER_MANIFEST_LIST
    index_bytes = _json_bytes(
        {
            "schemaVersion": 2,
            "mediaType": index_type,
            "manifests": [image.manifest.to_json() for image in images],
        }
    )
    index = _store(layout, index_bytes, index_type)
    _tag_in_layout(layout, index, tag)
    log.info("index.built", layout=str(layout), tag=tag, digest=index.digest)
    return BuiltIndex(layout, tag, index, index_bytes, images)


# -- pushing -------------------------------------------------------------------------------


async def _push_single(client: RegistryClient, ref: ImageReference, image: BuiltImage) -> str:
    for layer in image.layers:
        await client.push_blob_file(ref, image.blob_path(layer.digest), layer.digest, layer.size)
    await client.push_blob(ref, image.config_bytes, image.config.digest)
    return await client.push_manifest(ref, image.manifest_bytes, image.manifest.media_type)


async def push_image(client: RegistryClient, reference: str, built: BuiltImage | BuiltIndex) -> str:
    """Push an image or index (blobs, child manifests by digest, then the tag); return its digest.

    The registry's answer is checked against the built digest: a registry that rewrote
    the manifest would otherwise silently invalidate every digest-based expectation.
    """
    ref = ImageReference.parse(reference)
    if isinstance(built, BuiltIndex):
        for image in built.images:
            await _push_single(client, ref.with_digest(image.digest), image)
        pushed = await client.push_manifest(ref, built.index_bytes, built.index.media_type)
    else:
        pushed = await _push_single(client, ref, built)
    if pushed != built.digest:
        raise RuntimeError(f"registry stored {reference} as {pushed}, built {built.digest}")
    log.info("image.pushed", reference=reference, digest=pushed)
    return pushed


# -- ready-made specs ---------------------------------------------------------------------

BUSYBOX_APPLETS = (
    "sh", "ash", "cat", "ls", "echo", "sleep", "head", "tail", "wc", "stat", "find",
    "dd", "cp", "mv", "rm", "mkdir", "touch", "true", "false", "env", "id", "uname",
    "readlink", "grep", "sed", "awk", "test", "xargs", "sort", "du", "df", "od", "cmp",
    "ln", "chmod", "date", "ps", "kill", "sync", "tee", "tr", "cut", "seq", "printf",
    "md5sum", "sha256sum", "hexdump", "mount", "which",
)  # fmt: skip
"""Applets linked into /bin of the busybox image (all present in Debian's busybox-static)."""

HELLO_PATH = "/etc/hello.txt"
DEFAULT_HELLO = "hello from acceld\n"
DEFAULT_BUSYBOX = Path("/bin/busybox")
BUSYBOX_HISTORY = "busybox (static, from the host)"


def _busybox_base(busybox: Path) -> list[Entry]:
    """A minimal root filesystem whose only program is the host's static busybox."""
    return [
        *(Directory(d) for d in ("bin", "dev", "etc", "proc", "sys", "usr", "usr/bin", "var")),
        Directory("root", mode=0o700),
        Directory("tmp", mode=0o1777),
        File("bin/busybox", HostFile(busybox), mode=0o755),
        *(Symlink(f"bin/{applet}", "busybox") for applet in BUSYBOX_APPLETS),
        Symlink("usr/bin/env", "/bin/busybox"),
        File("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
        File("etc/group", b"root:x:0:\n"),
    ]


def busybox_image_spec(
    hello: str = DEFAULT_HELLO,
    busybox: Path = DEFAULT_BUSYBOX,
    compression: Compression = Compression.GZIP,
    manifest_format: ManifestFormat = "oci",
    platform: Platform | None = None,
) -> ImageSpec:
    """A runnable two-layer image: static busybox + applet links, then /etc/hello.txt.

    The greeting sits in its own upper layer so tests can vary it (and so get distinct
    images) while the busybox layer stays byte-identical and shared.
    """
    app: list[Entry] = [Directory("etc"), File(HELLO_PATH, hello.encode())]
    return ImageSpec(
        layers=(
            LayerSpec(_busybox_base(busybox), compression, created_by=BUSYBOX_HISTORY),
            LayerSpec(app, compression, created_by=f"write {HELLO_PATH}"),
        ),
        platform=platform or Platform.host(),
        config=ImageConfig(cmd=("/bin/sh", "-c", f"cat {HELLO_PATH}")),
        manifest_format=manifest_format,
    )


LARGE_FILE_PATH = "/big/large.bin"
DEFAULT_LARGE_FILE_SIZE = 64 << 20
LONG_PATH = "/features/" + "d" * 70 + "/" + "f" * 60 + ".txt"
UNICODE_PATH = "/features/ünïcødé/名前-😀.txt"


def _feature_base() -> list[Entry]:
    """Lower layer: one entry per tar feature, each with distinct metadata."""
    return [
        Directory("features"),
        File("features/plain.txt", b"plain text\n", mtime=1_500_000_000),
        File(
            "features/owned.sh",
            b"#!/bin/sh\necho owned\n",
            mode=0o750,
            uid=1000,
            gid=100,
            uname="alice",
            gname="users",
            mtime=1_234_567_890,
        ),
        File("features/setuid", b"suid\n", mode=0o4755),
        File("features/setgid", b"sgid\n", mode=0o2711, gid=50),
        File("features/readonly", b"ro\n", mode=0o400),
        File("features/big-ids", b"ids beyond ustar\n", uid=3_000_000, gid=3_000_001),
        File("features/empty", b""),
        File(
            "features/xattrs.txt",
            b"has extended attributes\n",
            xattrs={"user.color": "blue", "user.binary": b"\x01\xfe\x80", "trusted.note": "t"},
        ),
        Directory("features/sticky", mode=0o1777),
        Directory("features/private", mode=0o700, uid=1000, gid=1000, mtime=1_600_000_000),
        Directory("features/xattr-dir", xattrs={"user.dir": "yes"}),
        Symlink("features/link-relative", "plain.txt"),
        Symlink("features/link-absolute", "/features/plain.txt"),
        Symlink("features/link-up", "../features/sticky"),
        Symlink("features/link-dangling", "/does/not/exist"),
        Symlink("features/link-long", "/" + "t" * 150, uid=1000, gid=1000),
        Hardlink("features/hardlink", "features/xattrs.txt"),
        Hardlink("features/hardlink-2", "features/owned.sh"),
        CharDevice("features/null", 1, 3, mode=0o666),
        BlockDevice("features/loop", 7, 0, mode=0o660, gid=6),
        Fifo("features/fifo", mode=0o620),
        Directory(LONG_PATH.rsplit("/", 1)[0], mtime=1_400_000_000),
        File(LONG_PATH, b"long path\n"),
        Directory(UNICODE_PATH.rsplit("/", 1)[0], uname="ünï", gname="cødé"),
        File(UNICODE_PATH, "ünïcødé content\n".encode()),
        Directory("lower"),
        File("lower/gone.txt", b"deleted by the upper layer\n"),
        File("lower/kept.txt", b"survives\n"),
        Directory("lower/gone-dir"),
        File("lower/gone-dir/inner.txt", b"deleted with its directory\n"),
        File("lower/replaced.txt", b"old content\n", mode=0o600),
        Directory("opaque", mode=0o755),
        File("opaque/old.txt", b"hidden by the opaque marker\n"),
        Directory("opaque/old-dir"),
        File("opaque/old-dir/nested.txt", b"hidden too\n"),
    ]


def _feature_upper() -> list[Entry]:
    """Upper layer: deletes, opaque directory, replacement and re-creation over the base."""
    return [
        Directory("lower"),
        Whiteout("lower/gone.txt"),
        Whiteout("lower/gone-dir"),
        File("lower/replaced.txt", b"new content from the upper layer\n", mode=0o644),
        File("lower/added.txt", b"added on top\n"),
        Directory("opaque", mode=0o750, xattrs={"user.upper": "1"}),
        OpaqueDir("opaque"),
        File("opaque/new.txt", b"only file left in the opaque dir\n"),
    ]


def feature_image_spec(
    large_file_size: int = DEFAULT_LARGE_FILE_SIZE,
    compression: Compression = Compression.GZIP,
    manifest_format: ManifestFormat = "oci",
    busybox: Path = DEFAULT_BUSYBOX,
) -> ImageSpec:
    """Four layers: busybox, every tar feature, a large sparse-ish file, whiteouts.

    Busybox makes the image runnable, so tests can also look at the features from
    inside a container. ``compression`` applies to every layer, giving the zstd and
    uncompressed variants.
    """
    large: list[Entry] = [
        Directory("big"),
        File(LARGE_FILE_PATH, SparseishFile(large_file_size, seed=42)),
    ]
    return ImageSpec(
        layers=(
            LayerSpec(_busybox_base(busybox), compression, created_by=BUSYBOX_HISTORY),
            LayerSpec(_feature_base(), compression, created_by="features"),
            LayerSpec(large, compression, created_by="large file"),
            LayerSpec(_feature_upper(), compression, created_by="whiteouts and opaque dir"),
        ),
        config=ImageConfig(
            cmd=("/bin/sh", "-c", "ls -la /features"),
            env=(DEFAULT_PATH_ENV, "ACCELD_FEATURES=1"),
            working_dir="/features",
            labels={"org.acceld.rig": "features"},
        ),
        manifest_format=manifest_format,
    )
