"""Faults, checkable images and verdicts for chaos tests and the soak benchmark.

A start under faults can end four ways, and only two are acceptable: the container
read exactly the image's bytes, or it failed cleanly (an I/O error, a non-zero exit)
within a bound. Wrong bytes and hangs are the failures acceld must never produce. The
images here make wrong bytes visible: the container prints the md5 of every data file
it reads, and the expected sums are known from how the files were generated.
"""

from __future__ import annotations

import hashlib
import random
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from rig.fault_proxy import Fault
from rig.images import ImageConfig, ImageSpec, busybox_image_spec
from rig.layers import Directory, File, LayerSpec, SparseishFile

Verdict = Literal["correct", "failed_cleanly", "wrong_bytes", "hang"]
DATA_DIR = "data"


@dataclass(frozen=True)
class CheckableImage:
    """An image whose start prints ``md5  /path`` for each data file it reads."""

    spec: ImageSpec
    expected: dict[str, str]
    """Absolute path -> md5 hex of the file's true content."""


def checkable_image(seed: int, files: int = 4, size: int = 3 << 20) -> CheckableImage:
    """Busybox plus ``files`` sparse-ish data files of ``size`` bytes (distinct per seed,
    so each seed is a distinct image with its own layers and cache entries)."""
    data: list[Directory | File] = [Directory(DATA_DIR)]
    expected = {}
    for i in range(files):
        content = SparseishFile(size, seed=seed * 1000 + i, data_every=64 << 10)
        path = f"{DATA_DIR}/f{i}.bin"
        data.append(File(path, content))
        md5 = hashlib.md5()
        for piece in content.chunks():
            md5.update(piece)
        expected["/" + path] = md5.hexdigest()
    base = busybox_image_spec(hello=f"chaos image {seed}\n")
    spec = ImageSpec(
        layers=(*base.layers, LayerSpec(data, created_by=f"chaos data {seed}")),
        platform=base.platform,
        config=ImageConfig(cmd=("/bin/sh", "-c", f"md5sum /{DATA_DIR}/*.bin")),
    )
    return CheckableImage(spec, expected)


def directory_tree_image(
    seed: int, top: int = 12, per_top: int = 12, files: int = 3, size: int = 24 << 10
) -> CheckableImage:
    """Busybox plus ``top * per_top`` data directories of ``files`` random files each,
    whose start creates a directory in each data directory before reading its files.

    Each mkdir makes overlayfs copy the lower directory chain up into the container's
    writable layer, asking FUSE for the lower directories' xattrs meanwhile, while the
    reads make the agent fetch and cache chunks: the mix that once deadlocked a node
    when several such containers started together.
    """
    rng = random.Random(seed)
    data: list[Directory | File] = [Directory(DATA_DIR)]
    expected = {}
    for a in range(top):
        data.append(Directory(f"{DATA_DIR}/a{a:02d}"))
        for b in range(per_top):
            directory = f"{DATA_DIR}/a{a:02d}/b{b:02d}"
            data.append(Directory(directory))
            for i in range(files):
                content = rng.randbytes(size)
                data.append(File(f"{directory}/f{i}", content))
                expected[f"/{directory}/f{i}"] = hashlib.md5(content).hexdigest()
    base = busybox_image_spec(hello=f"tree image {seed}\n")
    script = f'for d in /{DATA_DIR}/*/*/; do mkdir "${{d}}new" || exit 1; md5sum "$d"f*; done'
    spec = ImageSpec(
        layers=(*base.layers, LayerSpec(data, created_by=f"tree data {seed}")),
        platform=base.platform,
        config=ImageConfig(cmd=("/bin/sh", "-c", script)),
    )
    return CheckableImage(spec, expected)


def parse_md5sum(output: str) -> dict[str, str]:
    """``md5sum`` output lines -> {path: md5}."""
    found = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 2 and len(parts[0]) == 32:
            found[parts[1]] = parts[0]
    return found


def verdict(expected: dict[str, str], run: subprocess.CompletedProcess[str] | None) -> Verdict:
    """How one start ended (None: it did not end within its time bound)."""
    if run is None:
        return "hang"
    seen = parse_md5sum(run.stdout)
    if any(expected.get(path) != md5 for path, md5 in seen.items()):
        return "wrong_bytes"
    if run.returncode == 0 and seen == expected:
        return "correct"
    return "failed_cleanly"


def _reset() -> Fault:
    return Fault("reset", path_contains="/blobs/", after_bytes=1000, times=3)


def _unavailable() -> Fault:
    return Fault("status", path_contains="/blobs/", status=503, retry_after="0", times=3)


def _throttled() -> Fault:
    return Fault("status", path_contains="/blobs/", status=429, retry_after="1", times=2)


def _stall() -> Fault:
    return Fault("stall", path_contains="/blobs/", after_bytes=200, stall_seconds=3, times=1)


def _truncate() -> Fault:
    return Fault("truncate", path_contains="/blobs/", after_bytes=5000, times=3)


def _flip() -> Fault:
    return Fault("flip", path_contains="/blobs/", after_bytes=3000, times=2)


TRANSIENT_FAULTS: dict[str, Callable[[], Fault]] = {
    "reset": _reset,
    "503": _unavailable,
    "429-retry-after": _throttled,
    "stall": _stall,
    "truncate": _truncate,
    "flip": _flip,
}
"""Faults a healthy registry or CDN shows now and then: each recovers after a few hits."""


def random_faults(rng: random.Random, most: int = 2) -> list[tuple[str, Fault]]:
    """Zero to ``most`` transient faults, drawn for one start of the soak."""
    names = rng.sample(sorted(TRANSIENT_FAULTS), rng.randint(0, most))
    return [(name, TRANSIENT_FAULTS[name]()) for name in names]
