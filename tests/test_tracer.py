"""The eBPF tracer against the real kernel: a chrooted process in its own mount namespace
reads known files in known ways, and the trace must name exactly those files, with
paths inside the chroot and the byte ranges that were read."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tracer.availability import TracerUnavailable
from tracer.btf_offsets import BTFError, KernelBTF
from tracer.trace import AccessEvent, Trace, Tracer, cgroup_id_of, container_init, mntns_of

BUSYBOX = Path("/bin/busybox")

REL_SIZE = 10_000  # read whole with 4 KiB reads: three reads, one merged extent
REAL_SIZE = 16_384
MAPPED_SIZE = 3 * 4096
LATE_SIZE = 777

# Runs in a new mount namespace; chroots into argv[1] once the test says go.
CHROOTED_READER = r"""
import mmap, os, sys, time
root, pause = sys.argv[1], float(sys.argv[2])
print("ready", flush=True)
sys.stdin.readline()
os.chroot(root)
os.chdir("/")
dfd = os.open("/data/sub", os.O_RDONLY | os.O_DIRECTORY)
fd = os.open("rel.txt", os.O_RDONLY, dir_fd=dfd)
while os.read(fd, 4096):
    pass
os.close(fd)
os.close(dfd)
for _ in range(2):  # the same open and the same range twice: reported once
    fd = os.open("/data/link.bin", os.O_RDONLY)
    os.pread(fd, 100, 8192)
    os.close(fd)
fd = os.open("/data/mapped.bin", os.O_RDONLY)
m = mmap.mmap(fd, 4096, prot=mmap.PROT_READ, offset=4096)
m[0]
m.close()
os.close(fd)
print("accessed", flush=True)
time.sleep(pause)
os.execv("/bin/busybox", ["cat", "/data/late.txt"])
"""

# Runs in the host namespace; everything it starts is traced by pid.
TREE_READER = r"""
import os, subprocess, sys
sys.stdin.readline()
with open(sys.argv[1], "rb") as f:
    f.read()
