"""One adversarial example, played against the agent and judged.

The adversarial-registry test (`tests/test_adversarial_registry.py`) draws plans; this
is what it plays them on. An `Arena` holds what the examples share: the real registry
with the image and its accelerated forms (`publish`), the hostile registry in front of
it, the agent as its own process, a containerd that uses it as snapshotter, and the
reference tree (the image as containerd's own overlayfs unpacks it). `Arena.run` stages
an edition of the image with the plan's forgeries and faults under an alias of its
own, pulls it through CRI, mounts its root file system and describes every entry in a
bounded child process (`rig.bounded_walk`), cleans up, and judges (`Verdict`):

* an entry that could be read must equal the reference (type, mode, owner, size,
  content, link target, device numbers, xattrs, mtime); one that fails must fail with
  EIO; nothing may appear or go missing (the pull itself may fail, or fall back);
* no FUSE request may stay unanswered past the agent's demand timeout (its watchdog
  counts them, with its threshold set just past the timeout), no entry may hang;
* the agent must be alive afterwards, /healthz ok, peak RSS (VmHWM) under the limit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from converter.convert import ConvertOptions, convert_image
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from formats.accelerated import accelerated_tag
from formats.estargz_toc import NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_TAR_NAME
from profiles.learn import from_trace
from profiles.registry_sync import PublishPolicy, push_run_profile
from profiles.trace import FileAccess, Outcome, RunTrace
from rig.agent_process import AgentProcess
from rig.bounded_walk import Facts, WalkResult, bounded_walk
from rig.containerd import ACCELD_SNAPSHOTTER, CRI_NAMESPACE, ContainerdError, ContainerdServer
from rig.forgery import FORGERIES, Forgery, Unforgeable
from rig.hostile_registry import Fault, HostileRegistry, Served
from rig.images import LARGE_FILE_PATH, ImageSpec, build_image, feature_image_spec, push_image
from rig.layers import Directory, File, LayerSpec, SparseishFile
from rig.publication import Converted, Edition, load_converted
from rig.snapshot_view import image_chain_id, mounted_view

ESTARGZ_OWN = frozenset({TOC_TAR_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK})
"""eStargz's own entries at a layer's root: containerd's unpack of an eStargz layer (a
fallback in ``full`` mode) shows them, the agent (like stargz-snapshotter) does not.
Not compared."""
LAZY_LAYERS = 'acceld_layers_total{mode="lazy"}'
DISTRUSTED = "acceld_distrusted_metadata_total"
REPOSITORY = "rig/adversary"


def _convert_options(mode: str) -> ConvertOptions:
    """Several chunks and spans (with pieces) per large file."""
    return ConvertOptions(mode=mode, chunk_size=256 << 10, span=1 << 20)


@dataclass(frozen=True)
class Limits:
    """The bounds an example is held to, all derived from the agent's demand timeout."""

    demand_timeout: float = 2.0
    rss_bytes: int = 512 << 20
    pull_s: float = 120.0
    """A pull still running after this long counts as hung."""

    @property
    def watchdog_threshold(self) -> float:
        """A FUSE request older than this was left unanswered past `demand_timeout`."""
        return self.demand_timeout + 2.0

    @property
    def entry_s(self) -> float:
        """How long describing one entry may take: a few reads slowed by faults, each
        bounded by the demand timeout (and the kernel retrying a failed readahead
        synchronously)."""
        return 8 * self.demand_timeout + 15

    audit_s: float = 20.0
    """How long the fill's audit of an index-only layer may take to distrust a forged
    artifact once the image was read (the layers here are a few MB)."""

    def agent_settings(self) -> dict[str, object]:
        """The agent's configuration: these bounds, background fill at once (for an
        index-only layer it is the audit that must catch what reads cannot), no
        recording, and a chunk cache so small that what one example fetched is not
        there for the next."""
        return {
            "demand_timeout": self.demand_timeout,
            "watchdog_request_threshold_s": self.watchdog_threshold,
            "background_fill_delay_s": 0.0,
            "record_profiles": False,
            "ebpf": False,
            "cache_max_bytes": 64 << 10,
        }


def image_spec() -> ImageSpec:
    """Busybox, every tar feature, a 3 MiB file across several spans and chunks (a
    random block every 32 KiB, so each span's window matters), whiteouts on top."""
    base = feature_image_spec()
    large = LayerSpec(
        [Directory("big"), File(LARGE_FILE_PATH, SparseishFile(3 << 20, 42, 32 << 10))],
        created_by="large file",
    )
    layers = (base.layers[0], base.layers[1], large, base.layers[3])
    return dataclasses.replace(base, layers=layers)


