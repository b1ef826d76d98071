"""Benchmark images made of real Debian packages, built without Docker.

Synthetic layers (random data, a few big files) flatter a lazy loader: real images are
tens of thousands of small files from package managers, shared libraries, bytecode
caches and headers, and how fast an application starts depends on how those are laid
out. So the benchmark images here are what `docker build` on a Debian base would
produce, made from the same ingredients with the tools this machine has:

- base layer: a ``debootstrap --variant=minbase`` root filesystem, from the Debian
  mirror this machine's apt is configured with (the only archive it can reach);
- app layer: what ``apt-get install --no-install-recommends`` changed in a copy of that
  tree (new and changed paths, OCI whiteouts for removed ones), found by comparing
  each path's inode, size, mtime, mode and owner before and after;
- top layer: the application's own script.

A later version of an image comes in the two shapes real releases take
(`build_app_update`, and ``base_packages``): the application changed and the lower
layers are reused by digest (a `docker build` whose cache held them), or the base image
was rebuilt (an extra package in it), so every layer is new.

debootstrap takes about a minute, so its tree is cached as a tarball; finished images
are cached as OCI layouts keyed by a hash of everything that goes into them. Mounts the
installers need (/proc, /dev) are made inside a private mount namespace, so they vanish
with the process even when a build fails half-way.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from common.logging import get_logger
from fetcher.manifest import Descriptor, ImageManifest, Platform, parse_manifest
from rig.images import (
    DEFAULT_PATH_ENV,
    REF_NAME_ANNOTATION,
    BuiltImage,
    ImageConfig,
    ImageSpec,
    blob_path,
    build_image,
    build_image_on,
)
from rig.layers import (
    BlockDevice,
    CharDevice,
    Directory,
    Entry,
    Fifo,
    File,
    Hardlink,
    HostFile,
    LayerSpec,
    Symlink,
    Whiteout,
)

log = get_logger(__name__)

BUILDER_VERSION = 1
"""Part of every cache key: bump it when a change here alters what lands in a layer."""

DEFAULT_SUITE = "bookworm"
LAYOUT_TAG = "latest"
_APT_ENV = (
    DEFAULT_PATH_ENV,
    "DEBIAN_FRONTEND=noninteractive",
    "LC_ALL=C",
)

_RUNTIME_DIRS = ("dev", "proc", "sys", "tmp")
"""Kept as empty directories: the runtime mounts or fills them, images ship them empty."""

_APT_CACHES = ("var/lib/apt/lists", "var/cache/apt")
"""Their files are left out of layers (as Debian's official images do); apt re-creates them."""

_HOST_FILES = ("etc/resolv.conf", "etc/hostname")
"""Copied from the build host by debootstrap; runtimes provide their own."""


class ImageBuildError(RuntimeError):
    """debootstrap, apt or the layer diff failed; the message carries the tool's output."""


@dataclass(frozen=True)
class AppFile:
    """A file of the top (application) layer."""

    path: str
    content: bytes
    mode: int = 0o755


@dataclass(frozen=True)
class DebianImageSpec:
    """What goes into a Debian benchmark image; its hash names the cached layout."""

    packages: tuple[str, ...]
    app_files: tuple[AppFile, ...]
    cmd: tuple[str, ...]
    env: tuple[str, ...] = (DEFAULT_PATH_ENV,)
    working_dir: str = ""
    suite: str = DEFAULT_SUITE
    labels: tuple[tuple[str, str], ...] = field(default=())
    base_packages: tuple[str, ...] = ()
    """Installed into the minbase tree before it becomes the base layer: a rebuilt base
    image (a new version whose every layer differs from the last)."""

    def cache_key(self, mirror: str) -> str:
        """Hex digest over every input of the build, the mirror included.

        ``base_packages`` enters the key only when set, so the images built before it
        existed (which had none) keep their keys and cached layouts.
        """
        doc: dict[str, object] = {
            **self._app_inputs(),
            "mirror": mirror,
            "suite": self.suite,
            "packages": sorted(self.packages),
        }
        if self.base_packages:
            doc["base_packages"] = sorted(self.base_packages)
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def app_key(self, parent_digest: str) -> str:
        """Hex digest over the inputs of an app-layer rebuild on the image ``parent_digest``."""
        doc = {**self._app_inputs(), "parent": parent_digest}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def _app_inputs(self) -> dict[str, object]:
        """What the app layer and the image config are made of (both keys hash it)."""
        return {
            "builder": BUILDER_VERSION,
            "files": [
                [f.path, f.mode, hashlib.sha256(f.content).hexdigest()] for f in self.app_files
            ],
            "cmd": list(self.cmd),
            "env": list(self.env),
            "working_dir": self.working_dir,
            "labels": [list(pair) for pair in self.labels],
        }


# -- the mirror -------------------------------------------------------------------------


def _sources_files(apt_dir: Path) -> list[Path]:
    files = [apt_dir / "sources.list"]
    parts = apt_dir / "sources.list.d"
    if parts.is_dir():
        # apt reads only these two extensions; "*.disabled" and the like are ignored.
        files += sorted(p for p in parts.iterdir() if p.suffix in (".list", ".sources"))
    return [p for p in files if p.is_file()]


def _deb822_stanzas(text: str) -> Iterator[dict[str, str]]:
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        if fields:
            yield fields


def _one_line_sources(text: str) -> Iterator[tuple[str, list[str]]]:
    """(uri, suites) of each ``deb [options] uri suite components`` line."""
    for line in text.splitlines():
        words = re.sub(r"\[[^\]]*\]", "", line.split("#", 1)[0]).split()
        if len(words) >= 3 and words[0] == "deb":
            yield words[1], [words[2]]


def debian_mirror(suite: str = DEFAULT_SUITE, apt_dir: Path = Path("/etc/apt")) -> str:
    """The archive URI this machine's apt uses for ``suite``: the one debootstrap can reach."""
    for path in _sources_files(apt_dir):
        text = path.read_text(errors="replace")
        if path.suffix == ".sources":
            for fields in _deb822_stanzas(text):
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                if (
                    "deb" in fields.get("types", "").split()
                    and suite in fields.get("suites", "").split()
                ):
                    return fields["uris"].split()[0]
        else:
            for uri, suites in _one_line_sources(text):
                if suite in suites:
                    return uri
    raise ImageBuildError(f"no apt source for suite {suite!r} under {apt_dir}")


# -- running tools ----------------------------------------------------------------------


def _run(argv: Sequence[str], log_path: Path, what: str) -> None:
    """Run a build tool with its output appended to ``log_path``; fail with its tail."""
    with log_path.open("ab") as out:
        out.write(f"\n$ {' '.join(argv)}\n".encode())
        out.flush()
        result = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise ImageBuildError(f"{what} failed ({result.returncode}); log {log_path}:\n{tail}")


_CHROOT_SCRIPT = (
    'root=$1; shift; mount -t proc proc "$root/proc"; mount --rbind /dev "$root/dev"; '
    'exec chroot "$root" "$@"'
)


def _in_chroot(root: Path, argv: Sequence[str], log_path: Path) -> None:
    """Run ``argv`` chrooted into ``root`` with /proc and /dev mounted in a private namespace."""
    _run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-euc",
            _CHROOT_SCRIPT,
            "sh",
            str(root),
            "env",
            "-i",
            *_APT_ENV,
            *argv,
        ],
        log_path,
        f"in chroot: {' '.join(argv)}",
    )


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mountinfo") as info:
        points = [line.split()[4] for line in info]
    return [p for p in points if p.startswith(prefix)]


