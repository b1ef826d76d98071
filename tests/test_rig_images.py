"""The rig's images are valid, deterministic, and contain exactly the tar features specified.

Every later test of the lazy loader compares what acceld presents against these images,
so they are checked here with tools that share no code with acceld: skopeo reads the
layouts and the registry, umoci and containerd unpack them, gzip tests the blobs, and
the tar members are read back with tarfile and compared field by field with the spec.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import stat
import subprocess
import tarfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, BinaryIO, NamedTuple, cast

import pytest
import zstandard

from fetcher import mediatypes as mt
from fetcher.manifest import ImageIndex, ImageManifest, Platform, parse_manifest
from rig.containerd import ContainerdServer
from rig.images import (
    BUSYBOX_APPLETS,
    LARGE_FILE_PATH,
    LONG_PATH,
    UNICODE_PATH,
    BuiltImage,
    BuiltIndex,
    ImageConfig,
    ImageSpec,
    build_image,
    build_image_on,
    build_index,
    busybox_image_spec,
    feature_image_spec,
    oci_layout_reference,
)
from rig.layers import (
    BlockDevice,
    CharDevice,
    Compression,
    Directory,
    Entry,
    EntryMeta,
    Fifo,
    File,
    Hardlink,
    HostFile,
    LayerSpec,
    OpaqueDir,
    SparseishFile,
    Symlink,
    Whiteout,
    merged_view,
    write_layer,
)
from tests.fixtures.images import ImagePusher, PushedImage

FEATURE_VARIANTS = ["built_features", "built_features_zstd", "built_features_uncompressed"]
ALL_IMAGES = [*FEATURE_VARIANTS, "built_busybox", "built_busybox_docker"]

_TAR_TYPES = {
    File: tarfile.REGTYPE,
    Directory: tarfile.DIRTYPE,
    Symlink: tarfile.SYMTYPE,
    Hardlink: tarfile.LNKTYPE,
    CharDevice: tarfile.CHRTYPE,
    BlockDevice: tarfile.BLKTYPE,
    Fifo: tarfile.FIFOTYPE,
    Whiteout: tarfile.REGTYPE,
    OpaqueDir: tarfile.REGTYPE,
}


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result


def _sha256_stream(stream: IO[bytes]) -> str:
    hasher = hashlib.sha256()
    while chunk := stream.read(1 << 20):
        hasher.update(chunk)
    return f"sha256:{hasher.hexdigest()}"


def _sha256_file(path: Path) -> str:
    with path.open("rb") as stream:
        return _sha256_stream(stream)


@contextmanager
def _uncompressed(path: Path, media_type: str) -> Iterator[BinaryIO]:
    """The layer's tar stream, decoded with the stdlib / zstandard, not rig code."""
    if media_type in mt.GZIP_LAYERS:
        with gzip.open(path, "rb") as stream:
            yield cast(BinaryIO, stream)
    elif media_type in mt.ZSTD_LAYERS:
        with zstandard.ZstdDecompressor().stream_reader(path.open("rb")) as stream:
            yield cast(BinaryIO, stream)
    else:
        assert media_type in mt.TAR_LAYERS, media_type
        with path.open("rb") as stream:
            yield stream


def _expected_content_digest(content: bytes | SparseishFile | HostFile) -> str:
    if isinstance(content, bytes):
        return f"sha256:{hashlib.sha256(content).hexdigest()}"
    if isinstance(content, SparseishFile):
        return content.sha256()
    return _sha256_file(content.path)


def _expected_member_name(entry: Entry) -> str:
    path = entry.path.strip("/")
    if isinstance(entry, Whiteout):
        head, _, tail = path.rpartition("/")
        return f"{head}/.wh.{tail}" if head else f".wh.{tail}"
    if isinstance(entry, OpaqueDir):
        return f"{path}/.wh..wh..opq"
    return path


def _raw_xattrs(entry: EntryMeta) -> dict[str, bytes]:
    return {k: v.encode() if isinstance(v, str) else v for k, v in entry.xattrs.items()}


def _member_xattrs(member: tarfile.TarInfo) -> dict[str, bytes]:
    prefix = "SCHILY.xattr."
    return {
        key[len(prefix) :]: value.encode("utf-8", "surrogateescape")
        for key, value in member.pax_headers.items()
        if key.startswith(prefix)
    }


