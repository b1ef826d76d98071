"""Which bytes a container of an image must read, known from the image's own layers.

A benchmark that only times starts cannot tell a fast start from a fast start that
read wrong bytes. The soak makes wrong bytes visible with images built to print the
md5 of their data (`rig.chaos`); real application images print nothing of the kind.
So here the expected content comes from the built image itself: its layer tars are
merged the way overlayfs merges them (later layers win, OCI whiteouts and opaque
directories remove lower entries, symlinks resolved inside the image's root), and a
few files are chosen whose md5 a container then prints with ``md5sum``:

* the program the image's command runs (the interpreter or binary every start reads);
* the application layer's files (the top layer, its largest ``top_files``);
* the largest programs and shared libraries of every other layer (``per_layer`` of
  them, each at most ``max_size``; other files only where a layer has too few): what
  a start maps and runs, and they span many chunks or index spans, so a misplaced
  chunk shows there first.

`rig.chaos.verdict` then judges ``md5sum``'s output against these sums, as the soak
does. The md5 of every other file is kept too, so a check can add the files a running
container has mapped (`ImageFiles.every`). Merging a big image's layers takes
seconds, so the sums are cached next to the built images, keyed by manifest digest.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import posixpath
import re
import tarfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, cast

import zstandard

from common.logging import get_logger
from fetcher import mediatypes as mt
from rig.images import BuiltImage

log = get_logger(__name__)

SUMS_VERSION = 2
"""Part of the cache key: bump it when the choice of files changes."""
_LOADABLE = re.compile(r"(\.so(\.[0-9]+)*|/s?bin/[^/]+)$")
"""Shared libraries and programs: what starts map and run, unlike a static archive or
the test data a package ships."""
_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"
SAFE_PATH = re.compile(r"^/[A-Za-z0-9._+@=,:/-]+$")
"""Paths md5sum prints as given (it escapes backslashes and newlines in names)."""
_MAX_LINKS = 40


@dataclass(frozen=True)
class Node:
    """One path of the merged root: its kind, and the md5 and size of a regular file."""

    kind: str
    """``reg``, ``dir``, ``sym`` or ``other``."""
    md5: str = ""
    size: int = 0
    target: str = ""
    """A symlink's target."""
    layer: int = -1
    """Index of the layer the entry comes from."""


def _normal(name: str) -> str:
    """A tar member name as an absolute, normalised path (``./usr/`` -> ``/usr``)."""
    return posixpath.normpath("/" + name.lstrip("/"))


@contextmanager
def _layer_stream(built: BuiltImage, index: int) -> Iterator[IO[bytes]]:
    layer = built.layers[index]
    with built.blob_path(layer.digest).open("rb") as raw:
        if layer.media_type in mt.GZIP_LAYERS:
            with gzip.GzipFile(fileobj=raw) as unzipped:
                yield cast(IO[bytes], unzipped)
        elif layer.media_type in mt.ZSTD_LAYERS:
            with zstandard.ZstdDecompressor().stream_reader(raw) as unzipped:
                yield unzipped
        else:
            yield raw


def _md5(stream: IO[bytes] | None) -> str:
    digest = hashlib.md5()
    if stream is not None:
        while block := stream.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _layer_entries(built: BuiltImage, index: int) -> tuple[dict[str, Node], list[str], list[str]]:
    """This layer's own entries, and the paths its whiteouts and opaque markers name."""
    entries: dict[str, Node] = {}
    whiteouts: list[str] = []
    opaque: list[str] = []
    with _layer_stream(built, index) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for info in tar:
            path = _normal(info.name)
            parent, base = posixpath.split(path)
            if base == _OPAQUE:
                opaque.append(parent)
            elif base.startswith(_WHITEOUT):
                whiteouts.append(posixpath.join(parent, base[len(_WHITEOUT) :]))
            elif info.isreg():
                entries[path] = Node("reg", _md5(tar.extractfile(info)), info.size, layer=index)
            elif info.islnk():
                source = entries.get(_normal(info.linkname))
                entries[path] = source or Node("other", layer=index)
            elif info.issym():
                entries[path] = Node("sym", target=info.linkname, layer=index)
            elif info.isdir():
                entries[path] = Node("dir", layer=index)
            else:
                entries[path] = Node("other", layer=index)
    return entries, whiteouts, opaque


def _remove_below(merged: dict[str, Node], path: str, keep_self: bool) -> None:
    prefix = path.rstrip("/") + "/"
    for name in [n for n in merged if n.startswith(prefix) or (n == path and not keep_self)]:
        del merged[name]


