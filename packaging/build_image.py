#!/usr/bin/env python3
"""Build the acceld agent image without Docker, and optionally push it.

Two layers, built with tools Debian ships (debootstrap, umoci, skopeo):

1. base: a Debian bookworm `minbase` root filesystem with python3, fuse3 and util-linux
   (nsenter, for the containerd set-up step), from the machine's apt mirror. It depends
   only on the package list, so it is cached in the OCI layout under a tag derived from
   that list: a rebuild after a code change skips debootstrap (~80 s here).
2. app: a virtualenv in /opt/acceld with this project's wheel and its dependencies,
   pinned to the versions in the virtualenv that runs this script (the tested ones),
   installed by the image's own python3 inside a chroot, so every shebang and compiled
   extension matches the image rather than the build host.

The image's Python is Debian's 3.11, the same minor version as the project's; wheels are
built on the host (pyfuse3 from source, against libfuse3) and installed into the image.

Usage (as root):
    .venv/bin/python packaging/build_image.py --tag dev [--layout DIR] \
        [--push REGISTRY/REPO:TAG [--plain-http]] [--skip-build]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("python3", "python3-venv", "libfuse3-3", "fuse3", "ca-certificates")
VENV = "/opt/acceld"
SETUP_SCRIPT = REPO_ROOT / "packaging" / "containerd" / "configure_containerd.py"
SETUP_COMMAND = "/usr/local/bin/acceld-configure-containerd"
IMAGE_PATH = f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Left out of the base layer: runtime-mounted or regenerated, and apt's downloads.
BASE_EXCLUDES = (
    "./dev/*",
    "./proc/*",
    "./sys/*",
    "./run/*",
    "./tmp/*",
    "./var/cache/apt/*",
    "./var/lib/apt/lists/*",
    "./var/log/*",
)


class BuildError(RuntimeError):
    """A build step failed; the message carries the command and its output."""


def run(command: Sequence[str]) -> str:
    """Run a build step and return its stdout; raise with the output on failure."""
    result = subprocess.run(
        list(command),
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise BuildError(
            f"{' '.join(command)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
        )
    return str(result.stdout)


def base_tag() -> str:
    """The layout tag of the base layer: a digest of everything that decides its content."""
    key = json.dumps([SUITE, MIRROR, "minbase", sorted(BASE_PACKAGES), BASE_EXCLUDES])
    return "base-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def layout_tags(layout: Path) -> set[str]:
    """Tags present in an OCI layout."""
    index = layout / "index.json"
    if not index.exists():
        return set()
    manifests = json.loads(index.read_text()).get("manifests") or []
    return {
        m["annotations"]["org.opencontainers.image.ref.name"]
        for m in manifests
        if "org.opencontainers.image.ref.name" in m.get("annotations", {})
    }


def build_base(layout: Path, scratch: Path) -> str:
    """Debootstrap the base root filesystem into the layout, unless it is there already."""
    tag = base_tag()
    if tag in layout_tags(layout):
        print(f"base layer cached as {layout}:{tag}", flush=True)
        return tag
    rootfs = scratch / "base-rootfs"
    print(f"debootstrap {SUITE} ({', '.join(BASE_PACKAGES)}) ...", flush=True)
    run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(BASE_PACKAGES)}",
            SUITE,
            str(rootfs),
            MIRROR,
        ]
    )
    layer = scratch / "base.tar"
    excludes = [f"--exclude={pattern}" for pattern in BASE_EXCLUDES]
    run(
        ["tar", "--numeric-owner", "--xattrs", "-C", str(rootfs), *excludes, "-cf", str(layer), "."]
    )
    run(["umoci", "new", "--image", f"{layout}:{tag}"])
    run(
        [
            "umoci",
            "raw",
            "add-layer",
            "--image",
            f"{layout}:{tag}",
            "--history.created_by",
            f"debootstrap --variant=minbase --include={','.join(BASE_PACKAGES)} {SUITE}",
            str(layer),
        ]
    )
    return tag


def build_wheelhouse(wheelhouse: Path) -> None:
    """Wheels of the project and its dependencies, at the versions of this virtualenv."""
    constraints = wheelhouse.parent / "constraints.txt"
    freeze = run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"])
    constraints.write_text(freeze)
    print("building wheels ...", flush=True)
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-build-isolation",
            "--constraint",
            str(constraints),
            "--wheel-dir",
            str(wheelhouse),
            str(REPO_ROOT),
        ]
    )


@contextlib.contextmanager
def chroot_mounts(rootfs: Path) -> Iterator[None]:
    """/dev and /proc inside the root filesystem while pip runs there; always unmounted."""
    mounted: list[Path] = []
    try:
        for name, args in (("dev", ["--bind", "/dev"]), ("proc", ["-t", "proc", "proc"])):
            target = rootfs / name
            target.mkdir(exist_ok=True)
            run(["mount", *args, str(target)])
            mounted.append(target)
        yield
    finally:
        for target in reversed(mounted):
            run(["umount", "--lazy", str(target)])


def install_app(rootfs: Path, wheelhouse: Path) -> None:
    """Create the virtualenv with the image's python and install the wheels into it."""
    staged = rootfs / "tmp" / "wheels"
    shutil.copytree(wheelhouse, staged)
    try:
        with chroot_mounts(rootfs):
            run(["chroot", str(rootfs), "python3", "-m", "venv", VENV])
            run(
                [
                    "chroot",
                    str(rootfs),
                    f"{VENV}/bin/pip",
                    "install",
                    "--quiet",
                    "--no-index",
                    "--no-cache-dir",
                    "--find-links",
                    "/tmp/wheels",
                    "acceld",
                ]
            )
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    local_bin = rootfs / "usr" / "local" / "bin"
    local_bin.mkdir(parents=True, exist_ok=True)
    for command in ("acceld", "accelctl"):
        link = local_bin / command
        link.unlink(missing_ok=True)
        link.symlink_to(f"{VENV}/bin/{command}")
    setup = rootfs / SETUP_COMMAND.lstrip("/")
    setup.write_text(f"#!{VENV}/bin/python\n" + SETUP_SCRIPT.read_text().split("\n", 1)[1])
    setup.chmod(0o755)


