"""A stand-in kernel header tree for BCC's compiler.

BCC refuses to compile without a kernel source/header tree (it runs clang inside it and
force-includes include/linux/kconfig.h), and nodes rarely have headers that match the
running kernel; this one has none at all, and Debian's 6.1 headers describe the wrong
struct layouts anyway. Our program reads no kernel struct through headers (offsets come
from BTF, see btf_offsets.py), so all it needs is BCC's own helpers.h to compile: the
uapi headers from linux-libc-dev plus a handful of tiny files written here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from tempfile import TemporaryDirectory

UAPI_INCLUDE = Path("/usr/include")
UAPI_ARCH_INCLUDE = Path("/usr/include/x86_64-linux-gnu")


class HeadersUnavailable(Exception):
    """linux-libc-dev (the uapi headers) is not installed."""


def _kernel_version_code() -> int:
    """LINUX_VERSION_CODE of the running kernel; helpers.h compares against it."""
    release = os.uname().release
    parts = [int("".join(ch for ch in p if ch.isdigit()) or 0) for p in release.split(".")[:3]]
    major, minor, patch = [*parts, 0, 0, 0][:3]
    return (major << 16) + (minor << 8) + min(patch, 255)


_KCONFIG_H = """\
/* Only the options BCC's helpers.h insists on. */
#define CONFIG_BPF_SYSCALL 1
"""

_TYPES_H = """\
#ifndef ACCELD_LINUX_TYPES_H
#define ACCELD_LINUX_TYPES_H
#include <uapi/linux/types.h>
typedef __u8 u8;
typedef __s8 s8;
typedef __u16 u16;
typedef __s16 s16;
typedef __u32 u32;
typedef __s32 s32;
typedef __u64 u64;
typedef __s64 s64;
typedef _Bool bool;
/* Types that syscall tracepoint formats (turned into structs by BCC) use. */
typedef __kernel_size_t size_t;
typedef __kernel_ssize_t ssize_t;
typedef __kernel_loff_t loff_t;
typedef __kernel_pid_t pid_t;
typedef __kernel_uid32_t uid_t;
typedef __kernel_gid32_t gid_t;
typedef unsigned short umode_t;
typedef unsigned long uintptr_t;
#define true 1
#define false 0
#endif
"""

_LOG2_H = """\
#ifndef ACCELD_LINUX_LOG2_H
#define ACCELD_LINUX_LOG2_H
/* Used by BPF_STACK_TRACE sizing only; a constant expression is enough. */
#define roundup_pow_of_two(n) (n)
#endif
"""

_BPF_H = """\
/* BCC already included its bundled uapi bpf.h; define the installed header's guard. */
#define __LINUX_BPF_H__
"""


def _write_tree(root: Path) -> None:
    if not (UAPI_INCLUDE / "linux" / "bpf.h").is_file():
        raise HeadersUnavailable(f"{UAPI_INCLUDE}/linux/bpf.h missing (install linux-libc-dev)")
    if not (UAPI_ARCH_INCLUDE / "asm" / "types.h").is_file():
        raise HeadersUnavailable(f"{UAPI_ARCH_INCLUDE}/asm missing (install linux-libc-dev)")
    include = root / "include"
    (include / "linux").mkdir(parents=True)
    (include / "uapi").mkdir()
    (include / "uapi" / "linux").symlink_to(UAPI_INCLUDE / "linux")
    (include / "uapi" / "asm-generic").symlink_to(UAPI_INCLUDE / "asm-generic")
    arch = root / "arch" / "x86" / "include"
    (arch / "uapi").mkdir(parents=True)
    (arch / "uapi" / "asm").symlink_to(UAPI_ARCH_INCLUDE / "asm")
    (arch / "asm").mkdir()
    # BCC force-includes its own copy of uapi bpf.h, guarded differently from the
    # installed one; this earlier-searched file keeps the second copy out.
    (arch / "uapi" / "linux").mkdir()
    (arch / "uapi" / "linux" / "bpf.h").write_text(_BPF_H)
    (include / "linux" / "kconfig.h").write_text(_KCONFIG_H)
    (include / "linux" / "types.h").write_text(_TYPES_H)
    (include / "linux" / "log2.h").write_text(_LOG2_H)
    code = _kernel_version_code()
    (include / "linux" / "version.h").write_text(
        f"#define LINUX_VERSION_CODE {code}\n"
        "#define KERNEL_VERSION(a, b, c) (((a) << 16) + ((b) << 8) + ((c) > 255 ? 255 : (c)))\n"
    )
    (arch / "asm" / "page.h").write_text(f"#define PAGE_SIZE {os.sysconf('SC_PAGE_SIZE')}\n")


@contextmanager
def stand_in_kernel_source() -> Iterator[Path]:
    """Point BCC_KERNEL_SOURCE at a fresh stand-in tree for the duration of a compile.

    The tree is only read while clang runs, so it lives in a temporary directory that
    is removed (and the variable restored) as soon as the BPF object is loaded.
    """
    previous = os.environ.get("BCC_KERNEL_SOURCE")
    with TemporaryDirectory(prefix="acceld-bcc-headers-") as tmp:
        root = Path(tmp)
        _write_tree(root)
        os.environ["BCC_KERNEL_SOURCE"] = str(root)
        try:
            yield root
        finally:
            if previous is None:
                os.environ.pop("BCC_KERNEL_SOURCE", None)
            else:
                os.environ["BCC_KERNEL_SOURCE"] = previous