def _remove_tree(path: Path) -> None:
    """Delete a build tree, refusing if anything is mounted inside (a bound /dev, say)."""
    mounted = _mounts_under(path)
    if mounted:
        raise ImageBuildError(f"not deleting {path}: still mounted inside: {mounted}")
    shutil.rmtree(path, ignore_errors=True)


_TAR_FLAGS = ("--numeric-owner", "--xattrs", "--xattrs-include=*")


@contextmanager
def _locked(cache_dir: Path) -> Iterator[None]:
    """One build at a time per cache: two benchmarks starting together share the work."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with (cache_dir / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


# -- the base tree ----------------------------------------------------------------------


def base_rootfs_tarball(cache_dir: Path, suite: str, mirror: str) -> Path:
    """The cached minbase tree of ``suite`` as a tar, made with debootstrap on first use."""
    name = hashlib.sha256(mirror.encode()).hexdigest()[:12]
    tarball = cache_dir / f"base-{suite}-minbase-{name}.tar"
    if tarball.exists():
        return tarball
    work = Path(tempfile.mkdtemp(prefix="debootstrap-", dir=cache_dir))
    log_path = cache_dir / f"debootstrap-{suite}.log"
    log_path.unlink(missing_ok=True)
    try:
        tree = work / "rootfs"
        log.info("debian.debootstrap", suite=suite, mirror=mirror, log=str(log_path))
        _run(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "debootstrap",
                "--variant=minbase",
                suite,
                str(tree),
                mirror,
            ],
            log_path,
            "debootstrap",
        )
        _pack_tree(tree, tarball, log_path)
    finally:
        _remove_tree(work)
    return tarball


def base_tarball_with(
    cache_dir: Path, suite: str, mirror: str, packages: Sequence[str], log_path: Path
) -> Path:
    """The minbase tree with ``packages`` installed (cached as a tar), or the plain one.

    apt stamps what it writes (dpkg's status and logs, ld.so.cache), so this tree is made
    once and kept: the base layer of every image built on it is then one blob.
    """
    plain = base_rootfs_tarball(cache_dir, suite, mirror)
    if not packages:
        return plain
    doc = {"builder": BUILDER_VERSION, "packages": sorted(packages)}
    key = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:12]
    tarball = plain.with_name(f"{plain.stem}+{key}.tar")
    if tarball.exists():
        return tarball
    work = Path(tempfile.mkdtemp(prefix="base-", dir=cache_dir))
    try:
        tree = work / "rootfs"
        _extract(plain, tree, log_path)
        log.info("debian.base_packages", packages=list(packages), log=str(log_path))
        install_packages(tree, packages, log_path)
        _pack_tree(tree, tarball, log_path)
    finally:
        _remove_tree(work)
    return tarball


def _pack_tree(tree: Path, tarball: Path, log_path: Path) -> None:
    """Tar ``tree`` into ``tarball``, which appears whole or not at all (the cache is
    shared by concurrent builds and outlives failed ones)."""
    partial = tree.parent / "base.tar"
    _run(
        ["tar", "--create", f"--file={partial}", f"--directory={tree}", *_TAR_FLAGS, "."],
        log_path,
        "tar of the base tree",
    )
    os.replace(partial, tarball)


def _extract(tarball: Path, dest: Path, log_path: Path) -> None:
    dest.mkdir(parents=True)
    _run(
        ["tar", "--extract", f"--file={tarball}", f"--directory={dest}", *_TAR_FLAGS, "-p"],
        log_path,
        "extracting the base tree",
    )


# -- trees as layers --------------------------------------------------------------------


@dataclass(frozen=True)
class PathState:
    """What decides whether a path changed: dpkg replaces files by rename (new inode)."""

    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    inode: int
    link_target: str | None


def _left_out(rel: str, is_dir: bool) -> bool:
    top, _, rest = rel.partition("/")
    if top in _RUNTIME_DIRS:
        return bool(rest)
    if rel in _HOST_FILES:
        return True
    return not is_dir and any(rel.startswith(prefix + "/") for prefix in _APT_CACHES)


def snapshot_tree(root: Path) -> dict[str, PathState]:
    """Every path of the tree (relative, parents before children, sorted) and its state."""
    states: dict[str, PathState] = {}
    pending = [""]
    while pending:
        rel_dir = pending.pop()
        with os.scandir(root / rel_dir if rel_dir else root) as scan:
            found = sorted(scan, key=lambda e: e.name)
        children = []
        for item in found:
            rel = f"{rel_dir}/{item.name}" if rel_dir else item.name
            st = item.stat(follow_symlinks=False)
            is_dir = stat.S_ISDIR(st.st_mode)
            if _left_out(rel, is_dir):
                continue
            target = os.readlink(item.path) if stat.S_ISLNK(st.st_mode) else None
            states[rel] = PathState(
                st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_ino, target
            )
            if is_dir:
                children.append(rel)
        pending.extend(reversed(children))
    return dict(sorted(states.items(), key=lambda item: item[0].split("/")))


def _xattrs(path: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    return {name: os.getxattr(path, name, follow_symlinks=False) for name in names}


def tree_entries(root: Path, paths: Sequence[str]) -> list[Entry]:
    """Layer entries for ``paths`` of the tree at ``root``, metadata as on disk.

    A file whose inode was already written in this layer becomes a hard link to it, as
    tar writers do, so hard-linked files are stored once.
    """
    entries: list[Entry] = []
    first_link: dict[tuple[int, int], str] = {}
    for rel in paths:
        full = os.path.join(root, rel)
        st = os.lstat(full)
        uid, gid, mtime = st.st_uid, st.st_gid, int(st.st_mtime)
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            entries.append(
                Directory(rel, mode=mode, xattrs=_xattrs(full), uid=uid, gid=gid, mtime=mtime)
            )
        elif stat.S_ISREG(st.st_mode):
            inode = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and inode in first_link:
                entries.append(Hardlink(rel, first_link[inode]))
                continue
            first_link.setdefault(inode, rel)
            entries.append(
                File(
                    rel,
                    HostFile(Path(full)),
                    mode=mode,
                    xattrs=_xattrs(full),
                    uid=uid,
                    gid=gid,
                    mtime=mtime,
                )
            )
        elif stat.S_ISLNK(st.st_mode):
            entries.append(Symlink(rel, os.readlink(full), uid=uid, gid=gid, mtime=mtime))
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            device = CharDevice if stat.S_ISCHR(st.st_mode) else BlockDevice
            entries.append(
                device(
                    rel,
                    os.major(st.st_rdev),
                    os.minor(st.st_rdev),
                    mode=mode,
                    uid=uid,
                    gid=gid,
                    mtime=mtime,
                )
            )
        elif stat.S_ISFIFO(st.st_mode):
            entries.append(Fifo(rel, mode=mode, uid=uid, gid=gid, mtime=mtime))
        # sockets have no tar form; a build leaves none behind that an image needs
    return entries


def diff_entries(
    root: Path, before: dict[str, PathState], after: dict[str, PathState]
) -> list[Entry]:
    """The layer that turns tree ``before`` into tree ``after`` (both of ``root``).

    Changed and new paths come with their parent directories (as `docker build` writes
    them); a removed path gets one whiteout, its removed children none.
    """
    changed = {rel for rel, state in after.items() if before.get(rel) != state}
    gone = before.keys() - after.keys()
    removed = [rel for rel in before if rel in gone and rel.rpartition("/")[0] not in gone]
    wanted = set(changed)
    for rel in [*changed, *removed]:
        parent = rel.rpartition("/")[0]
        while parent and parent not in wanted and parent in after:
            wanted.add(parent)
            parent = parent.rpartition("/")[0]
    entries = tree_entries(root, [rel for rel in after if rel in wanted])
    entries.extend(Whiteout(rel) for rel in removed)
    return entries


def install_packages(root: Path, packages: Sequence[str], log_path: Path) -> None:
    """apt-get install into the tree, with no services started and the caches cleaned."""
    shutil.copyfile("/etc/resolv.conf", root / "etc/resolv.conf")
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")  # the Debian way to say "start no daemons"
    policy.chmod(0o755)
    try:
        _in_chroot(root, ["apt-get", "update", "-q"], log_path)
        _in_chroot(
            root,
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages],
            log_path,
        )
        _in_chroot(root, ["apt-get", "clean"], log_path)
    finally:
        policy.unlink(missing_ok=True)


def _app_layer(files: Sequence[AppFile]) -> LayerSpec:
    entries: list[Entry] = []
    dirs: set[str] = set()
    for app_file in files:
        parts = app_file.path.strip("/").split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent not in dirs:
                dirs.add(parent)
                entries.append(Directory(parent))
        entries.append(File(app_file.path, app_file.content, mode=app_file.mode))
    return LayerSpec(entries, created_by="COPY app files")


# -- reading a finished layout back -----------------------------------------------------


def load_built_image(layout: Path, tag: str = LAYOUT_TAG) -> BuiltImage:
    """The image tagged ``tag`` in an OCI layout this module wrote, ready for `push_image`.

    Cached and fresh builds both come back through here so callers see one shape. The
    build trees are gone by then, so each ``spec`` layer carries its history line but no
    entries: the blobs in the layout are the image.
    """
    index = json.loads((layout / "index.json").read_text())
    entry = next(
        (m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME_ANNOTATION) == tag),
        None,
    )
    if entry is None:
        raise ImageBuildError(f"{layout} has no image tagged {tag!r}")
    manifest_bytes = blob_path(layout, entry["digest"]).read_bytes()
    manifest = parse_manifest(manifest_bytes, entry["mediaType"])
    if not isinstance(manifest, ImageManifest):
        raise ImageBuildError(f"{layout}:{tag} is not a single image manifest")
    config_bytes = blob_path(layout, manifest.config.digest).read_bytes()
    config = json.loads(config_bytes)
    platform = Platform(config["os"], config["architecture"], config.get("variant"))
    runtime = config.get("config", {})
    spec = ImageSpec(
        layers=tuple(LayerSpec((), created_by=h["created_by"]) for h in config["history"]),
        platform=platform,
        config=ImageConfig(
            cmd=runtime.get("Cmd"),
            entrypoint=runtime.get("Entrypoint"),
            env=tuple(runtime.get("Env", ())),
            working_dir=runtime.get("WorkingDir", ""),
            labels=runtime.get("Labels", {}),
        ),
    )
    descriptor = Descriptor(
        manifest.media_type, entry["digest"], len(manifest_bytes), platform=platform
    )
    return BuiltImage(
        spec,
        layout,
        tag,
        descriptor,
        manifest_bytes,
        manifest.config,
        config_bytes,
        tuple(manifest.layers),
        tuple(config["rootfs"]["diff_ids"]),
    )


# -- building ---------------------------------------------------------------------------


def build_debian_image(name: str, spec: DebianImageSpec, cache_dir: Path) -> BuiltImage:
    """The image for ``spec``, from the cache or built now (minutes on a cold cache).

    Three layers (two without packages): minbase (with ``base_packages``), the
    packages, the app files. The base layer's bytes depend only on the cached tarball, so
    every image built on one base shares that layer blob, as images built FROM one base
    image do. The package layer is not reproducible (apt stamps times): a new version
    that keeps it must be made with `build_app_update`.
    """
    cache = cache_dir / "debian"
    mirror = debian_mirror(spec.suite)
    layout = cache / "layouts" / f"{name}-{spec.cache_key(mirror)[:16]}"
    if (layout / "index.json").exists():
        return load_built_image(layout)  # layouts appear complete (renamed into place)
    with _locked(cache):
        if (layout / "index.json").exists():
            return load_built_image(layout)  # another process built it while we waited
        (cache / "work").mkdir(exist_ok=True)
        for leftover in (cache / "work").iterdir():
            _remove_tree(leftover)  # from a build that was killed; we hold the lock
        log_path = cache / f"build-{name}.log"
        log_path.unlink(missing_ok=True)
        tarball = base_tarball_with(cache, spec.suite, mirror, spec.base_packages, log_path)
        work = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=cache / "work"))
        log.info("debian.build", image=name, packages=list(spec.packages), log=str(log_path))
        try:
            base = work / "base"
            _extract(tarball, base, log_path)
            layers = [
                LayerSpec(
                    tree_entries(base, list(snapshot_tree(base))),
                    created_by=f"debootstrap --variant=minbase {spec.suite}"
                    + "".join(f" && apt-get install {package}" for package in spec.base_packages),
                )
            ]
            if spec.packages:
                app = work / "app"
                _extract(tarball, app, log_path)
                before = snapshot_tree(app)
                install_packages(app, spec.packages, log_path)
                layers.append(
                    LayerSpec(
                        diff_entries(app, before, snapshot_tree(app)),
                        created_by="apt-get install --no-install-recommends "
                        + " ".join(spec.packages),
                    )
                )
            layers.append(_app_layer(spec.app_files))
            image = ImageSpec(
                layers=layers,
                config=ImageConfig(
                    cmd=spec.cmd,
                    env=spec.env,
                    working_dir=spec.working_dir,
                    labels=dict(spec.labels),
                ),
            )
            staged = work / "layout"
            build_image(image, staged, LAYOUT_TAG)
            layout.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, layout)
        finally:
            _remove_tree(work)
        log.info("debian.built", image=name, layout=str(layout))
        return load_built_image(layout)


def build_app_update(
    name: str, parent: BuiltImage, spec: DebianImageSpec, cache_dir: Path
) -> BuiltImage:
    """``parent`` (a `build_debian_image` result) with its top (app) layer made anew from
    ``spec``'s app files and its config from ``spec``: every lower layer is ``parent``'s,
    by digest. ``spec``'s packages are not looked at; they are ``parent``'s.
    """
    layout = cache_dir / "debian" / "layouts" / f"{name}-{spec.app_key(parent.digest)[:16]}"
    if not (layout / "index.json").exists():
        layout.parent.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=layout.parent))
        try:
            build_image_on(
                parent,
                len(parent.layers) - 1,
                [_app_layer(spec.app_files)],
                ImageConfig(
                    cmd=spec.cmd,
                    env=spec.env,
                    working_dir=spec.working_dir,
                    labels=dict(spec.labels),
                ),
                staged,
                LAYOUT_TAG,
            )
            os.replace(staged, layout)
        except OSError:
            if not (layout / "index.json").exists():
                raise
        finally:
            shutil.rmtree(staged, ignore_errors=True)  # a copy that lost the race
        log.info("debian.app_update", image=name, parent=parent.digest, layout=str(layout))
    return load_built_image(layout)