def build_image(layout: Path, tag: str, scratch: Path) -> None:
    """Base (cached) + app layer + runtime config, as ``layout:tag``."""
    layout.parent.mkdir(parents=True, exist_ok=True)
    if not (layout / "index.json").exists():
        run(["umoci", "init", "--layout", str(layout)])
    base = build_base(layout, scratch)
    wheelhouse = scratch / "wheels"
    build_wheelhouse(wheelhouse)
    bundle = scratch / "bundle"
    run(["umoci", "unpack", "--image", f"{layout}:{base}", str(bundle)])
    install_app(bundle / "rootfs", wheelhouse)
    print("packing the app layer ...", flush=True)
    run(
        [
            "umoci",
            "repack",
            "--mask-path",
            "/tmp",
            "--mask-path",
            "/dev",
            "--mask-path",
            "/proc",
            "--history.created_by",
            f"python3 -m venv {VENV} && pip install acceld",
            "--image",
            f"{layout}:{tag}",
            str(bundle),
        ]
    )
    run(
        [
            "umoci",
            "config",
            "--image",
            f"{layout}:{tag}",
            "--no-history",
            "--config.entrypoint",
            f"{VENV}/bin/acceld",
            "--config.cmd",
            "run",
            "--config.env",
            f"PATH={IMAGE_PATH}",
            "--config.label",
            "org.opencontainers.image.title=acceld",
            "--config.label",
            f"org.opencontainers.image.version={project_version()}",
        ]
    )
    run(["umoci", "gc", "--layout", str(layout)])


def project_version() -> str:
    """The version in pyproject.toml (the image is labelled with it)."""
    with (REPO_ROOT / "pyproject.toml").open("rb") as handle:
        return str(tomllib.load(handle)["project"]["version"])


def push(layout: Path, tag: str, destination: str, plain_http: bool) -> None:
    """Copy ``layout:tag`` to ``destination`` (registry/repo:tag) with skopeo."""
    command = ["skopeo", "copy", "--quiet", f"oci:{layout}:{tag}", f"docker://{destination}"]
    if plain_http:
        command.insert(2, "--dest-tls-verify=false")
    run(command)
    print(f"pushed {destination}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--tag", default="latest", help="tag in the OCI layout")
    parser.add_argument(
        "--layout",
        type=Path,
        default=REPO_ROOT / "build" / "image-layout",
        help="OCI layout to build into (keeps the cached base layer between builds)",
    )
    parser.add_argument("--push", metavar="REGISTRY/REPO:TAG", help="push the result here")
    parser.add_argument("--plain-http", action="store_true", help="the registry is plain HTTP")
    parser.add_argument("--skip-build", action="store_true", help="only push a tag built earlier")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="acceld-image-") as scratch:
        try:
            if not args.skip_build:
                build_image(args.layout.resolve(), args.tag, Path(scratch))
            if args.push:
                push(args.layout.resolve(), args.tag, args.push, args.plain_http)
        except BuildError as exc:
            print(f"build failed: {exc}", file=sys.stderr)
            return 1
    if not args.skip_build:
        print(f"built {args.layout}:{args.tag}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
