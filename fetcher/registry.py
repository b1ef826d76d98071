"""The OCI distribution client every part of acceld uses.

Manifests and indexes (with platform selection), whole-blob downloads that are verified
against their digest and resume after a dropped connection, HTTP Range reads for lazy
loading, pushes (blobs, manifests) for the converter and profile sharing, tag listing,
and referrers with the OCI tag-schema fallback for registries without the referrers API.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Protocol
from urllib.parse import urljoin

import aiofiles
import aiohttp

from common.digest import digest_of_hasher, new_hasher, sha256_digest, validate_digest
from common.logging import get_logger
from fetcher import mediatypes as mt
from fetcher.bodies import json_capped, read_capped
from fetcher.credentials import CredentialStore
from fetcher.errors import (
    BodyInterruptedError,
    DigestMismatchError,
    ManifestError,
    NotFoundError,
    RangeNotSupportedError,
    RegistryError,
    RegistryUnavailableError,
    ResponseTooLargeError,
    UnsupportedMediaTypeError,
)
from fetcher.hosts_config import RESOLVING, Capability, RegistryHost
from fetcher.http_errors import reading_body
from fetcher.manifest import (
    MAX_MANIFEST_BYTES,
    Descriptor,
    ImageIndex,
    ImageManifest,
    Platform,
    parse_manifest,
)
from fetcher.reference import ImageReference
from fetcher.registry_policy import RegistryPolicy
from fetcher.retry import RetryPolicy
from fetcher.transport import RegistryTransport, Target, raise_for_status

log = get_logger(__name__)

STREAM_CHUNK = 1 << 20
MAX_SMALL_BLOB = 64 << 20
_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


@dataclass(frozen=True)
class FetchedManifest:
    """A manifest or index as fetched: raw bytes (what digests cover) and the parse."""

    digest: str
    media_type: str
    body: bytes
    parsed: ImageManifest | ImageIndex


@dataclass(frozen=True)
class ResolvedImage:
    """An image reference resolved to one platform's manifest."""

    reference: ImageReference
    manifest_digest: str
    manifest: ImageManifest
    manifest_body: bytes
    index_digest: str | None = None


def referrers_tag(digest: str) -> str:
    """The OCI tag-schema fallback tag for referrers of ``digest`` (`sha256-<hex>`)."""
    algorithm, hexpart = validate_digest(digest).split(":", 1)
    return f"{algorithm}-{hexpart}"[:128]


class RangeSink(Protocol):
    """Takes a range body piece by piece (e.g. to inflate it while the rest arrives)."""

    def restart(self) -> None:
        """A new attempt's body begins: forget what earlier attempts fed."""

    def feed(self, data: bytes) -> None:
        """The next piece of the body."""


class _Received:
    """What a range read has received so far, across its attempts and hosts: a resumed
    request asks only for the rest, and ``sink`` sees each byte once."""

    def __init__(self, length: int, sink: RangeSink | None) -> None:
        self.length = length
        self.size = 0
        self._sink = sink
        self._pieces: list[bytes] = []
        if sink is not None:
            sink.restart()

    async def read(self, resp: aiohttp.ClientResponse) -> int:
        """Take ``resp``'s body; how many bytes it brought. Never holds more than the
        ``length`` asked for: a body running past it is refused as it arrives."""
        announced = resp.content_length
        if announced is not None and self.size + announced > self.length:
            raise ResponseTooLargeError(
                f"range body of {announced} bytes announced, over the {self.length} asked for"
            )
        got = 0
        async for piece in resp.content.iter_chunked(STREAM_CHUNK):
            if self.size + len(piece) > self.length:
                raise ResponseTooLargeError(
                    f"range body runs past the {self.length} bytes asked for"
                )
            self._pieces.append(piece)
            self.size += len(piece)
            got += len(piece)
            if self._sink is not None:
                self._sink.feed(piece)
        return got

    def drop(self) -> None:
        """Forget everything received (bytes that cannot be trusted to line up)."""
        self._pieces.clear()
        self.size = 0
        if self._sink is not None:
            self._sink.restart()

    def data(self) -> bytes:
        """The bytes received, in order."""
        return b"".join(self._pieces)


