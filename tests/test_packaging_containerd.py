"""The containerd set-up step on real containerd TOML files, checked by containerd itself.

Inputs are what `containerd config default` prints (the file a node typically has) plus
hand-written edge cases; every result is loaded by `containerd config dump`, which
parses it with containerd's own decoder and prints the effective configuration.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = (
    Path(__file__).resolve().parents[1] / "packaging" / "containerd" / "configure_containerd.py"
)
SOCKET = "/run/acceld/snapshotter.sock"
CRI = "io.containerd.grpc.v1.cri"


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("configure_containerd", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


setup = _load_script()


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, check=False
    )


def containerd_view(config: Path) -> dict[str, Any]:
    """The effective configuration as containerd 1.6 reads the file."""
    dump = subprocess.run(
        ["containerd", "--config", str(config), "config", "dump"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert dump.returncode == 0, dump.stderr
    return tomllib.loads(dump.stdout)


@pytest.fixture
def default_config(tmp_path: Path) -> Path:
    """What `containerd config default` writes, as on a freshly installed node."""
    text = subprocess.run(
        ["containerd", "config", "default"], capture_output=True, text=True, check=True
    ).stdout
    config = tmp_path / "etc" / "containerd" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(text)
    return config


def assert_acceld_configured(config: Path) -> None:
    view = containerd_view(config)
    assert view["proxy_plugins"]["acceld"] == {"type": "snapshot", "address": SOCKET}
    cri = view["plugins"][CRI]["containerd"]
    assert cri["snapshotter"] == "acceld"
    assert cri["disable_snapshot_annotations"] is False


def test_default_config_is_edited_and_backed_up(default_config: Path) -> None:
    original = default_config.read_text()
    before = containerd_view(default_config)
    assert before["plugins"][CRI]["containerd"]["snapshotter"] == "overlayfs"

    result = run_script("--config", str(default_config), "--restart-command", "")

    assert result.returncode == 0, result.stderr
    assert_acceld_configured(default_config)
    backup = default_config.with_name("config.toml.before-acceld")
    assert backup.read_text() == original
    after = containerd_view(default_config)
    # Everything else the node had is still there, e.g. its runtimes and sandbox image.
    assert after["plugins"][CRI]["sandbox_image"] == before["plugins"][CRI]["sandbox_image"]
    assert (
        after["plugins"][CRI]["containerd"]["runtimes"]
        == before["plugins"][CRI]["containerd"]["runtimes"]
    )


def test_second_run_changes_nothing_and_does_not_restart(
    default_config: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "restarted"
    restart = f"touch {marker}"
    first = run_script("--config", str(default_config), "--restart-command", restart)
    assert first.returncode == 0, first.stderr
    assert marker.exists()
    marker.unlink()
    configured = default_config.read_bytes()
    backup = default_config.with_name("config.toml.before-acceld").read_bytes()

    second = run_script("--config", str(default_config), "--restart-command", restart)

    assert second.returncode == 0, second.stderr
    assert "already configured" in second.stdout
    assert default_config.read_bytes() == configured
    assert default_config.with_name("config.toml.before-acceld").read_bytes() == backup
    assert not marker.exists()


def test_dry_run_shows_the_diff_and_writes_nothing(default_config: Path, tmp_path: Path) -> None:
    original = default_config.read_bytes()
    marker = tmp_path / "restarted"

    result = run_script(
        "--config", str(default_config), "--dry-run", "--restart-command", f"touch {marker}"
    )

    assert result.returncode == 0, result.stderr
    assert default_config.read_bytes() == original
    assert not default_config.with_name("config.toml.before-acceld").exists()
    assert not marker.exists()
    lines = result.stdout.splitlines()
    assert any(line.startswith("+") and 'snapshotter = "acceld"' in line for line in lines)
    assert any(line.startswith("-") and 'snapshotter = "overlayfs"' in line for line in lines)
    assert f"would run: touch {marker}" in result.stdout


def test_restore_brings_back_the_original(default_config: Path) -> None:
    original = default_config.read_text()
    assert run_script("--config", str(default_config), "--restart-command", "").returncode == 0

    result = run_script("--config", str(default_config), "--restore", "--restart-command", "")

    assert result.returncode == 0, result.stderr
    assert default_config.read_text() == original
    assert not default_config.with_name("config.toml.before-acceld").exists()


def test_partial_and_conflicting_settings_are_completed(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        "version = 2\n"
        "# an operator's comment\n"
        "[proxy_plugins.acceld]\n"
        '  type = "snapshot"\n'
        '  address = "/old/place.sock"\n'
        '[plugins."io.containerd.grpc.v1.cri".containerd]\n'
        '  snapshotter = "acceld"\n'
        '[plugins."io.containerd.grpc.v1.cri".registry]\n'
        '  config_path = "/etc/containerd/certs.d"\n'
    )

    assert run_script("--config", str(config), "--restart-command", "").returncode == 0

    assert_acceld_configured(config)
    view = containerd_view(config)
    assert view["plugins"][CRI]["registry"]["config_path"] == "/etc/containerd/certs.d"


def test_missing_config_is_created(tmp_path: Path) -> None:
    config = tmp_path / "etc" / "containerd" / "config.toml"

    result = run_script("--config", str(config), "--restart-command", "")

    assert result.returncode == 0, result.stderr
    assert_acceld_configured(config)
    assert not config.with_name("config.toml.before-acceld").exists()


def test_containerd_2_layout_uses_the_images_plugin() -> None:
    doc: dict[str, Any] = {
        "version": 3,
        "plugins": {"io.containerd.cri.v1.images": {"snapshotter": "overlayfs"}},
    }

    result = setup.configured(doc, SOCKET)

    images = result["plugins"]["io.containerd.cri.v1.images"]
    assert images == {"snapshotter": "acceld", "disable_snapshot_annotations": False}
    assert doc["plugins"]["io.containerd.cri.v1.images"]["snapshotter"] == "overlayfs"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[plugins.cri]\nsandbox_image = "pause"\n', "version 1 is not supported"),
        ("version = 2\n[plugins\n", "not valid TOML"),
        ('version = 2\nplugins = "oops"\n', "is not a table"),
    ],
)
def test_unusable_configs_are_refused_untouched(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text(text)

    result = run_script("--config", str(config), "--restart-command", "")

    assert result.returncode == 1
    assert message in result.stderr
    assert config.read_text() == text
    assert not config.with_name("config.toml.before-acceld").exists()
