"""The snapshotter over real gRPC on a unix socket, judged by containerd's rules.

Every call goes through a grpc.aio channel to the wire names containerd uses, so a
wrong method path, field number or status code fails here. Mounts are performed with
the kernel's overlayfs to prove they assemble what containerd would see.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from google.protobuf import empty_pb2, field_mask_pb2
from google.protobuf.message import Message

from agent.snapshotter import snapshotter as snapshotter_module
from agent.snapshotter.proto import mount_pb2
from agent.snapshotter.proto import snapshots_pb2 as pb
from agent.snapshotter.remote import REMOTE_REF_LABEL, NoRemoteLayers, RemoteLayers
from agent.snapshotter.server import SnapshotterServer

SERVICE = "/containerd.services.snapshots.v1.Snapshots"
NAMESPACE = (("containerd-namespace", "acceld-test"),)
INDEX_OFF = ["index=off"] if Path("/sys/module/overlay/parameters/index").exists() else []


class Client:
    """containerd's side of the wire: literal method paths, our message classes."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel

    async def call(self, method: str, request: Message, response: type[Message]) -> Message:
        rpc = self.channel.unary_unary(
            f"{SERVICE}/{method}",
            request_serializer=type(request).SerializeToString,
            response_deserializer=response.FromString,
        )
        return await rpc(request, metadata=NAMESPACE, timeout=30)

    async def prepare(self, key: str, parent: str = "", **labels: str) -> list[mount_pb2.Mount]:
        request = pb.PrepareSnapshotRequest(snapshotter="acceld", key=key, parent=parent)
        request.labels.update(labels)
        reply = await self.call("Prepare", request, pb.PrepareSnapshotResponse)
        assert isinstance(reply, pb.PrepareSnapshotResponse)
        return list(reply.mounts)

    async def prepare_labelled(
        self, key: str, parent: str, labels: dict[str, str]
    ) -> list[mount_pb2.Mount]:
        request = pb.PrepareSnapshotRequest(key=key, parent=parent, labels=labels)
        reply = await self.call("Prepare", request, pb.PrepareSnapshotResponse)
        assert isinstance(reply, pb.PrepareSnapshotResponse)
        return list(reply.mounts)

    async def view(self, key: str, parent: str = "") -> list[mount_pb2.Mount]:
        request = pb.ViewSnapshotRequest(key=key, parent=parent)
        reply = await self.call("View", request, pb.ViewSnapshotResponse)
        assert isinstance(reply, pb.ViewSnapshotResponse)
        return list(reply.mounts)

    async def mounts(self, key: str) -> list[mount_pb2.Mount]:
        reply = await self.call("Mounts", pb.MountsRequest(key=key), pb.MountsResponse)
        assert isinstance(reply, pb.MountsResponse)
        return list(reply.mounts)

    async def commit(self, name: str, key: str, **labels: str) -> None:
        request = pb.CommitSnapshotRequest(name=name, key=key, labels=labels)
        await self.call("Commit", request, empty_pb2.Empty)

    async def remove(self, key: str) -> None:
        await self.call("Remove", pb.RemoveSnapshotRequest(key=key), empty_pb2.Empty)

    async def stat(self, key: str) -> pb.Info:
        reply = await self.call("Stat", pb.StatSnapshotRequest(key=key), pb.StatSnapshotResponse)
        assert isinstance(reply, pb.StatSnapshotResponse)
        return reply.info

    async def update(self, name: str, labels: dict[str, str], *paths: str) -> pb.Info:
        request = pb.UpdateSnapshotRequest(
            info=pb.Info(name=name, labels=labels),
            update_mask=field_mask_pb2.FieldMask(paths=paths) if paths else None,
        )
        reply = await self.call("Update", request, pb.UpdateSnapshotResponse)
        assert isinstance(reply, pb.UpdateSnapshotResponse)
        return reply.info

    async def list(self, *filters: str) -> list[pb.Info]:
        rpc = self.channel.unary_stream(
            f"{SERVICE}/List",
            request_serializer=pb.ListSnapshotsRequest.SerializeToString,
            response_deserializer=pb.ListSnapshotsResponse.FromString,
        )
        infos: list[pb.Info] = []
        async for reply in rpc(pb.ListSnapshotsRequest(filters=filters), timeout=30):
            infos.extend(reply.info)
        return infos

    async def usage(self, key: str) -> tuple[int, int]:
        reply = await self.call("Usage", pb.UsageRequest(key=key), pb.UsageResponse)
        assert isinstance(reply, pb.UsageResponse)
        return reply.size, reply.inodes

    async def cleanup(self) -> None:
        await self.call("Cleanup", pb.CleanupRequest(), empty_pb2.Empty)