def _check_layer_members(stream: BinaryIO, layer: LayerSpec) -> None:
    """Every tar member, in order, carries exactly the metadata and content of its entry."""
    files = {entry.path.strip("/"): entry for entry in layer.entries if isinstance(entry, File)}
    with tarfile.open(fileobj=stream, mode="r|", encoding="utf-8") as tar:
        members = iter(tar)
        for entry in layer.entries:
            member = next(members, None)
            assert member is not None, f"tar ends before {entry}"
            where = f"{member.name} ({type(entry).__name__})"
            assert member.name == _expected_member_name(entry), where
            assert member.type == _TAR_TYPES[type(entry)], where
            # A hard link's header repeats its target's metadata: they are one inode.
            meta = files[entry.target.strip("/")] if isinstance(entry, Hardlink) else entry
            assert member.mode == meta.effective_mode, where
            assert (member.uid, member.gid) == (meta.uid, meta.gid), where
            assert (member.uname, member.gname) == (meta.uname, meta.gname), where
            assert member.mtime == meta.mtime, where
            assert _member_xattrs(member) == _raw_xattrs(meta), where
            if isinstance(entry, Symlink):
                assert member.linkname == entry.target, where
            if isinstance(entry, Hardlink):
                assert member.linkname == entry.target.strip("/"), where
            if isinstance(entry, CharDevice | BlockDevice):
                assert (member.devmajor, member.devminor) == (entry.major, entry.minor), where
            if isinstance(entry, File):
                data = tar.extractfile(member)
                assert data is not None
                assert _sha256_stream(data) == _expected_content_digest(entry.content), where
            elif member.isreg():
                assert member.size == 0, where
        assert next(members, None) is None, "tar has members beyond the spec"


# -- layouts, blobs and digests -----------------------------------------------------------


@pytest.mark.parametrize("image_fixture", ALL_IMAGES)
def test_blobs_match_their_descriptors_and_diff_ids(
    image_fixture: str, request: pytest.FixtureRequest
) -> None:
    built: BuiltImage = request.getfixturevalue(image_fixture)
    manifest = parse_manifest(built.manifest_bytes)
    assert isinstance(manifest, ImageManifest)
    assert _sha256_file(built.blob_path(built.digest)) == built.digest
    assert built.blob_path(built.digest).read_bytes() == built.manifest_bytes
    assert manifest.config == built.config
    assert _sha256_file(built.blob_path(built.config.digest)) == built.config.digest
    config = json.loads(built.blob_path(built.config.digest).read_bytes())
    assert config["rootfs"] == {"type": "layers", "diff_ids": list(built.diff_ids)}
    assert len(config["history"]) == len(manifest.layers) == len(built.spec.layers)
    for layer, diff_id in zip(manifest.layers, built.diff_ids, strict=True):
        path = built.blob_path(layer.digest)
        assert path.stat().st_size == layer.size
        assert _sha256_file(path) == layer.digest
        with _uncompressed(path, layer.media_type) as stream:
            assert _sha256_stream(stream) == diff_id


@pytest.mark.parametrize(
    ("image_fixture", "manifest_type", "config_type", "layer_type"),
    [
        ("built_features", mt.OCI_MANIFEST, mt.OCI_CONFIG, mt.OCI_LAYER_GZIP),
        ("built_features_zstd", mt.OCI_MANIFEST, mt.OCI_CONFIG, mt.OCI_LAYER_ZSTD),
        ("built_features_uncompressed", mt.OCI_MANIFEST, mt.OCI_CONFIG, mt.OCI_LAYER_TAR),
        ("built_busybox_docker", mt.DOCKER_MANIFEST, mt.DOCKER_CONFIG, mt.DOCKER_LAYER_GZIP),
    ],
)
def test_media_types_follow_format_and_compression(
    image_fixture: str,
    manifest_type: str,
    config_type: str,
    layer_type: str,
    request: pytest.FixtureRequest,
) -> None:
    built: BuiltImage = request.getfixturevalue(image_fixture)
    doc = json.loads(built.manifest_bytes)
    assert doc["mediaType"] == manifest_type
    assert doc["config"]["mediaType"] == config_type
    assert {layer["mediaType"] for layer in doc["layers"]} == {layer_type}


