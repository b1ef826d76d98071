"""bench.scaleup end to end: real link, registry, containerd and agent.

The benchmark is only worth running if its verdicts can be trusted both ways: a quick
run on a healthy node must report every container ready with the right bytes, and a
node that really hangs must be reported as hung, with the evidence, and be left able
to run the next trial. The second test makes a real hang by freezing the agent
(SIGSTOP) under two starting containers, so FUSE and snapshotter calls block in the
kernel exactly as they would on a deadlocked agent.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from bench import scaleup
from bench.scaleup import ScaleOptions, checkable, published_plan, run_trial
from rig.containerd import ContainerdServer

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(170)
def test_quick_scaleup_starts_every_container_with_the_right_bytes(tmp_path: Path) -> None:
    results = tmp_path / "results"
    # containerd's sockets live under the work dir: keep its path short.
    with tempfile.TemporaryDirectory(prefix="acceld-su-") as workdir:
        command = [
            sys.executable, "-m", "bench.scaleup", "--quick",
            "--cache-dir", str(tmp_path / "cache"), "--workdir", workdir,
            "--results-dir", str(results),
        ]  # fmt: skip
        proc = subprocess.run(
            command, cwd=REPO, capture_output=True, text=True, timeout=160, check=False
        )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    assert "| lazy-index | 2 |" in proc.stdout
    assert "0 hung and 0 wrong-byte container(s) over 6 trial(s)" in proc.stdout

    (path,) = results.glob("scaleup-*.json")
    assert path.with_suffix(".md").exists() and path.with_suffix(".png").exists()
    document = json.loads(path.read_text())
    assert document["git"]["commit"]
    images = {image["name"]: image for image in document["images"]}
    assert set(images) == {"checkable-1", "checkable-2"}
    for image in images.values():
        # the four data files the start reads, plus files of the busybox layers
        assert sum(p.startswith("/data/") for p in image["checked_files"]) == 4, image
    trials = document["trials"]
    assert sorted((t["mode"], t["n"]) for t in trials) == sorted(
        (mode, n) for mode in scaleup.MODES for n in (1, 2)
    )
    for trial in trials:
        containers = trial["containers"]
        assert [c["image"] for c in containers] == ["checkable-1", "checkable-2"][: trial["n"]]
        assert all(c["outcome"] == "ready" and c["check"] == "correct" for c in containers), trial
        assert all(c["files_checked"] >= 5 for c in containers), trial
        assert all(0 < c["pull_seconds"] <= c["ready_seconds"] for c in containers), trial
        assert trial["all_ready_seconds"] == max(c["ready_seconds"] for c in containers)
        assert trial["hangs"] == trial["wrong_bytes"] == trial["failures"] == 0
        assert trial["diagnostics"] is None
        assert trial["link_bytes"] > 0
        if trial["mode"] == "overlayfs":
            assert trial["agent_cpu_seconds"] is None
            assert trial["link_bytes"] >= images["checkable-1"]["compressed_bytes"]
        else:
            assert trial["fallback_layers"] == 0 and trial["lazy_layers"] >= 3, trial
            assert trial["agent_fetched_bytes"] > 0
            assert trial["agent_cpu_seconds"] > 0
            assert 0 < trial["agent_peak_rss_bytes"] < 2**30
    rows = {(row["mode"], row["n"]): row for row in document["rows"]}
    assert len(rows) == 6
    assert all(row["complete"] == row["trials"] == 1 for row in rows.values())
    assert rows[("overlayfs", 2)]["speedup"] == 1.0


def _agent_pid(server: ContainerdServer) -> int:
    """The agent serving ``server`` (its command line names the snapshotter socket)."""
    wanted = str(server.acceld_socket).encode()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"agent.main" in argv and wanted in argv:
                return int(proc.name)
    raise LookupError(f"no agent listening on {wanted!r}")


@pytest.mark.timeout(170)
def test_a_frozen_agent_is_a_hang_diagnosed_and_cleaned_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    frozen: list[int] = []
    run_command = scaleup.ctr_run_command

    def freeze(pid: int) -> None:
        os.kill(pid, signal.SIGSTOP)
        frozen.append(pid)

    def freeze_soon(server: ContainerdServer, *args: str) -> list[str]:
        # The image sleeps 3 s before reading its data: freeze the agent meanwhile.
        threading.Timer(1.5, freeze, (_agent_pid(server),)).start()
        return run_command(server, *args)

    with tempfile.TemporaryDirectory(prefix="acceld-sh-") as workdir:
        options = ScaleOptions(
            images=("unused",),
            ns=(2,),
            modes=("lazy-index",),
            repeat=1,
            deadline=15.0,
            background_fill=False,
            cache_dir=tmp_path / "cache",
            workdir=Path(workdir),
        )
        image = checkable(1, options.cache_dir, pause_s=3)
        with published_plan(options, [image]) as plan:
            monkeypatch.setattr(scaleup, "ctr_run_command", freeze_soon)
            hung = run_trial(plan, "lazy-index", 2, 1)
            monkeypatch.setattr(scaleup, "ctr_run_command", run_command)
            healthy = run_trial(plan, "lazy-index", 2, 2)

    assert frozen, "the agent was never frozen"
    assert hung.hangs == 2 and hung.all_ready_seconds is None
    assert all(c.outcome == "hang" and c.check is None for c in hung.containers)
    diagnostics = hung.diagnostics
    assert diagnostics is not None
    assert diagnostics["agent_healthz"] == "(no answer within 2 s)"
    assert {t["state"] for t in diagnostics["agent_threads"]} <= {"T", "t"}, diagnostics
    # The container's processes, stuck on the frozen FUSE server (reading, or paging in
    # a program: depends on how far the start got when the agent froze).
    stuck = [t for t in diagnostics["blocked_threads"] if t["comm"] in ("sh", "sleep", "md5sum")]
    assert stuck, diagnostics["blocked_threads"]
    assert diagnostics["fuse_waiting_requests"] >= 1
    assert Path(diagnostics["agent_log"]).name == "acceld.log"

    # The node was unwedged and torn down: the next trial on this machine runs.
    assert healthy.hangs == healthy.failures == healthy.wrong_bytes == 0, healthy
    assert all(c.outcome == "ready" and c.check == "correct" for c in healthy.containers)
