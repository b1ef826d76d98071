"""A profile recorded at conversion: the converter starts the new image once, traced.

Why: the fleet learns an image's profile from its starts on nodes, so the first starts
of a new image (a rollout, the ones that matter) get no prefetch plan. A repository
that opts in has its image started once by the converter right after conversion, in a
sandbox, under the eBPF tracer; what the start read is published like a node's run
profile (a referrer of the manifest nodes run), counted under the node name
`conversion/<host>` (`profiles.provenance`) so that its origin stays visible.

What is started is whatever someone pushed, so it is confined
(`tracer.containerd_start.Sandbox`): a network namespace with only loopback, a
read-only root, memory and CPU limits, containerd's default seccomp profile, and a
time limit after which it is killed. Only a complete start teaches anything: with a
readiness pattern, a start is complete when a line of its output matches (it is then
stopped); without one, when it goes quiet before the time limit. A crash (non-zero
exit, crash signal) or a timeout publishes nothing.

Which image is started: in full mode the `_accelerated` image, in index-only mode the
source image itself (nodes run it and read its layers through the index), each by
digest for this host's platform.

How it gets into containerd: through containerd's CRI image service, as the kubelet
pulls (`accelctl.cri.client`), into the CRI namespace and its snapshotter. Not
`ctr images pull`: that takes credentials only as `--user user:password`, on a
command line every local user can read in /proc, while CRI carries them in the
request. It is also the nodes' own path, so the start runs on the bytes a node would
unpack. Plain-HTTP registries other than loopback ones need containerd's registry
host configuration (`hosts.toml`), as on the nodes. An image this call pulled is
removed afterwards through CRI (containerd's garbage collector then drops its content
and snapshots, and the container is `ctr run --rm`), so repeated conversions do not
fill the disk; one that containerd already had is left as it was.
"""

from __future__ import annotations

import asyncio
import re
import socket
from dataclasses import dataclass
from typing import Any

from accelctl.cri.client import CRI_NAMESPACE, DEFAULT_CONTAINERD, CRIError, CRIImageClient
from common.logging import get_logger
from converter.convert import ConversionResult
from fetcher.credentials import CredentialStore
from fetcher.errors import RegistryError
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient, ResolvedImage
from formats.accelerated import MODE_FULL
from profiles.learn import from_trace
from profiles.provenance import conversion_node
from profiles.registry_sync import ProfileSyncError, push_run_profile
from profiles.trace import Outcome, RunTrace
from tracer.availability import TracerUnavailable
from tracer.containerd_start import (
    Containerd,
    ContainerRun,
    RecordError,
    Sandbox,
    image_chain_id,
    run_trace,
    traced_run,
)
from tracer.trace import Tracer

log = get_logger(__name__)


_NUMBERS = ("timeout_s", "quiet_s", "memory_mb", "cpus")


RECORD_FAILURES: tuple[type[Exception], ...] = (
    RecordError,
    CRIError,
    TracerUnavailable,
    RegistryError,
    ProfileSyncError,
    OSError,
    ValueError,
)
"""What `record_at_conversion` raises when a start could not be recorded at all (the
conversion itself is published either way)."""


class RecordSettingsError(ValueError):
    """Recording settings that cannot be used."""


@dataclass(frozen=True)
class RecordSettings:
    """How one repository's images are started at conversion (per repository rule)."""

    command: tuple[str, ...] = ()
    """Replaces the image's entrypoint and cmd; empty: the image's own command."""
    ready_pattern: str | None = None
    """Regular expression searched in each output line; a match completes the start."""
    timeout_s: float = 60.0
    """Time limit of the start; reached without the readiness line: timed out."""
    quiet_s: float = 3.0
    """Without a readiness pattern: idle seconds that complete the start."""
    memory_mb: int = 512
    cpus: float = 1.0

    def __post_init__(self) -> None:
        if not self.timeout_s > 0 or not self.quiet_s > 0:
            raise RecordSettingsError("timeout_s and quiet_s must be positive")
        if self.memory_mb < 6:  # runc refuses limits below 6 MiB
            raise RecordSettingsError("memory_mb must be at least 6")
        if not self.cpus > 0:
            raise RecordSettingsError("cpus must be positive")
        if self.ready_pattern is not None:
            try:
                re.compile(self.ready_pattern)
            except re.error as exc:
                raise RecordSettingsError(f"ready_pattern: {exc}") from None

    def sandbox(self) -> Sandbox:
        """The confinement of the start."""
        return Sandbox(read_only=True, memory_bytes=self.memory_mb << 20, cpus=self.cpus)

    @classmethod
    def from_dict(cls, raw: Any, source: str) -> RecordSettings:
        """Validate a rule's `record_profile` mapping (``true`` takes every default)."""
        if raw is True:
            return cls()
        if not isinstance(raw, dict):
            raise RecordSettingsError(f"{source}: record_profile must be a mapping or true")
        unknown = set(raw) - {"command", "ready_pattern", *_NUMBERS}
        if unknown:
            raise RecordSettingsError(f"{source}: unknown record_profile keys {sorted(unknown)}")
        command = raw.get("command") or []
        if not isinstance(command, list) or not all(isinstance(a, str) for a in command):
            raise RecordSettingsError(f"{source}: record_profile.command must be a list of strings")
        pattern = raw.get("ready_pattern")
        if pattern is not None and not isinstance(pattern, str):
            raise RecordSettingsError(f"{source}: record_profile.ready_pattern must be a string")
        numbers: dict[str, Any] = {}
        for key in _NUMBERS:
            if key in raw:
                value = raw[key]
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise RecordSettingsError(f"{source}: record_profile.{key} must be a number")
                numbers[key] = value
        if "memory_mb" in numbers:
            numbers["memory_mb"] = int(numbers["memory_mb"])
        try:
            return cls(command=tuple(command), ready_pattern=pattern, **numbers)
        except RecordSettingsError as exc:
            raise RecordSettingsError(f"{source}: record_profile: {exc}") from None