async def publish(registry_host: str, work: Path) -> tuple[Converted, dict[str, str]]:
    """Build the image, push it, convert it into both forms (index-only from tag ``v1``,
    the full-mode twin from tag ``full``), push a learned profile, and read back what
    was published. Returns it with each mode's top chain ID."""
    built = build_image(image_spec(), work / "layout", "v1")
    source = ImageReference.parse(f"{registry_host}/{REPOSITORY}:v1")
    full = ImageReference.parse(f"{registry_host}/{REPOSITORY}:full")
    async with RegistryClient() as client:
        for ref in (source, full):
            await push_image(client, str(ref), built)
        await convert_image(client, source, _convert_options("index"))
        await convert_image(client, full, _convert_options("full"))
        layers = tuple(d.digest for d in built.layers)
        trace = RunTrace(
            built.digest,
            layers,
            (
                FileAccess(layers[0], "/bin/busybox", ((0, 1 << 20),), 1_000),
                FileAccess(layers[1], "/features/plain.txt", ((0, 11),), 2_000),
                FileAccess(layers[2], LARGE_FILE_PATH, ((0, 1 << 20), (2 << 20, 3 << 20)), 3_000),
                FileAccess(layers[3], "/lower/replaced.txt", ((0, 33),), 4_000),
            ),
            Outcome.OK,
            "adversary",
            frozenset({"fuse"}),
            False,
            1_700_000_000_000_000_000,
        )
        profile = from_trace(trace)
        policy = PublishPolicy(settle=0.3, check_interval=0.1)
        await push_run_profile(client, source, profile, policy)
        twin_ref = full.with_tag(accelerated_tag("full"))
        converted = await load_converted(client, source, twin_ref, profile)
        twin = converted.manifest(converted.twin)
        twin_config = await client.get_blob(twin_ref, twin.config.digest)
    chains = {
        "index": image_chain_id(built.config_bytes),
        "twin": image_chain_id(built.config_bytes),
        "full": image_chain_id(twin_config),
    }
    return converted, chains


def reference_tree(
    containerd: ContainerdServer, reference: str, chain: str, work: Path
) -> dict[str, Facts]:
    """The image's tree as containerd's own overlayfs snapshotter unpacks it."""
    containerd.ctr("images", "pull", "--plain-http", reference)
    with mounted_view(containerd, chain, work / "reference") as root:
        walk = bounded_walk(root, 60)
    if walk.errors or walk.hung is not None:
        raise RuntimeError(f"the reference tree does not read: {walk}")
    return walk.facts


@dataclass(frozen=True)
class Plan:
    """One example: the mode, what is forged, what goes wrong in transit."""

    mode: str
    forgeries: tuple[Forgery, ...] = ()
    faults: tuple[Fault, ...] = ()

    def describe(self) -> str:
        parts = [f"mode {self.mode}"]
        parts += [f.describe() for f in self.forgeries]
        parts += [f.describe() for f in self.faults]
        return "; ".join(parts)


@dataclass
class Verdict:
    """How one example went."""

    example: int
    plan: str
    forged: list[str] = field(default_factory=list)
    pulled: bool = False
    pull_error: str = ""
    read: bool = False
    """Whether the root file system could be mounted and walked."""
    lazy_layers: int = 0
    """How many of the image's layers the agent served (the rest fell back)."""
    eio: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_mib: float = 0.0