def test_gzip_layers_pass_gzip_t(built_features: BuiltImage, built_busybox: BuiltImage) -> None:
    for built in (built_features, built_busybox):
        for layer in built.layers:
            _run("gzip", "-t", str(built.blob_path(layer.digest)))


def test_zstd_layers_are_zstd_frames_with_checksums(built_features_zstd: BuiltImage) -> None:
    for layer in built_features_zstd.layers:
        with built_features_zstd.blob_path(layer.digest).open("rb") as blob:
            params = zstandard.get_frame_parameters(blob.read(18))
        assert params.has_checksum


@pytest.mark.parametrize("image_fixture", ["built_features", "built_busybox"])
def test_skopeo_reads_the_layout(
    image_fixture: str, request: pytest.FixtureRequest, image_layout: Path
) -> None:
    built: BuiltImage = request.getfixturevalue(image_fixture)
    assert built.tag is not None
    name = oci_layout_reference(image_layout, built.tag)
    assert _run("skopeo", "inspect", "--raw", name).stdout.encode() == built.manifest_bytes
    assert _run("skopeo", "inspect", "--config", "--raw", name).stdout.encode() == (
        built.config_bytes
    )
    summary = json.loads(_run("skopeo", "inspect", name).stdout)
    assert summary["Architecture"] == built.spec.platform.architecture
    assert summary["Layers"] == [layer.digest for layer in built.layers]


def test_index_lists_each_platform_manifest(
    built_busybox_index: BuiltIndex, image_layout: Path
) -> None:
    name = oci_layout_reference(image_layout, built_busybox_index.tag)
    raw = _run("skopeo", "inspect", "--raw", name).stdout.encode()
    assert raw == built_busybox_index.index_bytes
    index = parse_manifest(raw)
    assert isinstance(index, ImageIndex)
    assert index.media_type == mt.OCI_INDEX
    assert [str(d.platform) for d in index.manifests] == ["linux/amd64", "linux/arm64/v8"]
    for descriptor, image in zip(index.manifests, built_busybox_index.images, strict=True):
        assert descriptor.digest == image.digest
        assert _sha256_file(image.blob_path(image.digest)) == image.digest
        config = json.loads(image.config_bytes)
        assert config["architecture"] == descriptor.platform.architecture  # type: ignore[union-attr]


# -- tar contents -------------------------------------------------------------------------


@pytest.mark.parametrize("image_fixture", [*FEATURE_VARIANTS, "built_busybox"])
def test_tar_members_match_the_spec_exactly(
    image_fixture: str, request: pytest.FixtureRequest
) -> None:
    built: BuiltImage = request.getfixturevalue(image_fixture)
    for layer_spec, layer in zip(built.spec.layers, built.layers, strict=True):
        with _uncompressed(built.blob_path(layer.digest), layer.media_type) as stream:
            _check_layer_members(stream, layer_spec)


def test_feature_layers_hold_the_promised_features(built_features: BuiltImage) -> None:
    """Spot checks by name, so a spec that lost a feature fails here, not silently."""
    names: dict[str, tarfile.TarInfo] = {}
    for layer in built_features.layers:
        with (
            _uncompressed(built_features.blob_path(layer.digest), layer.media_type) as stream,
            tarfile.open(fileobj=stream, mode="r|", encoding="utf-8") as tar,
        ):
            names.update({member.name: member for member in tar})
    assert names["lower/.wh.gone.txt"].isreg()
    assert names["lower/.wh.gone-dir"].isreg()
    assert names["opaque/.wh..wh..opq"].isreg()
    assert names["features/null"].ischr()
    assert names["features/loop"].isblk()
    assert names["features/fifo"].isfifo()
    assert names["features/hardlink"].islnk()
    assert names["features/link-absolute"].linkname.startswith("/")
    assert not names["features/link-relative"].linkname.startswith("/")
    assert len(LONG_PATH) > 100 and LONG_PATH.lstrip("/") in names
    assert len(names["features/link-long"].linkname) > 100
    assert UNICODE_PATH.lstrip("/") in names
    assert names["features/big-ids"].uid > 0o7777777
    assert names["features/empty"].size == 0
    assert names[LARGE_FILE_PATH.lstrip("/")].size == 64 << 20
    assert _member_xattrs(names["features/xattrs.txt"]).keys() == {
        "user.color",
        "user.binary",
        "trusted.note",
    }


