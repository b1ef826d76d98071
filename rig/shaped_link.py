"""A registry link with a realistic bandwidth and round-trip time, on one machine.

Loopback moves gigabytes per second with microsecond latency, which hides exactly the
costs that lazy pulling is meant to beat. Benchmarks therefore run the registry inside a
network namespace (`rig.netns`) and reach it over a veth pair:

* bandwidth: a tbf qdisc on the egress of both veth ends. The namespace end shapes the
  download direction (registry -> client), the host end the upload direction.
* latency: this kernel has no netem, so a user-space `rig.delay_proxy` adds it. The
  proxy listens on 127.0.0.1:<free port> in the root namespace, forwards to
  ``ns_address:<server port>`` through the shaped veth and delays each direction by
  ``rtt_ms / 2``. Clients ask `ShapedLink.client_endpoint` where to connect; with
  ``rtt_ms == 0`` that is the server's own address in the namespace, without a proxy.
  A new connection's first response takes two RTTs (the proxy charges the handshake).
  Event-loop timers have millisecond granularity, so the RTT measured on a warm
  connection is the configured one plus up to ~2 ms, never less.

Servers are started by the caller inside the namespace with `command_prefix`, listening
on `ns_address`, and must be stopped before the link is closed.
"""

from __future__ import annotations

import contextlib
import subprocess
from types import TracebackType

from common.logging import get_logger
from rig.delay_proxy import BackgroundDelayProxy
from rig.netns import Netns, create_netns, delete_netns, run_in

log = get_logger(__name__)

# tbf refills its bucket from a timer; a bucket holding ~4 ms of traffic lets a sender
# reach the configured rate between refills, while keeping bursts short next to a
# millisecond-scale RTT. It must at least hold a 64 KiB GSO packet, in case the stack
# hands one to the qdisc unsegmented.
_BURST_SECONDS = 0.004
_MIN_BURST_BYTES = 64 * 1024 + 1514
# Queue beyond the bucket: enough to absorb TCP bursts without tail-dropping a healthy
# flow, short enough not to add noticeable queueing delay.
_QUEUE_LATENCY_MS = 20


def tbf_burst_bytes(rate_mbit: float) -> int:
    """Token bucket size for a rate (see `_BURST_SECONDS`)."""
    rate_bytes = rate_mbit * 1_000_000 / 8
    return max(int(rate_bytes * _BURST_SECONDS), _MIN_BURST_BYTES)


class ShapedLink:
    """A namespace behind a rate-limited veth pair, plus delay proxies on 127.0.0.1."""

    def __init__(self, rate_mbit: float = 300, rtt_ms: float = 5) -> None:
        if rate_mbit <= 0:
            raise ValueError("rate_mbit must be positive")
        if rtt_ms < 0:
            raise ValueError("rtt_ms must not be negative")
        self.rate_mbit = rate_mbit
        self.rtt_ms = rtt_ms
        self._netns: Netns | None = None
        self._proxies: dict[int, BackgroundDelayProxy] = {}

    @property
    def netns(self) -> Netns:
        """The namespace and veth pair; only while the link is open."""
        if self._netns is None:
            raise RuntimeError("shaped link is not open")
        return self._netns

    @property
    def ns_name(self) -> str:
        """Name of the network namespace."""
        return self.netns.name

    @property
    def ns_address(self) -> str:
        """Address inside the namespace that servers must listen on."""
        return self.netns.ns_address

    @property
    def host_address(self) -> str:
        """Address of the root-namespace end; what servers see as the client."""
        return self.netns.host_address

    @property
    def command_prefix(self) -> list[str]:
        """Prepend to an argv to run it inside the namespace."""
        return self.netns.command_prefix

    def run_in(self, argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a short command inside the namespace and capture its output."""
        return run_in(self.netns, argv, check=check)

    def open(self) -> None:
        """Create the namespace and shape both directions; undone entirely on failure."""
        if self._netns is not None:
            raise RuntimeError(f"shaped link {self._netns.name} is already open")
        self._netns = create_netns()
        try:
            self._shape(self._netns)
        except BaseException:
            self.close()
            raise
        log.info(
            "shaped_link.opened",
            netns=self._netns.name,
            ns_address=self._netns.ns_address,
            rate_mbit=self.rate_mbit,
            rtt_ms=self.rtt_ms,
        )

    def _shape(self, netns: Netns) -> None:
        tbf = [
            "root",
            "tbf",
            "rate",
            f"{self.rate_mbit}mbit",
            "burst",
            str(tbf_burst_bytes(self.rate_mbit)),
            "latency",
            f"{_QUEUE_LATENCY_MS}ms",
        ]
        for prefix, dev in (([], netns.host_veth), (["-n", netns.name], netns.ns_veth)):
            argv = ["tc", *prefix, "qdisc", "replace", "dev", dev, *tbf]
            proc = subprocess.run(argv, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")

    def client_endpoint(self, server_port: int) -> tuple[str, int]:
        """Where a root-namespace client connects to reach ``ns_address:server_port``.

        The first call for a port starts that port's delay proxy; later calls reuse it.
        """
        netns = self.netns
        if self.rtt_ms == 0:
            return netns.ns_address, server_port
        proxy = self._proxies.get(server_port)
        if proxy is None:
            proxy = BackgroundDelayProxy(
                "127.0.0.1", (netns.ns_address, server_port), delay_ms=self.rtt_ms / 2
            )
            proxy.start()
            self._proxies[server_port] = proxy
        assert proxy.address is not None
        return proxy.address

    def close(self) -> None:
        """Stop the proxies and delete the namespace and veth pair (idempotent)."""
        proxies, self._proxies = self._proxies, {}
        netns, self._netns = self._netns, None
        # Callbacks run last-in first-out and all run even if one raises: proxies stop
        # before the namespace they forward into goes away.
        with contextlib.ExitStack() as teardown:
            if netns is not None:
                teardown.callback(log.info, "shaped_link.closed", netns=netns.name)
                teardown.callback(delete_netns, netns)
            for proxy in proxies.values():
                teardown.callback(proxy.stop)

    def __enter__(self) -> ShapedLink:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