class Arena:
    """Everything examples share; `run` plays one plan and judges it.

    ``log``: a JSON-lines file every verdict is appended to (with ``tags``, e.g. the
    seed). ``refresh_root``: list the agent's mount root after each pull, working
    around the stale-entry bug `forget_removed_layers` describes.
    """

    def __init__(
        self,
        work: Path,
        converted: Converted,
        chains: dict[str, str],
        reference: dict[str, Facts],
        hostile: HostileRegistry,
        agent: AgentProcess,
        containerd: ContainerdServer,
        limits: Limits,
        log: Path,
        tags: dict[str, object],
        refresh_root: bool = True,
    ) -> None:
        self.work = work
        self.converted = converted
        self.chains = chains
        self.reference = reference
        self.hostile = hostile
        self.agent = agent
        self.containerd = containerd
        self.limits = limits
        self.log = log
        self.tags = tags
        self.refresh_root = refresh_root
        self.examples = 0

    def run(self, plan: Plan, fresh_connections: bool = True) -> Verdict:
        """Play ``plan`` and judge it. ``fresh_connections``: close the hostile
        registry's client connections afterwards, so that nothing a fault left in a
        keep-alive connection (a smuggled response) carries over to the next example."""
        self.examples += 1
        number = self.examples
        verdict = Verdict(number, plan.describe())
        started = time.monotonic()
        edition = Edition(
            self.converted, number, accelerated="index" if plan.mode == "index" else "twin"
        )
        for forged in plan.forgeries:
            try:
                detail = FORGERIES[forged.label][1](edition, *forged.picks)
            except Unforgeable as exc:
                detail = f"not applied: {exc}"
            verdict.forged.append(f"{forged.label}: {detail}")
        faults = [dataclasses.replace(f) for f in plan.faults]
        alias = f"adversary/e{number}"
        self.hostile.stage(alias, edition.staging(faults))
        tag = self.converted.tag if plan.mode != "full" else accelerated_tag(self.converted.tag)
        reference = f"{self.hostile.host}/{alias}:{tag}"
        health = self._health()
        lazy_before = self.agent.metric(LAZY_LAYERS)
        distrusted_before = self.agent.metric(DISTRUSTED)
        try:
            self._pull_and_read(plan, reference, verdict)
            if plan.forgeries and verdict.violations:
                self._excuse_until_caught(plan, verdict, distrusted_before)
        finally:
            self._clean_up(verdict)
            served = self.hostile.unstage(alias)
            if fresh_connections:
                self.hostile.drop_connections()
        verdict.lazy_layers = round(self.agent.metric(LAZY_LAYERS) - lazy_before)
        verdict.notes += [f"{f.describe()}: hit {f.hits}" for f in faults]
        self._check_agent(health, verdict)
        verdict.seconds = round(time.monotonic() - started, 1)
        self._log(verdict, served)
        return verdict

    def _log(self, verdict: Verdict, served: list[Served]) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        record = {
            **self.tags,
            **dataclasses.asdict(verdict),
            "served": [dataclasses.asdict(s) for s in served if s.fault or s.status >= 400],
        }
        with self.log.open("a") as out:
            out.write(json.dumps(record) + "\n")

    def _pull_and_read(self, plan: Plan, reference: str, verdict: Verdict) -> None:
        began = time.monotonic()
        try:
            self.containerd.cri_pull_image(reference, timeout=self.limits.pull_s)
        except ContainerdError as exc:
            verdict.pull_error = str(exc).splitlines()[0][:300]
            if time.monotonic() - began >= self.limits.pull_s - 1:
                verdict.violations.append(f"pull hung for {self.limits.pull_s:g} s")
            return
        verdict.pulled = True
        if self.refresh_root:
            forget_removed_layers(self.agent.mountpoint)
        view = self.work / f"view-{verdict.example}"
        try:
            with mounted_view(
                self.containerd,
                self.chains[plan.mode],
                view,
                snapshotter=ACCELD_SNAPSHOTTER,
                namespace=CRI_NAMESPACE,
            ) as root:
                walk = bounded_walk(root, self.limits.entry_s)
        except (ContainerdError, subprocess.CalledProcessError) as exc:
            verdict.notes.append(f"root file system not mountable: {exc}"[:300])
            return
        verdict.read = True
        self._judge(walk, verdict)

    def _excuse_until_caught(self, plan: Plan, verdict: Verdict, distrusted: float) -> None:
        """What the threat model grants an artifact forged with push rights. An index
        artifact's claims that no read checks (rows no file's data is read by, windows
        and checkpoints signed again) hold until the fill's audit: differences seen
        before then are excused only if the audit then distrusts the artifact. A
        full-mode twin found by its tag is trusted as its pusher (docs/threat-model.md,
        open gaps): differences are recorded, not failed. Faults in transit, and twins
        pulled pinned, are held to every byte."""
        if plan.mode == "twin":
            verdict.notes += [f"trusted twin's pusher: {v}" for v in verdict.violations]
            verdict.violations.clear()
            return
        if plan.mode != "index":
            return
        deadline = time.monotonic() + self.limits.audit_s
        while time.monotonic() < deadline:
            if self.agent.metric(DISTRUSTED) > distrusted:
                verdict.notes += [
                    f"before the audit distrusted it: {v}" for v in verdict.violations
                ]
                verdict.violations.clear()
                return
            time.sleep(0.2)
        verdict.violations.append(
            f"the fill's audit did not distrust it in {self.limits.audit_s:g} s"
        )

    def _judge(self, walk: WalkResult, verdict: Verdict) -> None:
        expected = self.reference
        unlisted = [path for path, error in walk.errors.items() if path not in walk.facts]
        for path in sorted(set(expected) | set(walk.facts) | set(walk.errors)):
            if path in walk.errors:
                if walk.errors[path] == "EIO":
                    verdict.eio.append(path)
                else:
                    verdict.violations.append(f"{path}: {walk.errors[path]}")
            elif path not in walk.facts:
                if not any(path.startswith(d + "/") or d == "" for d in unlisted):
                    verdict.violations.append(f"missing: {path}")
            elif path in ESTARGZ_OWN and path not in expected:
                continue
            elif path not in expected:
                verdict.violations.append(f"unexpected: {path} {walk.facts[path]}")
            elif walk.facts[path] != expected[path]:
                verdict.violations.append(_difference(path, expected[path], walk.facts[path]))
        if walk.hung is not None:
            verdict.violations.append(f"hung reading {walk.hung} for {self.limits.entry_s:g} s")
        verdict.notes.append(f"slowest entry {walk.slowest[1]}: {walk.slowest[0]:.1f} s")

    def _clean_up(self, verdict: Verdict) -> None:
        """Remove the example's images, so containerd removes their snapshots and the
        agent unmounts their layers: the next example starts from nothing."""
        ctr = self.containerd
        listed = ctr.ctr("images", "ls", "-q", namespace=CRI_NAMESPACE).stdout.split()
        if listed:
            ctr.ctr("images", "rm", "--sync", *listed, namespace=CRI_NAMESPACE, check=False)
        deadline = time.monotonic() + 30
        while True:
            left = ctr.ctr(
                "snapshots", "--snapshotter", ACCELD_SNAPSHOTTER, "ls", namespace=CRI_NAMESPACE
            ).stdout.splitlines()[1:]
            if not left:
                return
            if time.monotonic() > deadline:
                verdict.violations.append(f"snapshots left after the images went: {left}")
                return
            time.sleep(0.2)

    def _health(self) -> dict[str, Any]:
        url = self.agent.metrics_url.replace("/metrics", "/healthz")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return dict(json.loads(response.read()))
        except urllib.error.HTTPError as exc:
            return dict(json.loads(exc.read()))

    def _check_agent(self, before: dict[str, Any], verdict: Verdict) -> None:
        if not self.agent.running:
            verdict.violations.append(f"the agent died:\n{self.agent.log_tail(30)}")
            return
        try:
            after = self._health()
        except (OSError, ValueError) as exc:
            verdict.violations.append(f"/healthz did not answer: {exc}")
            return
        if after.get("status") != "ok":
            verdict.violations.append(f"/healthz: {after}")
        stalled = after.get("stalled_fuse_requests", 0) - before.get("stalled_fuse_requests", 0)
        if stalled:
            verdict.violations.append(
                f"{stalled} FUSE requests unanswered after {self.limits.watchdog_threshold:g} s "
                f"(demand_timeout {self.limits.demand_timeout:g} s)"
            )
        peak = _peak_rss(self.agent.pid)
        verdict.peak_rss_mib = round(peak / (1 << 20), 1)
        if peak >= self.limits.rss_bytes:
            verdict.violations.append(f"agent peak RSS {peak >> 20} MiB")


