"""`accelctl profile record`: one traced start on a real containerd, learned and shared.

The layer lookup is checked on real directories (whiteouts and opaque directories as
overlayfs stores them); the command runs an app whose reads are known, through a real
containerd with its own overlayfs snapshotter, and must name exactly those files."""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from accelctl.main import cli
from fetcher.registry import RegistryClient
from formats.overlay import providing_layer
from formats.plan_path import root_name
from profiles.plan import prefetch_plan
from profiles.registry_sync import fetch_profile
from rig.images import build_image, push_image
from tests.test_profiles_e2e import app_image_spec
from tracer.containerd_start import LayerDirectory, RecordError, layer_dirs


def test_layer_dirs_from_ctr_mount_commands() -> None:
    overlay = "mount -t overlay overlay /mnt -o index=off,ro,lowerdir=/s/3/fs:/s/2/fs:/s/1/fs"
    assert layer_dirs(overlay) == [Path("/s/3/fs"), Path("/s/2/fs"), Path("/s/1/fs")]
    assert layer_dirs("mount -t bind /s/1/fs /mnt -o ro,rbind") == [Path("/s/1/fs")]
    for bad in ("", "umount /mnt", "mount -t tmpfs tmpfs /mnt -o size=1m"):
        with pytest.raises(RecordError):
            layer_dirs(bad)


def _topmost(path: str, dirs: list[Path]) -> int | None:
    """The recorder's attribution: which layer directory (topmost first) shows ``path``."""
    name = root_name(path)
    return None if name is None else providing_layer(name, [LayerDirectory(d) for d in dirs])


def test_layer_directories_follow_overlay_rules(tmp_path: Path) -> None:
    top, middle, bottom = (tmp_path / n for n in ("top", "middle", "bottom"))
    for layer in (top, middle, bottom):
        (layer / "etc").mkdir(parents=True)
    (bottom / "etc" / "base.conf").write_text("b")
    (bottom / "etc" / "gone.conf").write_text("b")
    (middle / "etc" / "base.conf").write_text("m")  # shadows bottom
    os.mknod(top / "etc" / "gone.conf", 0o600 | 0o020000, os.makedev(0, 0))  # whiteout
    (bottom / "opt" / "old").mkdir(parents=True)
    (bottom / "opt" / "old" / "lib.so").write_text("b")
    (middle / "opt").mkdir()
    os.setxattr(middle / "opt", "trusted.overlay.opaque", b"y")
    (middle / "opt" / "new.so").write_text("m")
    dirs = [top, middle, bottom]
    assert _topmost("/etc/base.conf", dirs) == 1
    assert _topmost("/etc/gone.conf", dirs) is None
    assert _topmost("/opt/new.so", dirs) == 1
    assert _topmost("/opt/old/lib.so", dirs) is None  # hidden by the opaque dir
    assert _topmost("/etc", dirs) == 0
    assert _topmost("/missing", dirs) is None
    assert _topmost("/", dirs) is None


async def test_record_names_what_the_app_read_and_shares_it(registry, containerd, tmp_path):
    built = build_image(app_image_spec(), tmp_path / "layout", "v1")
    reference = f"{registry.host}/rig/recorded-{uuid.uuid4().hex[:8]}:v1"
    async with RegistryClient() as client:
        await push_image(client, reference, built)
    runner = CliRunner(env={"COLUMNS": "250"})
    args = ["profile", "record", reference, "--address", str(containerd.address)]
    result = await asyncio.to_thread(
        runner.invoke,
        cli,
        [*args, "--snapshotter", "overlayfs", "--quiet", "1", "-o", str(tmp_path / "run.msgpack")],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert "started" in result.output
    assert "/app/a.bin" in result.output and "/app/unused.bin" not in result.output
    assert (tmp_path / "run.msgpack").stat().st_size > 0
    async with RegistryClient() as client:
        profile = await fetch_profile(client, reference, built.digest)
    assert profile is not None
    planned = {entry.path: entry for entry in prefetch_plan(profile)}
    assert {"/app/a.bin", "/app/b.bin", "/bin/busybox"} <= set(planned), sorted(planned)
    assert "/app/unused.bin" not in planned
    app_layer = built.layers[-1].digest
    assert planned["/app/a.bin"].layer == app_layer
    assert planned["/bin/busybox"].layer == built.layers[0].digest

    failing = await asyncio.to_thread(
        runner.invoke,
        cli,
        [
            *args,
            "--snapshotter",
            "overlayfs",
            "--quiet",
            "1",
            "sh",
            "-c",
            "cat /app/a.bin >/dev/null; exit 4",
        ],
        catch_exceptions=False,
    )
    assert failing.exit_code != 0
    assert "crashed (exit code 4): nothing learned" in failing.output