def merged_root(built: BuiltImage) -> dict[str, Node]:
    """Every path of the image's root file system as a container sees it."""
    merged: dict[str, Node] = {"/": Node("dir")}
    for index in range(len(built.layers)):
        entries, whiteouts, opaque = _layer_entries(built, index)
        for path in whiteouts:
            _remove_below(merged, path, keep_self=False)
        for path in opaque:
            _remove_below(merged, path, keep_self=True)
        for path, node in entries.items():
            if node.kind != "dir" and merged.get(path, node).kind == "dir":
                _remove_below(merged, path, keep_self=True)
            merged[path] = node
    return merged


def resolve(merged: dict[str, Node], path: str) -> str | None:
    """``path`` with every symlink in it followed inside the image's root (None if it
    leads nowhere, or round in circles)."""
    parts = [p for p in path.split("/") if p]
    done = "/"
    hops = 0
    while parts:
        current = posixpath.join(done, parts.pop(0))
        node = merged.get(current)
        if node is None:
            return None
        if node.kind == "sym":
            hops += 1
            if hops > _MAX_LINKS:
                return None
            base = "/" if node.target.startswith("/") else done
            parts = [p for p in posixpath.join(base, node.target).split("/") if p] + parts
            done = "/"
            continue
        done = posixpath.normpath(current)
    return done


def _config(built: BuiltImage) -> tuple[list[str], list[str]]:
    """The image's command (entrypoint + cmd) and PATH directories."""
    config = json.loads(built.config_bytes).get("config") or {}
    command = [*(config.get("Entrypoint") or []), *(config.get("Cmd") or [])]
    path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    for variable in config.get("Env") or []:
        if variable.startswith("PATH="):
            path = variable.removeprefix("PATH=")
    return command, [d for d in path.split(":") if d.startswith("/")]


def program_path(merged: dict[str, Node], command: Sequence[str], path_dirs: Sequence[str]) -> str:
    """The file the command's first word names, as the runtime finds it ("" if none)."""
    if not command:
        return ""
    program = command[0]
    candidates = [program] if "/" in program else [f"{d}/{program}" for d in path_dirs]
    for candidate in candidates:
        target = resolve(merged, candidate)
        if target is not None and merged[target].kind == "reg":
            return candidate
    return ""


@dataclass(frozen=True)
class ImageFiles:
    """What a check of an image's bytes can ask for."""

    chosen: dict[str, str]
    """Path -> md5 of the files every check reads (`choose_files`)."""
    every: dict[str, str]
    """Path -> md5 of every regular file (hard links included; symlinks not), for
    checking files a running container turns out to have open or mapped."""


def choose_files(
    merged: dict[str, Node],
    built: BuiltImage,
    top_files: int = 8,
    per_layer: int = 3,
    max_size: int = 16 << 20,
) -> dict[str, str]:
    """Path -> md5 of the files a check reads (see the module docstring)."""
    command, path_dirs = _config(built)
    chosen: dict[str, str] = {}

    def take(path: str) -> None:
        target = resolve(merged, path)
        node = merged.get(target) if target else None
        # One path per content: a hard link or a second name adds no check.
        if node is None or node.kind != "reg" or node.md5 in chosen.values():
            return
        if SAFE_PATH.match(path):
            chosen[path] = node.md5

    program = program_path(merged, command, path_dirs)
    if program:
        take(program)
    top = len(built.layers) - 1
    by_size = sorted(
        ((node.size, path, node.layer) for path, node in merged.items() if node.kind == "reg"),
        key=lambda item: (-item[0], item[1]),
    )
    for layer in range(len(built.layers)):
        fitting = [path for size, path, lay in by_size if lay == layer and size <= max_size]
        if layer != top:
            fitting.sort(key=lambda path: not _LOADABLE.search(path))  # stable: by size
        for path in fitting[: top_files if layer == top else per_layer]:
            take(path)
    return chosen


def image_files(built: BuiltImage, cache_dir: Path) -> ImageFiles:
    """`ImageFiles` of ``built``, computed once per image and kept in ``cache_dir``."""
    key = built.digest.removeprefix("sha256:")
    path = cache_dir / "file-sums" / f"{key}-v{SUMS_VERSION}.json"
    try:
        cached = json.loads(path.read_text())
        return ImageFiles(dict(cached["chosen"]), dict(cached["every"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    merged = merged_root(built)
    files = ImageFiles(
        choose_files(merged, built),
        {p: node.md5 for p, node in merged.items() if node.kind == "reg"},
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_suffix(".tmp")
    temp.write_text(json.dumps({"chosen": files.chosen, "every": files.every}) + "\n")
    temp.replace(path)
    log.info(
        "bench.file_sums", image=built.digest, chosen=len(files.chosen), files=len(files.every)
    )
    return files