@dataclass
class DirectoryLayers:
    """A real `RemoteLayers`: serves each layer from a directory it fills itself.

    Stands for the FUSE tree: what matters to the snapshotter is only that a directory
    comes back and is released again.
    """

    top: Path
    serve: bool = True
    fail: bool = False
    fail_release: bool = False
    restorable: bool = True
    prepared: list[str] = field(default_factory=list)
    released: list[Path] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)
    generation: int = 0

    def _tree(self, labels: dict[str, str]) -> Path:
        ref = labels[REMOTE_REF_LABEL]
        path = self.top / f"gen{self.generation}" / ref.replace(":", "-")
        path.mkdir(parents=True, exist_ok=True)
        (path / "from-remote").write_text(ref)
        return path

    async def prepare_layer(
        self, key: str, parent: str | None, labels: dict[str, str]
    ) -> Path | None:
        self.prepared.append(key)
        await asyncio.sleep(0.05)  # a hook does network I/O: let other calls interleave
        if self.fail:
            raise OSError("registry unreachable")
        return self._tree(labels) if self.serve else None

    async def release_layer(self, snapshot_labels: dict[str, str], path: Path) -> None:
        self.released.append(path)
        if self.fail_release:
            raise OSError("layer busy")

    async def restore_layer(self, labels: dict[str, str]) -> Path | None:
        self.restored.append(labels[REMOTE_REF_LABEL])
        return self._tree(labels) if self.restorable else None

    def layer_usage(self, path: Path) -> tuple[int, int]:
        return 4096 * 3, 3


class Harness:
    """A `SnapshotterServer` on a unix socket and a client; restartable on the same root."""

    def __init__(self, root: Path, socket_path: Path, remote: RemoteLayers) -> None:
        self.root = root
        self.socket_path = socket_path
        self.remote = remote
        self.server: SnapshotterServer | None = None
        self.channel: grpc.aio.Channel | None = None
        self.client: Client

    async def start(self) -> Client:
        self.server = SnapshotterServer(self.root, self.socket_path, self.remote)
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(f"unix://{self.socket_path}")
        self.client = Client(self.channel)
        return self.client

    async def stop(self) -> None:
        if self.channel is not None:
            await self.channel.close()
            self.channel = None
        if self.server is not None:
            await self.server.stop()
            self.server = None

    async def restart(self) -> Client:
        await self.stop()
        return await self.start()


@pytest.fixture
def short_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # unix socket paths are capped at 108 bytes; tmp_path embeds the test name.
    return tmp_path_factory.mktemp("snap")


@pytest.fixture
def layers(short_dir: Path) -> DirectoryLayers:
    return DirectoryLayers(short_dir / "remote")


@pytest.fixture
async def harness(short_dir: Path, layers: DirectoryLayers) -> AsyncIterator[Harness]:
    harness = Harness(short_dir / "root", short_dir / "run" / "snap.sock", layers)
    await harness.start()
    try:
        yield harness
    finally:
        await harness.stop()


@pytest.fixture
def client(harness: Harness) -> Client:
    return harness.client


@pytest.fixture
def mounted(short_dir: Path) -> Iterator[list[Path]]:
    """Targets mounted by a test; unmounted afterwards whatever happens."""
    targets: list[Path] = []
    yield targets
    for target in reversed(targets):
        subprocess.run(["umount", str(target)], capture_output=True, check=False)


