"""formats/ is the formats and nothing else (docs: STYLE.md, "one reason to change per
directory"): what a layer's bytes mean must not depend on how they were fetched, so no
module under formats/ imports the network side or the agent."""

from __future__ import annotations

import ast
from pathlib import Path

FORMATS = Path(__file__).resolve().parent.parent / "formats"
_OUTSIDE = ("fetcher", "agent", "converter", "profiles", "accelctl", "rig")


def _imported(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_formats_import_nothing_from_the_network_side_or_the_agent() -> None:
    found = {
        f"{path.name}: {name}"
        for path in sorted(FORMATS.glob("*.py"))
        for name in _imported(path)
        if name.split(".")[0] in _OUTSIDE
    }
    assert not found
