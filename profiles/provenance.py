"""Where a profile's runs came from: a node's starts or a start at conversion.

A profile recorded by the converter (`converter.record_at_conversion`) is pushed and
merged like any node's, so its origin has to survive compaction: it is carried in the
profile's own run statistics, as the name of the "node" that ran it, not in an
artifact annotation that a merge would drop.
"""

from __future__ import annotations

from profiles.format import MAX_NODE_NAME, Profile

CONVERSION_NODE_PREFIX = "conversion/"
"""Node names of runs made by the converter's sandbox start, followed by its host name."""


def conversion_node(host: str) -> str:
    """The node name a start recorded at conversion on ``host`` is counted under."""
    return (CONVERSION_NODE_PREFIX + (host or "converter"))[:MAX_NODE_NAME]


def conversion_runs(profile: Profile) -> int:
    """How many of the profile's runs were recorded at conversion."""
    return sum(n for node, n in profile.runs.nodes if node.startswith(CONVERSION_NODE_PREFIX))