def do_mount(mounts: list[mount_pb2.Mount], target: Path, mounted: list[Path]) -> Path:
    """Perform containerd's mounts with mount(8), as containerd would with mount(2)."""
    assert len(mounts) == 1
    (mount,) = mounts
    target.mkdir(parents=True, exist_ok=True)
    options = list(mount.options)
    if mount.type == "bind":
        subprocess.run(["mount", "--rbind", mount.source, str(target)], check=True)
        mounted.append(target)
        if "ro" in options:
            remount = ["mount", "-o", "remount,bind,ro", str(target)]
            subprocess.run(remount, check=True)
    else:
        command = ["mount", "-t", mount.type, "-o", ",".join(options), mount.source, str(target)]
        subprocess.run(command, check=True)
        mounted.append(target)
    return target


def unmount(target: Path, mounted: list[Path]) -> None:
    subprocess.run(["umount", str(target)], check=True)
    mounted.remove(target)


async def expect_code(code: grpc.StatusCode, call: object) -> str:
    assert asyncio.iscoroutine(call)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    return caught.value.details() or ""


def snapshot_id(mount: mount_pb2.Mount) -> int:
    """The snapshot id inside a bind mount's source ``.../snapshots/<id>/fs``."""
    return int(Path(mount.source).parent.name)


async def test_base_snapshot_is_a_rw_bind_mount_of_its_own_tree(
    client: Client, harness: Harness
) -> None:
    (mount,) = await client.prepare("ns/1/base")
    assert mount.type == "bind"
    assert list(mount.options) == ["rw", "rbind"]
    source = Path(mount.source)
    assert source == harness.root / "snapshots" / str(snapshot_id(mount)) / "fs"
    assert oct(source.stat().st_mode & 0o777) == oct(0o755)
    assert oct((source.parent / "work").stat().st_mode & 0o777) == oct(0o711)
    info = await client.stat("ns/1/base")
    assert (info.name, info.parent, info.kind) == ("ns/1/base", "", pb.ACTIVE)
    assert info.created_at.seconds > 0 and info.created_at == info.updated_at
    assert await client.mounts("ns/1/base") == [mount]


async def test_layers_stack_into_overlays_exactly_like_containerd(
    client: Client, harness: Harness, short_dir: Path, mounted: list[Path]
) -> None:
    (base_mount,) = await client.prepare("extract-1")
    (Path(base_mount.source) / "base.txt").write_text("base\n")
    (Path(base_mount.source) / "gone.txt").write_text("deleted above\n")
    await client.commit("layer-1", "extract-1", **{"containerd.io/uncompressed": "sha256:1"})
    committed = await client.stat("layer-1")
    assert committed.kind == pb.COMMITTED and dict(committed.labels) == {
        "containerd.io/uncompressed": "sha256:1"
    }
    await expect_code(grpc.StatusCode.NOT_FOUND, client.stat("extract-1"))
    layer1 = Path(base_mount.source)
    assert not (layer1.parent / "work").exists()

    (upper_mount,) = await client.prepare("extract-2", "layer-1")
    assert upper_mount.type == "overlay" and upper_mount.source == "overlay"
    upper_id = snapshot_id_from_options(upper_mount)
    upper = harness.root / "snapshots" / str(upper_id)
    assert list(upper_mount.options) == [
        *INDEX_OFF,
        f"workdir={upper / 'work'}",
        f"upperdir={upper / 'fs'}",
        f"lowerdir={layer1}",
    ]
    target = do_mount([upper_mount], short_dir / "mnt-upper", mounted)
    assert (target / "base.txt").read_text() == "base\n"
    (target / "gone.txt").unlink()
    (target / "app.txt").write_text("app\n")
    unmount(target, mounted)
    await client.commit("layer-2", "extract-2")
    assert (await client.stat("layer-2")).parent == "layer-1"

    (container_mount,) = await client.prepare("container", "layer-2")
    options = list(container_mount.options)
    assert options[-1] == f"lowerdir={upper / 'fs'}:{layer1}"
    rootfs = do_mount([container_mount], short_dir / "mnt-rootfs", mounted)
    assert sorted(p.name for p in rootfs.iterdir()) == ["app.txt", "base.txt"]

    (single_view,) = await client.view("view-1", "layer-1")
    assert (single_view.type, single_view.source) == ("bind", str(layer1))
    assert list(single_view.options) == ["ro", "rbind"]
    (double_view,) = await client.view("view-2", "layer-2")
    assert double_view.type == "overlay"
    assert list(double_view.options) == [*INDEX_OFF, f"lowerdir={upper / 'fs'}:{layer1}"]
    view_root = do_mount([double_view], short_dir / "mnt-view", mounted)
    assert sorted(p.name for p in view_root.iterdir()) == ["app.txt", "base.txt"]
    with pytest.raises(OSError):
        (view_root / "new").write_text("read-only")
    (empty_view,) = await client.view("view-0")
    assert empty_view.type == "bind" and list(empty_view.options) == ["ro", "rbind"]
    assert (await client.stat("view-0")).kind == pb.VIEW
    assert await client.mounts("view-2") == [double_view]


