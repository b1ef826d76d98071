"""One start of an image through containerd, under the eBPF tracer, mapped to its layers.

Shared by `accelctl profile record` (an operator records a start on a node) and the
converter's recording at conversion (`converter.record_at_conversion`), so both learn
from a start the same way. It works with any snapshotter, because it asks containerd
for the image's root file system mounts and maps each path the container touched to
the topmost layer directory that holds it, as overlayfs does. The eBPF tracer follows
containerd's children from before the container exists, so it sees the container from
its first instruction.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import socket
import stat
import subprocess
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from common.digest import chain_id
from common.logging import get_logger
from fetcher.registry import RegistryClient, ResolvedImage
from formats.overlay import OPAQUE_XATTR, Presence, providing_layer, whiteout_device
from formats.plan_path import root_name
from profiles.trace import RunTrace, file_accesses, run_outcome
from tracer.trace import Trace, Tracer, mntns_of

log = get_logger(__name__)


class RecordError(RuntimeError):
    """The start could not be recorded (containerd, the mounts or the tracer said no)."""


def layer_dirs(mount_command: str) -> list[Path]:
    """The layer directories of a root file system, topmost first, from the mount
    command `ctr snapshots view|mounts` prints (overlay lowerdirs, or one bind mount
    for a single-layer image)."""
    argv = shlex.split(mount_command)
    # ctr prints: mount -t TYPE SOURCE TARGET -o OPTIONS
    if len(argv) != 7 or argv[0] != "mount" or argv[1] != "-t" or argv[5] != "-o":
        raise RecordError(f"unexpected mount command from containerd: {mount_command!r}")
    options = argv[6].split(",")
    for option in options:
        if option.startswith("lowerdir="):
            return [Path(p) for p in option.removeprefix("lowerdir=").split(":")]
    if "bind" in options or "rbind" in options:
        return [Path(argv[3])]
    raise RecordError(f"no layer directories in {mount_command!r}")


class LayerDirectory:
    """A layer directory containerd mounts as a lower directory, as a
    `formats.overlay.LayerView`: asked through the file system, so that a plainly
    unpacked layer and one the agent serves are read the same way."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def presence(self, path: str) -> Presence:
        here = self.root / path if path else self.root
        try:
            st = here.lstat()
        except OSError:
            return Presence.ABSENT
        if stat.S_ISDIR(st.st_mode):
            try:
                opaque = os.getxattr(here, OPAQUE_XATTR, follow_symlinks=False) == b"y"
            except OSError:
                opaque = False
            return Presence.OPAQUE_DIRECTORY if opaque else Presence.DIRECTORY
        rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
        if whiteout_device(stat.S_ISCHR(st.st_mode), *rdev):
            return Presence.WHITEOUT
        return Presence.OTHER


@dataclass(frozen=True)
class Sandbox:
    """How tightly a start is confined, as `ctr run` flags.

    For starts of images nobody on this host vouched for (the converter runs whatever
    was pushed). Network isolation needs no flag: without ``--net-host`` or ``--cni``
    ctr gives the container a network namespace of its own holding only a loopback
    device, so it reaches neither the host nor anything beyond it. Every start gets
    that, sandboxed or not; ``no_new_privileges`` is ctr's default too.
    """

    read_only: bool = True
    """Root file system mounted read-only: the start cannot alter what it is run from."""
    memory_bytes: int | None = None
    """cgroup memory limit; None: unlimited."""
    cpus: float | None = None
    """CFS quota in CPUs (0.5 = half of one); None: unlimited."""
    seccomp: bool = True
    """containerd's default seccomp profile (the one Kubernetes' RuntimeDefault names)."""
    scratch: tuple[str, ...] = ("/tmp",)
    """Writable tmpfs mounts: a read-only image must not mean a start that cannot make a
    temporary file (most do, as they would under Kubernetes' emptyDir). Their pages are
    charged to the container's cgroup, so the memory limit bounds them too."""

    def ctr_flags(self) -> list[str]:
        """The `ctr run` flags for this confinement."""
        flags = ["--read-only"] if self.read_only else []
        for path in self.scratch:
            flags += ["--mount", f"type=tmpfs,src=tmpfs,dst={path},options=rw:nosuid:nodev"]
        if self.memory_bytes is not None:
            flags += ["--memory-limit", str(self.memory_bytes)]
        if self.cpus is not None:
            flags += ["--cpus", repr(float(self.cpus))]
        if self.seccomp:
            flags.append("--seccomp")
        return flags


