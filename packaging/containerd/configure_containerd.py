#!/usr/bin/env python3
"""Point a node's containerd at the acceld snapshotter, safely and at most once.

Run by the DaemonSet's init container (host /etc/containerd mounted in, hostPID for the
restart) or by hand on a node without Kubernetes. What it changes in config.toml:

- `proxy_plugins.acceld`: type "snapshot", address = the agent's socket;
- the CRI plugin's snapshotter = "acceld" and `disable_snapshot_annotations = false`,
  without which the CRI plugin never passes the image labels lazy pulling needs
  (`plugins."io.containerd.grpc.v1.cri".containerd` in config version 2, containerd
  1.x; `plugins."io.containerd.cri.v1.images"` in version 3, containerd 2.x).

containerd's `imports` cannot carry this: an imported file replaces a plugin's whole
section, which would drop the node's own CRI settings, so the main file is edited.
Safety: nothing is written when the settings are already there (idempotent, no restart);
the original file is copied once to `<config>.before-acceld` (never overwritten, so
`--restore` always brings back the pre-acceld file); the new file replaces the old one
atomically with the same mode. Comments in the file are not kept (TOML round trip); the
backup keeps them. A version 1 config (pre-1.3 layout) is refused, not guessed at.
`--dry-run` prints the diff and the restart command and changes nothing.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tomli_w

SNAPSHOTTER = "acceld"
DEFAULT_CONFIG = Path("/etc/containerd/config.toml")
DEFAULT_SOCKET = "/run/acceld/snapshotter.sock"
BACKUP_SUFFIX = ".before-acceld"
DEFAULT_RESTART = (
    "nsenter --target 1 --mount --uts --ipc --net --pid -- systemctl restart containerd"
)
CRI_SECTIONS = {
    2: ("plugins", "io.containerd.grpc.v1.cri", "containerd"),
    3: ("plugins", "io.containerd.cri.v1.images"),
}


class ConfigError(ValueError):
    """The existing configuration cannot be edited safely."""


def _section(doc: dict[str, Any], path: Sequence[str]) -> dict[str, Any]:
    node = doc
    for key in path:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path)}: {key} is not a table")
        node = child
    return node


def configured(doc: dict[str, Any], socket: str) -> dict[str, Any]:
    """``doc`` with the acceld settings applied (a new document; ``doc`` is untouched)."""
    version = doc.get("version", 1)
    if version not in CRI_SECTIONS:
        raise ConfigError(
            f"containerd config version {version} is not supported; use version 2 "
            "(containerd 1.x) or 3 (containerd 2.x)"
        )
    result = copy.deepcopy(doc)
    result["version"] = version
    proxies = _section(result, ("proxy_plugins",))
    proxies[SNAPSHOTTER] = {**proxies.get(SNAPSHOTTER, {}), "type": "snapshot", "address": socket}
    cri = _section(result, CRI_SECTIONS[version])
    cri["snapshotter"] = SNAPSHOTTER
    cri["disable_snapshot_annotations"] = False
    return result


def plan(current: str | None, socket: str) -> str | None:
    """The new file text, or None when ``current`` already has every setting."""
    if current is None:
        doc: dict[str, Any] = {"version": 2}
    else:
        try:
            doc = tomllib.loads(current)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"not valid TOML: {exc}") from None
    wanted = configured(doc, socket)
    if current is not None and wanted == doc:
        return None
    return tomli_w.dumps(wanted)


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` in one rename, keeping its mode."""
    mode = path.stat().st_mode & 0o7777 if path.exists() else 0o644
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def apply(config: Path, socket: str, dry_run: bool) -> bool:
    """Edit ``config`` if needed; True when it changed (or would change, in a dry run)."""
    current = config.read_text() if config.exists() else None
    new = plan(current, socket)
    if new is None:
        print(f"{config}: acceld already configured, nothing to do")
        return False
    diff = difflib.unified_diff(
        (current or "").splitlines(keepends=True),
        new.splitlines(keepends=True),
        fromfile=str(config),
        tofile=f"{config} (acceld)",
    )
    sys.stdout.writelines(diff)
    if dry_run:
        print(f"dry run: {config} not written")
        return True
    backup = config.with_name(config.name + BACKUP_SUFFIX)
    if current is not None and not backup.exists():
        shutil.copy2(config, backup)
        print(f"original kept as {backup}")
    write_atomically(config, new)
    print(f"{config}: acceld configured")
    return True


def restore(config: Path, dry_run: bool) -> bool:
    """Put the pre-acceld file back (uninstall); True when something was restored."""
    backup = config.with_name(config.name + BACKUP_SUFFIX)
    if not backup.exists():
        print(f"{backup} does not exist, nothing to restore")
        return False
    if dry_run:
        print(f"dry run: would restore {config} from {backup}")
        return True
    write_atomically(config, backup.read_text())
    backup.unlink()
    print(f"{config} restored from {backup}")
    return True


def restart(command: str, dry_run: bool) -> None:
    """Restart containerd so it reads the new file (running containers keep running)."""
    if dry_run:
        print(f"dry run: would run: {command}")
        return
    print(f"restarting containerd: {command}", flush=True)
    subprocess.run(shlex.split(command), check=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; exit 1 with a message when the config cannot be edited."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--socket", default=DEFAULT_SOCKET, help="the agent's snapshotter socket")
    parser.add_argument("--dry-run", action="store_true", help="show the change, write nothing")
    parser.add_argument("--restore", action="store_true", help="undo: put the original back")
    parser.add_argument(
        "--restart-command",
        default=DEFAULT_RESTART,
        help="run after a change ('' to skip); the default reaches the host's systemd",
    )
    args = parser.parse_args(argv)
    try:
        if args.restore:
            changed = restore(args.config, args.dry_run)
        else:
            changed = apply(args.config, args.socket, args.dry_run)
    except (ConfigError, OSError) as exc:
        print(f"{args.config}: {exc}", file=sys.stderr)
        return 1
    if changed and args.restart_command:
        restart(args.restart_command, args.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
