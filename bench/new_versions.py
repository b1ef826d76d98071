"""The startup suite's new-version scenario (issue 24): a version with no profile yet.

A profile is learned per image manifest, so a new version (a new digest) starts at
no-profile speed until its own starts have taught one, unless the agent lends it a
predecessor's (``profile_inheritance``). This scenario measures how much of the
profile's gain a new version gets on its first starts. Per catalog image with versions
(`bench.catalog.ImageVersion`): v2 and v3 are pushed under v1's repositories (the
agent finds predecessors among the tags there) and converted in each lazy form; v2
must share every layer but the app's with v1 by digest in each form, v3 none (checked
here: a builder or converter that stopped being deterministic would void the
comparison). v1's profile is the one the suite learned; each version's own profile is
then learned too and unlisted again (`bench.profile_state`), so that, ``repeat``
times with the order rotating, each from a cold node and none recording:

* ``lazy-<form>+inherited``  profiles and inheritance on, the version's own unlisted;
* ``lazy-<form>``            profiles off: the start the version would have without;
* ``lazy-<form>+profile``    the version's own profile listed again.

Each run records which profile the agent loaded (`bench.startup.profile_loaded`).
The rows hold the ratios the issue sets targets for: inherited over own-profile ready
time, inherited over the compressed limit (v1's local start plus the compressed bytes,
in the form's layers, holding what the version's start read, from one start with
read-ahead off, at link bandwidth: bench/compressed_limit.py), and the bytes fetched
before ready by an inherited start over the bytes the app read.
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Mapping, Sequence, Set
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from bench import catalog
from bench.chart import Bar, Panel
from bench.learning import (
    PROFILE_SUFFIX,
    Learned,
    ProgressCallback,
    done_with,
    form_costing,
    learn_profile,
    run_dir,
)
from bench.profile_state import list_profiles
from bench.report import markdown_table
from bench.startup import (
    ImageUnderTest,
    RunResult,
    Setup,
    lazy_node,
    lazy_reference,
    physical_limit_seconds,
    publish,
    timed_lazy_start,
)
from common.logging import get_logger
from fetcher.manifest import Descriptor, ImageManifest
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from formats.accelerated import ANNOTATION_LAYER_DIGEST, ARTIFACT_TYPE_INDEX

log = get_logger(__name__)

VERSION_MODES = ("inherited", "none", "own")
"""A version's start with a predecessor's profile, with none, and with its own."""
_SUFFIX = {"inherited": "+inherited", "none": "", "own": PROFILE_SUFFIX}
_LABEL = {"inherited": "inherited", "none": "no profile", "own": "own profile"}
TARGET_VS_OWN = 1.15
TARGET_VS_LIMIT = 1.3
TARGET_BYTES = 1.5


class ScenarioError(RuntimeError):
    """A version does not share with v1 the layers the scenario is built on."""


def mode_name(form: str, version_mode: str) -> str:
    """The run label of a version's start in ``form`` and ``version_mode``."""
    return f"lazy-{form}{_SUFFIX[version_mode]}"


@dataclass
class ScenarioOutcome:
    """The new-version scenario of one image."""

    first_digests: dict[str, str]
    """Per form, v1's manifest digest (what an inherited profile should come from)."""
    versions: list[VersionOutcome]


@dataclass
class VersionOutcome:
    """Everything measured for one later version of an image."""

    tag: str
    change: str
    digests: dict[str, str]
    """Per form, the manifest digest the agent serves (and keys profiles by)."""
    layers: dict[str, int]
    shared_with_v1: dict[str, int]
    """Per form, how many of the layers the agent serves are v1's, by digest."""
    conversions: dict[str, dict[str, float]]
    learned: dict[str, Learned] = field(default_factory=dict)
    runs: list[RunResult] = field(default_factory=list)

    @property
    def app_read_bytes(self) -> int | None:
        """Bytes the version's start read, as its own learned profiles saw it."""
        values = [learned.app_read_bytes for learned in self.learned.values()]
        return int(statistics.median(values)) if values else None


# -- publishing ---------------------------------------------------------------------------