def snapshot_id_from_options(mount: mount_pb2.Mount) -> int:
    upper = next(o for o in mount.options if o.startswith("upperdir="))
    return int(Path(upper.removeprefix("upperdir=")).parent.name)


async def test_errors_carry_containerds_status_codes(client: Client) -> None:
    codes = grpc.StatusCode
    await client.prepare("active")
    await expect_code(codes.ALREADY_EXISTS, client.prepare("active"))
    await expect_code(codes.NOT_FOUND, client.prepare("child", "no-such-parent"))
    await expect_code(codes.FAILED_PRECONDITION, client.prepare("child", "active"))
    await expect_code(codes.FAILED_PRECONDITION, client.view("child", "active"))
    await expect_code(codes.INVALID_ARGUMENT, client.prepare(""))
    await expect_code(codes.INVALID_ARGUMENT, client.prepare("big", **{"k": "v" * 4096}))
    await client.prepare("just-fits", **{"k": "v" * 4095})
    await expect_code(codes.NOT_FOUND, client.commit("name", "no-such-key"))
    await client.commit("committed", "active")
    await client.prepare("active-2")
    await expect_code(codes.ALREADY_EXISTS, client.commit("committed", "active-2"))
    await expect_code(codes.ALREADY_EXISTS, client.commit("just-fits", "active-2"))
    await expect_code(codes.FAILED_PRECONDITION, client.commit("again", "committed"))
    await client.view("a-view")
    await expect_code(codes.FAILED_PRECONDITION, client.commit("from-view", "a-view"))
    await expect_code(codes.FAILED_PRECONDITION, client.mounts("committed"))
    await expect_code(codes.NOT_FOUND, client.mounts("no-such-key"))
    await client.prepare("on-top", "committed")
    await expect_code(codes.FAILED_PRECONDITION, client.remove("committed"))
    await expect_code(codes.NOT_FOUND, client.remove("no-such-key"))
    await expect_code(codes.NOT_FOUND, client.stat("no-such-key"))
    await expect_code(codes.NOT_FOUND, client.usage("no-such-key"))
    await expect_code(codes.NOT_FOUND, client.update("no-such-key", {}))
    await expect_code(codes.INVALID_ARGUMENT, client.update("committed", {}, "parent"))
    await expect_code(codes.INVALID_ARGUMENT, client.update("committed", {}, "name"))
    await expect_code(codes.INVALID_ARGUMENT, client.list('labels."unterminated==x'))
    await expect_code(codes.INVALID_ARGUMENT, client.list("name~=("))
    # A refused request changed nothing.
    names = sorted(info.name for info in await client.list())
    assert names == ["a-view", "active-2", "committed", "just-fits", "on-top"]


