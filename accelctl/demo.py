"""`accelctl demo`: the whole product on an embedded default, on one machine.

Starts a local registry, builds and pushes a demo image (busybox plus a large data
layer its start never reads), shows what the registry client finds, converts the image
in both accelerated forms, then starts the app twice, through containerd's CRI as the
kubelet would: once after a normal full pull (overlayfs) and once lazily through a
freshly started acceld, and prints both timings side by side.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from accelctl.inspect_image import describe_image, render
from converter.convert import ConvertOptions, convert_image
from converter.progress import LayerProgress
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from rig.agent_process import AgentProcess
from rig.containerd import ACCELD_SNAPSHOTTER, CRI_NAMESPACE, ContainerdServer
from rig.images import ImageConfig, ImageSpec, build_image, busybox_image_spec, push_image
from rig.layers import Directory, File, LayerSpec, SparseishFile
from rig.registry import RegistryServer

DEMO_REPOSITORY = "demo/app"


def demo_image_spec(data_mb: int) -> ImageSpec:
    """busybox + a data layer of ``data_mb`` MiB of random files; start reads one file.

    Every directory has its own tar entry, as image builders write them: stargz-
    snapshotter 0.12's `ctr-remote image optimize` (the startup suite's peer) refuses
    to prioritize a file whose parent directory has none in the file's layer.
    """
    base = busybox_image_spec()
    files: list[Directory | File] = [Directory("data")]
    per_file = 8 << 20
    for i in range(max(1, (data_mb << 20) // per_file)):
        content = SparseishFile(per_file, seed=i, data_every=4096, block_size=4096)
        files.append(File(f"data/blob-{i:03d}.bin", content))
    files += [Directory("app"), File("app/config.txt", b"demo app ready\n")]
    return ImageSpec(
        layers=(*base.layers, LayerSpec(files, created_by="demo data")),
        platform=base.platform,
        config=ImageConfig(cmd=("/bin/sh", "-c", "cat /app/config.txt")),
    )


async def _run(console: Console, workdir: Path, data_mb: int) -> None:
    with RegistryServer(workdir / "registry") as registry:
        console.rule("1. local registry")
        console.print(f"distribution registry at {registry.url} (storage {registry.storage_dir})")
        console.rule("2. demo image")
        started = time.monotonic()
        built = build_image(demo_image_spec(data_mb), workdir / "layout", "v1")
        reference = f"{registry.host}/{DEMO_REPOSITORY}:v1"
        async with RegistryClient() as client:
            await push_image(client, reference, built)
            console.print(f"built and pushed {reference} in {time.monotonic() - started:.1f}s")
            console.rule("3. what the registry client finds")
            ref = ImageReference.parse(reference)
            resolved, config = await describe_image(client, ref, None)
            render(console, resolved, config)
            console.rule("4. conversion")
            table = Table("mode", "published as", "seconds", "output bytes", "% of image")
            for mode in ("index", "full"):
                result = await convert_image(
                    client,
                    ref,
                    ConvertOptions(mode=mode, force=True),
                    LayerProgress(interactive=False),
                )
                pct = 100.0 * result.output_bytes / max(result.source_bytes, 1)
                table.add_row(
                    mode,
                    str(result.target),
                    f"{result.seconds:.2f}",
                    f"{result.output_bytes:,}",
                    f"{pct:.2f}",
                )
            console.print(table)
        console.rule("5. start the app: normal pull vs acceld")
        _start_both(console, workdir, reference)


def _timed_start(
    containerd: ContainerdServer, reference: str, name: str, snapshotter: str
) -> tuple[float, float, str]:
    """(pull seconds, pull-to-ready seconds, output) for a CRI pull + run."""
    started = time.monotonic()
    containerd.cri_pull_image(reference)
    pulled = time.monotonic() - started
    out = containerd.run_container(
        reference, name, snapshotter=snapshotter, namespace=CRI_NAMESPACE
    )
    return pulled, time.monotonic() - started, out.stdout.strip()


def _start_both(console: Console, workdir: Path, reference: str) -> None:
    """containerd + overlayfs (full pull) against containerd + acceld (lazy), same image."""
    table = Table("how", "pull (s)", "pull to app output (s)", "app said")
    with ContainerdServer(workdir / "containerd-overlayfs") as plain:
        pulled, ready, said = _timed_start(plain, reference, "demo-plain", "overlayfs")
        table.add_row("containerd overlayfs (full pull)", f"{pulled:.2f}", f"{ready:.2f}", said)
    with (
        AgentProcess(workdir / "acceld") as agent,
        ContainerdServer(
            workdir / "containerd-acceld",
            snapshotter=ACCELD_SNAPSHOTTER,
            acceld_socket=agent.socket,
        ) as lazy,
    ):
        pulled_lazy, ready_lazy, said = _timed_start(
            lazy, reference, "demo-lazy", ACCELD_SNAPSHOTTER
        )
        table.add_row("acceld (lazy)", f"{pulled_lazy:.2f}", f"{ready_lazy:.2f}", said)
        fetched = agent.metric("acceld_fetch_bytes_total")
    console.print(table)
    console.print(
        f"acceld fetched {fetched / 1e6:.1f} MB of layer data by the time the app "
        f"answered; speed-up to app output: {ready / max(ready_lazy, 1e-6):.1f}x"
    )


@click.command("demo")
@click.option(
    "--data-mb", default=256, show_default=True, help="Size of the demo image's data layer (MiB)."
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep the demo's files here (default: a temporary directory).",
)
def demo(data_mb: int, workdir: Path | None) -> None:
    """Run the demo on an embedded registry (and, with it, everything acceld does)."""
    console = Console()
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        asyncio.run(_run(console, workdir, data_mb))
        return
    with tempfile.TemporaryDirectory(prefix="acceld-demo-") as tmp:
        asyncio.run(_run(console, Path(tmp), data_mb))