def test_sparseish_file_streams_mostly_zeros_with_seeded_blocks() -> None:
    spec = SparseishFile(5 * (1 << 20) + 123, seed=7, data_every=1 << 20, block_size=4096)
    chunks = list(spec.chunks())
    data = b"".join(chunks)
    assert len(data) == spec.size
    assert max(len(chunk) for chunk in chunks) <= 1 << 20
    nonzero = len(data) - data.count(0)
    assert 5 * 4000 < nonzero <= 6 * 4096
    assert b"".join(SparseishFile(spec.size, seed=7).chunks()) == data
    assert b"".join(SparseishFile(spec.size, seed=8).chunks()) != data


def test_hardlink_must_follow_its_target(tmp_path: Path) -> None:
    layer = LayerSpec([Hardlink("a", "b"), File("b", b"x")])
    with pytest.raises(ValueError, match="no earlier file"):
        write_layer(layer, tmp_path / "blob")


def test_docker_format_refuses_zstd(tmp_path: Path) -> None:
    spec = busybox_image_spec(compression=Compression.ZSTD, manifest_format="docker")
    with pytest.raises(ValueError, match="zstd"):
        build_image(spec, tmp_path / "layout")


def test_busybox_applets_exist_in_the_host_busybox() -> None:
    available = set(_run("/bin/busybox", "--list").stdout.split())
    assert set(BUSYBOX_APPLETS) <= available


# -- determinism -------------------------------------------------------------------------


@pytest.mark.parametrize("compression", list(Compression))
def test_same_spec_builds_the_same_digests(compression: Compression, tmp_path: Path) -> None:
    spec = feature_image_spec(large_file_size=3 << 20, compression=compression)
    first = build_image(spec, tmp_path / "one")
    second = build_image(spec, tmp_path / "two")
    assert first.digest == second.digest
    assert first.layers == second.layers
    assert first.diff_ids == second.diff_ids
    other = build_image(
        feature_image_spec(large_file_size=4 << 20, compression=compression), tmp_path / "three"
    )
    assert other.digest != first.digest


def test_image_on_a_parent_keeps_its_lower_layers_byte_for_byte(tmp_path: Path) -> None:
    lower = LayerSpec([Directory("etc"), File("etc/base.txt", b"base\n")], created_by="base")
    parent = build_image(
        ImageSpec([lower, LayerSpec([File("app.sh", b"v1\n")], created_by="app v1")]),
        tmp_path / "v1",
    )
    upper = LayerSpec([File("app.sh", b"v2\n"), File("new.txt", b"x\n")], created_by="app v2")
    config = ImageConfig(cmd=["/app.sh"])
    child = build_image_on(parent, 1, [upper], config, tmp_path / "v2", "v2")
    assert child.layers[0] == parent.layers[0] and child.diff_ids[0] == parent.diff_ids[0]
    assert child.layers[1] != parent.layers[1]
    assert child.blob_path(child.layers[0].digest).read_bytes() == (
        parent.blob_path(parent.layers[0].digest).read_bytes()
    )
    # The same image as a build of the whole spec would give (the rig's layers are
    # reproducible), history lines included.
    whole = build_image(ImageSpec([lower, upper], config=config), tmp_path / "whole", "v2")
    assert child.digest == whole.digest and child.config_bytes == whole.config_bytes
    with pytest.raises(ValueError, match="keep=3"):
        build_image_on(parent, 3, [], config, tmp_path / "bad")


def test_gzip_level_is_honoured(tmp_path: Path) -> None:
    entries = [File("data", SparseishFile(4 << 20, seed=3, data_every=64 << 10))]
    fast = write_layer(LayerSpec(entries, level=1), tmp_path / "fast")
    best = write_layer(LayerSpec(entries, level=9), tmp_path / "best")
    assert fast.diff_id == best.diff_id
    assert fast.size != best.size


def test_session_feature_image_is_reproducible(built_features: BuiltImage, tmp_path: Path) -> None:
    assert build_image(feature_image_spec(), tmp_path / "again").digest == built_features.digest