async def test_update_masks_touch_only_labels(client: Client) -> None:
    await client.prepare("k", a="1", b="2", c="3")
    before = await client.stat("k")

    info = await client.update("k", {"b": "20", "d": "4", "ignored": "x"}, "labels.b", "labels.d")
    assert dict(info.labels) == {"a": "1", "b": "20", "c": "3", "d": "4"}
    info = await client.update("k", {}, "labels.a")  # absent from the request: deleted
    assert dict(info.labels) == {"b": "20", "c": "3", "d": "4"}
    info = await client.update("k", {"only": "this"}, "labels")
    assert dict(info.labels) == {"only": "this"}
    info = await client.update("k", {"no": "mask"})
    assert dict(info.labels) == {"no": "mask"}
    info = await client.update("k", {"empty": ""}, "labels.no", "labels.empty")
    assert dict(info.labels) == {}

    assert info.name == "k" and info.kind == pb.ACTIVE and info.parent == ""
    assert info.created_at == before.created_at
    assert info.updated_at.ToNanoseconds() > before.updated_at.ToNanoseconds()
    assert await client.stat("k") == info
    await expect_code(grpc.StatusCode.INVALID_ARGUMENT, client.update("k", {"x": "y" * 4096}))


async def test_list_filters_as_containerd_and_its_gc_send_them(
    client: Client, layers: DirectoryLayers
) -> None:
    layers.serve = False  # every layer unpacked the ordinary way
    ref_label = "containerd.io/snapshot.ref"
    await client.prepare("ns/1/extract a", **{ref_label: "sha256:aaa"})
    await client.commit("ns/2/sha256:aaa", "ns/1/extract a", **{ref_label: "sha256:aaa"})
    await client.prepare("ns/3/extract b", "ns/2/sha256:aaa", **{ref_label: "sha256:bbb"})
    await client.commit("sha256:bbb", "ns/3/extract b", **{ref_label: "sha256:bbb"})
    await client.view("ns/4/view", "sha256:bbb")
    await client.prepare("ns/5/container", "sha256:bbb", **{"odd key": 'quote " and \\'})

    async def names(*filters: str) -> list[str]:
        return sorted(info.name for info in await client.list(*filters))

    everything = ["ns/2/sha256:aaa", "ns/4/view", "ns/5/container", "sha256:bbb"]
    assert await names() == everything
    assert await names("") == everything
    # What containerd's metadata layer asks after a remote snapshot's ALREADY_EXISTS.
    exact = f'labels."{ref_label}"==sha256:bbb,parent=="ns/2/sha256:aaa"'
    assert await names(exact) == ["sha256:bbb"]
    assert await names(f'labels."{ref_label}"==sha256:bbb,parent==""') == []
    assert await names(f'labels."{ref_label}"==sha256:aaa,parent==""') == ["ns/2/sha256:aaa"]
    assert await names("kind==committed") == ["ns/2/sha256:aaa", "sha256:bbb"]
    assert await names("kind==view", "kind==active") == ["ns/4/view", "ns/5/container"]
    assert await names('name=="ns/4/view"') == ["ns/4/view"]
    assert await names("parent==sha256:bbb") == ["ns/4/view", "ns/5/container"]
    assert await names(f'labels."{ref_label}"') == ["ns/2/sha256:aaa", "sha256:bbb"]
    assert await names(f'labels."{ref_label}"!=sha256:aaa') == [
        "ns/4/view",
        "ns/5/container",
        "sha256:bbb",
    ]
    assert await names(r'labels."odd key"=="quote \" and \\"') == ["ns/5/container"]
    assert await names("name~=|^ns/[24]/|") == ["ns/2/sha256:aaa", "ns/4/view"]
    assert await names(" kind == committed , name ~= /bbb$/ ") == ["sha256:bbb"]
    assert await names("labels.missing", "name==nothing") == []


async def test_list_streams_many_snapshots_in_batches(client: Client) -> None:
    keys = {f"ns/{n}/key" for n in range(250)}
    await asyncio.gather(*(client.prepare(key) for key in keys))
    assert {info.name for info in await client.list()} == keys


async def test_usage_counts_blocks_and_inodes_like_containerd(client: Client) -> None:
    (mount,) = await client.prepare("active")
    tree = Path(mount.source)
    (tree / "data").write_bytes(os.urandom(100_000))
    (tree / "dir").mkdir()
    os.link(tree / "data", tree / "dir" / "hardlink")
    size, inodes = await client.usage("active")
    expected = sum(os.lstat(p).st_blocks * 512 for p in (tree, tree / "data", tree / "dir"))
    assert (size, inodes) == (expected, 3)
    assert size >= 100_000

    await client.commit("committed", "active")
    (tree / "written-after-commit").write_bytes(b"x" * 50_000)
    assert await client.usage("committed") == (size, inodes)  # recorded at commit
    await client.view("view", "committed")
    assert await client.usage("view") == (0, 0)


