"""A private network namespace joined to the host by a veth pair.

Benchmarks need the registry behind a link with real bandwidth limits, and the only
kernel shaping that works on this machine (tbf) shapes an interface's egress, not
loopback traffic. A namespace gives the server its own interface to shape, on a /30 that
the host does not route anywhere else, so no traffic can leave the machine. Each
namespace carries its creator's PID in its name, so leftovers of a killed run can be
told apart from a namespace that a live run still uses.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import random
import secrets
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from common.logging import get_logger

log = get_logger(__name__)

NAME_PREFIX = "acceld-"
# Private ranges to carve /30 links from; a whole range may be taken by a VPN route.
_ADDRESS_POOLS = tuple(
    ipaddress.IPv4Network(net) for net in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
)
_TRIES_PER_POOL = 256
# Serialises choose-then-assign across processes, or two runs could pick the same /30.
_ALLOCATION_LOCK = "/run/lock/acceld-netns.lock"


class NetnsError(RuntimeError):
    """An `ip` command failed; the message carries its stderr."""


@dataclass(frozen=True)
class Netns:
    """A namespace, its veth pair and the /30 between them."""

    name: str
    host_veth: str
    ns_veth: str
    host_address: str
    ns_address: str
    prefix_len: int

    @property
    def command_prefix(self) -> list[str]:
        """Prepend to an argv to run it inside the namespace."""
        return ["ip", "netns", "exec", self.name]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def networks_in_use() -> list[ipaddress.IPv4Network]:
    """Every IPv4 prefix the host routes or owns, in any routing table."""
    used: list[ipaddress.IPv4Network] = []
    for route in json.loads(_ip("-j", "-4", "route", "show", "table", "all").stdout or "[]"):
        dst = route.get("dst", "default")
        if dst != "default":
            used.append(ipaddress.IPv4Network(dst, strict=False))
    for link in json.loads(_ip("-j", "-4", "addr", "show").stdout or "[]"):
        for info in link.get("addr_info", []):
            used.append(ipaddress.IPv4Network(f"{info['local']}/{info['prefixlen']}", strict=False))
    return used


def choose_free_subnet(used: Sequence[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
    """A random /30 from the private pools that overlaps nothing in ``used``."""
    rng = random.SystemRandom()
    for pool in _ADDRESS_POOLS:
        if any(net.supernet_of(pool) for net in used if net.version == 4):
            continue
        blocks = pool.num_addresses // 4
        for _ in range(_TRIES_PER_POOL):
            base = int(pool.network_address) + 4 * rng.randrange(blocks)
            candidate = ipaddress.IPv4Network((base, 30))
            if not any(candidate.overlaps(net) for net in used):
                return candidate
    raise NetnsError("no free private /30 found for a veth link")


@contextmanager
def _allocation_lock() -> Iterator[None]:
    os.makedirs(os.path.dirname(_ALLOCATION_LOCK), exist_ok=True)
    with open(_ALLOCATION_LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def create_netns() -> Netns:
    """Create a namespace joined to the host by an up veth pair; undo all on failure."""
    token = secrets.token_hex(4)
    # Interface names are capped at 15 characters, namespace names are not.
    name = f"{NAME_PREFIX}{os.getpid()}-{token}"
    host_veth, ns_veth = f"acd{token}h", f"acd{token}n"
    _ip("netns", "add", name)
    try:
        with _allocation_lock():
            subnet = choose_free_subnet(networks_in_use())
            host_ip, ns_ip = (str(subnet.network_address + i) for i in (1, 2))
            netns = Netns(name, host_veth, ns_veth, host_ip, ns_ip, subnet.prefixlen)
            _ip("link", "add", host_veth, "type", "veth", "peer", "name", ns_veth, "netns", name)
            _ip("addr", "add", f"{host_ip}/{subnet.prefixlen}", "dev", host_veth)
        _ip("link", "set", host_veth, "up")
        _ip("-n", name, "addr", "add", f"{ns_ip}/{subnet.prefixlen}", "dev", ns_veth)
        _ip("-n", name, "link", "set", ns_veth, "up")
        _ip("-n", name, "link", "set", "lo", "up")
    except BaseException:
        _delete(name, host_veth)
        raise
    log.info("netns.created", netns=name, host=host_ip, ns=ns_ip, veth=host_veth)
    return netns


def _delete(name: str, host_veth: str) -> None:
    # Deleting the host end removes the pair at once; the kernel frees a deleted
    # namespace's interfaces asynchronously, so relying on that alone leaves the veth
    # visible for a moment after teardown.
    _ip("link", "del", host_veth, check=False)
    _ip("netns", "del", name, check=False)


def delete_netns(netns: Netns) -> None:
    """Remove the namespace and its veth pair; safe to call twice or after a partial create."""
    _delete(netns.name, netns.host_veth)
    log.info("netns.deleted", netns=netns.name)


def run_in(
    netns: Netns, argv: Sequence[str], check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` inside the namespace and capture its output."""
    return subprocess.run(
        [*netns.command_prefix, *argv], capture_output=True, text=True, check=check
    )


def list_namespaces() -> list[str]:
    """Names of all named network namespaces on the host."""
    namespaces = json.loads(_ip("-j", "netns", "list").stdout or "[]")
    return [entry["name"] for entry in namespaces]


def remove_orphaned_namespaces() -> list[str]:
    """Delete acceld namespaces whose creating process is gone (a killed earlier run)."""
    removed = []
    for name in list_namespaces():
        if not name.startswith(NAME_PREFIX):
            continue
        pid_text, _, token = name.removeprefix(NAME_PREFIX).partition("-")
        if not pid_text.isdigit():
            continue
        if os.path.exists(f"/proc/{pid_text}"):
            continue
        _delete(name, f"acd{token}h")
        removed.append(name)
    if removed:
        log.warning("netns.orphans_removed", namespaces=removed)
    return removed
