"""The snapshotter as the real containerd 1.6 uses it: pulls, runs, GC and the CRI
remote-snapshot handshake.

The bar is containerd's own overlayfs snapshotter: the same image pulled through both
must give byte-identical root filesystems and identical container output. The remote
test stands a registry-backed hook in for the lazy FUSE layers: it downloads and
unpacks each layer itself, so the registry's access log shows whether containerd
skipped the layers it was told already exist.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import stat
import subprocess
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import grpc
import pytest

from agent.snapshotter.overlay import disk_usage
from agent.snapshotter.proto import snapshots_pb2 as pb
from agent.snapshotter.remote import REMOTE_REF_LABEL, RemoteLayers
from agent.snapshotter.server import SnapshotterServer
from common.digest import chain_id
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from rig.containerd import ACCELD_SNAPSHOTTER, CRI_NAMESPACE, ContainerdServer
from rig.images import BuiltImage
from rig.registry import RegistryRequest, RegistryServer
from tests.fixtures.containerd import ContainerdFactory
from tests.fixtures.images import PushedImage
from tests.fixtures.registry import running

pytestmark = pytest.mark.containerd

CRI_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
CRI_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"


class ThreadedSnapshotter:
    """A `SnapshotterServer` on its own event loop thread, so blocking `ctr` calls can
    drive it from the test thread as containerd's peer."""

    def __init__(self, root: Path, socket_path: Path, remote: RemoteLayers | None) -> None:
        self.root = root
        self.socket_path = socket_path
        self.remote = remote
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: SnapshotterServer | None = None

    def start(self) -> None:
        self._thread.start()
        try:
            self._start_server()
        except BaseException:
            self.stop()
            raise

    def restart(self) -> None:
        """A new server on the same root, as when the agent restarts under containerd."""
        self._stop_server()
        self._start_server()

    def stop(self) -> None:
        self._stop_server()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()

    def _start_server(self) -> None:
        server = SnapshotterServer(self.root, self.socket_path, self.remote)
        asyncio.run_coroutine_threadsafe(server.start(), self._loop).result(timeout=30)
        self._server = server

    def _stop_server(self) -> None:
        if self._server is not None:
            stop = self._server.stop(grace=2.0)
            asyncio.run_coroutine_threadsafe(stop, self._loop).result(timeout=30)
            self._server = None

    def log_paths(self) -> list[Path]:
        return []  # logs go to the test's captured output

    def list(self, *filters: str) -> list[pb.Info]:
        """What the snapshotter itself holds, asked over its socket."""
        with grpc.insecure_channel(f"unix://{self.socket_path}") as channel:
            rpc = channel.unary_stream(
                "/containerd.services.snapshots.v1.Snapshots/List",
                request_serializer=pb.ListSnapshotsRequest.SerializeToString,
                response_deserializer=pb.ListSnapshotsResponse.FromString,
            )
            return [
                info
                for reply in rpc(pb.ListSnapshotsRequest(filters=filters))
                for info in reply.info
            ]


def unpack_layer(blob: Path, target: Path) -> None:
    """Unpack a layer tarball into an overlay lowerdir, whiteouts in overlay's format."""
    target.mkdir(parents=True)
    with tarfile.open(blob, "r:*") as layer:
        for member in layer:
            parent, _, name = member.name.rstrip("/").rpartition("/")
            directory = target / parent
            if name == OPAQUE_MARKER:
                os.setxattr(directory, "trusted.overlay.opaque", b"y")
            elif name.startswith(WHITEOUT_PREFIX):
                hidden = directory / name.removeprefix(WHITEOUT_PREFIX)
                os.mknod(hidden, stat.S_IFCHR | 0o000, os.makedev(0, 0))
            else:
                layer.extract(member, target, numeric_owner=True, filter="fully_trusted")


