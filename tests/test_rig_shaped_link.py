"""The shaped link: real servers in a real namespace, shaped by the kernel, timed for real.

Benchmarks trust this link to stand for a ~300 Mbit/s, few-ms registry connection, so
these tests measure what a client actually gets: throughput in both directions, the
round-trip time the delay proxy adds, intact bytes, and a host left as it was found.
"""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from rig.delay_proxy import BackgroundDelayProxy
from rig.netns import (
    NAME_PREFIX,
    choose_free_subnet,
    list_namespaces,
    networks_in_use,
    remove_orphaned_namespaces,
)
from rig.ports import free_port, wait_for_port
from rig.processes import terminate_group
from rig.registry import RegistryServer
from rig.shaped_link import ShapedLink
from tests.fixtures.registry import running

pytestmark = pytest.mark.netns

PAYLOAD_SIZE = 16 * 1024 * 1024
SERVER_PORT = 8000
SINK_PORT = 9000
# Loose: a tbf-shaped TCP flow reaches ~95% of the rate here, scheduler noise on a
# 2-core machine costs some more; above the rate means the shaping is not applied.
RATE_BAND = (0.5, 1.1)
# Python threads, the proxy's timer granularity (~1 ms) and a loaded machine.
RTT_SLACK_MS = 15.0
# Receives until EOF, then answers how many bytes it got: an upload that also proves
# the half-close travelled through. Serves on, as readiness probes connect too.
_SINK_PROGRAM = """
import contextlib, socket, sys
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
while True:
    conn, _ = server.accept()
    with conn, contextlib.suppress(OSError):
        total = 0
        while chunk := conn.recv(1 << 20):
            total += len(chunk)
        conn.sendall(str(total).encode())
"""


class NamespaceProcess:
    """A program run inside the link's namespace, with its output kept as a log."""

    def __init__(self, link: ShapedLink, argv: list[str], port: int, log_path: Path) -> None:
        self.link = link
        self.argv = argv
        self.port = port
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [*self.link.command_prefix, *self.argv],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            wait_for_port(self.link.ns_address, self.port, timeout=10)
        except TimeoutError as error:
            self.stop()
            raise RuntimeError(f"{self.argv[:3]} did not listen; log {self.log_path}") from error

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        terminate_group(proc, grace=5)

    def log_paths(self) -> list[Path]:
        return [self.log_path]


def http_server_in(link: ShapedLink, directory: Path, log_path: Path) -> NamespaceProcess:
    argv = [sys.executable, "-m", "http.server", "-b", link.ns_address, "-p", "HTTP/1.1"]
    argv += ["-d", str(directory), str(SERVER_PORT)]
    return NamespaceProcess(link, argv, SERVER_PORT, log_path)


@pytest.fixture
def payload_dir(tmp_path: Path) -> tuple[Path, str]:
    """A directory with random ``payload.bin`` and a tiny ``ping``; returns the payload's sha256."""
    data = os.urandom(PAYLOAD_SIZE)
    (tmp_path / "payload.bin").write_bytes(data)
    (tmp_path / "ping").write_bytes(b"p")
    return tmp_path, hashlib.sha256(data).hexdigest()


@pytest.fixture
def served_link(
    shaped_link: ShapedLink, payload_dir: tuple[Path, str], tmp_path: Path
) -> Iterator[tuple[ShapedLink, str]]:
    """The link with an HTTP server in its namespace serving ``payload_dir``."""
    directory, digest = payload_dir
    with running(http_server_in(shaped_link, directory, tmp_path / "http-server.log")):
        yield shaped_link, digest


def download(host: str, port: int, path: str = "/payload.bin") -> tuple[bytes, float]:
    """GET ``path``; returns the body and the seconds it took from connect to last byte."""
    started = time.monotonic()
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        assert response.status == 200
        body = response.read()
    finally:
        conn.close()
    return body, time.monotonic() - started


def assert_rate_in_band(size: int, seconds: float, rate_mbit: float) -> None:
    measured = size / seconds
    configured = rate_mbit * 1_000_000 / 8
    low, high = (configured * bound for bound in RATE_BAND)
    assert low <= measured <= high, (
        f"{measured / 1e6:.1f} MB/s measured, configured {configured / 1e6:.1f} MB/s"
    )


@pytest.mark.parametrize("shaped_link", [(100, 0)], indirect=True)
def test_download_runs_at_configured_rate(served_link: tuple[ShapedLink, str]) -> None:
    link, digest = served_link
    endpoint = link.client_endpoint(SERVER_PORT)
    assert endpoint == (link.ns_address, SERVER_PORT), "rtt 0 must not add a proxy"
    body, seconds = download(*endpoint)
    assert hashlib.sha256(body).hexdigest() == digest
    assert_rate_in_band(len(body), seconds, link.rate_mbit)


@pytest.mark.parametrize("shaped_link", [(100, 20)], indirect=True)
def test_delay_proxy_keeps_the_rate_and_the_bytes(served_link: tuple[ShapedLink, str]) -> None:
    link, digest = served_link
    host, port = link.client_endpoint(SERVER_PORT)
    assert host == "127.0.0.1"
    body, seconds = download(host, port)
    assert hashlib.sha256(body).hexdigest() == digest
    assert_rate_in_band(len(body), seconds, link.rate_mbit)


