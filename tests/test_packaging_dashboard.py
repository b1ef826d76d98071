"""Every series the Grafana dashboard queries is one a real agent exports, of the right type.

A real `acceld run` is started and its /metrics read: every series the agent defines is
listed there with HELP and TYPE lines even before it has samples.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from rig.agent_process import AgentProcess

DASHBOARD = Path(__file__).resolve().parents[1] / "packaging" / "dashboards" / "acceld.json"
_METRIC = re.compile(r"\bacceld_[a-z0-9_]+")
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def queried_series(doc: dict[str, Any]) -> set[str]:
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in doc["templating"]["list"] if "definition" in v]
    return {name for expr in exprs for name in _METRIC.findall(expr)}


def exported_types(metrics_text: str) -> dict[str, str]:
    """Series name -> type, from the `# TYPE` lines (counters keyed as `<name>_total`)."""
    types = {}
    for line in metrics_text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            if kind == "counter" and not name.endswith("_total"):
                name += "_total"
            types[name] = kind
    return types


@pytest.fixture(scope="module")
def agent_metrics(tmp_path_factory: pytest.TempPathFactory) -> str:
    with AgentProcess(tmp_path_factory.mktemp("agent")) as agent:
        return agent.metrics()


def test_dashboard_is_well_formed() -> None:
    doc = dashboard()
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for panel in doc["panels"]:
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}"
            for target in panel["targets"]:
                assert 'instance=~"$instance"' in target["expr"], target["expr"]


def test_every_queried_series_is_exported_with_a_matching_type(agent_metrics: str) -> None:
    types = exported_types(agent_metrics)
    queried = queried_series(dashboard())
    assert len(queried) >= 15
    for name in sorted(queried):
        base = name
        for suffix in _HISTOGRAM_SUFFIXES:
            if name.endswith(suffix) and name.removesuffix(suffix) in types:
                base = name.removesuffix(suffix)
                assert types[base] == "histogram", name
        assert base in types, f"dashboard queries {name}, the agent does not export it"
        if name.endswith("_total"):
            assert types[name] == "counter", name


def test_dashboard_covers_the_headline_series(agent_metrics: str) -> None:
    queried = queried_series(dashboard())
    for name in (
        "acceld_corrupt_chunks_total",
        "acceld_fetch_in_flight",
        "acceld_cache_hits_total",
        "acceld_fallbacks_total",
        "acceld_prepare_to_first_byte_seconds_bucket",
    ):
        assert name in queried