async def test_remove_deletes_the_tree_and_cleanup_the_orphans(
    client: Client, harness: Harness
) -> None:
    (mount,) = await client.prepare("doomed")
    doomed_dir = Path(mount.source).parent
    (Path(mount.source) / "file").write_text("x")
    (kept,) = await client.prepare("kept")
    snapshots = harness.root / "snapshots"
    orphans = [snapshots / "999999", snapshots / "new-123456", snapshots / "rm-7"]
    for orphan in orphans:
        (orphan / "fs" / "deep").mkdir(parents=True)

    await client.remove("doomed")
    assert not doomed_dir.exists()
    await expect_code(grpc.StatusCode.NOT_FOUND, client.stat("doomed"))
    assert all(orphan.exists() for orphan in orphans)

    await client.cleanup()
    assert not any(orphan.exists() for orphan in orphans)
    assert Path(kept.source).is_dir()
    assert sorted(p.name for p in snapshots.iterdir()) == [str(snapshot_id(kept))]


async def test_restart_keeps_everything_and_ids_never_repeat(harness: Harness) -> None:
    client = harness.client
    (base,) = await client.prepare("base", label="one")
    (Path(base.source) / "file").write_text("survives\n")
    await client.commit("layer", "base", label="committed")
    (top,) = await client.prepare("top", "layer")
    (last,) = await client.prepare("last")
    await client.remove("last")
    before = sorted((i.name, i.SerializeToString()) for i in await client.list())

    client = await harness.restart()

    assert sorted((i.name, i.SerializeToString()) for i in await client.list()) == before
    assert await client.mounts("top") == [top]
    assert (Path(base.source) / "file").read_text() == "survives\n"
    (fresh,) = await client.prepare("fresh")
    assert snapshot_id(fresh) > snapshot_id(last)
    assert (await client.stat("layer")).labels["label"] == "committed"


async def test_socket_is_private(harness: Harness) -> None:
    assert oct(harness.socket_path.stat().st_mode & 0o777) == oct(0o600)
    assert oct(harness.socket_path.parent.stat().st_mode & 0o777) == oct(0o700)
    assert oct((harness.root / "snapshots").stat().st_mode & 0o777) == oct(0o700)


CRI_LABELS = {
    "containerd.io/snapshot/cri.image-ref": "127.0.0.1:5000/app:v1",
    "containerd.io/snapshot/cri.layer-digest": "sha256:" + "1" * 64,
    "containerd.io/snapshot/cri.manifest-digest": "sha256:" + "2" * 64,
}


def remote_labels(chain_id: str) -> dict[str, str]:
    return {**CRI_LABELS, REMOTE_REF_LABEL: chain_id}


async def test_remote_layer_handshake(
    client: Client, layers: DirectoryLayers, short_dir: Path, mounted: list[Path]
) -> None:
    # Layer 1 is local (unpacked by containerd), layer 2 is served by the hook.
    base_name = "k8s.io/2/sha256:c1"
    (base,) = await client.prepare("k8s.io/1/extract-1 sha256:c1")
    (Path(base.source) / "local").write_text("unpacked\n")
    await client.commit(base_name, "k8s.io/1/extract-1 sha256:c1")
    key = f"k8s.io/3/extract-{uuid.uuid4().int} sha256:c2"

    await expect_code(
        grpc.StatusCode.ALREADY_EXISTS,
        client.prepare_labelled(key, base_name, remote_labels("sha256:c2")),
    )

    assert layers.prepared == [key]
    await expect_code(grpc.StatusCode.NOT_FOUND, client.stat(key))
    exact = f'labels."{REMOTE_REF_LABEL}"==sha256:c2,parent=="k8s.io/2/sha256:c1"'
    (found,) = await client.list(exact)
    assert (found.name, found.parent, found.kind) == ("sha256:c2", "k8s.io/2/sha256:c1", 3)
    assert dict(found.labels) == remote_labels("sha256:c2")
    served = layers.top / "gen0" / "sha256-c2"
    assert await client.usage("sha256:c2") == (4096 * 3, 3)

    # The same layer again (another image, another namespace): no second preparation.
    await expect_code(
        grpc.StatusCode.ALREADY_EXISTS,
        client.prepare_labelled("other/1/extract", base_name, remote_labels("sha256:c2")),
    )
    assert layers.prepared == [key]

    (rootfs,) = await client.prepare("k8s.io/4/container", "sha256:c2")
    assert list(rootfs.options)[-1] == f"lowerdir={served}:{base.source}"
    root = do_mount([rootfs], short_dir / "mnt-remote", mounted)
    assert (root / "from-remote").read_text() == "sha256:c2"
    assert (root / "local").read_text() == "unpacked\n"
    unmount(root, mounted)

    await expect_code(grpc.StatusCode.FAILED_PRECONDITION, client.remove("sha256:c2"))
    await client.remove("k8s.io/4/container")
    await client.remove("sha256:c2")
    assert layers.released == [served]
    await expect_code(grpc.StatusCode.NOT_FOUND, client.stat("sha256:c2"))