@pytest.mark.parametrize("shaped_link", [(300, 10)], indirect=True)
def test_round_trip_time_is_the_configured_rtt(served_link: tuple[ShapedLink, str]) -> None:
    link, _ = served_link
    conn = http.client.HTTPConnection(*link.client_endpoint(SERVER_PORT), timeout=10)
    timings = []
    try:
        for _ in range(12):
            started = time.monotonic()
            # HEAD: the answer is one write, so the server's Nagle cannot add a delay.
            conn.request("HEAD", "/ping")
            response = conn.getresponse()
            response.read()
            assert response.status == 200
            timings.append((time.monotonic() - started) * 1000)
    finally:
        conn.close()
    first, steady = timings[0], timings[1:]
    # A fresh connection pays the handshake round trip as well.
    assert first >= 2 * link.rtt_ms, timings
    assert min(steady) >= link.rtt_ms, timings
    assert statistics.median(steady) < link.rtt_ms + RTT_SLACK_MS, timings


@pytest.mark.parametrize("shaped_link", [(100, 10)], indirect=True)
def test_upload_is_shaped_too(shaped_link: ShapedLink, tmp_path: Path) -> None:
    sink = NamespaceProcess(
        shaped_link,
        [sys.executable, "-c", _SINK_PROGRAM, shaped_link.ns_address, str(SINK_PORT)],
        SINK_PORT,
        tmp_path / "sink.log",
    )
    data = os.urandom(PAYLOAD_SIZE // 2)
    with running(sink):
        started = time.monotonic()
        with socket.create_connection(shaped_link.client_endpoint(SINK_PORT)) as conn:
            conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
            answer = b"".join(iter(lambda: conn.recv(64), b""))
        seconds = time.monotonic() - started
    assert int(answer) == len(data)
    assert_rate_in_band(len(data), seconds, shaped_link.rate_mbit)


@pytest.mark.parametrize("shaped_link", [(300, 5)], indirect=True)
def test_registry_serves_blobs_through_the_link(
    shaped_link: ShapedLink, payload_dir: tuple[Path, str], tmp_path: Path
) -> None:
    """What benchmarks do: the real registry in the namespace, a client on the host."""
    blob = (payload_dir[0] / "payload.bin").read_bytes()
    digest = f"sha256:{payload_dir[1]}"
    registry = RegistryServer(
        tmp_path / "registry",
        host=shaped_link.ns_address,
        command_prefix=shaped_link.command_prefix,
    )
    with running(registry):
        host, port = shaped_link.client_endpoint(registry.port)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        base = f"http://{host}:{port}/v2/rig/shaped"
        with opener.open(
            urllib.request.Request(f"{base}/blobs/uploads/", method="POST")
        ) as started:
            location = started.headers["Location"]
        separator = "&" if "?" in location else "?"
        upload = urllib.request.Request(
            f"{location}{separator}digest={digest}", data=blob, method="PUT"
        )
        upload.add_header("Content-Type", "application/octet-stream")
        with opener.open(upload) as finished:
            assert finished.status == 201
        started_at = time.monotonic()
        with opener.open(f"{base}/blobs/{digest}") as response:
            body = response.read()
        seconds = time.monotonic() - started_at
        ranged = urllib.request.Request(
            f"{base}/blobs/{digest}", headers={"Range": "bytes=100-199"}
        )
        with opener.open(ranged) as partial:
            assert partial.status == 206
            assert partial.read() == blob[100:200]
    assert hashlib.sha256(body).hexdigest() == payload_dir[1]
    assert_rate_in_band(len(body), seconds, shaped_link.rate_mbit)


def _host_state() -> tuple[set[str], set[str]]:
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True, check=True)
    return set(list_namespaces()), {line.split()[0] for line in links.stdout.splitlines()}


def test_link_leaves_nothing_behind(payload_dir: tuple[Path, str], tmp_path: Path) -> None:
    namespaces_before, interfaces_before = _host_state()
    routes_before = networks_in_use()
    with pytest.raises(RuntimeError, match="test failure inside the link"):  # noqa: SIM117
        with ShapedLink(rate_mbit=300, rtt_ms=4) as link:
            subnet = ipaddress.IPv4Network(f"{link.ns_address}/30", strict=False)
            assert not any(subnet.overlaps(net) for net in routes_before)
            assert link.ns_name in list_namespaces()
            with running(http_server_in(link, payload_dir[0], tmp_path / "http.log")):
                proxy_endpoint = link.client_endpoint(SERVER_PORT)
                body, _ = download(*proxy_endpoint, path="/ping")
                assert body == b"p"
            raise RuntimeError("test failure inside the link")
    assert _host_state() == (namespaces_before, interfaces_before)
    assert not any(subnet.overlaps(net) for net in networks_in_use())
    assert not [t for t in threading.enumerate() if t.name == "delay-proxy"]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(proxy_endpoint, timeout=2).close()
    link.close()  # idempotent


