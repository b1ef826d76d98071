"""The agent image built by packaging/build_image.py runs under the real containerd.

The build is slow, so it happens once per test session, into an OCI layout that
survives between sessions (``$ACCELD_IMAGE_LAYOUT``, default
``~/.cache/acceld/image-layout``). The Debian base layer there is reused whenever its
package list is unchanged (cold build ~3.5 min here, mostly debootstrap); the app layer,
which carries this checkout's code, is rebuilt every session (~1.5 min). The image is
then pushed by the script (skopeo) to the rig's registry, pulled by containerd and run with runc.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rig.containerd import ContainerdServer
from rig.registry import RegistryServer

REPO = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = REPO / "packaging" / "build_image.py"
TAG = "session"


def _layout() -> Path:
    default = Path.home() / ".cache" / "acceld" / "image-layout"
    return Path(os.environ.get("ACCELD_IMAGE_LAYOUT", default))


@pytest.fixture(scope="session")
def agent_image_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the image once per session; the build log is kept for a failure report."""
    layout = _layout()
    log_path = tmp_path_factory.mktemp("image-build") / "build.log"
    with log_path.open("w") as log:
        result = subprocess.run(
            [sys.executable, str(BUILD_SCRIPT), "--tag", TAG, "--layout", str(layout)],
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=1200,
            check=False,
        )
    assert result.returncode == 0, f"image build failed, log: {log_path}\n{log_path.read_text()}"
    return layout


@pytest.mark.containerd
def test_built_agent_image_runs_acceld_under_containerd(
    agent_image_layout: Path, registry: RegistryServer, containerd: ContainerdServer
) -> None:
    image = f"{registry.host}/acceld/acceld:{TAG}"
    pushed = subprocess.run(
        [
            sys.executable,
            str(BUILD_SCRIPT),
            "--skip-build",
            "--tag",
            TAG,
            "--layout",
            str(agent_image_layout),
            "--push",
            image,
            "--plain-http",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert pushed.returncode == 0, pushed.stderr
    containerd.ctr("images", "pull", "--plain-http", image, timeout=300)

    version = containerd.run_container(image, "acceld-version", "acceld", "--version")
    setup = containerd.run_container(
        image,
        "acceld-setup-dry-run",
        "acceld-configure-containerd",
        "--config",
        "/tmp/config.toml",
        "--dry-run",
    )
    webhook = containerd.run_container(image, "accelctl-webhook-help", "accelctl", "--help")

    assert version.stdout.strip() == "acceld, version 0.1.0"
    assert 'snapshotter = "acceld"' in setup.stdout
    assert "would run: nsenter --target 1" in setup.stdout
    assert "convert" in webhook.stdout
