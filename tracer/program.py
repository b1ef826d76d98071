"""Compile and load bpf_program.c for the running kernel.

Kept apart from the event consumer because this is the part that depends on the node:
BTF offsets, the header stand-in, tracefs, libbcc. Everything that can go wrong here
surfaces as one TracerUnavailable with the reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tracer.availability import TracerUnavailable, check_available, ensure_tracefs
from tracer.btf_offsets import BTFError, KernelBTF
from tracer.headers import HeadersUnavailable, stand_in_kernel_source

PROGRAM_SOURCE = Path(__file__).with_name("bpf_program.c")

# macro -> (struct, member path) read from BTF; the C program uses only these.
_OFFSETS = {
    "OFF_TASK_NSPROXY": ("task_struct", "nsproxy"),
    "OFF_TASK_FS": ("task_struct", "fs"),
    "OFF_TASK_FILES": ("task_struct", "files"),
    "OFF_TASK_MM": ("task_struct", "mm"),
    "OFF_TASK_EXIT_CODE": ("task_struct", "exit_code"),
    "OFF_NSPROXY_MNT_NS": ("nsproxy", "mnt_ns"),
    "OFF_MNTNS_INUM": ("mnt_namespace", "ns.inum"),
    "OFF_FS_ROOT": ("fs_struct", "root"),
    "OFF_PATH_MNT": ("path", "mnt"),
    "OFF_PATH_DENTRY": ("path", "dentry"),
    "OFF_FILES_FDT": ("files_struct", "fdt"),
    "OFF_FDT_MAX_FDS": ("fdtable", "max_fds"),
    "OFF_FDT_FD": ("fdtable", "fd"),
    "OFF_FILE_F_PATH": ("file", "f_path"),
    "OFF_FILE_F_INODE": ("file", "f_inode"),
    "OFF_FILE_F_POS": ("file", "f_pos"),
    "OFF_INODE_I_MODE": ("inode", "i_mode"),
    "OFF_INODE_I_INO": ("inode", "i_ino"),
    "OFF_INODE_I_SB": ("inode", "i_sb"),
    "OFF_SB_S_DEV": ("super_block", "s_dev"),
    "OFF_DENTRY_D_PARENT": ("dentry", "d_parent"),
    "OFF_DENTRY_D_NAME_NAME": ("dentry", "d_name.name"),
    "OFF_MOUNT_MNT": ("mount", "mnt"),
    "OFF_MOUNT_MNT_PARENT": ("mount", "mnt_parent"),
    "OFF_MOUNT_MNT_MOUNTPOINT": ("mount", "mnt_mountpoint"),
    "OFF_VFSMOUNT_MNT_ROOT": ("vfsmount", "mnt_root"),
    "OFF_MM_EXE_FILE": ("mm_struct", "exe_file"),
    "OFF_MM_MA_ROOT": ("mm_struct", "mm_mt.ma_root"),
    "OFF_MAPLE_RANGE64_PIVOT": ("maple_range_64", "pivot"),
    "OFF_MAPLE_RANGE64_SLOT": ("maple_range_64", "slot"),
    "OFF_MAPLE_ARANGE64_PIVOT": ("maple_arange_64", "pivot"),
    "OFF_MAPLE_ARANGE64_SLOT": ("maple_arange_64", "slot"),
    "OFF_VMA_VM_START": ("vm_area_struct", "vm_start"),
    "OFF_VMA_VM_END": ("vm_area_struct", "vm_end"),
    "OFF_VMA_VM_FILE": ("vm_area_struct", "vm_file"),
    "OFF_PT_REGS_IP": ("pt_regs", "ip"),
}


def kernel_cflags(btf: KernelBTF, ring_pages: int) -> list[str]:
    """-D flags carrying this kernel's struct layout into the C program."""
    flags = [f"-D{macro}={btf.member(s, m).offset}" for macro, (s, m) in _OFFSETS.items()]
    # Pivot counts follow from the array sizes (15 and 9 on 64-bit kernels).
    flags.append(f"-DMAPLE_RANGE64_PIVOTS={btf.member('maple_range_64', 'pivot').size // 8}")
    flags.append(f"-DMAPLE_ARANGE64_PIVOTS={btf.member('maple_arange_64', 'pivot').size // 8}")
    flags.append(f"-DRING_PAGES={ring_pages}")
    if (ensure_tracefs() / "events" / "syscalls" / "sys_exit_open").is_dir():
        flags.append("-DHAVE_SYS_OPEN")
    return flags


@contextlib.contextmanager
def _captured_native_output() -> Iterator[io.StringIO]:
    """libbcc prints compiler/verifier errors to fd 2: keep them for the exception.

    fd 2 is process-wide, so whatever else was written meanwhile is captured too;
    on success the caller hands it all back to stderr, merely delayed."""
    with tempfile.TemporaryFile() as sink:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        text = io.StringIO()
        try:
            yield text
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text.write(sink.read().decode(errors="replace"))


def load_program(ring_pages: int) -> Any:
    """Compile, load and attach the program; returns the bcc.BPF object."""
    check_available()
    from bcc import BPF

    try:
        cflags = kernel_cflags(KernelBTF.from_running_kernel(), ring_pages)
    except BTFError as exc:
        raise TracerUnavailable(f"kernel BTF lacks what the tracer reads: {exc}") from exc
    source = PROGRAM_SOURCE.read_text()
    bpf: Any = None
    failure: Exception | None = None
    with _captured_native_output() as native:
        try:
            with stand_in_kernel_source():
                bpf = BPF(text=source.encode(), cflags=cflags)
                # Every probe that must send a path tail-calls this one program.
                walker = bpf.load_func(b"send_with_path", BPF.TRACEPOINT)
                bpf[b"path_walker"][ctypes.c_int(0)] = ctypes.c_int(walker.fd)
                bpf.attach_tracepoint(tp=b"sched:sched_process_exec", fn_name=b"exec_interpreter")
        except HeadersUnavailable as exc:
            failure = TracerUnavailable(str(exc))
        except Exception as exc:  # libbcc raises bare Exception for compile/verify failures
            failure = exc
    if failure is None:
        sys.stderr.write(native.getvalue())
        return bpf
    if bpf is not None:
        bpf.cleanup()  # detach whatever was attached before the failure
    if isinstance(failure, TracerUnavailable):
        raise failure
    raise TracerUnavailable(
        f"the BPF program failed to load: {failure}", details=native.getvalue()[-8000:]
    ) from failure