@dataclass(frozen=True)
class ContainerdTarget:
    """The converter host's containerd that runs the recorded starts."""

    address: str = DEFAULT_CONTAINERD
    snapshotter: str = "overlayfs"
    """The snapshotter containerd's CRI plugin pulls with (the start must use it too)."""


@dataclass(frozen=True)
class Recorded:
    """What one start at conversion gave."""

    image: str
    """The reference started (pinned to the platform manifest)."""
    outcome: Outcome
    exit_code: int | None
    output: str
    files: int
    """Files the learned profile names (0 when nothing was learned)."""
    profile_digest: str | None
    """The published profile artifact; None when nothing was published."""


def started_image(result: ConversionResult) -> ImageReference:
    """The image nodes run for this conversion: the full-mode form, or in index-only mode
    the source (the artifact is no runnable image)."""
    if result.mode == MODE_FULL:
        return result.target.with_digest(result.result_digest)
    return result.source.with_digest(result.source_digest)


def _containerd_name(resolved: ResolvedImage) -> str:
    """The name containerd gives the image pulled by digest (a tag would be dropped)."""
    ref = resolved.reference
    return f"{ref.registry}/{ref.repository}@{resolved.manifest_digest}"


def _start(
    image: str,
    top_chain_id: str,
    resolved: ResolvedImage,
    settings: RecordSettings,
    target: ContainerdTarget,
    credentials: CredentialStore | None,
) -> tuple[RunTrace, ContainerRun]:
    """Pull, start traced, clean up (blocking: run in a thread)."""
    ready = re.compile(settings.ready_pattern) if settings.ready_pattern else None
    containerd = Containerd(target.address, CRI_NAMESPACE, target.snapshotter)
    # eBPF first: a host that cannot trace should say so before anything is pulled.
    with Tracer() as tracer, CRIImageClient(target.address) as cri:
        had_it = cri.status(image) is not None
        cri.pull(image, credentials)
        try:
            dirs = containerd.rootfs_layers(top_chain_id)
            trace, run = traced_run(
                tracer,
                containerd,
                image,
                settings.command,
                settings.quiet_s,
                settings.timeout_s,
                ready=ready,
                sandbox=settings.sandbox(),
            )
            # While the layer directories still exist: the mapping looks into them.
            node = conversion_node(socket.gethostname())
            return run_trace(resolved, trace, run, dirs, node=node), run
        finally:
            if not had_it:
                try:
                    cri.remove(image)
                except CRIError as exc:
                    log.warning("record_at_conversion.remove_failed", image=image, error=str(exc))


async def record_at_conversion(
    client: RegistryClient,
    result: ConversionResult,
    settings: RecordSettings,
    target: ContainerdTarget,
    credentials: CredentialStore | None = None,
) -> Recorded:
    """Start the converted image once in the sandbox and publish what it read.

    Raises RecordError (containerd, the mounts), CRIError (the pull), TracerUnavailable
    or RegistryError when the start could not be recorded at all; a start that crashed
    or timed out is a `Recorded` with nothing published.
    """
    resolved = await client.resolve(started_image(result))
    top = await image_chain_id(client, resolved)
    image = _containerd_name(resolved)
    log.info("record_at_conversion.starting", image=image, timeout_s=settings.timeout_s)
    recorded, run = await asyncio.to_thread(
        _start, image, top, resolved, settings, target, credentials
    )
    if recorded.outcome is not Outcome.OK:
        log.warning(
            "record_at_conversion.not_published",
            image=image,
            outcome=str(recorded.outcome),
            exit_code=run.returncode,
            ready=run.ready,
        )
        return Recorded(image, recorded.outcome, run.returncode, run.output, 0, None)
    learned = from_trace(recorded)
    published = await push_run_profile(client, resolved.reference, learned)
    log.info(
        "record_at_conversion.published",
        image=image,
        profile=published.digest,
        files=len(learned.files),
        node=recorded.node,
    )
    return Recorded(
        image, Outcome.OK, run.returncode, run.output, len(learned.files), published.digest
    )
