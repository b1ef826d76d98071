"""A hostile registry of our own: a real HTTP server on loopback in front of the real
`docker-registry`, answering what a test's plan says.

acceld reads manifests, referrers, index artifacts, eStargz TOCs, profiles and range
bodies from registries it does not control. This server forwards each request to the
real registry (`rig.registry`) and lies the way a hostile registry, a man in the middle
or someone with push rights would:

* it serves documents of its own, by digest and by tag (artifacts whose digests match
  their forged content: what a push-rights attacker can publish; see `rig.forgery`),
  and hides tags;
* it mangles bodies and headers in transit (`Fault`): flipped bits, truncation, extra
  bytes, a second response smuggled onto the connection, wrong Content-Range,
  Content-Type, Content-Encoding or Docker-Content-Digest, other status codes, stalls,
  trickles and dropped connections.

Each test example stages its documents and faults under a repository alias of its own,
mapped onto the real repository, so that nothing an agent remembers about one example
(manifests by digest, shared lookups) answers for the next. Every request is named by a
target such as ``manifest:image``, ``range:layer2`` or ``range:estargz1:toc``, which is
what faults are matched against.
"""

from __future__ import annotations

import asyncio
import fnmatch
import gzip
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import msgpack
from aiohttp import web

from common.digest import sha256_digest
from common.logging import get_logger
from formats.estargz_toc import FOOTER_SIZE
from rig.fault_proxy import HOP_BY_HOP, UpstreamProxy

log = get_logger(__name__)

FaultKind = Literal[
    "flip",
    "truncate",
    "cut",
    "extend",
    "smuggle",
    "stall",
    "trickle",
    "drop",
    "status",
    "content-range",
    "content-type",
    "digest-header",
    "encoding",
    "json",
    "msgpack",
]
SLOW_FAULTS: tuple[FaultKind, ...] = ("smuggle", "stall", "trickle")
"""Faults that hold a request open (or leave its connection out of step) rather than
failing it at once."""
QUICK_FAULTS: tuple[FaultKind, ...] = tuple(k for k in get_args(FaultKind) if k not in SLOW_FAULTS)
"""Faults that fail a request at once."""
FOREVER = 10**6
_PATH = re.compile(r"^/v2/(?P<name>.+?)/(?P<kind>manifests|blobs|referrers)/(?P<ref>[^/]+)$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_MEDIA_TYPES = (
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "text/html",
    "",
)
_TRICKLE_BYTES = 64
_TRICKLE_EVERY_S = 0.25


@dataclass(frozen=True)
class Document:
    """A manifest or blob the server answers itself (by digest, or for a tag)."""

    body: bytes
    media_type: str
    role: str
    """What it is, for request targets (``image``, ``index``, ``index-blob1``...)."""

    @property
    def digest(self) -> str:
        return sha256_digest(self.body)


@dataclass
class Fault:
    """One way to mangle the responses to requests whose target matches ``target``.

    ``at`` is where in the body it strikes (a fraction of its length); ``amount`` is the
    kind's number (bytes added, Content-Range shift, status code, which field or media
    type); ``seconds`` how long a stall or trickle lasts, or how long after its answer
    a smuggled response follows. Only the agent's requests
    (User-Agent ``acceld/...``) are touched unless ``agent_only`` is False, and only
    the first ``times`` of them.
    """

    kind: FaultKind
    target: str = "*"
    times: int = 1
    at: float = 0.5
    amount: int = 1
    seconds: float = 0.0
    agent_only: bool = True
    hits: int = field(default=0, init=False)

    def describe(self) -> str:
        times = "always" if self.times >= FOREVER else f"x{self.times}"
        detail = {
            "flip": f"byte at {self.at:.2f} ^ {self.amount & 0xFF or 1:#04x}",
            "truncate": f"to {self.at:.2f}",
            "cut": f"at {self.at:.2f}",
            "extend": f"+{self.amount} bytes",
            "smuggle": f"{self.amount} bytes after {self.seconds:g} s",
            "stall": f"{self.seconds:g} s at {self.at:.2f}",
            "trickle": f"for {self.seconds:g} s",
            "drop": f"at {self.at:.2f}",
            "status": str(self.amount),
            "content-range": f"start {self.amount:+d}",
            "content-type": repr(_MEDIA_TYPES[self.amount % len(_MEDIA_TYPES)]),
            "digest-header": "",
            "encoding": "gzip'd" if self.amount % 2 else "claimed",
            "json": f"leaf {self.amount}",
            "msgpack": f"leaf {self.amount}",
        }[self.kind]
        return f"{self.kind}({detail}) on {self.target} {times}"


