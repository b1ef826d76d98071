"""The registry client against the real distribution registry (plain, Basic, Bearer).

Every test talks to a real `docker-registry` process started by the rig; faults come
from the rig's proxy or from corrupting the registry's own storage.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from common.digest import sha256_digest
from fetcher import mediatypes as mt
from fetcher.credentials import Credential, CredentialStore
from fetcher.errors import (
    BodyInterruptedError,
    DigestMismatchError,
    ForbiddenError,
    MalformedResponseError,
    NotFoundError,
    RegistryUnavailableError,
    UnauthorizedError,
)
from fetcher.manifest import ImageIndex, Platform
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from fetcher.retry import RetryPolicy
from rig.fault_proxy import Fault, FaultProxy

FAST_RETRY = RetryPolicy(attempts=4, base_delay=0.05, max_delay=0.2)


def _layer(seed: int, size: int = 300_000) -> bytes:
    """A small real gzip'd tar layer with incompressible content."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        data = os.urandom(size) if seed >= 0 else b"\0" * size
        info = tarfile.TarInfo(f"file-{seed}.bin")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return gzip.compress(buf.getvalue(), mtime=0)


async def _push_image(
    client: RegistryClient,
    ref: ImageReference,
    layers: list[bytes],
    arch: str = "amd64",
    docker: bool = False,
) -> tuple[str, bytes]:
    config = json.dumps(
        {
            "architecture": arch,
            "os": "linux",
            "rootfs": {
                "type": "layers",
                "diff_ids": [sha256_digest(gzip.decompress(x)) for x in layers],
            },
        }
    ).encode()
    config_digest = await client.push_blob(ref, config)
    layer_type = mt.DOCKER_LAYER_GZIP if docker else mt.OCI_LAYER_GZIP
    layer_descs = []
    for data in layers:
        digest = await client.push_blob(ref, data)
        layer_descs.append({"mediaType": layer_type, "digest": digest, "size": len(data)})
    media_type = mt.DOCKER_MANIFEST if docker else mt.OCI_MANIFEST
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": {
                "mediaType": mt.DOCKER_CONFIG if docker else mt.OCI_CONFIG,
                "digest": config_digest,
                "size": len(config),
            },
            "layers": layer_descs,
        }
    ).encode()
    digest = await client.push_manifest(ref, manifest, media_type)
    return digest, manifest


def _blob_path(registry, digest: str) -> Path:
    hexpart = digest.split(":", 1)[1]
    return registry.storage_dir / "docker/registry/v2/blobs/sha256" / hexpart[:2] / hexpart / "data"


async def test_push_resolve_and_read_back(registry, repo_name):
    ref = ImageReference.parse(f"{registry.host}/{repo_name}:v1")
    layers = [_layer(1), _layer(2)]
    async with RegistryClient() as client:
        digest, body = await _push_image(client, ref, layers)
        resolved = await client.resolve(ref)
        assert resolved.manifest_digest == digest == sha256_digest(body)
        assert [layer.size for layer in resolved.manifest.layers] == [len(x) for x in layers]
        assert await client.get_blob(ref, resolved.manifest.layers[1].digest) == layers[1]
        assert await client.manifest_digest(ref) == digest
        assert await client.manifest_digest(ref.with_tag("absent")) is None
        assert "v1" in await client.list_tags(ref)
        by_digest = await client.get_manifest(ref.with_digest(digest))
        assert by_digest.body == body


async def test_docker_schema2_and_multiplatform_index(registry, repo_name):
    ref = ImageReference.parse(f"{registry.host}/{repo_name}:multi")
    async with RegistryClient() as client:
        amd, amd_body = await _push_image(
            client, ref.with_tag("amd"), [_layer(3)], "amd64", docker=True
        )
        arm, arm_body = await _push_image(
            client, ref.with_tag("arm"), [_layer(4)], "arm64", docker=True
        )
        index = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": mt.DOCKER_MANIFEST_LIST,
                "manifests": [
                    {
                        "mediaType": mt.DOCKER_MANIFEST,
                        "digest": amd,
                        "size": len(amd_body),
                        "platform": {"os": "linux", "architecture": "amd64"},
                    },
                    {
                        "mediaType": mt.DOCKER_MANIFEST,
                        "digest": arm,
                        "size": len(arm_body),
                        "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"},
                    },
                ],
            }
        ).encode()
        index_digest = await client.push_manifest(ref, index, mt.DOCKER_MANIFEST_LIST)
        fetched = await client.get_manifest(ref)
        assert isinstance(fetched.parsed, ImageIndex)
        assert fetched.media_type == mt.DOCKER_MANIFEST_LIST
        picked = await client.resolve(ref, Platform.parse("linux/arm64"))
        assert picked.manifest_digest == arm and picked.index_digest == index_digest
        assert picked.manifest.media_type == mt.DOCKER_MANIFEST
        assert (await client.resolve(ref, Platform.parse("linux/amd64"))).manifest_digest == amd