@dataclass(frozen=True)
class ContainerRun:
    """How the traced container ended, as `ctr run` reported it."""

    returncode: int | None
    """The container's exit code; None if it still ran when the window closed."""
    output: str
    """What it printed (stdout and stderr together; the last ``OUTPUT_KEPT`` bytes)."""
    started_ns: int
    """time.monotonic_ns() at the start (the tracer's clock)."""
    started_wall_ns: int
    ready: bool | None = None
    """Whether it printed its readiness line; None when none was asked for."""
    timed_out: bool = False
    """The start did not complete in time: no readiness line when one was asked for
    (deadline passed, or the command ended without printing it), else the window
    closed on its deadline rather than on a quiet period."""


OUTPUT_KEPT = 64 << 10
"""Bytes of a container's output kept for the caller: a chatty (or hostile) start must
not fill the recorder's memory."""


class Containerd:
    """The few `ctr` calls recording needs, against one containerd namespace."""

    def __init__(self, address: str, namespace: str, snapshotter: str) -> None:
        self.address = address
        self.base = ["ctr", "--address", address, "--namespace", namespace]
        self.snapshotter = snapshotter

    def _ctr(self, *args: str) -> str:
        result = subprocess.run(
            [*self.base, *args], capture_output=True, text=True, timeout=120, check=False
        )
        if result.returncode != 0:
            raise RecordError(f"ctr {' '.join(args[:2])}: {result.stderr.strip()}")
        return result.stdout

    def rootfs_layers(self, top_chain_id: str) -> list[Path]:
        """Layer directories of the image's root file system, topmost first: a view is
        created and removed at once (only its mount command is needed)."""
        key = f"accelctl-record-{uuid.uuid4().hex[:12]}"
        snapshots = ["snapshots", "--snapshotter", self.snapshotter]
        try:
            # --target only makes ctr print the mount command; nothing is mounted.
            command = self._ctr(*snapshots, "view", "--target", "/mnt", key, top_chain_id)
            command = command.strip()
        finally:
            subprocess.run(
                [*self.base, *snapshots, "rm", key], capture_output=True, check=False, timeout=60
            )
        return layer_dirs(command)

    def start(
        self,
        image: str,
        name: str,
        pid_file: Path,
        command: Sequence[str],
        sandbox: Sandbox | None = None,
    ) -> subprocess.Popen[str]:
        """`ctr run --rm` in the background; ctr writes the container's first process's
        pid to ``pid_file`` before it lets it run. An empty ``command`` runs the image's
        own (entrypoint and cmd of its config); a given one replaces both."""
        argv = [
            *self.base,
            "run",
            "--rm",
            "--snapshotter",
            self.snapshotter,
            "--pid-file",
            str(pid_file),
            *(sandbox.ctr_flags() if sandbox is not None else []),
            image,
            name,
            *command,
        ]
        return subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        )

    def kill(self, name: str) -> None:
        subprocess.run(
            [*self.base, "task", "kill", "-s", "KILL", name],
            capture_output=True,
            check=False,
            timeout=60,
        )


def server_pid(socket_path: str) -> int:
    """The process listening on a unix socket (containerd, by its --address)."""
    inodes = set()
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[7] == socket_path:
            inodes.add(f"socket:[{fields[6]}]")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in inodes:
                        return int(proc.name)
    raise RecordError(f"no process listens on {socket_path}: is containerd running?")


