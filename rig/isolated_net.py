"""Run a function in a throwaway network and mount namespace whose addresses and
names the caller chooses.

Some behaviour depends on the kind of address a peer has (`fetcher.delegation` treats
public and private addresses differently) and on what a name resolves to. Testing it
needs servers on public addresses and names that resolve where the test says, without
touching the host: a fresh network namespace has nothing but its own loopback
interface, so any address put on it is reachable from inside and from nowhere else, and
a fresh mount namespace lets /etc/hosts and /etc/resolv.conf be replaced for the
processes inside only. Both namespaces end with the process that runs in them.

The function runs in a child process (``python -m rig.isolated_net``) and hands back a
JSON value; servers, clients and name servers it needs are started inside it.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import os
import subprocess
import sys
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[1]
_NAMESPACES = ("net", "mnt")


def _namespace_ids() -> dict[str, str]:
    return {kind: os.readlink(f"/proc/self/ns/{kind}") for kind in _NAMESPACES}


def run_isolated(
    target: str,
    workdir: Path,
    *,
    addresses: Sequence[str] = (),
    hosts: Mapping[str, str] | None = None,
    nameserver: str = "127.0.0.1",
    timeout: float = 120.0,
) -> Any:
    """Run ``target`` (``module:function``, a coroutine function is awaited) in fresh
    namespaces and return its JSON result.

    Inside, loopback is up and also carries ``addresses``; /etc/hosts maps localhost
    and each name of ``hosts`` to its address; /etc/resolv.conf names only
    ``nameserver`` (a name server the function starts itself, or none: unknown names
    then fail at once). ``workdir`` keeps those files and the result.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    hosts_file = workdir / "hosts"
    lines = ["127.0.0.1 localhost", "::1 localhost"]
    lines += [f"{address} {name}" for name, address in (hosts or {}).items()]
    hosts_file.write_text("\n".join(lines) + "\n")
    resolv_file = workdir / "resolv.conf"
    resolv_file.write_text(f"nameserver {nameserver}\noptions timeout:1 attempts:1\n")
    result = workdir / "result.json"
    result.unlink(missing_ok=True)
    spec = {
        "target": target,
        "addresses": list(addresses),
        "hosts": str(hosts_file),
        "resolv": str(resolv_file),
        "result": str(result),
        "outside": _namespace_ids(),
    }
    proc = subprocess.run(
        ["unshare", "--net", "--mount", sys.executable, "-m", "rig.isolated_net", json.dumps(spec)],
        cwd=_REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0 or not result.exists():
        raise RuntimeError(
            f"{target} failed in its namespace (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    return json.loads(result.read_text())


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _enter(spec: dict[str, Any]) -> None:
    """Set the namespaces up; refuses to touch anything outside fresh ones."""
    inside = _namespace_ids()
    for kind in _NAMESPACES:
        if inside[kind] == spec["outside"][kind]:
            raise RuntimeError(f"not in a fresh {kind} namespace; nothing changed")
    _ip("link", "set", "lo", "up")
    for address in spec["addresses"]:
        _ip("addr", "add", f"{address}/{128 if ':' in address else 32}", "dev", "lo")
    for source, target in ((spec["hosts"], "/etc/hosts"), (spec["resolv"], "/etc/resolv.conf")):
        subprocess.run(["mount", "--bind", source, target], check=True, capture_output=True)


def _main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    _enter(spec)
    module_name, _, function_name = spec["target"].partition(":")
    function = getattr(importlib.import_module(module_name), function_name)
    try:
        value = asyncio.run(function()) if inspect.iscoroutinefunction(function) else function()
    except BaseException:
        traceback.print_exc()
        return 1
    Path(spec["result"]).write_text(json.dumps(value))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