async def test_remote_fallbacks_give_ordinary_snapshots(
    client: Client, layers: DirectoryLayers
) -> None:
    layers.serve = False
    (mount,) = await client.prepare_labelled("ns/1/a", "", remote_labels("sha256:a"))
    assert mount.type == "bind" and (await client.stat("ns/1/a")).kind == pb.ACTIVE
    layers.serve, layers.fail = True, True
    (mount,) = await client.prepare_labelled("ns/1/b", "", remote_labels("sha256:b"))
    assert mount.type == "bind" and (await client.stat("ns/1/b")).kind == pb.ACTIVE
    assert layers.prepared == ["ns/1/a", "ns/1/b"]
    assert await client.list("kind==committed") == []

    # Parent errors win over the hook, which is not even asked.
    layers.fail = False
    await expect_code(
        grpc.StatusCode.NOT_FOUND,
        client.prepare_labelled("ns/1/c", "missing", remote_labels("sha256:c")),
    )
    assert layers.prepared == ["ns/1/a", "ns/1/b"]


async def test_concurrent_prepares_of_one_layer_prepare_it_once(
    client: Client, layers: DirectoryLayers
) -> None:
    calls = [
        client.prepare_labelled(f"ns{n}/1/extract", "", remote_labels("sha256:shared"))
        for n in range(4)
    ]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(r, grpc.aio.AioRpcError) for r in results)
    assert {r.code() for r in results if isinstance(r, grpc.aio.AioRpcError)} == {
        grpc.StatusCode.ALREADY_EXISTS
    }
    assert len(layers.prepared) == 1
    assert [i.name for i in await client.list()] == ["sha256:shared"]


async def test_restart_restores_remote_layers_before_serving(
    harness: Harness, layers: DirectoryLayers
) -> None:
    await expect_code(
        grpc.StatusCode.ALREADY_EXISTS,
        harness.client.prepare_labelled("ns/1/x", "", remote_labels("sha256:r")),
    )
    layers.generation = 1  # after a restart the hook serves from elsewhere

    client = await harness.restart()

    assert layers.restored == ["sha256:r"]
    await client.prepare("ns/2/container", "sha256:r")
    (mount,) = await client.view("ns/3/view", "sha256:r")
    assert mount.source == str(layers.top / "gen1" / "sha256-r")


