"""Profiles recorded at conversion: the converter starts the new image once, sandboxed.

Everything is real: the registry, containerd (CRI pull, `ctr run` with runc), the eBPF
tracer. The image's reads are known (`app_image_spec`), so the published profile must
name them; crashed and timed-out starts must publish nothing; the sandbox is checked
from both sides (what the container could do, and what containerd and the kernel were
told: the OCI spec and the container's cgroup)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from accelctl.cri.client import CRI_NAMESPACE
from accelctl.main import cli
from converter.convert import ConversionResult, ConvertOptions, convert_image
from converter.record_at_conversion import (
    ContainerdTarget,
    RecordSettings,
    RecordSettingsError,
    record_at_conversion,
)
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from formats.accelerated import MODE_FULL, MODE_INDEX
from profiles.plan import prefetch_plan
from profiles.provenance import conversion_node
from profiles.registry_sync import fetch_profile
from profiles.trace import Outcome
from rig.containerd import ContainerdServer
from rig.images import build_image, push_image
from tests.test_profiles_e2e import app_image_spec

READS = "cat /app/a.bin /app/b.bin >/dev/null"


async def _pushed(registry: Any, tmp_path: Path, command: str) -> ImageReference:
    built = build_image(app_image_spec(command), tmp_path / f"layout-{uuid.uuid4().hex}", "v1")
    reference = ImageReference.parse(f"{registry.host}/rig/conv-rec-{uuid.uuid4().hex[:8]}:v1")
    async with RegistryClient() as client:
        await push_image(client, str(reference), built)
    return reference


async def _convert(reference: ImageReference, mode: str = MODE_FULL) -> ConversionResult:
    async with RegistryClient() as client:
        return await convert_image(client, reference, ConvertOptions(mode=mode))


async def _record(
    containerd: ContainerdServer, result: ConversionResult, settings: RecordSettings
) -> Any:
    target = ContainerdTarget(address=str(containerd.address), snapshotter="overlayfs")
    async with RegistryClient() as client:
        return await record_at_conversion(client, result, settings, target)


async def _profile(reference: ImageReference) -> Any:
    """What a node starting ``reference`` would be given (the agent's own lookup)."""
    async with RegistryClient() as client:
        resolved = await client.resolve(reference)
        return await fetch_profile(client, reference, resolved.manifest_digest)


def _ctr_names(containerd: ContainerdServer, *what: str) -> set[str]:
    listed = containerd.ctr(*what, "ls", "-q", namespace=CRI_NAMESPACE).stdout
    return set(listed.split())


def _snapshots(containerd: ContainerdServer) -> set[str]:
    listed = containerd.ctr(
        "snapshots", "--snapshotter", "overlayfs", "ls", namespace=CRI_NAMESPACE
    ).stdout
    return {line.split()[0] for line in listed.splitlines()[1:] if line.strip()}


class _SpecWatch:
    """Catches the recording container while it runs: its OCI spec as containerd holds
    it, and the memory and CPU limits of its cgroup as the kernel holds them."""

    def __init__(self, containerd: ContainerdServer) -> None:
        self.containerd = containerd
        self.spec: dict[str, Any] | None = None
        self.cgroup: dict[str, str] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._done.is_set() and self.spec is None:
            names = [
                n
                for n in _ctr_names(self.containerd, "containers")
                if n.startswith("accelctl-record-")
            ]
            for name in names:
                # The container is listed before runc has made its cgroup and set the
                # limits: only a running task's cgroup holds them.
                tasks = self.containerd.ctr("tasks", "ls", namespace=CRI_NAMESPACE, check=False)
                if not any(
                    line.split()[:1] == [name] and "RUNNING" in line
                    for line in tasks.stdout.splitlines()
                ):
                    continue
                info = self.containerd.ctr(
                    "containers", "info", name, namespace=CRI_NAMESPACE, check=False
                )
                if info.returncode != 0:
                    continue
                spec = json.loads(info.stdout)["Spec"]
                cgroup = spec["linux"]["cgroupsPath"].lstrip("/")
                for controller, knob in (
                    ("memory", "memory.limit_in_bytes"),
                    ("cpu", "cpu.cfs_quota_us"),
                    ("cpu", "cpu.cfs_period_us"),
                ):
                    with contextlib.suppress(OSError):
                        path = Path("/sys/fs/cgroup") / controller / cgroup / knob
                        self.cgroup[knob] = path.read_text().strip()
                self.spec = spec
            time.sleep(0.1)

    def __enter__(self) -> _SpecWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(10)


def test_settings_are_validated() -> None:
    assert RecordSettings.from_dict(True, "t") == RecordSettings()
    parsed = RecordSettings.from_dict(
        {"command": ["sh", "-c", "x"], "ready_pattern": "^up", "timeout_s": 5, "memory_mb": 64},
        "t",
    )
    assert parsed.command == ("sh", "-c", "x") and parsed.memory_mb == 64
    sandbox = parsed.sandbox()
    assert sandbox.read_only and sandbox.memory_bytes == 64 << 20 and sandbox.cpus == 1.0
    for bad in (
        {"ready_pattern": "("},
        {"timeout_s": 0},
        {"memory_mb": "lots"},
        {"cpus": -1},
        {"command": "sh -c x"},
        {"networking": True},
        "yes",
    ):
        with pytest.raises(RecordSettingsError):
            RecordSettings.from_dict(bad, "t")


async def test_a_start_at_conversion_publishes_what_it_read(registry, containerd, tmp_path):
    reference = await _pushed(registry, tmp_path, f"{READS}; echo ready; sleep 60")
    result = await _convert(reference)
    images_before = _ctr_names(containerd, "images")
    snapshots_before = await asyncio.to_thread(_snapshots, containerd)
    started = time.monotonic()
    recorded = await _record(
        containerd, result, RecordSettings(ready_pattern=r"^ready$", timeout_s=60)
    )
    # Stopped at its readiness line, not at the time limit.
    assert time.monotonic() - started < 30
    assert recorded.outcome is Outcome.OK, recorded.output
    assert recorded.profile_digest is not None

    profile = await _profile(result.target)
    assert profile is not None
    assert dict(profile.runs.nodes) == {conversion_node(socket.gethostname()): 1}
    planned = {entry.path for entry in prefetch_plan(profile)}
    assert {"/app/a.bin", "/app/b.bin", "/bin/busybox"} <= planned, sorted(planned)
    assert "/app/unused.bin" not in planned
    shown = await asyncio.to_thread(
        CliRunner(env={"COLUMNS": "250"}).invoke,
        cli,
        ["profile", "show", str(result.target)],
        catch_exceptions=False,
    )
    assert shown.exit_code == 0, shown.output
    assert "origin: own profile, 1 run(s) recorded at conversion" in shown.output

    # Nothing of the sandbox is left in containerd: image, container, snapshots.
    assert _ctr_names(containerd, "images") == images_before
    assert not any(n.startswith("accelctl-record-") for n in _ctr_names(containerd, "containers"))
    deadline = time.monotonic() + 20
    while await asyncio.to_thread(_snapshots, containerd) != snapshots_before:
        assert time.monotonic() < deadline, "the sandbox's snapshots were not removed"
        await asyncio.sleep(0.5)


@pytest.mark.parametrize(
    ("command", "ready", "outcome"),
    [
        pytest.param(f"{READS}; exit 1", None, Outcome.CRASHED, id="exit-1"),
        # The shell is the container's pid 1, which ignores signals it has no handler
        # for; its child is killed, and the shell exits with that status (128 + 11).
        pytest.param(f"{READS}; sh -c 'kill -SEGV $$'; exit $?", None, Outcome.CRASHED, id="segv"),
        pytest.param(f"{READS}; exit 3", r"^ready$", Outcome.CRASHED, id="exit-3-before-ready"),
        pytest.param(f"{READS}; echo done", r"^ready$", Outcome.TIMED_OUT, id="exit-0-never-ready"),
        pytest.param(f"{READS}; echo starting; sleep 60", r"^ready$", Outcome.TIMED_OUT, id="slow"),
    ],
)
async def test_a_start_that_crashes_or_times_out_publishes_nothing(
    registry, containerd, tmp_path, command, ready, outcome
):
    reference = await _pushed(registry, tmp_path, command)
    result = await _convert(reference)
    started = time.monotonic()
    recorded = await _record(
        containerd, result, RecordSettings(ready_pattern=ready, timeout_s=6, quiet_s=1)
    )
    assert time.monotonic() - started < 40
    assert recorded.outcome is outcome, recorded
    assert recorded.profile_digest is None
    assert await _profile(result.target) is None


def _host_addresses() -> list[str]:
    """This host's IPv4 addresses: loopback and whatever its interfaces hold."""
    shown = subprocess.run(
        ["ip", "-j", "-4", "addr", "show"], capture_output=True, text=True, check=True
    )
    found = [a["local"] for link in json.loads(shown.stdout) for a in link.get("addr_info", [])]
    return ["127.0.0.1", *(a for a in found if a != "127.0.0.1")]


@contextlib.contextmanager
def _listeners(addresses: list[str]) -> Iterator[tuple[int, list[str]]]:
    """Listeners on one port at each address; yields the port and a list that collects
    the address of every connection accepted."""
    port = 0
    sockets = []
    for address in addresses:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((address, port))
        port = listener.getsockname()[1]
        listener.listen()
        listener.settimeout(0.2)
        sockets.append(listener)
    accepted: list[str] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            for listener in sockets:
                with contextlib.suppress(TimeoutError):
                    connection, _ = listener.accept()
                    accepted.append(listener.getsockname()[0])
                    connection.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield port, accepted
    finally:
        stop.set()
        thread.join(5)
        for listener in sockets:
            listener.close()


def _connect_to_each(addresses: list[str], port: int, accepted: list[str]) -> None:
    for address in addresses:
        socket.create_connection((address, port), timeout=5).close()
    deadline = time.monotonic() + 5
    while len(accepted) < len(addresses) and time.monotonic() < deadline:
        time.sleep(0.05)


async def test_the_sandbox_has_no_network_no_writable_root_and_its_limits(
    registry, containerd, tmp_path
):
    addresses = _host_addresses()
    with _listeners(addresses) as (port, accepted):
        tries = " ".join(
            f"if echo hi | nc -w 2 {a} {port}; then echo 'connected to {a}'; "
            f"else echo 'connect to {a} failed'; fi;"
            for a in addresses
        )
        command = (
            f"{READS}; {tries} "
            "cat /proc/net/dev; "
            "if touch /written 2>/dev/null; then echo 'wrote /'; "
            "else echo 'write to / failed'; fi; "
            "if echo x > /tmp/scratch; then echo 'wrote /tmp'; fi; "
            "sleep 4; echo ready; sleep 60"
        )
        reference = await _pushed(registry, tmp_path, command)
        result = await _convert(reference)
        settings = RecordSettings(ready_pattern=r"^ready$", timeout_s=60, memory_mb=96, cpus=0.5)
        with _SpecWatch(containerd) as watch:
            recorded = await _record(containerd, result, settings)
        # The listeners work: this host reaches each of them, the container none.
        await asyncio.to_thread(_connect_to_each, addresses, port, accepted)
    assert sorted(accepted) == sorted(addresses), "the container reached a host listener"
    output = recorded.output
    for address in addresses:
        assert f"connect to {address} failed" in output, output
        assert f"connected to {address}" not in output
    # /proc/net/dev inside: the container's network namespace holds loopback only.
    devices = {m.group(1) for m in re.finditer(r"^\s*([\w.@-]+):\s+\d", output, re.M)}
    assert devices == {"lo"}, output
    assert "write to / failed" in output and "wrote /\n" not in output
    assert "wrote /tmp" in output
    assert recorded.outcome is Outcome.OK and recorded.profile_digest is not None

    spec = watch.spec
    assert spec is not None, "the recording container was never seen running"
    assert spec["root"]["readonly"] is True
    network = [ns for ns in spec["linux"]["namespaces"] if ns["type"] == "network"]
    assert network and "path" not in network[0]  # a new network namespace, not the host's
    resources = spec["linux"]["resources"]
    assert resources["memory"]["limit"] == 96 << 20
    assert resources["cpu"]["quota"] == resources["cpu"]["period"] // 2
    assert "seccomp" in spec["linux"]
    assert watch.cgroup["memory.limit_in_bytes"] == str(96 << 20)
    assert int(watch.cgroup["cpu.cfs_quota_us"]) * 2 == int(watch.cgroup["cpu.cfs_period_us"])


async def test_convert_command_records_an_index_only_conversion(registry, containerd, tmp_path):
    reference = await _pushed(registry, tmp_path, f"{READS}; echo started")
    runner = CliRunner(env={"COLUMNS": "250"})
    args = ["convert", str(reference), "--mode", MODE_INDEX, "--record-profile"]
    args += ["--address", str(containerd.address), "--snapshotter", "overlayfs"]
    args += ["--record-quiet", "1", "--record-timeout", "30"]
    converted = await asyncio.to_thread(runner.invoke, cli, args, catch_exceptions=False)
    assert converted.exit_code == 0, converted.output
    assert "profile recorded at conversion" in converted.output, converted.output
    # Index-only: nodes run the image itself, so the profile refers to its manifest.
    profile = await _profile(reference)
    assert profile is not None
    assert dict(profile.runs.nodes) == {conversion_node(socket.gethostname()): 1}
    assert "/app/a.bin" in {entry.path for entry in prefetch_plan(profile)}

    failing = await _pushed(registry, tmp_path, f"{READS}; exit 1")
    args[1] = str(failing)
    crashed = await asyncio.to_thread(runner.invoke, cli, args, catch_exceptions=False)
    assert crashed.exit_code != 0
    assert "crashed" in crashed.output and "nothing published" in crashed.output
    assert await _profile(failing) is None
