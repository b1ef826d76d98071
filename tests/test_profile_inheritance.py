"""Inheriting a predecessor's profile (`profiles.inherit`, `profiles.predecessors`): the
mapping rules on their own, then whole starts with the real registry, containerd and
agent (v2 with a changed app layer, v3 with every layer changed, an unrelated image)."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from accelctl.main import cli
from converter.convert import ConvertOptions, convert_image
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from profiles.format import FileStat, Profile, RunStats
from profiles.inherit import inherit
from profiles.predecessors import Candidate, rank, version_tags
from profiles.registry_sync import fetch_profile, push_run_profile
from rig.agent_process import AgentProcess
from rig.containerd import ACCELD_SNAPSHOTTER, CRI_NAMESPACE
from rig.images import ImageConfig, ImageSpec, build_image, busybox_image_spec, push_image
from rig.layers import Directory, File, LayerSpec, SparseishFile

BASE, PKGS, APP = "sha256:" + "b" * 64, "sha256:" + "c" * 64, "sha256:" + "a" * 64
NEW_APP, NEW_BASE = "sha256:" + "d" * 64, "sha256:" + "e" * 64
MiB = 1 << 20


def learned(image: str, layers: tuple[str, ...], reads: list[tuple[str, str, int]]) -> Profile:
    """A one-run profile of ``image`` whose start read ``reads`` (layer, path, bytes from
    0), in that order."""
    files = [
        FileStat(layer, path, 1, ((0, size, 1),), ((1_000, n * 1_000),))
        for n, (layer, path, size) in enumerate(reads)
    ]
    position = {layer: i for i, layer in enumerate(layers)}
    files.sort(key=lambda f: (position[f.layer], f.path))
    total = sum(size for _, _, size in reads)
    runs = RunStats(1, 0, 0, 0, (("node-a", 1),), (("ebpf", 1),), ((1_000, total),))
    return Profile(image, layers, 0.5, tuple(files), runs)


V1_READS = [(BASE, "bin/sh", 100), (PKGS, "lib/x.so", 2 * MiB), (APP, "app/main.py", 300)]


def test_shared_layers_are_kept_exactly_and_changed_ones_go_by_path():
    profile = learned("sha256:" + "1" * 64, (BASE, PKGS, APP), V1_READS)
    plan = inherit(profile, (BASE, PKGS, NEW_APP), by_path=True)
    assert [(e.layer, e.path) for e in plan.entries] == [
        (BASE, "/bin/sh"),
        (PKGS, "/lib/x.so"),
        (None, "/app/main.py"),
    ]
    assert (plan.exact, plan.by_path, plan.dropped, plan.shared_layers) == (2, 1, 0, 2)
    assert [e.ranges for e in plan.entries] == [((0, 100),), ((0, 2 * MiB),), ((0, 300),)]


def test_every_layer_changed_maps_everything_by_path_in_the_same_order():
    profile = learned("sha256:" + "1" * 64, (BASE, PKGS, APP), V1_READS)
    plan = inherit(profile, (NEW_BASE, "sha256:" + "f" * 64, NEW_APP), by_path=True)
    assert [e.layer for e in plan.entries] == [None, None, None]
    assert [e.path for e in plan.entries] == ["/bin/sh", "/lib/x.so", "/app/main.py"]
    assert plan.exact == 0 and plan.shared_layers == 0


def test_another_repositorys_image_lends_only_the_layers_it_shares():
    profile = learned("sha256:" + "1" * 64, (BASE, PKGS, APP), V1_READS)
    plan = inherit(profile, (BASE, NEW_APP), by_path=False)
    assert [(e.layer, e.path) for e in plan.entries] == [(BASE, "/bin/sh")]
    assert plan.dropped == 2


def test_the_plan_never_names_more_bytes_than_a_start_of_the_predecessor_read():
    reads = [(APP, f"app/{n}.bin", MiB) for n in range(4)]
    profile = learned("sha256:" + "1" * 64, (APP,), reads)
    # Two runs that read different files: the merged plan holds both, a start one set.
    other = learned("sha256:" + "1" * 64, (APP,), [(APP, f"app/x{n}.bin", MiB) for n in range(4)])
    merged = Profile(
        profile.image,
        profile.layers,
        0.5,
        tuple(sorted(profile.files + other.files, key=lambda f: f.path)),
        RunStats(2, 0, 0, 0, (("node-a", 2),), (("ebpf", 2),), ((1_000, 4 * MiB),) * 2),
    )
    plan = inherit(merged, (NEW_APP,), by_path=True)
    assert plan.planned_bytes == 4 * MiB
    assert plan.cut == 4


def test_version_tags_put_the_highest_version_first_and_skip_referrer_tags():
    tags = ["v9", "v10", "v2", "latest", "sha256-" + "0" * 64, "v10_accelerated"]
    assert version_tags(tags) == ["v10_accelerated", "v10", "v9", "v2", "latest"]


def test_candidates_rank_by_shared_layers_then_repository_then_form_then_version():
    def candidate(repository: str, digit: str, layers: tuple[str, ...], form, newness: int):
        ref = ImageReference.parse(f"r.example/{repository}@sha256:{digit * 64}")
        return Candidate(ref, f"sha256:{digit * 64}", layers, form, newness)

    old = candidate("app", "1", (BASE, PKGS, APP), None, 1)
    new = candidate("app", "2", (BASE, PKGS, "sha256:" + "9" * 64), None, 2)
    other = candidate("other", "3", (BASE, PKGS, "sha256:" + "8" * 64), None, 3)
    far = candidate("app", "4", (NEW_BASE,), None, 4)
    full = candidate("app", "5", (NEW_BASE,), "full", 3)
    ranked = rank([far, full, other, old, new], (BASE, PKGS, NEW_APP), "app", None)
    assert ranked == [new, old, other, far, full]
    assert rank([far, full], (NEW_APP,), "app", "full") == [full, far]


# -- whole starts ----------------------------------------------------------------------


def _app_layer(version: int, with_old: bool) -> LayerSpec:
    entries: list[Directory | File] = [
        Directory("app"),
        File("app/data.bin", SparseishFile(3 * MiB, seed=10 + version, data_every=4096)),
        File("app/spare.bin", SparseishFile(16 * MiB, seed=20 + version, data_every=4096)),
    ]
    if with_old:
        entries.append(File("app/old.bin", SparseishFile(12 * MiB, seed=30, data_every=4096)))
    return LayerSpec(entries, created_by=f"app v{version}")


def _pkgs_layer(seed: int) -> LayerSpec:
    return LayerSpec(
        [
            Directory("lib"),
            File("lib/x.so", SparseishFile(6 * MiB, seed=seed, data_every=4096)),
            File("lib/unused.so", SparseishFile(24 * MiB, seed=seed + 1, data_every=4096)),
        ],
        created_by="packages",
    )


COMMAND = "cat /app/data.bin >/dev/null; head -c 2097152 /lib/x.so >/dev/null; echo started"


def version_spec(version: int) -> ImageSpec:
    """v1: base, packages, app with old.bin; v2: the app layer changed (old.bin
    removed); v3: every layer changed (the base's greeting, the packages' bytes)."""
    base = busybox_image_spec(hello="hello v3" if version == 3 else "hello")
    system, greeting = base.layers
    if version == 3:  # an updated base: its files are the same paths, one more
        system = replace(system, entries=(*system.entries, File("etc/os-release", b"v3\n")))
    pkgs = _pkgs_layer(seed=50 if version == 3 else 40)
    return ImageSpec(
        layers=(system, greeting, pkgs, _app_layer(version, with_old=version == 1)),
        platform=base.platform,
        config=ImageConfig(cmd=("/bin/sh", "-c", COMMAND)),
    )


def unrelated_spec() -> ImageSpec:
    base = busybox_image_spec()
    layer = LayerSpec([Directory("srv"), File("srv/data.bin", b"unrelated" * 1000)])
    return ImageSpec(
        layers=(layer,), platform=base.platform, config=ImageConfig(cmd=("/bin/true",))
    )


def _agent(path: Path) -> AgentProcess:
    settings = {"background_fill": False, "record_profiles": False}
    return AgentProcess(path, settings=settings)


def _metric(agent: AgentProcess, prefix: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in agent.metrics().splitlines()
        if line.startswith(prefix)
    )


def _loaded(agent: AgentProcess, image: str, timeout: float = 60.0) -> dict[str, object]:
    """The agent's `profile.loaded` record for ``image``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in agent.log_path.read_text().splitlines():
            if '"profile.loaded"' in line:
                record = json.loads(line)
                if str(record.get("image")).split("@")[0] == image:
                    return record
        time.sleep(0.2)
    raise AssertionError(f"no profile.loaded for {image}:\n{agent.log_tail(60)}")


