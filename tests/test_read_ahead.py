"""The FUSE mount's read-ahead is the configured one: what the kernel asks of the agent
per read depends on it (a window per fault of a mapped file), and 0 is how the
benchmark learns the bytes a start reads exactly."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import AgentConfig, ConfigError
from agent.fs.mount import mount_device
from rig.agent_process import AgentProcess


def _read_ahead_kib(mountpoint: Path) -> int:
    device = mount_device(mountpoint)
    assert device is not None, f"nothing mounted at {mountpoint}"
    return int(Path(f"/sys/class/bdi/{device}/read_ahead_kb").read_text())


@pytest.mark.parametrize(("settings", "expected"), [({}, 1024), ({"read_ahead_kib": 0}, 0)])
def test_the_mount_reads_ahead_as_configured(
    tmp_path: Path, settings: dict[str, int], expected: int
) -> None:
    with AgentProcess(tmp_path / "agent", settings=settings) as agent:
        assert _read_ahead_kib(agent.mountpoint) == expected


def test_a_read_ahead_out_of_range_is_refused() -> None:
    with pytest.raises(ConfigError, match="read_ahead_kib"):
        AgentConfig.from_dict({"read_ahead_kib": -1})