def forget_removed_layers(mountpoint: Path) -> None:
    """Work around an agent bug, so that it does not hide everything else: a layer
    directory under the FUSE mount root is looked up with the layer root's entry timeout
    (a day), so when a layer is unmounted (its snapshots removed) and mounted again under
    the same name (same blob, same metadata), the kernel keeps resolving its path to the
    old, forgotten inode and the next overlay mount of it reads ENOENT everywhere.
    Listing the mount root (READDIRPLUS) makes the kernel look the names up again."""
    os.listdir(mountpoint)


def _difference(path: str, expected: Facts, actual: Facts) -> str:
    """Which facts of an entry differ: "wrong bytes" when a regular file's size or
    content does, "wrong metadata" otherwise."""
    detail = {stat.S_IFREG: "size/content", stat.S_IFLNK: "link target"}
    names = ("type", "mode", "uid", "gid", detail.get(expected[0], "device"), "xattrs", "mtime")
    fields = [n for n, a, b in zip(names, expected, actual, strict=True) if a != b]
    bytes_differ = expected[0] == actual[0] == stat.S_IFREG and expected[4] != actual[4]
    what = "wrong bytes" if bytes_differ else "wrong metadata"
    return f"{what}: {path} ({', '.join(fields)}): expected {expected}, got {actual}"


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0