def _settled_prefetch(agent: AgentProcess) -> float:
    """Prefetched bytes once they stop growing (background fill is off)."""
    last, stable = -1.0, 0
    deadline = time.monotonic() + 60
    while stable < 6 and time.monotonic() < deadline:
        now = _metric(agent, 'acceld_fetch_bytes_total{priority="prefetch"}')
        stable = stable + 1 if now == last else 0
        last = now
        time.sleep(0.25)
    return last


async def _publish_versions(registry, tmp_path: Path, mode: str) -> dict[str, str]:
    """Push v1..v3 and an unrelated image, convert them; the names containerd pulls."""
    repository = f"{registry.host}/rig/versions-{uuid.uuid4().hex[:8]}"
    names: dict[str, str] = {}
    suffix = "_accelerated" if mode == "full" else ""
    async with RegistryClient() as client:
        for label, spec in [(f"v{n}", version_spec(n)) for n in (1, 2, 3)] + [
            ("unrelated", unrelated_spec())
        ]:
            repo = repository if label != "unrelated" else f"{repository}-other"
            reference = f"{repo}:{label}"
            await push_image(client, reference, build_image(spec, tmp_path / label, label))
            options = ConvertOptions(mode=mode, span=1 << 20)
            await convert_image(client, ImageReference.parse(reference), options)
            names[label] = reference + suffix
    return names