@dataclass
class Staging:
    """What the server says for one repository alias."""

    upstream: str
    """The real repository the alias maps onto."""
    tags: dict[str, Document | None] = field(default_factory=dict)
    """Tags answered here instead of upstream (None: the tag does not exist)."""
    documents: dict[str, Document] = field(default_factory=dict)
    """Manifests and blobs by digest, answered here (blobs with Range support)."""
    roles: dict[str, str] = field(default_factory=dict)
    """Upstream manifests and blobs by digest -> their role in request targets."""
    referrers_api: dict[str, Document] = field(default_factory=dict)
    """Subject digest -> the OCI index the referrers API answers (else upstream's 404)."""
    toc_offsets: dict[str, tuple[int, int]] = field(default_factory=dict)
    """eStargz blob digest -> (TOC offset, blob size), to name footer/TOC/data ranges."""
    faults: list[Fault] = field(default_factory=list)


@dataclass(frozen=True)
class Served:
    """One request as answered: for failure reports."""

    method: str
    target: str
    status: int
    fault: str


@dataclass
class _Answer:
    status: int
    headers: dict[str, str]
    body: bytes


class HostileRegistry(UpstreamProxy):
    """Reverse proxy to ``upstream`` (http://host:port) that answers staged aliases as
    their `Staging` says; run on its own thread (`ThreadedServer`)."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream, "hostile-registry")
        self._stagings: dict[str, Staging] = {}
        self._served: dict[str, list[Served]] = {}

    def stage(self, alias: str, staging: Staging) -> None:
        """Answer requests for repository ``alias`` from now on as ``staging`` says."""
        with self._lock:
            self._stagings[alias] = staging
            self._served[alias] = []

    def unstage(self, alias: str) -> list[Served]:
        """Stop answering for ``alias`` (its requests then go upstream unchanged);
        returns what was served for it."""
        with self._lock:
            self._stagings.pop(alias, None)
            return self._served.pop(alias, [])

    # -- requests ---------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        match = _PATH.match(request.path)
        with self._lock:
            alias = match.group("name") if match else None
            staging = self._stagings.get(alias) if alias else None
        if match is None or staging is None or alias is None:
            return await self._send(request, await self._forward(request, request.path_qs))
        kind, ref = match.group("kind"), match.group("ref")
        target = _target(staging, kind, ref, request.headers.get("Range"))
        answer = self._staged(staging, kind, ref, request.headers.get("Range"))
        if answer is None:
            path = f"/v2/{staging.upstream}/{kind}/{ref}"
            if request.query_string:
                path += "?" + request.query_string
            answer = await self._forward(request, path)
        fault = self._take_fault(staging, target, request.headers.get("User-Agent", ""))
        with self._lock:
            self._served.setdefault(alias, []).append(
                Served(request.method, target, answer.status, fault.describe() if fault else "")
            )
        if fault is None or request.method == "HEAD":
            return await self._send(request, answer)
        log.info("hostile_registry.fault", alias=alias, target=target, fault=fault.describe())
        return await self._faulty(request, fault, answer)

    def _take_fault(self, staging: Staging, target: str, agent: str) -> Fault | None:
        with self._lock:
            for fault in staging.faults:
                if (
                    fault.hits < fault.times
                    and fnmatch.fnmatchcase(target, fault.target)
                    and (agent.startswith("acceld/") or not fault.agent_only)
                ):
                    fault.hits += 1
                    return fault
        return None

    def _staged(
        self, staging: Staging, kind: str, ref: str, range_header: str | None
    ) -> _Answer | None:
        """The answer a staged document gives, or None to ask upstream."""
        if kind == "referrers":
            index = staging.referrers_api.get(ref)
            return _document_answer(index, None) if index is not None else None
        if kind == "manifests" and not _DIGEST.match(ref):
            if ref not in staging.tags:
                return None
            return _document_answer(staging.tags[ref], None)
        document = staging.documents.get(ref)
        if document is None:
            return None
        return _document_answer(document, range_header if kind == "blobs" else None)

    async def _forward(self, request: web.Request, path_qs: str) -> _Answer:
        assert self._session is not None
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() not in HOP_BY_HOP and k.lower() != "host"
        }
        body = await request.read()
        async with self._session.request(
            request.method,
            self.upstream + path_qs,
            headers=headers,
            data=body or None,
            allow_redirects=False,
        ) as upstream:
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
            if request.method == "HEAD" and "Content-Length" in upstream.headers:
                out["Content-Length"] = upstream.headers["Content-Length"]
            return _Answer(upstream.status, out, await upstream.read())

    @staticmethod
    async def _send(request: web.Request, answer: _Answer) -> web.StreamResponse:
        # A HEAD answer keeps the length of the body it does not send (aiohttp sends
        # no body for HEAD, and an explicit Content-Length is not recomputed).
        return web.Response(status=answer.status, headers=answer.headers, body=answer.body)

    # -- faults -------------------------------------------------------------------------

    async def _faulty(
        self, request: web.Request, fault: Fault, answer: _Answer
    ) -> web.StreamResponse:
        body, headers, status = answer.body, dict(answer.headers), answer.status
        cut = int(fault.at * len(body))
        headers.pop("Content-Length", None)
        if fault.kind in _BODY_EDITS:
            body = _BODY_EDITS[fault.kind](body, fault)
        elif fault.kind == "status":
            status, body = fault.amount, b'{"errors":[{"code":"UNKNOWN","message":"hostile"}]}'
            headers = {"Content-Type": "application/json", "Retry-After": "0"}
        elif fault.kind == "content-range":
            headers["Content-Range"] = _shifted_range(headers.get("Content-Range"), fault.amount)
        elif fault.kind == "content-type":
            headers["Content-Type"] = _MEDIA_TYPES[fault.amount % len(_MEDIA_TYPES)]
        elif fault.kind == "digest-header":
            headers["Docker-Content-Digest"] = sha256_digest(body + b"hostile")
        elif fault.kind == "encoding":
            headers["Content-Encoding"] = "gzip"
            if fault.amount % 2:
                body = gzip.compress(body, mtime=0)
        else:
            return await self._misbehave(request, fault, status, headers, body, cut)
        return web.Response(status=status, headers=headers, body=body)

    async def _misbehave(
        self,
        request: web.Request,
        fault: Fault,
        status: int,
        headers: dict[str, str],
        body: bytes,
        cut: int,
    ) -> web.StreamResponse:
        """Faults of timing and framing: written by hand, piece by piece."""
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = len(body)
        await response.prepare(request)
        transport = request.transport
        if fault.kind == "smuggle":
            await response.write(body)
            await response.write_eof()
            # A whole second response, which the client reads as the answer to its next
            # request on this connection: sent at once it may still arrive with the
            # first (a client then drops the connection), a moment later it waits in the
            # idle connection of the client's pool.
            await asyncio.sleep(fault.seconds)
            if transport is not None and not transport.is_closing():
                junk = bytes((i * 131 + 7) & 0xFF for i in range(fault.amount))
                transport.write(
                    b"HTTP/1.1 206 Partial Content\r\n"
                    + f"Content-Range: bytes 0-{len(junk) - 1}/{len(junk)}\r\n".encode()
                    + f"Content-Length: {len(junk)}\r\n\r\n".encode()
                    + junk
                )
            return response
        if fault.kind == "trickle":
            loop = asyncio.get_running_loop()
            deadline = loop.time() + fault.seconds
            sent = 0
            while sent < len(body) and loop.time() < deadline:
                await response.write(body[sent : sent + _TRICKLE_BYTES])
                sent += _TRICKLE_BYTES
                await asyncio.sleep(_TRICKLE_EVERY_S)
            if sent >= len(body):
                await response.write_eof()
                return response
        else:
            await response.write(body[:cut])
        if fault.kind == "stall":
            await asyncio.sleep(fault.seconds)
            await response.write(body[cut:])
            await response.write_eof()
            return response
        if transport is not None:
            if fault.kind == "drop":
                transport.abort()
            else:  # cut (and a trickle out of time): a clean close, body incomplete
                transport.close()
        return response


def _target(staging: Staging, kind: str, ref: str, range_header: str | None) -> str:
    if kind == "referrers":
        return "referrers-api"
    staged = staging.tags.get(ref) if kind == "manifests" and not _DIGEST.match(ref) else None
    document = staged or staging.documents.get(ref)
    role = document.role if document else staging.roles.get(ref, "other")
    if kind == "manifests":
        return f"manifest:{role}"
    if not range_header:
        return f"blob:{role}"
    target = f"range:{role}"
    bounds = staging.toc_offsets.get(ref)
    match = _RANGE.match(range_header)
    if bounds is not None and match is not None:
        start, (toc_offset, size) = int(match.group(1)), bounds
        part = "footer" if start >= size - FOOTER_SIZE else "toc" if start >= toc_offset else "data"
        target += f":{part}"
    return target


def _document_answer(document: Document | None, range_header: str | None) -> _Answer:
    if document is None:
        body = b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}'
        return _Answer(404, {"Content-Type": "application/json"}, body)
    headers = {
        "Content-Type": document.media_type,
        "Docker-Content-Digest": document.digest,
        "Content-Length": str(len(document.body)),
    }
    match = _RANGE.match(range_header) if range_header else None
    if match is None:
        return _Answer(200, headers, document.body)
    size = len(document.body)
    start = int(match.group(1))
    end = min(int(match.group(2)) if match.group(2) else size - 1, size - 1)
    if start >= size or end < start:
        return _Answer(416, {"Content-Range": f"bytes */{size}"}, b"")
    headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    headers["Content-Length"] = str(end - start + 1)
    return _Answer(206, headers, document.body[start : end + 1])


def _shifted_range(header: str | None, shift: int) -> str:
    match = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", header or "")
    if match is None:
        return f"bytes {max(shift, 0)}-{max(shift, 0) + 10}/*"
    start, end = int(match.group(1)) + shift, int(match.group(2)) + shift
    return f"bytes {max(start, 0)}-{max(end, 0)}/{match.group(3)}"


def _flip(body: bytes, fault: Fault) -> bytes:
    if not body:
        return body
    out = bytearray(body)
    out[min(int(fault.at * len(body)), len(body) - 1)] ^= fault.amount & 0xFF or 1
    return bytes(out)


def _edited_leaf(document: Any, pick: int) -> Any:
    """``document`` with one of its scalar leaves changed (the ``pick``-th, cyclically):
    a number moved by one, a string or byte string extended, a boolean negated."""
    leaves: list[tuple[Any, Any]] = []

    def walk(node: Any) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            if isinstance(value, dict | list):
                walk(value)
            else:
                leaves.append((node, key))

    if isinstance(document, dict | list):
        walk(document)
    if not leaves:
        return document
    parent, key = leaves[pick % len(leaves)]
    value = parent[key]
    if isinstance(value, bool):
        parent[key] = not value
    elif isinstance(value, int | float):
        parent[key] = value + 1
    elif isinstance(value, str):
        parent[key] = value + "x"
    elif isinstance(value, bytes):
        parent[key] = value + b"x"
    else:
        parent[key] = 0
    return document


def _json_edit(body: bytes, fault: Fault) -> bytes:
    try:
        document = json.loads(body)
    except ValueError:
        return _flip(body, fault)
    return json.dumps(_edited_leaf(document, fault.amount), separators=(",", ":")).encode()


def _msgpack_edit(body: bytes, fault: Fault) -> bytes:
    try:
        document = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception:  # anything msgpack refuses: mangle the bytes instead
        return _flip(body, fault)
    packed: bytes = msgpack.packb(_edited_leaf(document, fault.amount), use_bin_type=True)
    return packed


_BODY_EDITS: dict[str, Callable[[bytes, Fault], bytes]] = {
    "flip": _flip,
    "truncate": lambda body, fault: body[: int(fault.at * len(body))],
    "extend": lambda body, fault: (
        body + (bytes(range(256)) * (fault.amount // 256 + 1))[: fault.amount]
    ),
    "json": _json_edit,
    "msgpack": _msgpack_edit,
}