# -- unpacked by other tools --------------------------------------------------------------


def _view_from_disk(rootfs: Path) -> set[str]:
    found = set()
    for top, dirs, files in os.walk(rootfs):
        for name in dirs + files:
            found.add(str((Path(top) / name).relative_to(rootfs)))
    return found


def _check_unpacked(rootfs: Path, spec: ImageSpec, check_dir_mtimes: bool) -> None:
    """The unpacked tree is exactly `merged_view`: same paths, types, metadata and bytes."""
    view = merged_view(spec.layers)
    assert _view_from_disk(rootfs) == set(view)
    for name, entry in view.items():
        path = rootfs / name
        st = os.lstat(path)
        if isinstance(entry, Hardlink):
            assert st.st_ino == os.lstat(rootfs / entry.target.strip("/")).st_ino, name
            continue
        kinds = {
            File: stat.S_ISREG,
            Directory: stat.S_ISDIR,
            Symlink: stat.S_ISLNK,
            CharDevice: stat.S_ISCHR,
            BlockDevice: stat.S_ISBLK,
            Fifo: stat.S_ISFIFO,
        }
        assert kinds[type(entry)](st.st_mode), name
        assert stat.S_IMODE(st.st_mode) == entry.effective_mode, name
        assert (st.st_uid, st.st_gid) == (entry.uid, entry.gid), name
        if check_dir_mtimes or not isinstance(entry, Directory):
            assert int(st.st_mtime) == entry.mtime, name
        if isinstance(entry, Symlink):
            assert os.readlink(path) == entry.target, name
            continue
        xattrs = {key: os.getxattr(path, key) for key in os.listxattr(path)}
        assert xattrs == _raw_xattrs(entry), name
        if isinstance(entry, CharDevice | BlockDevice):
            assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (entry.major, entry.minor)
        if isinstance(entry, File):
            assert _sha256_file(path) == _expected_content_digest(entry.content), name


def test_umoci_unpack_reproduces_every_feature(
    built_features: BuiltImage, image_layout: Path, tmp_path: Path
) -> None:
    assert built_features.tag is not None
    bundle = tmp_path / "bundle"
    _run("umoci", "unpack", "--image", f"{image_layout}:{built_features.tag}", str(bundle))
    rootfs = bundle / "rootfs"
    # umoci (unlike containerd) leaves directory mtimes at the time their children appeared.
    _check_unpacked(rootfs, built_features.spec, check_dir_mtimes=False)
    assert not (rootfs / "lower/gone.txt").exists()
    assert not (rootfs / "lower/gone-dir").exists()
    assert sorted(os.listdir(rootfs / "opaque")) == ["new.txt"]
    assert (rootfs / "lower/replaced.txt").read_bytes() == b"new content from the upper layer\n"


# -- through the registry ----------------------------------------------------------------


def _skopeo_raw(reference: str, *extra: str) -> bytes:
    return _run(
        "skopeo", "inspect", "--tls-verify=false", "--raw", *extra, f"docker://{reference}"
    ).stdout.encode()


def test_pushed_image_reads_back_identically(pushed_features: PushedImage) -> None:
    built = pushed_features.built
    assert isinstance(built, BuiltImage)
    assert pushed_features.digest == built.digest
    assert _skopeo_raw(pushed_features.reference) == built.manifest_bytes
    assert _skopeo_raw(pushed_features.reference, "--config") == built.config_bytes


async def test_docker_manifest_and_index_push(
    image_pusher: ImagePusher,
    built_busybox_docker: BuiltImage,
    built_busybox_index: BuiltIndex,
) -> None:
    docker = await image_pusher.push(built_busybox_docker)
    assert _skopeo_raw(docker.reference) == built_busybox_docker.manifest_bytes
    assert json.loads(_skopeo_raw(docker.reference))["mediaType"] == mt.DOCKER_MANIFEST

    index = await image_pusher.push(built_busybox_index, tag="multi")
    assert index.digest == built_busybox_index.digest
    assert _skopeo_raw(index.reference) == built_busybox_index.index_bytes
    repository = index.reference.rsplit(":", 1)[0]
    for image in built_busybox_index.images:
        assert _skopeo_raw(f"{repository}@{image.digest}") == image.manifest_bytes