subprocess.run(["/bin/busybox", "cat", sys.argv[2]], stdout=subprocess.DEVNULL, check=True)
"""


@pytest.fixture(scope="module")
def tracer() -> Iterator[Tracer]:
    """One compile for the module (~2 s)."""
    t = Tracer(ring_buffer_mb=8)
    try:
        yield t
    finally:
        t.close()


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    """A tiny root: static busybox plus data files with distinct sizes."""
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    sub = root / "data" / "sub"
    sub.mkdir(parents=True)
    (sub / "rel.txt").write_bytes(b"r" * REL_SIZE)
    (root / "data" / "real.bin").write_bytes(os.urandom(REAL_SIZE))
    (root / "data" / "link.bin").symlink_to("real.bin")
    (root / "data" / "mapped.bin").write_bytes(b"m" * MAPPED_SIZE)
    (root / "data" / "late.txt").write_bytes(b"l" * LATE_SIZE)
    (root / "data" / "untouched.txt").write_bytes(b"never read")
    return root


def _start(args: list[str], log_dir: Path) -> tuple[subprocess.Popen[str], Path]:
    log = log_dir / "child.stderr"
    proc = subprocess.Popen(
        args,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
    )
    return proc, log


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


def _by_path(trace: Trace, mntns: int) -> dict[str, list[AccessEvent]]:
    out: dict[str, list[AccessEvent]] = {}
    for event in trace.events:
        if event.mntns_id == mntns:
            out.setdefault(event.path, []).append(event)
    return out


def _kinds(events: list[AccessEvent]) -> list[str]:
    return [e.kind for e in events]


def _ranges(events: list[AccessEvent], kind: str) -> list[tuple[int, int]]:
    return [(e.offset, e.length) for e in events if e.kind == kind]


def test_mount_namespace_trace_names_exactly_the_files_read(
    tracer: Tracer, rootfs: Path, tmp_path: Path
) -> None:
    pause = 2.0
    proc, log = _start(
        ["unshare", "-m", sys.executable, "-c", CHROOTED_READER, str(rootfs), str(pause)],
        tmp_path,
    )
    outsider_file = rootfs / "data" / "untouched.txt"
    mntns = 0
    try:
        # Python's own start-up is done (and untraced) once it says ready.
        assert proc.stdin is not None and proc.stdout is not None
        assert proc.stdout.readline() == "ready\n", log.read_text()
        mntns = mntns_of(proc.pid)
        assert mntns != mntns_of(os.getpid())
        tracer.add_target(mntns_id=mntns)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "accessed\n", log.read_text()
        # Outside the namespace: the same tree read from the host, and another process.
        outsider_file.read_bytes()
        (rootfs / "data" / "sub" / "rel.txt").read_bytes()
        outsider = subprocess.run(
            [str(BUSYBOX), "cat", str(outsider_file)], capture_output=True, check=True
        )
        assert outsider.stdout == b"never read"

        started = time.monotonic()
        first = tracer.collect(quiet_s=0.5, deadline_s=20)
        first_took = time.monotonic() - started
        second = tracer.collect(quiet_s=0.5, deadline_s=20)
        assert proc.wait(timeout=10) == 0, log.read_text()
        assert proc.stdout.read() == "l" * LATE_SIZE
    finally:
        _stop(proc)
        if mntns:
            tracer.remove_target(mntns_id=mntns)

    # The quiet period after the accesses (the child sleeps) ended the first window.
    assert first.ended_by == "quiet"
    assert first_took < pause, first_took
    assert first.dropped == 0 and first.unresolved == 0

    files = _by_path(first, mntns)
    assert set(files) == {
        "/data/sub",
        "/data/sub/rel.txt",
        "/data/real.bin",
        "/data/mapped.bin",
    }, files.keys()
    assert _kinds(files["/data/sub"]) == ["open"]
    assert files["/data/sub"][0].is_dir
    # Three 4 KiB reads from the file position, reported in order (dirfd-relative open).
    assert _ranges(files["/data/sub/rel.txt"], "read") == [(0, 4096), (4096, 4096), (8192, 1808)]
    # Through the symlink; the repeated open and pread were deduplicated in the kernel.
    assert _kinds(files["/data/real.bin"]) == ["open", "read"]
    assert _ranges(files["/data/real.bin"], "read") == [(8192, 100)]
    assert _ranges(files["/data/mapped.bin"], "mmap") == [(4096, 4096)]
    assert all(not e.outside_root for es in files.values() for e in es)
    assert {e.pid for es in files.values() for e in es} == {proc.pid}
    stamps = [e.ts_ns for e in first.events]
    assert stamps == sorted(stamps)
    assert first.paths()[:2] == ["/data/sub", "/data/sub/rel.txt"]

    # The second window saw the exec into busybox and what it read.
    late = _by_path(second, mntns)
    assert set(late) == {"/bin/busybox", "/data/late.txt"}, late.keys()
    assert _kinds(late["/bin/busybox"]) == ["exec"]
    assert _ranges(late["/data/late.txt"], "read") == [(0, LATE_SIZE)]
    # Nothing from outside the namespace, under any path.
    every_path = {e.path for t in (first, second) for e in t.events}
    assert not any(p.endswith("untouched.txt") for p in every_path)


def test_process_tree_follows_children_with_host_paths(
    tracer: Tracer, rootfs: Path, tmp_path: Path
) -> None:
    own = rootfs / "data" / "real.bin"
    childs = rootfs / "data" / "late.txt"
    proc, log = _start([sys.executable, "-c", TREE_READER, str(own), str(childs)], tmp_path)
    try:
        tracer.add_target(pid=proc.pid)
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        trace = tracer.collect(quiet_s=0.5, deadline_s=20)
        assert proc.wait(timeout=10) == 0, log.read_text()
    finally:
        _stop(proc)
        tracer.remove_target(pid=proc.pid)
    host_ns = mntns_of(os.getpid())
    files = _by_path(trace, host_ns)
    assert _ranges(files[str(own.resolve())], "read")[0] == (0, REAL_SIZE)
    assert _kinds(files[str(BUSYBOX.resolve())])[0] == "exec"
    busybox_pid = files[str(BUSYBOX.resolve())][0].pid
    assert busybox_pid != proc.pid
    assert ("read", 0, LATE_SIZE) in [
        (e.kind, e.offset, e.length) for e in files[str(childs.resolve())]
    ]
    assert {e.pid for e in files[str(childs.resolve())]} == {busybox_pid}


@pytest.fixture
def v2_cgroup() -> Iterator[Path]:
    root = next(
        Path(line.split()[1])
        for line in Path("/proc/self/mounts").read_text().splitlines()
        if line.split()[2] == "cgroup2"
    )
    cgroup = root / f"acceld-test-tracer-{os.getpid()}"
    cgroup.mkdir()
    try:
        yield cgroup
    finally:
        cgroup.rmdir()


def test_cgroup_target_traces_only_that_cgroup(
    tracer: Tracer, rootfs: Path, v2_cgroup: Path, tmp_path: Path
) -> None:
    wanted = rootfs / "data" / "real.bin"
    script = (
        "import sys\nprint('ready', flush=True)\nsys.stdin.readline()\n"
        f"open({str(wanted)!r}, 'rb').read()\n"
    )
    proc, log = _start([sys.executable, "-c", script], tmp_path)
    cgroup_id = v2_cgroup.stat().st_ino
    try:
        assert proc.stdin is not None and proc.stdout is not None
        assert proc.stdout.readline() == "ready\n", log.read_text()
        (v2_cgroup / "cgroup.procs").write_text(str(proc.pid))
        assert cgroup_id_of(proc.pid) == cgroup_id
        tracer.add_target(cgroup_id=cgroup_id)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        rootfs.joinpath("data", "late.txt").read_bytes()  # same host, other cgroup
        trace = tracer.collect(quiet_s=0.5, deadline_s=20)
        assert proc.wait(timeout=10) == 0, log.read_text()
    finally:
        _stop(proc)
        tracer.remove_target(cgroup_id=cgroup_id)
    assert {e.pid for e in trace.events} == {proc.pid}
    assert [(e.kind, e.offset, e.length) for e in trace.events if e.path == str(wanted)] == [
        ("open", 0, 0),
        ("read", 0, REAL_SIZE),
    ]
    assert not any(e.path.endswith("late.txt") for e in trace.events)


def test_dynamic_executables_report_their_interpreter(tracer: Tracer, tmp_path: Path) -> None:
    """ld.so is opened by the kernel, not via openat: it must come from the exec. true
    and ls start with differently shaped VMA trees (one leaf vs. a two-level tree)."""
    chain = "/usr/bin/ls / >/dev/null; /bin/true"
    script = "import os, sys\nprint('ready', flush=True)\nsys.stdin.readline()\n"
    script += f"os.execv('/bin/sh', ['sh', '-c', {chain!r}])\n"
    proc, log = _start([sys.executable, "-c", script], tmp_path)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        assert proc.stdout.readline() == "ready\n", log.read_text()
        tracer.add_target(pid=proc.pid)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        trace = tracer.collect(quiet_s=0.5, deadline_s=20)
        assert proc.wait(timeout=10) == 0, log.read_text()
    finally:
        _stop(proc)
        tracer.remove_target(pid=proc.pid)
    execs = [(e.pid, e.path) for e in trace.events if e.kind == "exec"]
    interpreter = os.path.realpath("/lib64/ld-linux-x86-64.so.2")
    exes = [os.path.realpath(p) for p in ("/bin/sh", "/usr/bin/ls", "/bin/true")]
    assert [path for _, path in execs] == [p for exe in exes for p in (exe, interpreter)], execs
    # Each interpreter event belongs to the process that exec'd the program before it.
    assert all(execs[i][0] == execs[i + 1][0] for i in range(0, len(execs), 2)), execs


def test_deadline_ends_a_window_with_no_activity(tracer: Tracer) -> None:
    tracer.add_target(mntns_id=1)  # no namespace has inode number 1
    started = time.monotonic()
    trace = tracer.collect(quiet_s=5, deadline_s=0.5)
    took = time.monotonic() - started
    tracer.remove_target(mntns_id=1)
    assert trace.ended_by == "deadline"
    assert trace.events == []
    assert 0.5 <= took < 1.5


def test_activity_only_the_caller_sees_keeps_a_window_open(tracer: Tracer) -> None:
    """A program faulting in a mapped library makes no system call for as long as that
    takes: the reads it makes through FUSE, which only the caller sees, must keep the
    window open (a window closed on syscalls alone cut python-torch's start short)."""
    tracer.add_target(mntns_id=1)  # no namespace has inode number 1: no events at all
    started = time.monotonic()
    busy_until = started + 1.5
    trace = tracer.collect(
        quiet_s=0.5, deadline_s=10, activity=lambda: min(time.monotonic(), busy_until)
    )
    took = time.monotonic() - started
    tracer.remove_target(mntns_id=1)
    assert trace.ended_by == "quiet"
    assert trace.events == []
    # Not before the caller's last activity plus the quiet period.
    assert 2.0 <= took < 4.0


@pytest.mark.parametrize(
    ("script", "status"),
    [
        ("import sys; sys.exit(3)", 3 << 8),
        ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", signal.SIGSEGV),
        ("pass", 0),
    ],
    ids=["exit-3", "segv", "clean"],
)
def test_watched_process_reports_its_exit_status(
    tracer: Tracer, tmp_path: Path, script: str, status: int
) -> None:
    """The container's first process's status, as wait(2) would give it to its parent,
    although the tracer is not that parent (how a crashed start is told apart)."""
    proc, _ = _start([sys.executable, "-c", f"input(); {script}"], tmp_path)
    try:
        tracer.watch_exit(proc.pid)
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        proc.wait(timeout=10)
        trace = tracer.collect(quiet_s=0.3, deadline_s=5)
    finally:
        tracer.unwatch_exit(proc.pid)
        _stop(proc)
    assert trace.exits == {proc.pid: status}


def test_container_init_is_the_outermost_process_of_its_namespace(tmp_path: Path) -> None:
    proc, _ = _start(
        ["unshare", "--mount", "--fork", "sh", "-c", "read x; sleep 30 & echo $!; wait"],
        tmp_path,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()
    sleeper = int(proc.stdout.readline())
    try:
        shell = int(Path(f"/proc/{sleeper}/stat").read_text().rpartition(")")[2].split()[1])
        assert mntns_of(sleeper) != mntns_of(os.getpid())
        # `unshare` entered the namespace itself, then forked the shell: it is the first.
        assert mntns_of(proc.pid) == mntns_of(shell)
        assert container_init(sleeper) == proc.pid
        assert container_init(shell) == proc.pid
    finally:
        os.kill(sleeper, signal.SIGKILL)  # the shell's `wait` returns, and it exits
        proc.wait(timeout=10)


def test_load_failure_is_unavailable_with_the_compiler_output() -> None:
    # 8 GiB of ring buffer overflows the map size the program can declare.
    with pytest.raises(TracerUnavailable) as failed:
        Tracer(ring_buffer_mb=8192)
    assert failed.value.reason.startswith("the BPF program failed to load")
    assert "BPF_RINGBUF_OUTPUT(events" in failed.value.details


def test_btf_offsets_match_the_running_kernel() -> None:
    btf = KernelBTF.from_running_kernel()
    # struct path is { struct vfsmount *mnt; struct dentry *dentry; } on every kernel.
    assert btf.member("path", "mnt").offset == 0
    assert btf.member("path", "dentry").offset == 8
    assert btf.struct_size("path") == 16
    # Nested members add up through anonymous unions.
    d_name = btf.member("dentry", "d_name").offset
    assert btf.member("dentry", "d_name.name").offset == d_name + 8
    with pytest.raises(BTFError):
        btf.member("task_struct", "no_such_field")
    with pytest.raises(BTFError):
        KernelBTF(b"\0" * 64)


def test_unavailable_names_the_reason_for_non_root(tmp_path: Path) -> None:
    script = (
        "import os\n"
        "from tracer.availability import TracerUnavailable, check_available\n"
        "os.setuid(65534)\n"
        "try:\n"
        "    check_available()\n"
        "except TracerUnavailable as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        check=False,
    )
    assert out.stdout.strip() == (
        "eBPF unavailable on this node because the tracer must run as root (loading BPF programs)"
    ), out.stderr
