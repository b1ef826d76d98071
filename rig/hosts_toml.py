"""containerd hosts.toml files for tests: one per registry namespace in a hosts dir.

The agent and the test's containerd read the same directory, as on a node, so a test
writes a registry's hosts (mirrors, CA, client certificates) in one place for both.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w


def write_hosts_toml(hosts_dir: Path, namespace: str, document: Mapping[str, Any]) -> Path:
    """Write ``document`` as ``<hosts_dir>/<namespace>/hosts.toml``; its path."""
    directory = hosts_dir / namespace
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "hosts.toml"
    path.write_text(tomli_w.dumps(dict(document)))
    return path