class RegistryLayers:
    """A real `RemoteLayers` for CRI pulls: fetches each layer blob itself and unpacks it.

    Stands for the lazy FUSE path: containerd must be content to find the layer
    committed and never download it.
    """

    def __init__(self, top: Path, plain_http_hosts: set[str]) -> None:
        self.top = top
        self.plain_http_hosts = plain_http_hosts
        self.prepared: list[str] = []
        self.released: list[Path] = []
        self.restored: list[str] = []

    def _layer_dir(self, labels: dict[str, str]) -> Path:
        return self.top / labels[REMOTE_REF_LABEL].replace(":", "-")

    async def prepare_layer(
        self, key: str, parent: str | None, labels: dict[str, str]
    ) -> Path | None:
        if CRI_IMAGE_REF not in labels or CRI_LAYER_DIGEST not in labels:
            return None
        reference = ImageReference.parse(labels[CRI_IMAGE_REF])
        digest = labels[CRI_LAYER_DIGEST]
        target = self._layer_dir(labels)
        blob = self.top / f"{digest.replace(':', '-')}.blob"
        self.top.mkdir(parents=True, exist_ok=True)
        async with RegistryClient(plain_http_hosts=self.plain_http_hosts) as client:
            await client.download_blob(reference, digest, blob)
        try:
            await asyncio.to_thread(unpack_layer, blob, target)
        finally:
            blob.unlink()
        self.prepared.append(digest)
        return target

    async def release_layer(self, snapshot_labels: dict[str, str], path: Path) -> None:
        self.released.append(path)
        await asyncio.to_thread(shutil.rmtree, path)

    async def restore_layer(self, labels: dict[str, str]) -> Path | None:
        self.restored.append(labels[REMOTE_REF_LABEL])
        path = self._layer_dir(labels)
        return path if path.is_dir() else None

    def layer_usage(self, path: Path) -> tuple[int, int]:
        return disk_usage(path)


SnapshotterFactory = Callable[..., ThreadedSnapshotter]


@pytest.fixture
def snapshotter_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SnapshotterFactory]:
    """Start snapshotters (own root, short socket path); all stopped at teardown.

    Request it before ``containerd_factory`` so that containerd goes first.
    """
    with ExitStack() as stack:

        def start(remote: RemoteLayers | None = None) -> ThreadedSnapshotter:
            work = tmp_path_factory.mktemp("acceld")
            # tmpfs like containerd's root: directory sizes and block counts, which
            # `ls -l` shows inside a container, then match those under overlayfs.
            (work / "root").mkdir()
            subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(work / "root")], check=True)
            stack.callback(unmount, work / "root")
            server = ThreadedSnapshotter(work / "root", work / "run" / "s.sock", remote)
            started: ThreadedSnapshotter = stack.enter_context(running(server))
            return started

        yield start


def unmount(target: Path) -> None:
    if subprocess.run(["umount", str(target)], capture_output=True).returncode:
        subprocess.run(["umount", "--lazy", str(target)], check=True)


def requests_since(
    registry: RegistryServer, start: int, layer_digests: list[str]
) -> tuple[list[RegistryRequest], list[RegistryRequest]]:
    """Requests after the first ``start`` ones, and the GETs of layer blobs among them.

    The registry logs a request a moment after answering it: wait until every layer
    blob GET has shown up (or 10 s).
    """
    deadline = time.monotonic() + 10
    while True:
        requests = registry.requests()[start:]
        layer_gets = [
            r for r in requests if r.method == "GET" and r.path.split("/")[-1] in layer_digests
        ]
        if len(layer_gets) >= len(layer_digests) or time.monotonic() > deadline:
            return requests, layer_gets
        time.sleep(0.1)


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def tree_fingerprint(top: Path) -> dict[str, tuple[object, ...]]:
    """Everything a container can observe of a tree, per path (content as a digest)."""
    entries: dict[str, tuple[object, ...]] = {}
    for directory, subdirs, files in os.walk(top):
        for name in ["", *subdirs, *files] if directory == str(top) else [*subdirs, *files]:
            path = Path(directory, name)
            info = os.lstat(path)
            detail: object = None
            if stat.S_ISREG(info.st_mode):
                detail = hashlib.sha256(path.read_bytes()).hexdigest()
            elif stat.S_ISLNK(info.st_mode):
                detail = os.readlink(path)
            elif stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode):
                detail = info.st_rdev
            xattrs = sorted(
                (key, os.getxattr(path, key, follow_symlinks=False))
                for key in os.listxattr(path, follow_symlinks=False)
            )
            entries[str(path.relative_to(top))] = (
                info.st_mode,
                info.st_uid,
                info.st_gid,
                info.st_nlink if not stat.S_ISDIR(info.st_mode) else None,
                info.st_size if not stat.S_ISDIR(info.st_mode) else None,
                # The root comes from no tar entry: its mtime is when the unpack ran.
                info.st_mtime_ns if path != top else None,
                detail,
                tuple(xattrs),
            )
    return entries