async def test_docker_manifest_list_push(image_pusher: ImagePusher, tmp_path: Path) -> None:
    specs = [
        busybox_image_spec(manifest_format="docker"),
        busybox_image_spec(manifest_format="docker", platform=Platform("linux", "arm", "v7")),
    ]
    built = build_index(specs, tmp_path / "layout", "list")
    pushed = await image_pusher.push(built)
    raw = _skopeo_raw(pushed.reference)
    assert raw == built.index_bytes
    assert json.loads(raw)["mediaType"] == mt.DOCKER_MANIFEST_LIST


def test_skopeo_copies_pushed_image_back_to_identical_blobs(
    pushed_busybox: PushedImage, tmp_path: Path
) -> None:
    built = pushed_busybox.built
    assert isinstance(built, BuiltImage)
    copy = tmp_path / "copy"
    _run(
        "skopeo",
        "copy",
        "--src-tls-verify=false",
        "--preserve-digests",
        f"docker://{pushed_busybox.reference}",
        f"oci:{copy}:copy",
    )
    for layer in built.layers:
        assert (copy / "blobs/sha256" / layer.digest.split(":")[1]).read_bytes() == (
            built.blob_path(layer.digest).read_bytes()
        )


# -- run by containerd ---------------------------------------------------------------------

_STAT_FORMAT = "%f|%u|%g|%Y|%t|%T|%i|%n"


class _Stat(NamedTuple):
    mode: int
    uid: int
    gid: int
    mtime: int
    major: int
    minor: int
    inode: int


def _parse_stat_line(line: str) -> tuple[str, _Stat]:
    """One line of busybox `stat -c _STAT_FORMAT`: mode and device numbers are in hex."""
    mode, uid, gid, mtime, major, minor, inode, name = line.split("|", 7)
    found = _Stat(
        int(mode, 16), int(uid), int(gid), int(mtime), int(major, 16), int(minor, 16), int(inode)
    )
    return name.lstrip("/"), found


_RUNTIME_MOUNTS = ("dev", "proc", "sys")


@pytest.mark.containerd
def test_containerd_runs_busybox_image(
    containerd: ContainerdServer, pushed_busybox: PushedImage
) -> None:
    containerd.ctr("images", "pull", "--plain-http", pushed_busybox.reference)
    result = containerd.run_container(pushed_busybox.reference, f"bb-{uuid.uuid4().hex[:12]}")
    assert result.stdout == "hello from acceld\n"


@pytest.mark.containerd
@pytest.mark.parametrize("image_fixture", ["built_features", "built_features_zstd"])
def test_containerd_unpack_shows_the_merged_view(
    image_fixture: str,
    request: pytest.FixtureRequest,
    containerd: ContainerdServer,
    image_pusher: ImagePusher,
) -> None:
    """What containerd's own overlayfs presents: the reference acceld must match."""
    built: BuiltImage = request.getfixturevalue(image_fixture)
    pushed = image_pusher.push_sync(built)
    containerd.ctr("images", "pull", "--plain-http", pushed.reference)
    view = {
        name: entry
        for name, entry in merged_view(built.spec.layers).items()
        if name.split("/")[0] not in _RUNTIME_MOUNTS
    }
    paths = [f"/{name}" for name in sorted(view)]
    # Not checked: stat exits 1 for a missing path, and the set comparison says which.
    result = containerd.run_container(
        pushed.reference,
        f"feat-{uuid.uuid4().hex[:12]}",
        *("/bin/stat", "-c", _STAT_FORMAT, *paths),
        check=False,
    )
    seen = dict(_parse_stat_line(line) for line in result.stdout.splitlines())
    assert set(seen) == set(view), result.stderr
    for name, entry in view.items():
        if isinstance(entry, Hardlink):
            assert seen[name].inode == seen[entry.target.strip("/")].inode, name
            continue
        found = seen[name]
        assert stat.S_IMODE(found.mode) == entry.effective_mode, name
        assert (found.uid, found.gid, found.mtime) == (entry.uid, entry.gid, entry.mtime), name
        if isinstance(entry, CharDevice | BlockDevice):
            assert (found.major, found.minor) == (entry.major, entry.minor), name
