"""A private, real containerd 1.6 for tests, the demo and benchmarks.

acceld is a containerd proxy snapshotter, so it can only be proven against the real
daemon. Each ``ContainerdServer`` keeps what it owns (config, socket, root on a tmpfs,
state, runc root, CRI registry hosts) inside one work directory, so several can run side
by side with nothing written to /var/lib or /opt. Shims always put their sockets (and
plain `ctr run` its runc state and FIFOs) under the shared /run/containerd; ``stop()``
finds those by what this daemon's shims hold, and sweeps every process and mount the
daemon caused, even after a failed test.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import tomli_w

from accelctl.cri.client import CRI_NAMESPACE, CRIError, CRIImageClient
from common.logging import get_logger
from rig.hosts_toml import write_hosts_toml

log = get_logger(__name__)

ACCELD_SNAPSHOTTER = "acceld"
"""Name of the proxy snapshotter entry that points containerd at the acceld agent."""
STARGZ_SNAPSHOTTER = "stargz"
"""Name of the proxy snapshotter entry for stargz-snapshotter's daemon (the benchmark's
peer), declared only when a server is given its socket."""

# Snapshotters that probe host filesystems or devices and only log noise here.
_DISABLED_PLUGINS = (
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
)
# Where the runc shim keeps container state when the client passes no runc root (ctr).
_DEFAULT_RUNC_ROOT = Path("/run/containerd/runc")
# Where ctr creates a task's IO FIFOs when not given --fifo-dir.
_DEFAULT_FIFO_ROOT = Path("/run/containerd/fifo")
_CGROUP_ROOT = Path("/sys/fs/cgroup")
_UNIX_PATH_MAX = 107


class ContainerdError(RuntimeError):
    """containerd failed to start, or a `ctr` / CRI call against it failed."""


class ContainerdServer:
    """One containerd daemon with its own config and directories under ``workdir``.

    ``snapshotter`` is the one the CRI plugin pulls and runs with; ``ctr`` users choose
    per call. ``acceld_socket`` is where the `acceld` proxy snapshotter is expected to
    listen; containerd dials it only when that snapshotter is used. ``stargz_socket``
    declares the `stargz` proxy snapshotter too (stargz-snapshotter's daemon there).
    ``hosts_dir`` is the CRI plugin's registry ``config_path`` (default: one of its own),
    given when an agent is to read the same hosts.toml files.
    ``env`` is added to the environment the daemon inherits (a node's proxy variables).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        namespace: str = "acceld-test",
        snapshotter: str = "overlayfs",
        acceld_socket: Path | None = None,
        stargz_socket: Path | None = None,
        sandbox_image: str = "127.0.0.1:1/acceld-test/pause:none",
        tmpfs_size: str = "8g",
        log_level: str = "info",
        hosts_dir: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.workdir = workdir.resolve()
        self.namespace = namespace
        self.snapshotter = snapshotter
        self.acceld_socket = acceld_socket or self.workdir / "acceld" / "snapshotter.sock"
        self.stargz_socket = stargz_socket
        self.sandbox_image = sandbox_image
        self.tmpfs_size = tmpfs_size
        self.log_level = log_level
        self.env = dict(env or {})
        self.root = self.workdir / "root"
        self.state = self.workdir / "state"
        self.runc_root = self.state / "runc"
        self.fifo_dir = self.state / "fifo"
        self.hosts_dir = hosts_dir or self.workdir / "hosts.d"
        self.config_path = self.workdir / "config.toml"
        self.log_path = self.workdir / "containerd.log"
        self.address = self.workdir / "containerd.sock"
        self._process: subprocess.Popen[bytes] | None = None
        # ttrpc listens on "<address>.ttrpc", the longest path containerd binds.
        if len(f"{self.address}.ttrpc") > _UNIX_PATH_MAX:
            raise ContainerdError(f"work dir path too long for a unix socket: {self.workdir}")

    def __enter__(self) -> ContainerdServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Mount the tmpfs root, write the config, start containerd, wait until it answers."""
        for directory in (self.root, self.state, self.hosts_dir, self.acceld_socket.parent):
            directory.mkdir(parents=True, exist_ok=True)
        for cni_dir in ("conf", "bin"):
            (self.workdir / "cni" / cni_dir).mkdir(parents=True, exist_ok=True)
        try:
            self._mount_root_tmpfs()
            self.config_path.write_text(tomli_w.dumps(self._config()))
            with self.log_path.open("ab") as log_file:
                self._process = subprocess.Popen(
                    ["containerd", "--config", str(self.config_path)],
                    env={**os.environ, **self.env},
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self._wait_ready(timeout=30.0)
        except BaseException:
            self.stop()
            raise
        log.info("containerd.started", address=str(self.address), log=str(self.log_path))

    def stop(self) -> None:
        """Stop containerd and remove every container, shim and mount it left (idempotent).

        Order matters: containers die first so their rootfs mounts become unbusy, then
        the daemon and its shims (which would otherwise outlive it, re-parented to init),
        then what the shims leave in the shared /run/containerd (their sockets, and the
        IO FIFOs of plain `ctr run -d`), the mounts, deepest first, and the tmpfs last.
        """
        shim_sockets = self._shim_sockets()
        self._delete_runc_containers()
        if self._process is not None:
            _terminate(self._process, grace=10.0)
            self._process = None
        shim_pids = self._shim_pids()
        fifo_dirs = _shared_fifo_dirs_held_by(shim_pids)
        for pid in shim_pids:
            _kill_pid(pid)
        for socket_path in shim_sockets:
            socket_path.unlink(missing_ok=True)
        for fifo_dir in fifo_dirs:
            shutil.rmtree(fifo_dir, ignore_errors=True)
        self._unmount_under(self.workdir)
        self._remove_namespace_cgroups()
        log.info("containerd.stopped", workdir=str(self.workdir))

    def log_paths(self) -> list[Path]:
        """Files worth keeping when a test fails."""
        return [self.config_path, self.log_path]

    @property
    def running(self) -> bool:
        """Whether the daemon process is alive."""
        return self._process is not None and self._process.poll() is None

    def ctr(
        self,
        *args: str,
        namespace: str | None = None,
        check: bool = True,
        timeout: float = 120.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run `ctr` against this daemon in ``namespace`` (default: the server's own)."""
        command = [
            "ctr",
            "--address",
            str(self.address),
            "--namespace",
            namespace or self.namespace,
            *args,
        ]
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise ContainerdError(
                f"{' '.join(command)} exited {result.returncode}:\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}"
            )
        return result

    def run_container(
        self,
        image: str,
        container_id: str,
        *command: str,
        snapshotter: str | None = None,
        timeout: float = 120.0,
        check: bool = True,
        namespace: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """`ctr run --rm` to completion, with runc state and IO FIFOs in the work dir
        (plain `ctr run` keeps both under /run/containerd, shared with every other
        daemon). ``stdout`` is the container's output, stdout and stderr together;
        ``stderr`` is ctr's own.

        The output is written by the shim to a file (``--log-uri``), not copied by ctr
        from FIFOs: containerd 1.6.20's client closes a task's FIFOs before it waits for
        their copy (task.Delete; fixed in 1.6.22), so a ctr held off the CPU at the
        container's exit lost its output (an empty stdout, exit 0, under load). The
        shim waits for its own copy before it deletes the task.
        """
        log = self.state / "output" / f"{container_id}.log"
        log.unlink(missing_ok=True)
        options = ["--rm", "--runc-root", str(self.runc_root), "--fifo-dir", str(self.fifo_dir)]
        options += ["--log-uri", f"file://{log}"]
        if snapshotter:
            options += ["--snapshotter", snapshotter]
        ran = self.ctr(
            "run",
            *options,
            image,
            container_id,
            *command,
            timeout=timeout,
            check=False,
            namespace=namespace,
        )
        try:
            output = log.read_text(errors="replace")
            log.unlink()
        except FileNotFoundError:
            output = ""  # the task never started
        result = subprocess.CompletedProcess(ran.args, ran.returncode, output, ran.stderr)
        if check and ran.returncode != 0:
            raise ContainerdError(
                f"{' '.join(ran.args)} exited {ran.returncode}:\n"
                f"output: {output}\nstderr: {ran.stderr}"
            )
        return result

    def allow_insecure_registry(self, host: str, endpoint: str | None = None) -> Path:
        """Let the CRI plugin pull images named ``host/...`` over plain HTTP from ``endpoint``.

        ``endpoint`` (``host:port``, default ``host``) lets a test keep an image's name
        while its traffic goes through a proxy, a shaped link or another namespace.
        containerd 1.6 reads ``<config_path>/<host>/hosts.toml`` at every pull, so this
        works on a running daemon; `ctr` honours the same file via ``--hosts-dir``.
        """
        url = f"http://{endpoint or host}"
        document = {"server": url, "host": {url: {"capabilities": ["pull", "resolve"]}}}
        return write_hosts_toml(self.hosts_dir, host, document)

    def wait_for_snapshotter(
        self, snapshotter: str = ACCELD_SNAPSHOTTER, timeout: float = 30.0
    ) -> None:
        """Until containerd reaches a restarted proxy snapshotter again (it redials with
        a backoff of its own, a few seconds here); returns at the deadline regardless.

        The probe must be a call containerd passes on to the snapshotter: listing
        snapshots is answered from containerd's own metadata, so it succeeded while the
        connection to the agent was still in its redial backoff, and the next pull's
        Prepare failed with the old connection's error ("connection closed"). A
        throwaway Prepare (removed again) goes through.
        """
        probe = ("snapshots", "--snapshotter", snapshotter)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            key = f"acceld-probe-{uuid.uuid4().hex[:12]}"
            prepared = self.ctr(*probe, "prepare", key, namespace=CRI_NAMESPACE, check=False)
            if prepared.returncode == 0:
                self.ctr(*probe, "rm", key, namespace=CRI_NAMESPACE)
                return
            time.sleep(0.5)

    def cri_pull_image(self, image: str, timeout: float = 300.0) -> str:
        """Pull ``image`` through the CRI ImageService, as the kubelet would; returns its ID.

        Only the CRI path hands a snapshotter the remote-snapshot labels that lazy
        pulling needs (`ctr images pull` does not), so lazy-pull tests pull here.
        """
        with CRIImageClient(str(self.address), timeout=timeout) as cri:
            try:
                return cri.pull(image)
            except CRIError as exc:
                raise ContainerdError(str(exc)) from exc

    def _config(self) -> dict[str, Any]:
        cri_runtime_options = {"Root": str(self.runc_root), "SystemdCgroup": False}
        return {
            "version": 2,
            "root": str(self.root),
            "state": str(self.state),
            "disabled_plugins": list(_DISABLED_PLUGINS),
            "grpc": {"address": str(self.address)},
            "debug": {"level": self.log_level},
            "plugins": {
                "io.containerd.internal.v1.opt": {"path": str(self.workdir / "opt")},
                "io.containerd.grpc.v1.cri": {
                    "sandbox_image": self.sandbox_image,
                    "netns_mounts_under_state_dir": True,
                    "cni": {
                        "conf_dir": str(self.workdir / "cni" / "conf"),
                        "bin_dir": str(self.workdir / "cni" / "bin"),
                    },
                    "containerd": {
                        "snapshotter": self.snapshotter,
                        "disable_snapshot_annotations": False,
                        "default_runtime_name": "runc",
                        "runtimes": {
                            "runc": {
                                "runtime_type": "io.containerd.runc.v2",
                                "options": cri_runtime_options,
                            }
                        },
                    },
                    "registry": {"config_path": str(self.hosts_dir)},
                },
            },
            "proxy_plugins": self._proxy_plugins(),
        }

    def _proxy_plugins(self) -> dict[str, dict[str, str]]:
        plugins = {ACCELD_SNAPSHOTTER: {"type": "snapshot", "address": str(self.acceld_socket)}}
        if self.stargz_socket is not None:
            plugins[STARGZ_SNAPSHOTTER] = {"type": "snapshot", "address": str(self.stargz_socket)}
        return plugins

    def _mount_root_tmpfs(self) -> None:
        # ext4 here unpacks 2-3x slower for a while after mass deletes; tmpfs does not.
        if not _is_mount_point(self.root):
            _run(["mount", "-t", "tmpfs", "-o", f"size={self.tmpfs_size}", "tmpfs", str(self.root)])

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._process is not None and self._process.poll() is not None:
                raise ContainerdError(
                    f"containerd exited {self._process.returncode}; log: {self.log_path}\n"
                    f"{_tail(self.log_path)}"
                )
            probe = self.ctr("version", check=False, timeout=10.0)
            if probe.returncode == 0 and "Server:" in probe.stdout:
                return
            if time.monotonic() > deadline:
                raise ContainerdError(
                    f"containerd did not answer within {timeout}s; log: {self.log_path}\n"
                    f"{probe.stderr}\n{_tail(self.log_path)}"
                )
            time.sleep(0.1)

    def _delete_runc_containers(self) -> None:
        """Kill and delete runc containers whose bundle lies in this server's state dir.

        The shim keeps runc state in ``<runc root>/<namespace>``; ctr runs without
        ``--runc-root`` land in the shared default root, so matching on the bundle keeps
        other daemons' containers untouched.
        """
        for root in (self.runc_root, _DEFAULT_RUNC_ROOT):
            for namespace_root in root.iterdir() if root.is_dir() else ():
                for container_id, bundle in _runc_containers(namespace_root):
                    if bundle.is_relative_to(self.state):
                        delete = ["runc", "--root", str(namespace_root), "delete", "--force"]
                        subprocess.run([*delete, container_id], capture_output=True, check=False)
                        log.info("containerd.leftover_container_deleted", id=container_id)

    def _shim_sockets(self) -> list[Path]:
        """Sockets of this daemon's shims, from the `address` file each shim writes."""
        bundles = self.state / "io.containerd.runtime.v2.task"
        return [
            Path(address_file.read_text().strip().removeprefix("unix://"))
            for address_file in bundles.glob("*/*/address")
        ]

    def _shim_pids(self) -> list[int]:
        """PIDs of runc shims started by this daemon (they carry its socket in argv)."""
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if (
                argv
                and os.path.basename(argv[0]).startswith(b"containerd-shim")
                and str(self.address).encode() in argv
            ):
                pids.append(int(proc.name))
        return pids

    def _unmount_under(self, top: Path) -> None:
        """Unmount everything below ``top``, children before parents, stacked mounts too."""
        while mount_points := _mount_points_under(top):
            for mount_point in sorted(mount_points, key=lambda p: len(p.parts), reverse=True):
                if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode:
                    log.warning("containerd.lazy_unmount", mount_point=str(mount_point))
                    _run(["umount", "--lazy", str(mount_point)])

    def _remove_namespace_cgroups(self) -> None:
        """Remove the now-empty ``/<namespace>`` cgroups that `ctr run` created.

        Covers one v1 hierarchy per controller and a v2 root alike. Fails harmlessly
        (EBUSY/ENOTEMPTY) while another daemon still uses the namespace.
        """
        for controller in (_CGROUP_ROOT, *_CGROUP_ROOT.iterdir()):
            with contextlib.suppress(OSError):
                (controller / self.namespace).rmdir()


def _runc_containers(runc_root: Path) -> list[tuple[str, Path]]:
    """(id, bundle) of every container runc knows under ``runc_root``."""
    listing = subprocess.run(
        ["runc", "--root", str(runc_root), "list", "--format", "json"],
        capture_output=True,
        text=True,
        check=False,
    )
    return [
        (item["id"], Path(item["bundle"])) for item in json.loads(listing.stdout or "null") or []
    ]


def _shared_fifo_dirs_held_by(pids: list[int]) -> set[Path]:
    """The per-task FIFO dirs under /run/containerd/fifo that these processes hold open.

    A shim keeps its task's FIFOs open for the task's lifetime, which attributes each
    dir in the shared FIFO root to exactly one daemon.
    """
    dirs = set()
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = Path(os.readlink(fd))
            except OSError:
                continue
            if target.parent.parent == _DEFAULT_FIFO_ROOT:
                dirs.add(target.parent)
    return dirs


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        raise ContainerdError(f"{' '.join(command)} failed: {result.stderr.strip()}")


def _terminate(process: subprocess.Popen[bytes], grace: float) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    log.info("containerd.leftover_shim_killed", pid=pid)


def _mount_points(mountinfo: str) -> Iterator[Path]:
    for line in mountinfo.splitlines():
        # Field 5 is the mount point, with space, tab, newline and backslash octal-escaped.
        escaped = line.split(" ")[4]
        yield Path(escaped.encode().decode("unicode_escape").encode("latin-1").decode())


def _mount_points_under(top: Path) -> set[Path]:
    mountinfo = Path("/proc/self/mountinfo").read_text()
    return {point for point in _mount_points(mountinfo) if point.is_relative_to(top)}


def _is_mount_point(path: Path) -> bool:
    return path.resolve() in set(_mount_points(Path("/proc/self/mountinfo").read_text()))


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