def _wait_for_pid_file(path: Path, process: subprocess.Popen[str], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            return int(path.read_text())
        if process.poll() is not None:
            break
        time.sleep(0.01)
    raise RecordError("the container did not start")


class _OutputWatch:
    """Reads a container's output as it comes, keeps its tail, and tells when a line
    matches the readiness pattern (searched in each line, stdout and stderr alike)."""

    def __init__(self, stream: IO[str], ready: re.Pattern[str] | None) -> None:
        self._stream = stream
        self._pattern = ready
        self._tail: deque[str] = deque()
        self._kept = 0
        self.ready = threading.Event()
        self._thread = threading.Thread(target=self._read, name="container-output", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while line := self._stream.readline(OUTPUT_KEPT):
            if self._pattern is not None and self._pattern.search(line):
                self.ready.set()
            self._tail.append(line)
            self._kept += len(line)
            while self._kept > OUTPUT_KEPT and len(self._tail) > 1:
                self._kept -= len(self._tail.popleft())

    def output(self, timeout: float) -> str:
        """Everything kept, once the stream has ended (or ``timeout`` passed)."""
        self._thread.join(timeout)
        return "".join(self._tail)


def traced_run(
    tracer: Tracer,
    containerd: Containerd,
    image: str,
    command: Sequence[str],
    quiet_s: float,
    deadline_s: float,
    *,
    ready: re.Pattern[str] | None = None,
    sandbox: Sandbox | None = None,
) -> tuple[Trace, ContainerRun]:
    """Start the container and trace it until it goes quiet or the deadline, or, with
    ``ready``, until it prints a line matching it, ends, or the deadline passes. A
    container still running when the window closes is killed.

    The container's mount namespace is not known before it exists, and a start is
    over in milliseconds, so the tracer follows everything containerd forks from now
    on (shim, runc, the container's processes: the kernel adds each child as it is
    forked) and only the container's namespace is kept afterwards.
    """
    name = f"accelctl-record-{uuid.uuid4().hex[:12]}"
    daemon = server_pid(containerd.address)
    with tempfile.TemporaryDirectory(prefix="accelctl-record-") as tmp:
        pid_file = Path(tmp) / "pid"
        tracer.add_target(pid=daemon)
        started_wall, started = time.time_ns(), time.monotonic_ns()
        process = containerd.start(image, name, pid_file, command, sandbox)
        assert process.stdout is not None
        watch = _OutputWatch(process.stdout, ready)
        try:
            try:
                init = _wait_for_pid_file(pid_file, process, deadline_s)
            except RecordError:
                said = watch.output(timeout=10).strip() if process.poll() is not None else ""
                raise RecordError(f"the container did not start: {said or 'timed out'}") from None
            try:
                mntns: int | None = mntns_of(init)
            except OSError:
                mntns = None  # already over; its own events name its namespace
            remaining = deadline_s - (time.monotonic_ns() - started) / 1e9
            if ready is None:
                trace = tracer.collect(quiet_s=quiet_s, deadline_s=remaining)
            else:
                done = watch.ready.is_set

                def over() -> bool:
                    return done() or process.poll() is not None

                trace = tracer.collect(deadline_s=remaining, stop=over)
        finally:
            tracer.remove_target(pid=daemon)
            tracer.forget_files()
            if process.poll() is None:
                containerd.kill(name)
                returncode = None
            else:
                returncode = process.returncode
            process.wait(timeout=120)
            output = watch.output(timeout=30)
    if mntns is None:
        mntns = next((e.mntns_id for e in trace.events if e.pid == init), None)
        if mntns is None:
            raise RecordError("the container ended before its start could be traced")
    trace.events = [e for e in trace.events if e.mntns_id == mntns]
    if ready is None:
        became_ready, timed_out = None, trace.ended_by == "deadline"
    else:
        became_ready = watch.ready.is_set()
        timed_out = not became_ready
    run = ContainerRun(returncode, output, started, started_wall, became_ready, timed_out)
    return trace, run


def run_trace(
    resolved: ResolvedImage,
    trace: Trace,
    run: ContainerRun,
    dirs: Sequence[Path],
    node: str | None = None,
) -> RunTrace:
    """The recorded start as the learner takes it: each event's path mapped to the image
    layer that provides it (``dirs`` topmost first, manifest layers bottom first),
    counted as a run of ``node`` (default: this host's name)."""
    layers = [d.digest for d in resolved.manifest.layers]
    if len(dirs) != len(layers):
        raise RecordError(
            f"the root file system has {len(dirs)} layer directories, the image "
            f"{len(layers)} layers: cannot tell which layer holds a file"
        )
    views = [LayerDirectory(d) for d in dirs]
    events = []
    for event in trace.events:
        if event.is_dir or event.outside_root or not event.path:
            continue
        name = root_name(event.path)
        index = None if name is None else providing_layer(name, views)
        if name is None or index is None:
            continue
        length = event.length if event.kind in ("read", "mmap") else 0
        layer = layers[len(layers) - 1 - index]
        events.append((event.ts_ns, layer, name, event.offset, length))
    # ctr reports a signal death as 128 + signal; the learner takes wait(2) statuses.
    status = None
    if run.returncode is not None:
        code = run.returncode
        status = (code - 128) if code > 128 else (code << 8)
    return RunTrace(
        image=resolved.manifest_digest,
        layers=tuple(layers),
        accesses=file_accesses(events, run.started_ns),
        outcome=run_outcome(status, run.timed_out),
        node=node if node is not None else socket.gethostname(),
        sources=frozenset({"ebpf"}),
        page_cache_visible=True,
        started_at_ns=run.started_wall_ns,
    )


async def image_chain_id(client: RegistryClient, resolved: ResolvedImage) -> str:
    """The chain ID containerd committed the image's top layer under."""
    config = json.loads(await client.get_blob(resolved.reference, resolved.manifest.config.digest))
    try:
        return chain_id(config["rootfs"]["diff_ids"])
    except (KeyError, TypeError, ValueError) as exc:
        raise RecordError(f"image config without usable rootfs.diff_ids: {exc}") from None