def mounted_view_fingerprint(
    containerd: ContainerdServer, snapshotter: str, parent: str, target: Path
) -> dict[str, tuple[object, ...]]:
    """Mount a read-only view of ``parent`` as containerd describes it and fingerprint it."""
    key = unique("view")
    mounts_json = containerd.ctr(
        "snapshots", "--snapshotter", snapshotter, "view", "--mounts", key, parent
    ).stdout
    (mount,) = json.loads(mounts_json)
    target.mkdir(parents=True)
    options = ",".join(mount["Options"])
    if mount["Type"] == "bind":
        command = ["mount", "-o", options, mount["Source"], str(target)]
    else:
        command = ["mount", "-t", mount["Type"], "-o", options, mount["Source"], str(target)]
    subprocess.run(command, check=True, capture_output=True)
    try:
        return tree_fingerprint(target)
    finally:
        subprocess.run(["umount", str(target)], check=True)
        # The view's lease ended with `ctr`: containerd's GC may have taken it already.
        containerd.ctr("snapshots", "--snapshotter", snapshotter, "rm", key, check=False)


def test_pulled_image_is_identical_to_overlayfs(
    snapshotter_factory: SnapshotterFactory,
    containerd_factory: ContainerdFactory,
    pushed_features: PushedImage,
    tmp_path: Path,
) -> None:
    acceld = snapshotter_factory()
    containerd = containerd_factory(acceld_socket=acceld.socket_path)
    built = pushed_features.built
    assert isinstance(built, BuiltImage)
    for snapshotter in ("overlayfs", ACCELD_SNAPSHOTTER):
        containerd.ctr(
            "images",
            "pull",
            "--plain-http",
            "--snapshotter",
            snapshotter,
            pushed_features.reference,
        )

    names = [info.name for info in acceld.list("kind==committed")]
    assert len(names) == len(built.layers)
    top = chain_id(built.diff_ids)
    overlay_tree = mounted_view_fingerprint(containerd, "overlayfs", top, tmp_path / "overlayfs")
    acceld_tree = mounted_view_fingerprint(containerd, ACCELD_SNAPSHOTTER, top, tmp_path / "acceld")
    assert "features" in {path.split("/")[0] for path in acceld_tree}
    assert acceld_tree == overlay_tree

    outputs = {
        snapshotter: containerd.run_container(
            pushed_features.reference, unique("features"), snapshotter=snapshotter
        ).stdout
        for snapshotter in ("overlayfs", ACCELD_SNAPSHOTTER)
    }
    assert "hardlink" in outputs[ACCELD_SNAPSHOTTER]
    assert outputs[ACCELD_SNAPSHOTTER] == outputs["overlayfs"]
    # `ctr run --rm` drops the container snapshots; containerd's GC then removes them
    # from the backend, on its own schedule.
    assert wait_for(lambda: sorted(info.name for info in acceld.list()) == sorted(names))