async def served_layers(registry_host: str, reference: str, form: str) -> tuple[str, list[str]]:
    """The manifest digest of ``reference`` and what ``form`` serves each layer from: the
    eStargz blob (full), or the original blob with its index blob(s) (index)."""
    ref = ImageReference.parse(reference)
    async with RegistryClient(plain_http_hosts={registry_host}) as client:
        resolved = await client.resolve(ref)
        layers = [layer.digest for layer in resolved.manifest.layers]
        if form == "full":
            return resolved.manifest_digest, layers
        indexes: dict[str, set[str]] = {layer: set() for layer in layers}
        for artifact in await client.referrers(ref, resolved.manifest_digest, ARTIFACT_TYPE_INDEX):
            fetched = await client.get_manifest(ref.with_digest(artifact.digest))
            if isinstance(fetched.parsed, ImageManifest):
                for blob in fetched.parsed.layers:
                    source = blob.annotations.get(ANNOTATION_LAYER_DIGEST, "")
                    indexes.setdefault(source, set()).add(blob.digest)
        served = [f"{layer}+{','.join(sorted(indexes[layer]))}" for layer in layers]
        return resolved.manifest_digest, served


def publish_version(
    setup: Setup,
    version: catalog.ImageVersion,
    first: Mapping[str, Sequence[str]],
    cache_dir: Path,
) -> tuple[Setup, VersionOutcome]:
    """Build, push and convert ``version`` next to v1 (``setup``'s image); check what it
    shares with v1 (``first``: what v1 serves its layers from, per form) in each form."""
    name = setup.image.name
    built = catalog.build_version(name, version.tag, cache_dir)
    image = ImageUnderTest(name, built, setup.image.probe)
    published = asyncio.run(publish(image, setup.registry_host, version.tag))
    version_setup = replace(setup, image=image, published=published)
    outcome = VersionOutcome(version.tag, version.change, {}, {}, {}, published.conversions)
    for form, theirs in first.items():
        reference = lazy_reference(version_setup, form)
        digest, mine = asyncio.run(served_layers(setup.registry_host, reference, form))
        shared = len(set(theirs) & set(mine))
        expected = 0 if version.base_packages else len(mine) - 1
        if shared != expected:
            raise ScenarioError(
                f"{name} {version.tag} ({form}): {shared} of {len(mine)} layers are v1's, "
                f"expected {expected}"
            )
        outcome.digests[form] = digest
        outcome.layers[form] = len(mine)
        outcome.shared_with_v1[form] = shared
    log.info("bench.version_published", image=name, tag=version.tag, shared=outcome.shared_with_v1)
    return version_setup, outcome


# -- measuring ------------------------------------------------------------------------


OwnProfiles = dict[tuple[str, str], list[Descriptor]]
"""(tag, form) -> the profile artifacts a version learned of its own, unlisted."""


def _list_only(
    versions: Sequence[tuple[Setup, VersionOutcome]],
    own: OwnProfiles,
    shown: Set[tuple[str, str]],
) -> None:
    """List the own profiles of the (tag, form) pairs ``shown``, no other version's: an
    inherited run must find only v1's profile, whatever ran before it."""
    for version_setup, outcome in versions:
        for form in outcome.digests:
            key = (outcome.tag, form)
            listed = own[key] if key in shown else []
            reference = lazy_reference(version_setup, form)
            asyncio.run(list_profiles(version_setup.registry_host, reference, listed))