class RegistryClient:
    """Async OCI registry client. Use as `async with RegistryClient(...) as client:`."""

    def __init__(
        self,
        credentials: CredentialStore | None = None,
        plain_http_hosts: set[str] | frozenset[str] = frozenset(),
        retry: RetryPolicy | None = None,
        max_connections_per_host: int = 8,
        connect_timeout: float = 10.0,
        read_timeout: float = 30.0,
        policy: RegistryPolicy | None = None,
        hosts_dir: str = "",
    ) -> None:
        """``policy`` limits which registries are contacted (default: any);
        ``hosts_dir`` is containerd's ``config_path`` (`fetcher.hosts_config`; empty:
        no hosts.toml is read)."""
        self.transport = RegistryTransport(
            credentials=credentials,
            plain_http_hosts=plain_http_hosts,
            retry=retry,
            max_connections_per_host=max_connections_per_host,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            policy=policy,
            hosts_dir=hosts_dir,
        )

    async def __aenter__(self) -> RegistryClient:
        await self.transport.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.transport.close()

    @staticmethod
    def _api(ref: ImageReference, kind: str, name: str) -> str:
        """The request's path below a host's API root."""
        return f"{ref.repository}/{kind}/{name}"

    @staticmethod
    def _target(ref: ImageReference, push: bool = False) -> Target:
        return Target(ref.registry, ref.repository, push)

    @staticmethod
    def _need(ref: ImageReference) -> Capability:
        """A manifest by tag is a resolve; by digest, a pull (containerd's split)."""
        return Capability.PULL if ref.digest else RESOLVING

    def forget_redirect(self, ref: ImageReference, digest: str) -> None:
        """A redirect to a bad copy of a blob must not serve the retry too."""
        self.transport.forget_redirect(self._target(ref), digest)

    # -- manifests -----------------------------------------------------------------

    async def get_manifest(
        self, ref: ImageReference, accept: str = mt.MANIFEST_ACCEPT
    ) -> FetchedManifest:
        """Fetch and verify the manifest or index ``ref`` names."""
        resp, _ = await self.transport.send(
            "GET",
            self._target(ref),
            self._api(ref, "manifests", ref.reference),
            need=self._need(ref),
            headers={"Accept": accept},
        )
        url = str(resp.url.with_query(None))
        await raise_for_status(resp, f"manifest {ref}")
        try:
            body = await read_capped(resp, MAX_MANIFEST_BYTES, f"manifest {ref}")
        finally:
            resp.release()
        digest = sha256_digest(body)
        # A pinned reference is checked in its own algorithm (validated when parsed); a
        # registry's Docker-Content-Digest header is only a hint, checked when sha256.
        header = resp.headers.get("Docker-Content-Digest", "")
        expected = ref.digest or (header if header.startswith("sha256:") else None)
        if expected:
            hasher = new_hasher(expected)
            hasher.update(body)
            if digest_of_hasher(hasher) != expected:
                raise DigestMismatchError(
                    f"manifest {ref}: content does not hash to {expected}", url=url
                )
        parsed = parse_manifest(body, resp.headers.get("Content-Type"))
        return FetchedManifest(digest, parsed.media_type, body, parsed)

    async def manifest_digest(self, ref: ImageReference) -> str | None:
        """The digest ``ref`` currently points at (HEAD), or None if it does not exist."""
        resp, _ = await self.transport.send(
            "HEAD",
            self._target(ref),
            self._api(ref, "manifests", ref.reference),
            need=self._need(ref),
            headers={"Accept": mt.MANIFEST_ACCEPT},
        )
        if resp.status == 404:
            resp.release()
            return None
        await raise_for_status(resp, f"manifest {ref}")
        resp.release()
        header = resp.headers.get("Docker-Content-Digest")
        if header:
            return validate_digest(header)
        return (await self.get_manifest(ref)).digest

    async def resolve(self, ref: ImageReference, platform: Platform | None = None) -> ResolvedImage:
        """Resolve ``ref`` to the image manifest for ``platform`` (default: this host's)."""
        fetched = await self.get_manifest(ref)
        index_digest = None
        if isinstance(fetched.parsed, ImageIndex):
            index_digest = fetched.digest
            chosen = fetched.parsed.select(platform or Platform.host())
            fetched = await self.get_manifest(ref.with_digest(chosen.digest))
            if isinstance(fetched.parsed, ImageIndex):
                raise ManifestError(f"{ref}: index points at another index, not an image")
        manifest = fetched.parsed
        assert isinstance(manifest, ImageManifest)
        for i, layer in enumerate(manifest.layers):
            if layer.media_type in (mt.DOCKER_SCHEMA1, mt.DOCKER_SCHEMA1_SIGNED):
                raise UnsupportedMediaTypeError(f"{ref}: layers[{i}] has schema-1 media type")
        return ResolvedImage(ref, fetched.digest, manifest, fetched.body, index_digest)

    async def push_manifest(self, ref: ImageReference, body: bytes, media_type: str) -> str:
        """Push a manifest under ``ref``'s tag (or digest); return its digest."""
        digest = sha256_digest(body)
        headers = await self._put_manifest(ref, body, media_type)
        returned = headers.get("Docker-Content-Digest")
        if returned and returned != digest:
            raise DigestMismatchError(
                f"registry stored manifest {ref} as {returned}, expected {digest}"
            )
        log.info("registry.manifest_pushed", ref=str(ref), digest=digest)
        return digest

    async def _put_manifest(
        self, ref: ImageReference, body: bytes, media_type: str
    ) -> Mapping[str, str]:
        """PUT a manifest at ``ref.reference``; returns the response headers."""
        resp, _ = await self.transport.send(
            "PUT",
            self._target(ref, push=True),
            self._api(ref, "manifests", ref.reference),
            need=Capability.PUSH,
            headers={"Content-Type": media_type},
            body=lambda: body,
        )
        await raise_for_status(resp, f"manifest push {ref}")
        resp.release()
        return resp.headers

    async def delete_manifest(self, ref: ImageReference) -> None:
        """Delete a manifest by digest (the registry must allow deletes)."""
        if not ref.digest:
            raise ValueError("deleting a manifest needs a digest reference")
        resp, _ = await self.transport.send(
            "DELETE",
            self._target(ref, push=True),
            self._api(ref, "manifests", ref.digest),
            need=Capability.PUSH,
        )
        await raise_for_status(resp, f"manifest delete {ref}")
        resp.release()

    async def list_tags(self, ref: ImageReference, limit: int | None = None) -> list[str]:
        """The repository's tags, following `Link` pagination: every one, or the first
        ``limit`` (a registry that paginates forever is not followed forever)."""
        tags: list[str] = []
        target = self._target(ref)
        resp, host = await self.transport.send(
            "GET", target, f"{ref.repository}/tags/list", need=RESOLVING
        )
        while True:
            await raise_for_status(resp, f"tags of {ref.repository}")
            try:
                doc = await json_capped(resp, MAX_MANIFEST_BYTES, f"tags of {ref.repository}")
            finally:
                resp.release()
            if not isinstance(doc, dict):
                raise RegistryError(f"tags of {ref.repository}: not a JSON object")
            tags.extend(t for t in (doc.get("tags") or []) if isinstance(t, str))
            link = resp.links.get("next")
            if not link or (limit is not None and len(tags) >= limit):
                return tags if limit is None else tags[:limit]
            # The next page is the same host's: another host's pages need not line up.
            url = urljoin(str(resp.url), str(link["url"]))
            resp = await self.transport.send_to("GET", target, host, url)

    # -- blobs -----------------------------------------------------------------------

    async def blob_size(
        self, ref: ImageReference, digest: str, need: Capability = Capability.PULL
    ) -> int | None:
        """Size of the blob if the repository has it, else None (``need`` PUSH: as the
        host a push goes to has it, a mirror's copy does not count)."""
        resp, _ = await self.transport.send(
            "HEAD",
            self._target(ref),
            self._api(ref, "blobs", validate_digest(digest)),
            need=need,
            blob_digest=digest,
        )
        if resp.status == 404:
            resp.release()
            return None
        await raise_for_status(resp, f"blob {digest}")
        resp.release()
        return resp.content_length

    async def iter_blob(self, ref: ImageReference, digest: str) -> AsyncIterator[bytes]:
        """Stream a blob, resuming with a Range after a dropped connection.

        A mirror that cuts the stream, or answers the resumed Range whole, is passed
        over and the next host continues from the byte reached. The digest is checked
        when the stream ends: a consumer must treat the data as unverified until
        iteration finishes without DigestMismatchError.
        """
        target = self._target(ref)
        api = self._api(ref, "blobs", validate_digest(digest))
        hasher = new_hasher(digest)
        offset = 0
        url = ""
        policy = self.transport.retry
        for attempt in range(policy.attempts):
            headers = {"Range": f"bytes={offset}-"} if offset else {}
            resp, host = await self.transport.send(
                "GET", target, api, headers=headers, blob_digest=digest
            )
            url = str(resp.url.with_query(None))
            await raise_for_status(resp, f"blob {digest}")
            if offset and resp.status == 200 and host.mirror:
                resp.release()
                self.transport.pass_over(target, host, "no_range", digest)
                continue
            skip = offset if (offset and resp.status == 200) else 0
            try:
                with reading_body(f"blob {digest}", url):
                    async for chunk in resp.content.iter_chunked(STREAM_CHUNK):
                        if skip:
                            cut = min(skip, len(chunk))
                            chunk, skip = chunk[cut:], skip - cut
                            if not chunk:
                                continue
                        hasher.update(chunk)
                        offset += len(chunk)
                        yield chunk
                break
            except BodyInterruptedError as exc:
                log.warning(
                    "registry.blob_stream_interrupted",
                    digest=digest,
                    offset=offset,
                    host=host.host,
                    error=str(exc),
                    attempt=attempt + 1,
                )
                if attempt + 1 == policy.attempts:
                    raise RegistryUnavailableError(
                        f"blob {digest}: stream kept failing at byte {offset}", url=url
                    ) from None
                self.transport.retries["stream"] += 1
                if host.mirror:
                    self.transport.pass_over(target, host, "body")
                else:
                    await asyncio.sleep(policy.delay(attempt))
            finally:
                resp.release()
        actual = digest_of_hasher(hasher)
        if actual != digest:
            self.transport.forget_redirect(target, digest)
            raise DigestMismatchError(f"blob {digest}: received bytes hash to {actual}", url=url)

    async def get_blob(
        self, ref: ImageReference, digest: str, max_size: int = MAX_SMALL_BLOB
    ) -> bytes:
        """A small blob (config, index, TOC) in memory, verified."""
        parts: list[bytes] = []
        total = 0
        async for chunk in self.iter_blob(ref, digest):
            total += len(chunk)
            if total > max_size:
                raise RegistryError(f"blob {digest} exceeds {max_size} bytes")
            parts.append(chunk)
        return b"".join(parts)

    async def download_blob(self, ref: ImageReference, digest: str, dest: Path) -> int:
        """Download a blob to ``dest`` atomically: only verified bytes ever appear there."""
        tmp = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
        size = 0
        try:
            async with aiofiles.open(tmp, "wb") as out:
                async for chunk in self.iter_blob(ref, digest):
                    await out.write(chunk)
                    size += len(chunk)
                await out.flush()
                await asyncio.to_thread(os.fsync, out.fileno())
            tmp.replace(dest)
        finally:
            tmp.unlink(missing_ok=True)
        return size

    async def get_range(
        self,
        ref: ImageReference,
        digest: str,
        offset: int,
        length: int,
        sink: RangeSink | None = None,
    ) -> bytes:
        """Bytes [offset, offset+length) of a blob with HTTP Range GETs.

        A registry that ignores Range raises RangeNotSupportedError rather than making
        us download the whole layer (a mirror that does is passed over for the next
        host). A body a mirror cut short is resumed on the next host from the byte
        reached; any other bad body is retried whole. A ``sink`` is fed the bytes as
        they arrive, and restarted when they are dropped.
        """
        if offset < 0 or length <= 0:
            raise ValueError(f"invalid range offset={offset} length={length}")
        target = self._target(ref)
        api = self._api(ref, "blobs", validate_digest(digest))
        received = _Received(length, sink)
        policy = self.transport.retry
        problem = ""
        url = ""
        for attempt in range(policy.attempts):
            start = offset + received.size
            headers = {"Range": f"bytes={start}-{offset + length - 1}"}
            resp, host = await self.transport.send(
                "GET", target, api, headers=headers, blob_digest=digest
            )
            url = str(resp.url.with_query(None))
            if resp.status == 416:
                resp.release()
                raise RegistryError(
                    f"blob {digest}: range {offset}+{length} beyond its end", 416, url
                )
            await raise_for_status(resp, f"blob {digest}")
            passed_over = ""
            try:
                if resp.status != 206:
                    if not host.mirror:
                        raise RangeNotSupportedError(
                            f"blob {digest}: registry answered {resp.status} to a Range GET",
                            resp.status,
                            url,
                        )
                    passed_over = "no_range"
                    problem = f"{host.host} answered {resp.status} to a Range GET"
                else:
                    match = _CONTENT_RANGE_RE.match(resp.headers.get("Content-Range", ""))
                    if match and int(match.group(1)) != start:
                        problem = f"Content-Range {resp.headers['Content-Range']} for {start}"
                    else:
                        with reading_body("range body", url):
                            got = await received.read(resp)
                        if received.size == length or (
                            match and got == int(match.group(2)) - start + 1
                        ):
                            return received.data()
                        problem = f"short body {received.size} of {length}"
                        if not host.mirror:
                            received.drop()
            except BodyInterruptedError as exc:
                problem = f"{type(exc).__name__}: {exc}"
                if host.mirror:
                    passed_over = "body"
                else:
                    # The same host is asked again, for the whole range as ever.
                    received.drop()
            except ResponseTooLargeError as exc:
                problem = f"{type(exc).__name__}: {exc}"
                received.drop()
            finally:
                resp.release()
            if passed_over:
                self.transport.pass_over(target, host, passed_over, digest)
            log.warning(
                "registry.range_retry",
                digest=digest,
                offset=offset,
                length=length,
                received=received.size,
                host=host.host,
                problem=problem,
                attempt=attempt + 1,
            )
            if attempt + 1 < policy.attempts:
                self.transport.retries["range"] += 1
                if not passed_over:
                    await asyncio.sleep(policy.delay(attempt))
        raise RegistryUnavailableError(f"blob {digest}: range read failed: {problem}", url=url)

    async def _start_upload(self, ref: ImageReference) -> tuple[str, RegistryHost]:
        """An upload's Location, and the host that gave it (the rest goes there too)."""
        resp, host = await self.transport.send(
            "POST",
            self._target(ref, push=True),
            f"{ref.repository}/blobs/uploads/",
            need=Capability.PUSH,
            headers={"Content-Length": "0"},
        )
        await raise_for_status(resp, f"upload to {ref.repository}")
        resp.release()
        location = resp.headers.get("Location")
        if not location:
            raise RegistryError("registry started an upload without a Location", resp.status)
        return urljoin(str(resp.url), location), host

    async def _upload(self, ref: ImageReference, digest: str, size: int, open_body: Any) -> None:
        """POST + monolithic PUT, retried as a unit (a broken upload session is discarded)."""
        policy = self.transport.retry
        for attempt in range(policy.attempts):
            location, host = await self._start_upload(ref)
            sep = "&" if "?" in location else "?"
            try:
                resp = await self.transport.send_to(
                    "PUT",
                    self._target(ref, push=True),
                    host,
                    f"{location}{sep}digest={digest}",
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Length": str(size),
                    },
                    body=open_body,
                    attempts=1,
                )
            except RegistryUnavailableError as exc:
                if attempt + 1 == policy.attempts:
                    raise
                log.warning("registry.upload_retry", digest=digest, error=str(exc))
                self.transport.retries["upload"] += 1
                await asyncio.sleep(policy.delay(attempt))
                continue
            await raise_for_status(resp, f"blob upload {digest}")
            resp.release()
            log.info("registry.blob_pushed", repository=ref.repository, digest=digest, size=size)
            return

    async def push_blob(self, ref: ImageReference, data: bytes, digest: str | None = None) -> str:
        """Push an in-memory blob unless the repository has it; return its digest."""
        actual = sha256_digest(data)
        if digest and digest != actual:
            raise DigestMismatchError(f"blob to push hashes to {actual}, not {digest}")
        if await self.blob_size(ref, actual, Capability.PUSH) is None:
            await self._upload(ref, actual, len(data), lambda: data)
        return actual

    async def push_blob_file(self, ref: ImageReference, path: Path, digest: str, size: int) -> None:
        """Push a blob from disk (streamed, never loaded whole) unless it already exists."""
        validate_digest(digest)
        if path.stat().st_size != size:
            raise ValueError(f"{path} is {path.stat().st_size} bytes, descriptor says {size}")
        if await self.blob_size(ref, digest, Capability.PUSH) is not None:
            return
        handles: list[BinaryIO] = []

        def open_body() -> BinaryIO:
            handle = path.open("rb")
            handles.append(handle)
            return handle

        try:
            await self._upload(ref, digest, size, open_body)
        finally:
            for handle in handles:
                handle.close()

    # -- referrers -------------------------------------------------------------------

    async def referrers(
        self, ref: ImageReference, subject_digest: str, artifact_type: str | None = None
    ) -> list[Descriptor]:
        """Manifests whose `subject` is ``subject_digest``: referrers API, else tag schema."""
        api = self._api(ref, "referrers", validate_digest(subject_digest))
        if artifact_type:
            api += f"?artifactType={artifact_type}"
        resp, _ = await self.transport.send(
            "GET", self._target(ref), api, need=RESOLVING, headers={"Accept": mt.OCI_INDEX}
        )
        content_type = resp.headers.get("Content-Type", "").split(";")[0]
        if resp.status == 200 and content_type == mt.OCI_INDEX:
            try:
                body = await read_capped(resp, MAX_MANIFEST_BYTES, f"referrers of {subject_digest}")
            finally:
                resp.release()
            parsed = parse_manifest(body, content_type)
            descriptors = list(parsed.manifests) if isinstance(parsed, ImageIndex) else []
        else:
            resp.release()
            if resp.status not in (404, 400, 405):
                await raise_for_status(resp, f"referrers of {subject_digest}")
            descriptors = await self._fallback_referrers(ref, subject_digest)
        if artifact_type:
            descriptors = [d for d in descriptors if d.artifact_type == artifact_type]
        return descriptors

    async def _fallback_referrers(
        self, ref: ImageReference, subject_digest: str
    ) -> list[Descriptor]:
        try:
            fetched = await self.get_manifest(
                ref.with_tag(referrers_tag(subject_digest)), accept=mt.OCI_INDEX
            )
        except NotFoundError:
            return []
        if not isinstance(fetched.parsed, ImageIndex):
            raise ManifestError(f"referrers tag of {subject_digest} is not an OCI index")
        return list(fetched.parsed.manifests)

    async def push_referrer(self, ref: ImageReference, body: bytes, media_type: str) -> str:
        """Push a manifest that has a `subject` and make it discoverable as a referrer.

        Registries with the referrers API index it themselves (they answer with an
        `OCI-Subject` header); otherwise the tag-schema index is read, extended and
        written back.
        """
        doc = json.loads(body)
        subject = doc.get("subject") if isinstance(doc, dict) else None
        if not isinstance(subject, dict) or "digest" not in subject:
            raise ManifestError("a referrer manifest needs a subject")
        digest = sha256_digest(body)
        headers = await self._put_manifest(ref.with_digest(digest), body, media_type)
        if headers.get("OCI-Subject"):
            return digest
        descriptor: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": len(body)}
        if doc.get("artifactType") or doc.get("config", {}).get("mediaType"):
            descriptor["artifactType"] = doc.get("artifactType") or doc["config"]["mediaType"]
        if doc.get("annotations"):
            descriptor["annotations"] = doc["annotations"]
        existing = await self._fallback_referrers(ref, subject["digest"])
        index = {
            "schemaVersion": 2,
            "mediaType": mt.OCI_INDEX,
            "manifests": [d.to_json() for d in existing if d.digest != digest] + [descriptor],
        }
        await self.push_manifest(
            ref.with_tag(referrers_tag(subject["digest"])),
            json.dumps(index, separators=(",", ":")).encode(),
            mt.OCI_INDEX,
        )
        return digest
