"""acceld's eStargz is lazily pullable by the peer: stargz-snapshotter's own daemon.

DESIGN.md makes eStargz compatibility a contract both ways. The other direction (images
made by `ctr-remote`, served by acceld) is tested in test_agent_e2e; this one converts
with OUR converter in full mode, pulls through the CRI of a real containerd whose
snapshotter is the real stargz-snapshotter (Debian's 0.12 library in our own short main,
`packaging/stargz-peer`), starts a container and compares the root file system the peer
presents with containerd's own overlayfs unpack of the original image, entry by entry.

"Lazily" is checked three ways: the peer's own per-layer verdict (its log), one FUSE
mount per layer, and the registry's log (no layer blob downloaded whole; a small share
of the bytes fetched to start the container). Background fetch is off so that share
only counts what the start read.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import cast

import pytest

from converter.convert import ConversionResult, ConvertOptions, convert_image
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from formats.accelerated import accelerated_tag
from formats.estargz_writer import DEFAULT_MIN_CHUNK_SIZE
from rig.containerd import CRI_NAMESPACE, STARGZ_SNAPSHOTTER, ContainerdError, ContainerdServer
from rig.images import BuiltImage
from rig.registry import RegistryServer
from rig.rootfs_digest import FileFacts, tree_differences
from rig.snapshot_view import image_chain_id, view_tree
from rig.stargz_process import RemoteSnapshots, StargzDaemon, missing_binary_message
from tests.fixtures.containerd import ContainerdFactory
from tests.fixtures.images import ImagePusher
from tests.fixtures.registry import running

_MISSING = missing_binary_message()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")

LAYOUTS = [
    pytest.param(0, id="member-per-chunk"),
    pytest.param(
        DEFAULT_MIN_CHUNK_SIZE,
        id="shared-members",
        marks=pytest.mark.xfail(
            strict=True,
            raises=ContainerdError,
            reason="small files sharing a gzip member are addressed with the TOC's "
            "innerOffset, which eStargz readers know from stargz-snapshotter 0.13 on; "
            "0.12 (Debian's) reads the member's start and fails the chunk digest (EIO)",
        ),
    ),
]


@pytest.fixture
def stargz(
    tmp_path_factory: pytest.TempPathFactory, registry: RegistryServer
) -> Iterator[StargzDaemon]:
    """The peer's daemon with an empty root; a short path, for its unix socket."""
    daemon = StargzDaemon(
        tmp_path_factory.mktemp("stargz"),
        plain_http=[registry.host],
        fs_config={"no_background_fetch": True},
    )
    with running(daemon):
        yield daemon


@pytest.fixture
def peer_containerd(
    containerd_factory: ContainerdFactory, stargz: StargzDaemon
) -> ContainerdServer:
    """A containerd whose CRI pulls and runs through the peer."""
    return containerd_factory(snapshotter=STARGZ_SNAPSHOTTER, stargz_socket=stargz.socket)


async def _convert_full(reference: str, min_chunk_size: int) -> tuple[str, ConversionResult]:
    ref = ImageReference.parse(reference)
    async with RegistryClient() as client:
        result = await convert_image(
            client, ref, ConvertOptions(mode="full", min_chunk_size=min_chunk_size)
        )
    return str(ref.with_tag(accelerated_tag(ref.tag or "latest"))), result


def _blob_gets(registry: RegistryServer, digest: str) -> tuple[int, list[int]]:
    """Bytes the registry sent for one blob, and the status of each GET of it."""
    gets = [
        r for r in registry.requests() if r.method == "GET" and r.path.endswith(f"/blobs/{digest}")
    ]
    return sum(r.size for r in gets), [r.status for r in gets]


def _without_trusted_xattrs(tree: dict[str, FileFacts]) -> dict[str, FileFacts]:
    """``tree`` minus `trusted.*` xattrs. The peer presents the archive's (the feature
    image has a ``trusted.note``), which containerd's own unpack refuses as "admin
    attributes" and acceld hides too: a difference of the peer, not of our eStargz,
    which carries the entry's xattrs as the original layer does."""
    position = 5  # of the xattrs in rig.rootfs_digest's facts
    cleaned = {}
    for path, facts in tree.items():
        xattrs = cast(tuple[tuple[str, bytes], ...], facts[position])
        kept = tuple((name, value) for name, value in xattrs if not name.startswith("trusted."))
        cleaned[path] = (*facts[:position], kept, *facts[position + 1 :])
    return cleaned


@pytest.mark.parametrize("min_chunk_size", LAYOUTS)
async def test_acceld_estargz_starts_lazily_and_exactly_in_stargz_snapshotter(
    min_chunk_size: int,
    registry: RegistryServer,
    image_pusher: ImagePusher,
    built_features: BuiltImage,
    containerd: ContainerdServer,
    stargz: StargzDaemon,
    peer_containerd: ContainerdServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    pushed = await image_pusher.push(built_features)
    target, result = await _convert_full(pushed.reference, min_chunk_size)
    (platform,) = result.platforms
    blobs = [
        (layer.estargz.blob_digest, layer.estargz.blob_size)
        for layer in platform.layers
        if layer.estargz
    ]
    assert len(blobs) == len(built_features.layers)

    await asyncio.to_thread(peer_containerd.cri_pull_image, target)
    assert stargz.remote_snapshots() == RemoteSnapshots(lazy=len(blobs), fallback=0)
    assert len(stargz.fuse_mounts()) == len(blobs)

    out = await asyncio.to_thread(
        peer_containerd.run_container,
        target,
        f"peer-{uuid.uuid4().hex[:8]}",
        snapshotter=STARGZ_SNAPSHOTTER,
        namespace=CRI_NAMESPACE,
    )
    assert "plain.txt" in out.stdout and "link-relative -> plain.txt" in out.stdout
    for digest, _ in blobs:
        assert 200 not in _blob_gets(registry, digest)[1], f"{digest} was downloaded whole"
    # The start lists /features and never reads the 64 MiB file of the third layer.
    large_digest, large_size = blobs[2]
    fetched = _blob_gets(registry, large_digest)[0]
    assert fetched < large_size / 4, (fetched, large_size)

    # Every entry the peer presents, against containerd's own unpack of the original.
    containerd.ctr("images", "pull", "--plain-http", pushed.reference)
    views = tmp_path_factory.mktemp("views")

    reference_top = image_chain_id(built_features.config_bytes)
    expected = await asyncio.to_thread(view_tree, containerd, reference_top, views / "reference")
    actual = await asyncio.to_thread(
        view_tree,
        peer_containerd,
        image_chain_id(platform.config_body),
        views / "peer",
        STARGZ_SNAPSHOTTER,
        CRI_NAMESPACE,
    )
    problems = tree_differences(expected, _without_trusted_xattrs(actual))
    assert problems == [], "\n".join(problems)
    assert stargz.remote_snapshots().fallback == 0