def measure_versions(
    setup: Setup,
    versions: Sequence[catalog.ImageVersion],
    *,
    forms: Sequence[str],
    repeat: int,
    learn_starts: int,
    keep_runs: bool,
    cache_dir: Path,
    image_number: int,
    progress: ProgressCallback,
) -> ScenarioOutcome:
    """Publish ``versions`` of ``setup``'s image (v1, whose profiles the suite learned),
    learn each one's own profile, then every version x form x mode ``repeat`` times."""
    name = setup.image.name
    first_digests, first = {}, {}
    for form in forms:
        reference = lazy_reference(setup, form)
        first_digests[form], first[form] = asyncio.run(
            served_layers(setup.registry_host, reference, form)
        )
    published = []
    for version in versions:
        progress(f"{name} {version.tag}: build, publish and convert")
        published.append(publish_version(setup, version, first, cache_dir))
    own: OwnProfiles = {}
    for version_setup, outcome in published:
        for form in forms:
            outcome.learned[form] = learn_profile(
                version_setup,
                form,
                costing=form_costing(version_setup, form),
                starts=learn_starts,
                keep_runs=keep_runs,
                image_number=image_number,
                progress=progress,
                version=outcome.tag,
            )
            reference = lazy_reference(version_setup, form)
            own[(outcome.tag, form)] = asyncio.run(
                list_profiles(setup.registry_host, reference, [])
            )
    order = [
        (number, form, mode)
        for number in range(len(published))
        for form in forms
        for mode in VERSION_MODES
    ]
    try:
        for repetition in range(1, repeat + 1):
            for number, form, mode in order:
                version_setup, outcome = published[number]
                label = mode_name(form, mode)
                progress(f"{name} {outcome.tag} {repetition}/{repeat}: {label}")
                _list_only(published, own, {(outcome.tag, form)} if mode == "own" else set())
                # no longer than the suite's own labels: sockets live below
                short = f"{outcome.tag}r{repetition}{form}-{mode[:3]}"
                path = run_dir(version_setup, image_number, short)
                with lazy_node(
                    version_setup,
                    path,
                    use_profiles=mode != "none",
                    record_profiles=False,
                    inherit_profiles=True,
                ) as node:
                    reference = lazy_reference(version_setup, form)
                    run = timed_lazy_start(version_setup, node, reference, label, repetition)
                outcome.runs.append(run)
                done_with(path, keep_runs)
                log.info("bench.done", image=name, version=outcome.tag, **asdict(run))
            order = order[1:] + order[:1]
    finally:
        # None stays listed: every v3 is built on the same rebuilt base, so a later
        # image's v3 could otherwise inherit through that layer from this image's.
        _list_only(published, own, set())
    return ScenarioOutcome(first_digests, [outcome for _, outcome in published])


# -- summarizing ----------------------------------------------------------------------


@dataclass(frozen=True)
class VersionRow:
    """One image x version x form line of the new-version table."""

    image: str
    version: str
    change: str
    form: str
    runs: int
    inherited_seconds: float
    none_seconds: float
    own_seconds: float
    limit_seconds: float | None
    mb_before_ready: float
    """Median over the inherited starts of the bytes that crossed the link by ready."""
    mb_read_by_app: float | None
    """The version's own learned profile: bytes its start read."""
    inherited_vs_own: float
    none_vs_own: float
    inherited_vs_limit: float | None
    before_ready_vs_read: float | None
    origin: str
    """Which profile the inherited starts loaded, per the agent's log."""


def _median(runs: Sequence[RunResult], attribute: str) -> float:
    return float(statistics.median(getattr(run, attribute) for run in runs))


def _origin(runs: Sequence[RunResult], tags: Mapping[str, str]) -> str:
    """Which profile ``runs`` loaded: "inherited from v1", "none", ... ("not logged"
    when the agent did not say, with the size of the plan it made if it said that;
    several answers joined when the runs disagree)."""
    seen = []
    for run in runs:
        if run.profile_origin is None:
            entries = "" if run.profile_entries is None else f" ({run.profile_entries} entries)"
            seen.append(f"not logged{entries}")
        elif run.inherited_from is not None:
            source = tags.get(run.inherited_from, run.inherited_from[:19])
            seen.append(f"{run.profile_origin} from {source}")
        else:
            seen.append(run.profile_origin)
    return " / ".join(dict.fromkeys(seen))


def version_rows(
    image: str,
    outcomes: Sequence[VersionOutcome],
    warm_seconds: Sequence[float],
    first_digests: Mapping[str, str],
    rate_mbit: float,
) -> list[VersionRow]:
    """Per version and form: the three medians, the limit and the ratios.

    ``warm_seconds`` are v1's local starts (the app's start barely changes between
    versions); ``first_digests`` are v1's manifest digests per form, to name sources.
    """
    tags = {digest: "v1" for digest in first_digests.values()}
    for outcome in outcomes:
        tags.update({digest: outcome.tag for digest in outcome.digests.values()})
    rows = []
    for outcome in outcomes:
        for form, learned in outcome.learned.items():
            limit_bytes = None if learned.cost is None else learned.cost.limit_bytes
            limit = physical_limit_seconds(warm_seconds, limit_bytes, rate_mbit)
            by_mode = {
                mode: [r for r in outcome.runs if r.mode == mode_name(form, mode)]
                for mode in VERSION_MODES
            }
            if not all(by_mode.values()):
                continue
            inherited = _median(by_mode["inherited"], "ready_seconds")
            none = _median(by_mode["none"], "ready_seconds")
            own = _median(by_mode["own"], "ready_seconds")
            before = _median(by_mode["inherited"], "link_bytes_before_ready")
            read = learned.app_read_bytes
            rows.append(
                VersionRow(
                    image,
                    outcome.tag,
                    outcome.change,
                    form,
                    len(by_mode["inherited"]),
                    inherited,
                    none,
                    own,
                    limit,
                    before / 1e6,
                    read / 1e6,
                    inherited / own,
                    none / own,
                    None if limit is None else inherited / limit,
                    before / read if read else None,
                    _origin(by_mode["inherited"], tags),
                )
            )
    return rows


