"""The watchdog reports a stuck event loop and stuck FUSE requests while they are stuck,
/healthz (served from its own thread) says so, and no FUSE handler can leave a reader
blocked by raising something unexpected. Real loops, a real FUSE mount, real HTTP.

Timings are thresholds plus generous margins (the suite shares two cores with a CPU
hog at times), never exact figures.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import io
import json
import os
import tarfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from agent import metrics
from agent.config import AgentConfig, ConfigError
from agent.fs.in_flight import InFlightRequests
from agent.fs.mount import FuseMount
from agent.fs.operations import LayerFS
from agent.layers.estargz_layer import EstargzLayer
from agent.metrics_server import MetricsServer
from agent.watchdog import FUSE_REQUEST, LOOP_STALL, StallReport, Watchdog
from fetcher.chunk_cache import ChunkCache
from fetcher.chunks import BlobSource
from fetcher.read_path import ReadPath
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from formats.estargz import FOOTER_SIZE, parse_footer, parse_toc, write_estargz
from rig.agent_process import AgentProcess

MARGIN_S = 2.0
FILES = {"etc/hello": b"hello, world\n", "etc/other": b"other file\n"}


class Reports:
    """What the watchdog reported, as its `on_report` hook saw it (on its thread)."""

    def __init__(self) -> None:
        self.items: list[tuple[float, StallReport]] = []
        self._arrived = threading.Condition()

    def __call__(self, report: StallReport) -> None:
        with self._arrived:
            self.items.append((time.monotonic(), report))
            self._arrived.notify_all()

    def wait(self, kind: str, timeout: float) -> tuple[float, StallReport]:
        with self._arrived:
            self._arrived.wait_for(lambda: self.of(kind), timeout)
            found = self.of(kind)
        assert found, f"no {kind} report within {timeout} s: {self.items}"
        return found[0]

    def of(self, kind: str) -> list[tuple[float, StallReport]]:
        return [(at, r) for at, r in self.items if r.kind == kind]


def http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def health(server: MetricsServer) -> tuple[int, dict[str, Any]]:
    code, body = http_get(f"http://127.0.0.1:{server.port}/healthz")
    return code, json.loads(body)


def sample(server: MetricsServer, name: str, **labels: str) -> float:
    """One sample of the agent registry, scraped through the server."""
    _, body = http_get(f"http://127.0.0.1:{server.port}/metrics")
    for family in text_string_to_metric_families(body.decode()):
        for found in family.samples:
            if found.name == name and all(found.labels.get(k) == v for k, v in labels.items()):
                return float(found.value)
    return 0.0


def counted(name: str, **labels: str) -> float:
    """A sample of the agent registry, read in this process."""
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def eventually(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


@contextlib.contextmanager
def loop_in_thread() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop run by a thread of its own, so this test's thread stays free to
    probe /healthz while the loop is blocked."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="stalling-loop", daemon=True)
    thread.start()
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def on_loop(loop: asyncio.AbstractEventLoop, call: Callable[[], object]) -> None:
    done: concurrent.futures.Future[object] = concurrent.futures.Future()
    loop.call_soon_threadsafe(lambda: done.set_result(call()))
    done.result(10)


def test_a_stalled_loop_is_reported_once_and_healthz_answers_503_while_it_lasts() -> None:
    threshold = 0.3
    reports = Reports()
    with loop_in_thread() as loop:
        watchdog = Watchdog(
            InFlightRequests(),
            stall_threshold_s=threshold,
            request_threshold_s=30.0,
            on_report=reports,
        )
        watchdog.start(loop)
        server = MetricsServer("127.0.0.1:0", metrics.REGISTRY, watchdog.status)
        server.start()
        release = threading.Event()
        blocked_at: list[float] = []

        def block_the_loop() -> None:
            blocked_at.append(time.monotonic())
            release.wait(30)  # a lock that is never let go, as in the field

        try:
            assert health(server)[0] == 200
            stalls_before = sample(server, "acceld_watchdog_loop_stalls_total")
            with capture_logs() as logs:
                loop.call_soon_threadsafe(block_the_loop)
                reported_at, report = reports.wait(LOOP_STALL, threshold + MARGIN_S)
                assert reported_at - blocked_at[0] <= threshold + MARGIN_S
                # Asked from this thread while the loop is still blocked:
                code, status = health(server)
                assert (code, status["status"]) == (503, "stalled"), status
                assert status["loop_lag_s"] > threshold
                assert status["loop_stalls"] >= 1
                assert sample(server, "acceld_watchdog_loop_stalls_total") == stalls_before + 1
                worst = sample(server, "acceld_watchdog_worst_loop_stall_seconds")
                assert worst > threshold
                time.sleep(3 * threshold)  # still the same stall: no second report
                assert len(reports.of(LOOP_STALL)) == 1
                assert sample(server, "acceld_watchdog_worst_loop_stall_seconds") > worst
                release.set()
                assert eventually(lambda: health(server)[0] == 200, MARGIN_S + 1)
                assert eventually(
                    lambda: any(e["event"] == "watchdog.loop_recovered" for e in logs), MARGIN_S
                )
        finally:
            release.set()
            on_loop(loop, watchdog.stop)
            server.stop()

    assert report.age_s > threshold
    loop_thread = next(t for t in report.threads if t.name == "stalling-loop")
    assert loop_thread.python_stack is not None and "block_the_loop" in loop_thread.python_stack
    assert loop_thread.state is not None  # /proc/self/task/<tid>/stat is always readable
    stall_records = [e for e in logs if e["event"] == "watchdog.stall"]
    assert len(stall_records) == 1
    record = stall_records[0]
    assert record["kind"] == LOOP_STALL and record["log_level"] == "error"
    assert any("block_the_loop" in t.get("python_stack", "") for t in record["threads"])
    recovered = next(e for e in logs if e["event"] == "watchdog.loop_recovered")
    assert recovered["stalled_s"] >= 3 * threshold
    assert watchdog.status()["status"] == "ok"
    # The worst lateness is kept (and exported) after the stall ends.
    assert watchdog.status()["worst_loop_lag_s"] >= 3 * threshold
    assert counted("acceld_watchdog_worst_loop_lag_seconds") >= 3 * threshold


# -- a real FUSE mount ------------------------------------------------------------------


def estargz_layer() -> tuple[EstargzLayer, dict[str, bytes]]:
    """A small eStargz layer and its decoded members by cache key (to fill the cache,
    so reads are answered without a registry)."""
    source = io.BytesIO()
    with tarfile.open(fileobj=source, mode="w") as tar:
        for name, data in FILES.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = io.BytesIO()
    write_estargz(io.BytesIO(source.getvalue()), out, workers=1)
    blob = out.getvalue()
    toc_offset = parse_footer(blob[-FOOTER_SIZE:], len(blob))
    toc = parse_toc(blob[toc_offset : len(blob) - FOOTER_SIZE], toc_offset, None)
    source_ref = ImageReference.parse("registry.invalid/watchdog:test")
    layer = EstargzLayer(BlobSource(source_ref, "sha256:" + "1" * 64, len(blob)), toc)
    members = {
        spec.key: spec.decode(blob[spec.fetch_start : spec.fetch_end])
        for spec in layer.all_chunks()
    }
    return layer, members


class HeldReads(LayerFS):
    """Reads of etc/hello wait for ``gate`` (a fetch that never comes back) or raise
    ``fail`` (a bug below the handler); everything else is the real LayerFS."""

    gate: asyncio.Event  # not `release`: that name is a FUSE handler
    fail: BaseException | None = None
    entered: float | None = None

    async def _read(self, inode: int, offset: int, size: int) -> bytes:
        node, _ = self._node(inode)
        if node.entry.name == "etc/hello":
            self.entered = time.monotonic()
            if self.fail is not None:
                raise self.fail
            await self.gate.wait()
        return await super()._read(inode, offset, size)


@pytest.fixture
async def mounted(tmp_path: Path):
    """A HeldReads mount at tmp_path/mnt with the layer at `mnt/layer`."""
    layer, members = estargz_layer()
    cache = ChunkCache(tmp_path / "cache", 1 << 30)
    for key, data in members.items():
        cache.put(layer.blob.digest, key, data)
    async with RegistryClient() as client:
        read_path = ReadPath.build(client, cache)
        fs = HeldReads(read_path.reader)
        fs.gate = asyncio.Event()
        fs.add_layer("layer", layer)
        mount = await FuseMount.new(fs, tmp_path / "mnt")
        try:
            yield fs, tmp_path / "mnt" / "layer"
        finally:
            fs.gate.set()
            await mount.stop()
            await read_path.close()


def read_in_thread(path: Path) -> tuple[threading.Thread, dict[str, object]]:
    """Read ``path`` on a daemon thread (a reader the kernel may block)."""
    outcome: dict[str, object] = {}

    def read() -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                outcome["data"] = os.read(fd, 4096)
            finally:
                os.close(fd)
        except OSError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=read, name="reader", daemon=True)
    thread.start()
    return thread, outcome


async def test_a_fuse_request_stuck_in_an_await_is_reported_with_its_op(mounted) -> None:
    fs, root = mounted
    threshold = 0.3
    reports = Reports()
    watchdog = Watchdog(
        fs.requests, stall_threshold_s=5.0, request_threshold_s=threshold, on_report=reports
    )
    watchdog.start(asyncio.get_running_loop())
    stuck_before = counted("acceld_watchdog_stalled_fuse_requests_total", op="read")
    try:
        with capture_logs() as logs:
            reader, outcome = read_in_thread(root / "etc" / "hello")
            reported_at, report = await asyncio.to_thread(
                reports.wait, FUSE_REQUEST, threshold + 2 * MARGIN_S
            )
            assert fs.entered is not None
            assert reported_at - fs.entered <= threshold + MARGIN_S
            assert report.op == "read"
            assert report.inode == (await asyncio.to_thread(os.stat, root / "etc/hello")).st_ino
            assert report.age_s > threshold
            assert report.await_stack is not None and "_read" in report.await_stack
            status = watchdog.status()
            assert status["status"] == "ok"  # the loop itself runs
            assert status["fuse_requests_in_flight"] >= 1
            assert status["oldest_fuse_request_s"] > threshold
            assert reports.of(LOOP_STALL) == []
            assert "data" not in outcome  # the reader is still blocked
            assert (
                counted("acceld_watchdog_stalled_fuse_requests_total", op="read")
                >= stuck_before + 1
            )
            fs.gate.set()
            await asyncio.to_thread(reader.join, 10)
            assert outcome.get("data") == FILES["etc/hello"]
            await asyncio.sleep(4 * threshold)  # a check after the request ended
        records = [e for e in logs if e["event"] == "watchdog.stall"]
        assert {e["kind"] for e in records} == {FUSE_REQUEST}
        assert all(e["op"] == "read" for e in records)
        assert len({e["request_id"] for e in records}) == len(records)  # each reported once
        assert any(e["event"] == "watchdog.fuse_request_finished" for e in logs)
        assert len(fs.requests) == 0
    finally:
        watchdog.stop()


async def test_a_handler_that_raises_an_unexpected_error_answers_eio(mounted) -> None:
    fs, root = mounted
    fs.fail = RuntimeError("a bug below the handler")
    internal_before = counted("acceld_fuse_internal_errors_total", op="read")
    with capture_logs() as logs:
        reader, outcome = read_in_thread(root / "etc" / "hello")
        await asyncio.to_thread(reader.join, 10)
        assert not reader.is_alive(), "the reader was never answered"
        error = outcome.get("error")
        assert isinstance(error, OSError) and error.errno == errno.EIO, outcome
        # The serving task survived: the next request is answered as before.
        other, other_outcome = read_in_thread(root / "etc" / "other")
        await asyncio.to_thread(other.join, 10)
        assert other_outcome.get("data") == FILES["etc/other"]
    # The kernel may ask again after a failed read-ahead: one record per request.
    failures = [e for e in logs if e["event"] == "fs.handler_failed"]
    inode = (await asyncio.to_thread(os.stat, root / "etc/hello")).st_ino
    assert failures and all((e["op"], e["inode"]) == ("read", inode) for e in failures)
    internal = counted("acceld_fuse_internal_errors_total", op="read") - internal_before
    assert internal == len(failures)
    assert len(fs.requests) == 0


# -- every handler goes through the one wrapper -------------------------------------------


class BrokenNodes(LayerFS):
    """Every inode lookup fails as a bug would."""

    def _node(self, inode: int) -> Any:
        raise KeyError(inode)

    async def _statfs(self) -> pyfuse3.StatvfsData:
        raise KeyError("statfs")


HANDLER_CALLS: dict[str, Callable[[LayerFS], Any]] = {
    "lookup": lambda fs: fs.lookup(7, b"name"),
    "getattr": lambda fs: fs.getattr(7),
    "readlink": lambda fs: fs.readlink(7),
    "opendir": lambda fs: fs.opendir(7),
    "readdir": lambda fs: fs.readdir(7, 0, None),  # type: ignore[arg-type]
    "open": lambda fs: fs.open(7, os.O_RDONLY),
    "read": lambda fs: fs.read(7, 0, 10),
    "getxattr": lambda fs: fs.getxattr(7, b"user.x"),
    "listxattr": lambda fs: fs.listxattr(7),
    "statfs": lambda fs: fs.statfs(),
}


def test_every_handler_of_layerfs_is_covered_here() -> None:
    handlers = {
        name
        for name, value in vars(LayerFS).items()
        if name in vars(pyfuse3.Operations) and callable(value)
    }
    # libfuse calls init while it handles INIT, before it replies itself: no request of
    # the kernel's waits for an answer from it (agent.fs.mount swaps the connection in).
    assert handlers - {"init"} == set(HANDLER_CALLS)


@pytest.mark.parametrize("op", sorted(HANDLER_CALLS))
async def test_every_handler_turns_an_unexpected_error_into_eio(tmp_path: Path, op: str) -> None:
    cache = ChunkCache(tmp_path / "cache", 1 << 20)
    async with RegistryClient() as client:
        read_path = ReadPath.build(client, cache)
        fs = BrokenNodes(read_path.reader)  # no watchdog: its own in-flight table
        errors_before = counted("acceld_fuse_errors_total", op=op, errno="EIO")
        with pytest.raises(pyfuse3.FUSEError) as raised:
            await HANDLER_CALLS[op](fs)
        assert raised.value.errno == errno.EIO
        assert counted("acceld_fuse_errors_total", op=op, errno="EIO") == errors_before + 1
        assert len(fs.requests) == 0
        await read_path.close()


def test_thresholds_are_configurable_and_must_be_positive() -> None:
    config = AgentConfig.from_dict(
        {"watchdog_stall_threshold_s": 2, "watchdog_request_threshold_s": "45"}
    )
    assert (config.watchdog_stall_threshold_s, config.watchdog_request_threshold_s) == (2.0, 45.0)
    defaults = AgentConfig()
    assert defaults.watchdog_request_threshold_s <= defaults.demand_timeout
    for key in ("watchdog_stall_threshold_s", "watchdog_request_threshold_s"):
        with pytest.raises(ConfigError):
            AgentConfig.from_dict({key: 0})


def test_the_agent_answers_healthz_from_its_watchdog_and_stops_cleanly(tmp_path: Path) -> None:
    settings = {"watchdog_stall_threshold_s": 2.5, "watchdog_request_threshold_s": 20}
    agent = AgentProcess(tmp_path, settings=settings).start()
    try:
        code, body = http_get(agent.metrics_url.removesuffix("/metrics") + "/healthz")
        assert code == 200
        status = json.loads(body)
        assert status["status"] == "ok" and status["loop_stalls"] == 0
        assert "acceld_watchdog_loop_stalls_total 0.0" in agent.metrics()
    finally:
        assert agent.stop() == 0
    lines = agent.log_path.read_text().splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]  # not stdlib's
    started = next(r for r in records if r.get("event") == "watchdog.started")
    assert (started["stall_threshold_s"], started["request_threshold_s"]) == (2.5, 20.0)
    assert any(r.get("event") == "agent.stopped" for r in records)