def test_orphans_of_dead_runs_are_removed_and_live_ones_kept() -> None:
    finished = subprocess.Popen(["true"])
    finished.wait()
    orphan, orphan_veth = f"{NAME_PREFIX}{finished.pid}-0ddba11", "acd0ddba11h"
    subprocess.run(["ip", "netns", "add", orphan], check=True)
    try:
        peer = ["peer", "name", "acd0ddba11n", "netns", orphan]
        subprocess.run(["ip", "link", "add", orphan_veth, "type", "veth", *peer], check=True)
        with ShapedLink(rate_mbit=300, rtt_ms=0) as live:
            removed = remove_orphaned_namespaces()
            assert orphan in removed
            assert live.ns_name not in removed
            assert live.ns_name in list_namespaces()
        assert orphan not in list_namespaces()
        assert orphan_veth not in _host_state()[1]
    finally:
        subprocess.run(["ip", "link", "del", orphan_veth], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", orphan], capture_output=True, check=False)


def test_free_subnet_skips_ranges_the_host_routes() -> None:
    taken = [ipaddress.IPv4Network("10.0.0.0/8"), ipaddress.IPv4Network("172.16.0.0/13")]
    for _ in range(50):
        subnet = choose_free_subnet(taken)
        assert subnet.prefixlen == 30
        assert subnet.subnet_of(ipaddress.IPv4Network("172.16.0.0/12")) or subnet.subnet_of(
            ipaddress.IPv4Network("192.168.0.0/16")
        )
        assert not any(subnet.overlaps(net) for net in taken)


class LoopbackSource:
    """A 127.0.0.1 server that sends ``data`` (or endless bytes) to its one client."""

    def __init__(self, data: bytes | None) -> None:
        self.data = data
        self.sent = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.address: tuple[str, int] = self._listener.getsockname()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
                break
            except TimeoutError:
                if self._stop.is_set():
                    return
        conn.settimeout(0.1)  # a blocked send must still notice the stop
        view = memoryview(self.data if self.data is not None else bytes(1 << 20))
        with conn:
            while not self._stop.is_set():
                try:
                    self.sent += conn.send(view[self.sent % len(view) :])
                except TimeoutError:
                    continue
                except OSError:
                    return
                if self.data is not None and self.sent == len(self.data):
                    return

    def __enter__(self) -> LoopbackSource:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listener.close()


def test_delay_proxy_does_not_serialize_throughput() -> None:
    delay_ms = 20
    data = os.urandom(64 * 1024 * 1024)
    with (
        LoopbackSource(data) as source,
        BackgroundDelayProxy("127.0.0.1", source.address, delay_ms) as proxy,
    ):
        assert proxy.address is not None
        started = time.monotonic()
        with socket.create_connection(proxy.address) as conn:
            received = b"".join(iter(lambda: conn.recv(1 << 20), b""))
        seconds = time.monotonic() - started
    assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()
    # Sleeping the delay per read (256 KiB at most) would take >= 256 * 20 ms = 5.1 s.
    assert seconds < 2.0
    assert seconds >= 3 * delay_ms / 1000  # handshake charge + one one-way delay


def test_delay_proxy_applies_backpressure() -> None:
    queue_limit = 1024 * 1024
    with LoopbackSource(None) as source:
        proxy_thread = BackgroundDelayProxy(
            "127.0.0.1", source.address, delay_ms=1, queue_limit=queue_limit
        )
        with proxy_thread, socket.socket() as client:
            assert proxy_thread.address is not None
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            client.connect(proxy_thread.address)
            # The client reads nothing: the source must stall once buffers are full.
            deadline, last = time.monotonic() + 5, -1
            while source.sent != last and time.monotonic() < deadline:
                last = source.sent
                time.sleep(0.5)
            assert source.sent == last, "the source never stalled"
            # Kernel socket buffers (up to ~40 MB with autotuning) plus 1 MiB queued.
            assert source.sent < 64 * 1024 * 1024
            assert client.recv(1024)


class LoopbackEcho:
    """A 127.0.0.1 server echoing each connection in turn, until closed.

    Serves more than one connection: a readiness probe through the proxy comes first.
    """

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.address: tuple[str, int] = self._listener.getsockname()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            with conn:
                while chunk := conn.recv(65536):
                    conn.sendall(chunk)

    def __enter__(self) -> LoopbackEcho:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listener.close()


def test_delay_proxy_command_line(tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "delay-proxy.log"
    with LoopbackEcho() as echo, log_path.open("wb") as log:
        argv = [sys.executable, "-m", "rig.delay_proxy", "--listen", f"127.0.0.1:{port}"]
        argv += ["--target", f"127.0.0.1:{echo.address[1]}", "--delay-ms", "15"]
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=log,
            cwd=Path(__file__).resolve().parents[1],
        )
        try:
            wait_for_port("127.0.0.1", port, timeout=10)
            with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                for _ in range(3):
                    started = time.monotonic()
                    conn.sendall(b"ping")
                    assert conn.recv(16) == b"ping"
                    rtt_ms = (time.monotonic() - started) * 1000
            assert 30 <= rtt_ms < 30 + RTT_SLACK_MS, log_path.read_text()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0, log_path.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