async def test_a_layer_not_restored_after_a_restart_is_retried_when_a_snapshot_needs_it(
    harness: Harness, layers: DirectoryLayers
) -> None:
    """The registry was unreachable while the agent restarted: a snapshot on the layer
    is refused by name (UNAVAILABLE), and nothing is left behind; once the hook can
    serve it again, the next Prepare, View and Mounts work on the layer's new path."""
    await expect_code(
        grpc.StatusCode.ALREADY_EXISTS,
        harness.client.prepare_labelled("ns/1/x", "", remote_labels("sha256:r")),
    )
    (mount,) = await harness.client.prepare("ns/2/before", "sha256:r")
    layers.generation, layers.restorable = 1, False
    client = await harness.restart()

    for refused in (
        client.prepare("ns/3/container", "sha256:r"),
        client.view("ns/4/view", "sha256:r"),
        client.mounts("ns/2/before"),
    ):
        details = await expect_code(grpc.StatusCode.UNAVAILABLE, refused)
        assert "layer sha256:r is not served" in details
    assert sorted(i.name for i in await client.list()) == ["ns/2/before", "sha256:r"]
    assert layers.restored == ["sha256:r"] * 4  # the restart, then each refused call

    layers.restorable = True
    served = str(layers.top / "gen1" / "sha256-r")
    (view,) = await client.view("ns/4/view", "sha256:r")
    assert view.source == served
    (again,) = await client.mounts("ns/2/before")
    assert f"lowerdir={served}" in again.options
    await client.prepare("ns/3/container", "sha256:r")
    assert layers.restored == ["sha256:r"] * 5  # served from then on: asked once more
    assert mount.options != again.options


async def test_a_layer_not_restored_after_a_restart_comes_back_unasked(
    harness: Harness, layers: DirectoryLayers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Running containers read a layer through nodes the kernel kept, with no Prepare
    to trigger a retry: the layer is tried again in the background until it is back."""
    monkeypatch.setattr(snapshotter_module, "RETRY_UNSERVED_S", 0.05)
    await expect_code(
        grpc.StatusCode.ALREADY_EXISTS,
        harness.client.prepare_labelled("ns/1/x", "", remote_labels("sha256:r")),
    )
    layers.generation, layers.restorable = 1, False
    client = await harness.restart()
    await asyncio.sleep(0.3)
    tries = len(layers.restored)
    assert tries >= 3  # the restart's, then the background's
    layers.restorable = True
    await asyncio.sleep(0.3)
    assert len(layers.restored) == tries + 1  # back, and then left alone
    (view,) = await client.view("ns/2/view", "sha256:r")
    assert view.source == str(layers.top / "gen1" / "sha256-r")
    assert len(layers.restored) == tries + 1


async def test_without_remote_layers_every_layer_is_local(short_dir: Path) -> None:
    harness = Harness(short_dir / "plain", short_dir / "plain.sock", NoRemoteLayers())
    client = await harness.start()
    try:
        (mount,) = await client.prepare_labelled("ns/1/a", "", remote_labels("sha256:a"))
        assert mount.type == "bind"
        await client.commit("ns/2/sha256:a", "ns/1/a")
        assert (await client.stat("ns/2/sha256:a")).kind == pb.COMMITTED
    finally:
        await harness.stop()


def test_standalone_server_runs_and_stops_on_sigterm(short_dir: Path) -> None:
    socket_path = short_dir / "cli" / "s.sock"
    command = [
        sys.executable,
        "-m",
        "agent.snapshotter.server",
        "--root",
        str(short_dir / "cli-root"),
        "--socket",
        str(socket_path),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        with grpc.insecure_channel(f"unix://{socket_path}") as channel:
            grpc.channel_ready_future(channel).result(timeout=20)
            stat = channel.unary_unary(
                f"{SERVICE}/Stat",
                request_serializer=pb.StatSnapshotRequest.SerializeToString,
                response_deserializer=pb.StatSnapshotResponse.FromString,
            )
            with pytest.raises(grpc.RpcError) as caught:
                stat(pb.StatSnapshotRequest(key="nothing"), timeout=10)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        process.terminate()
        output, _ = process.communicate(timeout=20)
        assert process.returncode == 0, output.decode()
        assert not socket_path.exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def test_remove_of_a_remote_snapshot_stands_when_the_hook_fails_to_release(
    client: Client, layers: DirectoryLayers
) -> None:
    await expect_code(
        grpc.StatusCode.ALREADY_EXISTS,
        client.prepare_labelled("ns/1/x", "", remote_labels("sha256:busy")),
    )
    layers.fail_release = True
    await client.remove("sha256:busy")
    assert layers.released == [layers.top / "gen0" / "sha256-busy"]
    await expect_code(grpc.StatusCode.NOT_FOUND, client.stat("sha256:busy"))