def test_ctr_snapshot_commands_and_gc(
    snapshotter_factory: SnapshotterFactory,
    containerd_factory: ContainerdFactory,
    pushed_busybox: PushedImage,
) -> None:
    acceld = snapshotter_factory()
    containerd = containerd_factory(acceld_socket=acceld.socket_path)
    reference = pushed_busybox.reference
    built = pushed_busybox.built
    assert isinstance(built, BuiltImage)
    containerd.ctr("images", "pull", "--plain-http", "--snapshotter", "acceld", reference)
    greeting = containerd.run_container(reference, unique("hello"), snapshotter="acceld")
    assert greeting.stdout == "hello from acceld\n"

    def ctr_snapshots(*args: str) -> str:
        return containerd.ctr("snapshots", "--snapshotter", ACCELD_SNAPSHOTTER, *args).stdout

    top = chain_id(built.diff_ids)
    rows = [line.split() for line in ctr_snapshots("ls").splitlines()[1:]]
    assert sorted(row[0] for row in rows) == sorted({built.diff_ids[0], top})
    assert {row[-1] for row in rows} == {"Committed"}
    info = json.loads(ctr_snapshots("info", top))
    assert info["Kind"] == "Committed" and info["Parent"] == built.diff_ids[0]

    ctr_snapshots("prepare", "scratch", top)
    # containerd keeps labels itself and hands a snapshotter only the inherited ones.
    inherited = "containerd.io/snapshot/acceld-test"
    ctr_snapshots("label", "scratch", f"{inherited}=me", "acceld.test/private=yes")
    labels = json.loads(ctr_snapshots("info", "scratch"))["Labels"]
    assert labels[inherited] == "me" and labels["acceld.test/private"] == "yes"
    assert "scratch" in ctr_snapshots("usage", "scratch")
    (scratch,) = [info for info in acceld.list() if info.name.endswith("/scratch")]
    assert scratch.kind == pb.ACTIVE and dict(scratch.labels) == {inherited: "me"}
    ctr_snapshots("rm", "scratch")
    # containerd forgets it at once and removes it from the backend at its next GC.
    assert wait_for(lambda: not [i for i in acceld.list() if i.name.endswith("/scratch")])

    # Removing the image lets containerd's GC remove every snapshot through us.
    containerd.ctr("images", "rm", "--sync", reference)
    assert ctr_snapshots("ls").splitlines()[1:] == []
    assert acceld.list() == []
    assert list((acceld.root / "snapshots").iterdir()) == []
    errors = [
        line for line in containerd.log_path.read_text().splitlines() if "level=error" in line
    ]
    assert not [line for line in errors if "snapshot" in line], errors


def test_cri_pull_takes_remote_layers_without_downloading_them(
    snapshotter_factory: SnapshotterFactory,
    containerd_factory: ContainerdFactory,
    pushed_busybox: PushedImage,
    registry: RegistryServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    layers = RegistryLayers(tmp_path_factory.mktemp("layers"), {registry.host})
    acceld = snapshotter_factory(layers)
    containerd = containerd_factory(
        snapshotter=ACCELD_SNAPSHOTTER, acceld_socket=acceld.socket_path
    )
    containerd.allow_insecure_registry(registry.host)
    built = pushed_busybox.built
    assert isinstance(built, BuiltImage)
    layer_digests = [layer.digest for layer in built.layers]
    requests_before = len(registry.requests())

    image_id = containerd.cri_pull_image(pushed_busybox.reference)

    assert image_id == built.config.digest
    assert layers.prepared == layer_digests
    committed = acceld.list("kind==committed")
    chain_ids = [built.diff_ids[0], chain_id(built.diff_ids)]
    assert sorted(info.name for info in committed) == sorted(chain_ids)
    top = acceld.list(f'labels."{REMOTE_REF_LABEL}"=={chain_ids[1]},parent=="{chain_ids[0]}"')
    assert [info.labels[CRI_LAYER_DIGEST] for info in top] == [layer_digests[1]]
    new_requests, layer_gets = requests_since(registry, requests_before, layer_digests)
    assert sorted(r.path.split("/")[-1] for r in layer_gets) == sorted(layer_digests)
    assert {r.user_agent.split("/")[0] for r in layer_gets} == {"acceld"}
    containerd_paths = {r.path for r in new_requests if "containerd" in r.user_agent}
    assert any(path.endswith(built.config.digest) for path in containerd_paths)
    content = containerd.ctr("content", "ls", "--quiet", namespace=CRI_NAMESPACE).stdout
    assert not set(layer_digests) & set(content.split())

    # The agent restarts under a running containerd: its layers are served again.
    acceld.restart()
    assert sorted(layers.restored) == sorted(chain_ids)
    # containerd redials the proxy with backoff (up to 3 s) and fails calls meanwhile.
    usage = ("snapshots", "--snapshotter", ACCELD_SNAPSHOTTER, "usage", chain_ids[1])
    assert wait_for(
        lambda: containerd.ctr(*usage, namespace=CRI_NAMESPACE, check=False).returncode == 0
    )
    run = containerd.run_container(
        pushed_busybox.reference,
        unique("remote"),
        snapshotter=ACCELD_SNAPSHOTTER,
        namespace=CRI_NAMESPACE,
    )
    assert run.stdout == "hello from acceld\n"