async def _teach_v1(names: dict[str, str]) -> tuple[str, tuple[str, ...]]:
    """Push v1's profile: the start read data.bin, the first 2 MiB of x.so, old.bin."""
    async with RegistryClient() as client:
        ref = ImageReference.parse(names["v1"])
        resolved = await client.resolve(ref)
        layers = tuple(layer.digest for layer in resolved.manifest.layers)
        reads = [
            (layers[2], "lib/x.so", 2 * MiB),
            (layers[3], "app/data.bin", 3 * MiB),
            (layers[3], "app/old.bin", 12 * MiB),
        ]
        profile = learned(resolved.manifest_digest, layers, reads)
        await push_run_profile(client, ref, profile)
        assert await fetch_profile(client, ref, resolved.manifest_digest) is not None
        return resolved.manifest_digest, layers


async def _layers_of(name: str) -> tuple[str, ...]:
    async with RegistryClient() as client:
        resolved = await client.resolve(ImageReference.parse(name))
        return tuple(layer.digest for layer in resolved.manifest.layers)


@pytest.mark.parametrize("mode", ["index", "full"])
async def test_new_versions_start_with_the_predecessors_profile(
    registry, tmp_path, containerd_factory, mode
):
    names = await _publish_versions(registry, tmp_path, mode)
    v1_digest, v1_layers = await _teach_v1(names)
    v2_layers, v3_layers = await _layers_of(names["v2"]), await _layers_of(names["v3"])
    assert v2_layers[:3] == v1_layers[:3] and v2_layers[3] != v1_layers[3]
    assert not set(v3_layers) & set(v1_layers)

    agent = _agent(tmp_path / "node").start()
    try:
        node = containerd_factory(snapshotter=ACCELD_SNAPSHOTTER, acceld_socket=agent.socket)
        for label in ("v2", "v3"):
            before = _metric(agent, 'acceld_fetch_bytes_total{priority="prefetch"}')
            await asyncio.to_thread(node.cri_pull_image, names[label])
            out = await asyncio.to_thread(
                node.run_container,
                names[label],
                f"start-{label}",
                snapshotter=ACCELD_SNAPSHOTTER,
                namespace=CRI_NAMESPACE,
            )
            assert out.stdout.strip() == "started"
            record = _loaded(agent, names[label])
            assert record["origin"] == "inherited", record
            assert record["inherited_from"] == v1_digest
            if label == "v2":
                # x.so's layer is shared: exact; the app layer changed: by path.
                assert (record["exact"], record["by_path"]) == (1, 2), record
            else:
                assert (record["exact"], record["by_path"]) == (0, 3), record
            # old.bin (12 MiB) is gone from v2 and v3: its entry resolves to nothing, so
            # what was prefetched is data.bin and x.so's first 2 MiB, with granularity.
            prefetched = await asyncio.to_thread(_settled_prefetch, agent) - before
            assert 4 * MiB <= prefetched < 9 * MiB, (label, prefetched, agent.log_tail(40))
        assert _metric(agent, 'acceld_profile_plans_total{origin="inherited"}') == 2

        await asyncio.to_thread(node.cri_pull_image, names["unrelated"])
        assert _loaded(agent, names["unrelated"])["origin"] == "none"
    finally:
        agent.stop()

    shown = await asyncio.to_thread(
        CliRunner(env={"COLUMNS": "250"}).invoke,
        cli,
        ["profile", "show", names["v2"]],
        catch_exceptions=False,
    )
    assert shown.exit_code == 0, shown.output
    assert re.search(r"origin: inherited from .*:v1.*@" + v1_digest, shown.output), shown.output
    assert "1 entries exact, 2 by path" in shown.output


async def test_the_images_own_profile_replaces_the_inherited_one(
    registry, tmp_path, containerd_factory
):
    """A node that starts v2 on the inherited plan records v2's own start and shares it;
    the next node's first start of v2 takes that, not v1's."""
    names = await _publish_versions(registry, tmp_path, "index")
    await _teach_v1(names)
    settings = {"background_fill": False, "record_starts": 1, "trace_quiet_s": 2.0}
    for number, origin in enumerate(("inherited", "own")):
        agent = AgentProcess(tmp_path / f"node-{number}", settings=settings).start()
        try:
            node = containerd_factory(snapshotter=ACCELD_SNAPSHOTTER, acceld_socket=agent.socket)
            await asyncio.to_thread(node.cri_pull_image, names["v2"])
            out = await asyncio.to_thread(
                node.run_container,
                names["v2"],
                f"start-{number}",
                snapshotter=ACCELD_SNAPSHOTTER,
                namespace=CRI_NAMESPACE,
            )
            assert out.stdout.strip() == "started"
            assert _loaded(agent, names["v2"])["origin"] == origin
            if origin == "inherited":
                async with RegistryClient() as client:
                    ref = ImageReference.parse(names["v2"])
                    digest = (await client.resolve(ref)).manifest_digest
                    deadline = time.monotonic() + 60
                    while await fetch_profile(client, ref, digest) is None:
                        assert time.monotonic() < deadline, agent.log_tail(40)
                        await asyncio.sleep(1)
        finally:
            agent.stop()