def _verdict(value: float, target: float) -> str:
    return f"{value:.2f}x (target <= {target:g}x: {'met' if value <= target else 'MISSED'})"


def versions_summary(rows: Sequence[VersionRow]) -> str:
    """Medians over images and forms, per version, against the issue's targets."""
    parts = []
    for tag in dict.fromkeys(row.version for row in rows):
        of_tag = [row for row in rows if row.version == tag]
        part = f"{tag} ({of_tag[0].change} changed): inherited vs own profile " + _verdict(
            statistics.median(r.inherited_vs_own for r in of_tag), TARGET_VS_OWN
        )
        limits = [r.inherited_vs_limit for r in of_tag if r.inherited_vs_limit is not None]
        if limits:
            part += ", vs the limit " + _verdict(statistics.median(limits), TARGET_VS_LIMIT)
        fetched = [r.before_ready_vs_read for r in of_tag if r.before_ready_vs_read is not None]
        if fetched:
            part += ", bytes before ready vs read " + _verdict(
                statistics.median(fetched), TARGET_BYTES
            )
        part += f"; no profile {statistics.median(r.none_vs_own for r in of_tag):.2f}x own"
        parts.append(part)
    images = len({row.image for row in rows})
    forms = ", ".join(dict.fromkeys(row.form for row in rows))
    return f"new versions, medians over {images} image(s) ({forms}): " + "; ".join(parts) + "."


def versions_table(rows: Sequence[VersionRow]) -> str:
    """The markdown table: one row per image x version x form."""
    headers = [
        "image",
        "version",
        "changed",
        "form",
        "runs",
        "inherited s",
        "no profile s",
        "own profile s",
        "limit s",
        "MB before ready (inherited)",
        "MB read by app",
        "inherited / own",
        "inherited / limit",
        "before ready / read",
        "profile loaded (inherited runs)",
    ]

    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}x"

    body = [
        [
            r.image,
            r.version,
            r.change,
            r.form,
            str(r.runs),
            f"{r.inherited_seconds:.2f}",
            f"{r.none_seconds:.2f}",
            f"{r.own_seconds:.2f}",
            "-" if r.limit_seconds is None else f"{r.limit_seconds:.2f}",
            f"{r.mb_before_ready:.1f}",
            "-" if r.mb_read_by_app is None else f"{r.mb_read_by_app:.1f}",
            ratio(r.inherited_vs_own),
            ratio(r.inherited_vs_limit),
            ratio(r.before_ready_vs_read),
            r.origin,
        ]
        for r in rows
    ]
    return markdown_table(headers, body)


def version_panels(
    image: str, outcomes: Sequence[VersionOutcome], rows: Sequence[VersionRow]
) -> list[Panel]:
    """One chart panel per version: pull + start bars per form and mode, and its limit."""
    panels = []
    for outcome in outcomes:
        bars = []
        for form in outcome.learned:
            for mode in VERSION_MODES:
                runs = [r for r in outcome.runs if r.mode == mode_name(form, mode)]
                if runs:
                    bars.append(
                        Bar(
                            f"{form} {_LABEL[mode]}",
                            _median(runs, "pull_seconds"),
                            _median(runs, "ready_seconds"),
                        )
                    )
        limits = [r.limit_seconds for r in rows if r.version == outcome.tag and r.image == image]
        panels.append(
            Panel(
                f"{image} {outcome.tag} ({outcome.change} changed)",
                bars,
                limits[0] if limits else None,
            )
        )
    return panels
