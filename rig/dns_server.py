"""A tiny DNS server whose answers a test decides, query by query.

Stands in for a hostile name server in DNS rebinding tests: the same name must resolve
to a public address on one query and to a private one on the next, with a TTL of zero
so that nothing between the client and the server keeps an answer. It answers A
queries over UDP from the test's function (NXDOMAIN for a name the function does not
know) and any other query with no records. Port 53 is only free to take inside a
network namespace of the test's own (`rig.isolated_net`).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import threading
from collections.abc import Callable

from common.logging import get_logger

log = get_logger(__name__)

_TYPE_A = 1
_CLASS_IN = 1
_NXDOMAIN = 3
_FORMERR = 1

Answer = Callable[[str], list[str] | None]
"""A name (lower case, no trailing dot) -> its IPv4 addresses now, or None: no such name."""


def _question(packet: bytes) -> tuple[str, int, int]:
    """(name, type, offset just past the question) of a query's first question."""
    labels = []
    offset = 12
    while packet[offset]:
        length = packet[offset]
        labels.append(packet[offset + 1 : offset + 1 + length].decode("ascii"))
        offset += 1 + length
    qtype, _qclass = struct.unpack("!HH", packet[offset + 1 : offset + 5])
    return ".".join(labels).lower(), qtype, offset + 5


def reply(packet: bytes, answer: Answer) -> bytes:
    """The response to one query packet."""
    (query_id, flags) = struct.unpack("!HH", packet[:4])
    recursion_desired = flags & 0x0100
    try:
        name, qtype, end = _question(packet)
    except (IndexError, UnicodeDecodeError, struct.error):
        return struct.pack("!HHHHHH", query_id, 0x8000 | _FORMERR, 0, 0, 0, 0)
    # Only an A query asks the test's function: one call per answer it gives.
    addresses = answer(name) if qtype == _TYPE_A else []
    records = b""
    count = 0
    rcode = 0
    if addresses is None:
        rcode = _NXDOMAIN
    else:
        for address in addresses:
            data = ipaddress.IPv4Address(address).packed
            # The name as a pointer to the question's, TTL 0: never to be cached.
            records += struct.pack("!HHHIH", 0xC00C, _TYPE_A, _CLASS_IN, 0, len(data)) + data
            count += 1
    # A response, authoritative, recursion as asked for and available.
    flags = 0x8000 | 0x0400 | recursion_desired | 0x0080 | rcode
    header = struct.pack("!HHHHHH", query_id, flags, 1, count, 0, 0)
    return header + packet[12:end] + records


class DnsServer:
    """Answers queries on ``host``:``port`` (UDP) from ``answer``, on a thread of its own."""

    def __init__(self, answer: Answer, host: str = "127.0.0.1", port: int = 53) -> None:
        self.answer = answer
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind((host, port))
        self._socket.settimeout(0.2)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="dns-server", daemon=True)

    def __enter__(self) -> DnsServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self._thread.join(5)
        self._socket.close()

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                packet, peer = self._socket.recvfrom(4096)
            except TimeoutError:
                continue
            try:
                self._socket.sendto(reply(packet, self.answer), peer)
            except OSError as exc:
                log.warning("dns_server.send_failed", error=str(exc))
