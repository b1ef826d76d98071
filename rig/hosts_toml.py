"""containerd hosts.toml files for tests: one per registry namespace in a hosts dir.

The agent and the test's containerd read the same directory, as on a node, so a test
writes a registry's hosts (mirrors, CA, client certificates) in one place for both.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w

from rig.registry import RegistryServer


def write_hosts_toml(hosts_dir: Path, namespace: str, document: Mapping[str, Any]) -> Path:
    """Write ``document`` as ``<hosts_dir>/<namespace>/hosts.toml``; its path."""
    directory = hosts_dir / namespace
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "hosts.toml"
    path.write_text(tomli_w.dumps(dict(document)))
    return path


def write_https_hosts(
    hosts_dir: Path, registry: RegistryServer, *, ca: bool = True, client: bool = True
) -> Path:
    """The hosts.toml of a registry on HTTPS: itself, with the CA (and its client pair
    when it requires one), as both ``server`` and a ``[host]`` table (containerd before
    1.7.32 refuses a file without the latter)."""
    assert registry.tls is not None
    settings: dict[str, Any] = {}
    if ca:
        settings["ca"] = str(registry.tls.ca)
    if client and registry.tls.client is not None:
        settings["client"] = [[str(registry.tls.client.cert), str(registry.tls.client.key)]]
    document = {"server": registry.url, **settings, "host": {registry.url: settings}}
    return write_hosts_toml(hosts_dir, registry.host, document)