async def test_range_reads_and_download(registry, repo_name, tmp_path):
    ref = ImageReference.parse(f"{registry.host}/{repo_name}:r")
    layer = _layer(5, 2_000_000)
    async with RegistryClient() as client:
        digest = await client.push_blob(ref, layer)
        for offset, length in [(0, 1), (12345, 4096), (len(layer) - 100, 100), (7, 1_000_000)]:
            assert (
                await client.get_range(ref, digest, offset, length)
                == (layer[offset : offset + length])
            )
        dest = tmp_path / "blob"
        assert await client.download_blob(ref, digest, dest) == len(layer)
        assert dest.read_bytes() == layer
    ranged = [r for r in registry.requests() if r.method == "GET" and digest in r.path]
    assert len(ranged) >= 5


async def test_not_found_is_typed(registry, repo_name):
    ref = ImageReference.parse(f"{registry.host}/{repo_name}:missing")
    async with RegistryClient() as client:
        with pytest.raises(NotFoundError, match="manifest"):
            await client.get_manifest(ref)
        with pytest.raises(NotFoundError):
            await client.get_blob(ref, "sha256:" + "0" * 64)


async def test_corrupt_blob_in_registry_is_detected(registry, repo_name, tmp_path):
    ref = ImageReference.parse(f"{registry.host}/{repo_name}:c")
    layer = _layer(6)
    async with RegistryClient(retry=FAST_RETRY) as client:
        digest = await client.push_blob(ref, layer)
        path = _blob_path(registry, digest)
        corrupted = bytearray(path.read_bytes())
        corrupted[len(corrupted) // 2] ^= 0x01
        path.write_bytes(bytes(corrupted))
        with pytest.raises(DigestMismatchError, match=digest):
            await client.get_blob(ref, digest)
        dest = tmp_path / "blob"
        with pytest.raises(DigestMismatchError):
            await client.download_blob(ref, digest, dest)
        assert not dest.exists()
        assert list(tmp_path.iterdir()) == []


async def test_push_refuses_wrong_digest(registry, repo_name):
    ref = ImageReference.parse(f"{registry.host}/{repo_name}:w")
    async with RegistryClient() as client:
        with pytest.raises(DigestMismatchError):
            await client.push_blob(ref, b"abc", digest="sha256:" + "1" * 64)


async def test_basic_auth(registry_basic_auth, repo_name, tmp_path):
    server, username, password = registry_basic_auth
    ref = ImageReference.parse(f"{server.host}/{repo_name}:b")
    good = CredentialStore()
    good.add(server.host, Credential(username, password))
    async with RegistryClient(credentials=good) as client:
        digest, _ = await _push_image(client, ref, [_layer(7)])
        assert (await client.resolve(ref)).manifest_digest == digest
    async with RegistryClient() as anonymous:
        with pytest.raises(UnauthorizedError, match="needs credentials"):
            await anonymous.get_manifest(ref)
    wrong = CredentialStore()
    wrong.add(server.host, Credential(username, "wrong-password"))
    async with RegistryClient(credentials=wrong) as client:
        with pytest.raises(UnauthorizedError) as info:
            await client.get_manifest(ref)
        assert "wrong-password" not in str(info.value)
    # The same credentials, read from a Docker config.json and from a k8s secret.
    auth = base64.b64encode(f"{username}:{password}".encode()).decode()
    config = json.dumps({"auths": {server.host: {"auth": auth}}})
    (tmp_path / "config.json").write_text(config)
    secret = tmp_path / "secret.json"
    secret.write_text(
        json.dumps(
            {
                "kind": "Secret",
                "type": "kubernetes.io/dockerconfigjson",
                "data": {".dockerconfigjson": base64.b64encode(config.encode()).decode()},
            }
        )
    )
    for loader, path in [
        ("load_docker_config", tmp_path / "config.json"),
        ("load_kubernetes_secret", secret),
    ]:
        store = CredentialStore()
        getattr(store, loader)(path)
        async with RegistryClient(credentials=store) as client:
            assert (await client.resolve(ref)).manifest_digest == digest


async def test_bearer_token_flow_and_scopes(registry_token_auth, repo_name):
    server, tokens, users = registry_token_auth
    ref = ImageReference.parse(f"{server.host}/{repo_name}:t")
    writer = CredentialStore()
    writer.add(server.host, Credential(*users["writer"]))
    async with RegistryClient(credentials=writer) as client:
        digest, _ = await _push_image(client, ref, [_layer(8), _layer(9)])
        for _ in range(5):
            await client.resolve(ref)
    scopes = [r.scope for r in tokens.requests() if repo_name in (r.scope or "")]
    assert f"repository:{repo_name}:pull,push" in scopes
    assert f"repository:{repo_name}:pull" in scopes
    assert len(scopes) <= 3, f"tokens are not reused: {scopes}"

    reader = CredentialStore()
    reader.add(server.host, Credential(*users["reader"]))
    async with RegistryClient(credentials=reader) as client:
        assert (await client.resolve(ref)).manifest_digest == digest
        with pytest.raises(UnauthorizedError):
            await client.push_blob(ref.with_tag("x"), b"reader may not push")

    wrong = CredentialStore()
    wrong.add(server.host, Credential(users["reader"][0], "not-the-password"))
    async with RegistryClient(credentials=wrong) as client:
        with pytest.raises(UnauthorizedError, match="rejected the credentials"):
            await client.get_manifest(ref)


async def test_forbidden_is_distinguished(registry_token_auth, repo_name):
    server, _tokens, users = registry_token_auth
    ref = ImageReference.parse(f"{server.host}/{repo_name}:f")
    reader = CredentialStore()
    reader.add(server.host, Credential(*users["reader"]))
    async with RegistryClient(credentials=reader) as client:
        with pytest.raises((ForbiddenError, UnauthorizedError)):
            await client.push_manifest(ref, b"{}", mt.OCI_MANIFEST)


async def test_reset_mid_body_resumes_with_range(registry, repo_name):
    ref = ImageReference.parse(f"{registry.host}/{repo_name}:reset")
    layer = _layer(10, 3_000_000)
    async with RegistryClient() as client:
        digest = await client.push_blob(ref, layer)
    with FaultProxy(registry.url) as proxy:
        fault = proxy.add(Fault("reset", path_contains=digest, after_bytes=1_000_000, times=2))
        proxied = ImageReference.parse(f"{proxy.host}/{repo_name}:reset")
        async with RegistryClient(retry=FAST_RETRY) as client:
            assert await client.get_blob(proxied, digest) == layer
            assert client.transport.retries == {"stream": 2}
        assert fault.hits == 2
        gets = [path for method, path, _ in proxy.requests if method == "GET" and digest in path]
        assert len(gets) == 3


async def test_5xx_and_429_are_retried_then_give_up(registry, repo_name):
    ref = ImageReference.parse(f"{registry.host}/{repo_name}:busy")
    async with RegistryClient() as client:
        digest, _ = await _push_image(client, ref, [_layer(11)])
    with FaultProxy(registry.url) as proxy:
        proxied = ImageReference.parse(f"{proxy.host}/{repo_name}:busy")
        proxy.add(Fault("status", path_contains="/manifests/", status=503, times=2))
        proxy.add(
            Fault("status", path_contains="/manifests/", status=429, retry_after="0", times=1)
        )
        async with RegistryClient(retry=FAST_RETRY) as client:
            assert (await client.resolve(proxied)).manifest_digest == digest
            assert client.transport.retries == {"status": 3}
            proxy.add(Fault("status", path_contains="/manifests/", status=502, times=100))
            with pytest.raises(RegistryUnavailableError, match="after 4 attempts"):
                await client.get_manifest(proxied)
            assert client.transport.retries == {"status": 6}  # no retry after the last


async def test_truncated_and_flipped_bodies(registry, repo_name):
    ref = ImageReference.parse(f"{registry.host}/{repo_name}:trunc")
    layer = _layer(12, 1_000_000)
    async with RegistryClient() as client:
        digest = await client.push_blob(ref, layer)
    with FaultProxy(registry.url) as proxy:
        proxied = ImageReference.parse(f"{proxy.host}/{repo_name}:trunc")
        proxy.add(Fault("truncate", path_contains=digest, after_bytes=1000, times=1))
        async with RegistryClient(retry=FAST_RETRY) as client:
            assert await client.get_range(proxied, digest, 0, 500_000) == layer[:500_000]
            assert client.transport.retries == {"range": 1}
            proxy.add(Fault("flip", path_contains=digest, after_bytes=10, times=100))
            with pytest.raises(DigestMismatchError):
                await client.get_blob(proxied, digest)


async def test_an_oversized_header_line_is_our_error_and_not_retried(registry, repo_name):
    """Issue 21, item 3: aiohttp's own exception for a header line past its parser's
    limit escaped the client and, in the agent, the FUSE handler that called it."""
    ref = ImageReference.parse(f"{registry.host}/{repo_name}:huge-header")
    layer = _layer(13, 100_000)
    async with RegistryClient() as client:
        digest = await client.push_blob(ref, layer)
    with FaultProxy(registry.url) as proxy:
        proxied = ImageReference.parse(f"{proxy.host}/{repo_name}:huge-header")
        fault = proxy.add(Fault("header", path_contains=digest, header_bytes=1 << 20, times=100))
        async with RegistryClient(retry=FAST_RETRY) as client:
            with pytest.raises(MalformedResponseError, match="unreadable answer") as raised:
                await client.get_range(proxied, digest, 0, 1000)
            assert len(str(raised.value)) < 1000  # not the megabyte it was sent
            assert fault.hits == 1
            assert client.transport.retries == {}
            proxy.clear()
            assert await client.get_range(proxied, digest, 0, 1000) == layer[:1000]


async def test_a_manifest_body_cut_short_is_our_error(registry, repo_name):
    ref = ImageReference.parse(f"{registry.host}/{repo_name}:cut")
    async with RegistryClient() as client:
        await _push_image(client, ref, [_layer(14)])
    with FaultProxy(registry.url) as proxy:
        proxied = ImageReference.parse(f"{proxy.host}/{repo_name}:cut")
        proxy.add(Fault("truncate", path_contains="/manifests/", after_bytes=10, times=1))
        async with RegistryClient(retry=FAST_RETRY) as client:
            with pytest.raises(BodyInterruptedError, match="cut short"):
                await client.get_manifest(proxied)


async def test_redirects_followed_and_reused_until_expiry(make_redirecting_registry, repo_name):
    server, cdn = make_redirecting_registry()
    ref = ImageReference.parse(f"{server.host}/{repo_name}:redir")
    layer = _layer(13, 1_000_000)
    async with RegistryClient() as client:
        digest = await client.push_blob(ref, layer)
        client.transport._redirect_ttl = 1.0
        assert await client.get_range(ref, digest, 100, 1000) == layer[100:1100]
        assert await client.get_range(ref, digest, 5000, 10) == layer[5000:5010]
        assert await client.get_blob(ref, digest) == layer
        registry_gets = [r for r in server.requests() if r.method == "GET" and digest in r.path]
        assert len(registry_gets) == 1, "redirect URL was not reused"
        assert len([r for r in cdn.requests if r[0] == "GET"]) == 3
        assert cdn.requests[0][2] == "bytes=100-1099"
        client.transport._redirects = {
            k: (url, 0.0) for k, (url, _) in client.transport._redirects.items()
        }
        assert await client.get_range(ref, digest, 0, 10) == layer[:10]
        assert len([r for r in server.requests() if r.method == "GET" and digest in r.path]) == 2


async def test_referrers_tag_schema_fallback(registry, repo_name):
    ref = ImageReference.parse(f"{registry.host}/{repo_name}:subj")
    async with RegistryClient() as client:
        subject_digest, subject_body = await _push_image(client, ref, [_layer(14)])
        empty = await client.push_blob(ref, b"{}")
        for name in ("one", "two"):
            payload = await client.push_blob(ref, name.encode())
            artifact = json.dumps(
                {
                    "schemaVersion": 2,
                    "mediaType": mt.OCI_MANIFEST,
                    "artifactType": "application/vnd.acceld.test.v1",
                    "config": {"mediaType": mt.OCI_EMPTY, "digest": empty, "size": 2},
                    "layers": [
                        {
                            "mediaType": "application/octet-stream",
                            "digest": payload,
                            "size": len(name),
                        }
                    ],
                    "subject": {
                        "mediaType": mt.OCI_MANIFEST,
                        "digest": subject_digest,
                        "size": len(subject_body),
                    },
                    "annotations": {"name": name},
                }
            ).encode()
            await client.push_referrer(ref, artifact, mt.OCI_MANIFEST)
        found = await client.referrers(
            ref, subject_digest, artifact_type="application/vnd.acceld.test.v1"
        )
        assert sorted(d.annotations["name"] for d in found) == ["one", "two"]
        assert await client.referrers(ref, subject_digest, artifact_type="other/type") == []
