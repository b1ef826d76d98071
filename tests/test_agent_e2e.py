"""acceld end to end: real containerd (CRI pull, as the kubelet does), real registry,
the agent as its own process; containers start from lazily served layers."""

from __future__ import annotations

import asyncio
import subprocess
import uuid

import pytest

from converter.convert import ConvertOptions, convert_image
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from rig.agent_process import AgentProcess
from rig.containerd import ACCELD_SNAPSHOTTER, CRI_NAMESPACE
from rig.rootfs_digest import tree_differences
from rig.snapshot_view import image_chain_id, view_tree

SMALL = {"chunk_size": 256 << 10, "span": 1 << 20}


@pytest.fixture
def agent(tmp_path, registry):
    with AgentProcess(
        tmp_path / "agent", plain_http=[registry.host], extra_args=["--no-background-fill"]
    ) as process:
        yield process


@pytest.fixture
def lazy_containerd(containerd_factory, agent):
    return containerd_factory(snapshotter=ACCELD_SNAPSHOTTER, acceld_socket=agent.socket)


def _layer_gets(registry, digests: set[str], since: int) -> list[tuple[str, int]]:
    """(path, status) of every GET of one of ``digests`` after request number ``since``."""
    return [
        (r.path, r.status)
        for r in registry.requests()[since:]
        if r.method == "GET" and any(d in r.path for d in digests)
    ]


@pytest.mark.parametrize("mode", ["index", "full"])
async def test_cri_pull_is_lazy_and_container_runs(
    mode, registry, image_pusher, built_busybox, agent, lazy_containerd
):
    pushed = await image_pusher.push(built_busybox)
    ref = ImageReference.parse(pushed.reference)
    async with RegistryClient() as client:
        result = await convert_image(client, ref, ConvertOptions(mode=mode, **SMALL))
    served_digests = {layer.digest for layer in built_busybox.layers}
    if mode == "full":
        served_digests = {
            layer.estargz.blob_digest
            for p in result.platforms
            for layer in p.layers
            if layer.estargz
        }
    before = len(registry.requests())
    await asyncio.to_thread(lazy_containerd.cri_pull_image, pushed.reference)
    whole = [(p, s) for p, s in _layer_gets(registry, served_digests, before) if s == 200]
    assert whole == [], "layer blobs were downloaded whole"
    assert agent.metric("acceld_layers_total") >= len(built_busybox.layers)
    out = await asyncio.to_thread(
        lazy_containerd.run_container,
        pushed.reference,
        f"lazy-{uuid.uuid4().hex[:8]}",
        snapshotter=ACCELD_SNAPSHOTTER,
        namespace=CRI_NAMESPACE,
    )
    assert out.stdout.strip() == "hello from acceld"
    assert agent.metric("acceld_fuse_ops_total") > 0


async def test_lazy_rootfs_equals_overlayfs(
    registry, image_pusher, built_features, agent, lazy_containerd, containerd, tmp_path
):
    pushed = await image_pusher.push(built_features)
    ref = ImageReference.parse(pushed.reference)
    async with RegistryClient() as client:
        await convert_image(client, ref, ConvertOptions(mode="index", **SMALL))
    containerd.ctr("images", "pull", "--plain-http", pushed.reference)
    top = image_chain_id(built_features.config_bytes)

    def lazy_tree() -> dict:
        lazy_containerd.cri_pull_image(pushed.reference)
        return view_tree(lazy_containerd, top, tmp_path / "lazy", ACCELD_SNAPSHOTTER, CRI_NAMESPACE)

    expected = await asyncio.to_thread(view_tree, containerd, top, tmp_path / "reference")
    actual = await asyncio.to_thread(lazy_tree)
    problems = tree_differences(expected, actual)
    assert problems == [], "\n".join(problems)
    assert agent.metric("acceld_fallbacks_total") == 0


async def test_image_without_accelerated_form_falls_back_and_runs(
    image_pusher, built_busybox, agent, lazy_containerd
):
    pushed = await image_pusher.push(built_busybox)
    await asyncio.to_thread(lazy_containerd.cri_pull_image, pushed.reference)
    assert agent.metric("acceld_fallbacks_total") >= len(built_busybox.layers)
    out = await asyncio.to_thread(
        lazy_containerd.run_container,
        pushed.reference,
        f"fallback-{uuid.uuid4().hex[:8]}",
        snapshotter=ACCELD_SNAPSHOTTER,
        namespace=CRI_NAMESPACE,
    )
    assert out.stdout.strip() == "hello from acceld"


METRICS = (
    "acceld_fetch_bytes_total",
    "acceld_range_requests_total",
    "acceld_range_request_seconds",
    "acceld_fuse_ops_total",
    "acceld_fuse_op_seconds",
    "acceld_cache_hits_total",
    "acceld_cache_misses_total",
    "acceld_cache_bytes",
    "acceld_layers_total",
    "acceld_fallbacks_total",
    "acceld_prepare_to_first_byte_seconds",
    "acceld_corrupt_chunks_total",
    "acceld_fetch_in_flight",
)


async def test_metrics_endpoint_has_every_series(
    image_pusher, built_busybox, agent, lazy_containerd
):
    pushed = await image_pusher.push(built_busybox)
    async with RegistryClient() as client:
        await convert_image(
            client, ImageReference.parse(pushed.reference), ConvertOptions(mode="index")
        )
    await asyncio.to_thread(lazy_containerd.cri_pull_image, pushed.reference)
    await asyncio.to_thread(
        lazy_containerd.run_container,
        pushed.reference,
        f"m-{uuid.uuid4().hex[:8]}",
        snapshotter=ACCELD_SNAPSHOTTER,
        namespace=CRI_NAMESPACE,
    )
    text = agent.metrics()
    missing = [name for name in METRICS if name not in text]
    assert missing == []
    assert agent.metric("acceld_prepare_to_first_byte_seconds_count") >= 1
    assert agent.metric("acceld_range_requests_total") >= 1


async def test_estargz_made_by_ctr_remote_is_served_lazily(
    pushed_busybox, containerd, agent, lazy_containerd, registry
):
    """eStargz images made elsewhere (stargz-snapshotter's `ctr-remote`) are lazy here."""
    source = pushed_busybox.reference
    target = f"{registry.host}/rig/ctr-remote-{uuid.uuid4().hex[:8]}:esgz"

    def convert_with_ctr_remote() -> None:
        containerd.ctr("images", "pull", "--plain-http", source)
        base = [
            "ctr-remote",
            "--address",
            str(containerd.address),
            "--namespace",
            containerd.namespace,
        ]
        for args in (
            ["images", "convert", "--estargz", "--oci", source, target],
            ["images", "push", "--plain-http", target],
        ):
            subprocess.run(base + args, check=True, capture_output=True, text=True, timeout=120)

    await asyncio.to_thread(convert_with_ctr_remote)
    before = len(registry.requests())
    await asyncio.to_thread(lazy_containerd.cri_pull_image, target)
    assert agent.metric("acceld_fallbacks_total") == 0
    whole_layers = [
        r
        for r in registry.requests()[before:]
        if r.method == "GET" and "/blobs/" in r.path and r.status == 200 and r.size > 100_000
    ]
    assert whole_layers == []
    out = await asyncio.to_thread(
        lazy_containerd.run_container,
        target,
        f"esgz-{uuid.uuid4().hex[:8]}",
        snapshotter=ACCELD_SNAPSHOTTER,
        namespace=CRI_NAMESPACE,
    )
    assert out.stdout.strip() == "hello from acceld"
