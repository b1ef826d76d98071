"""Registries reached as the node's containerd reaches them (containerd's hosts.toml):
a private CA, client certificates, mirrors in order with fallback, per-host headers and
credentials, range reads resumed on the next host. Real registries (distribution) behind
real TLS; the fault proxy plays a mirror that misbehaves on cue."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from fetcher.credentials import CredentialStore
from fetcher.errors import RegistryUnavailableError
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from fetcher.retry import RetryPolicy
from rig.fault_proxy import Fault, FaultProxy
from rig.hosts_toml import write_hosts_toml, write_https_hosts
from rig.ports import free_port
from rig.registry import RegistryServer

FAST_RETRY = RetryPolicy(attempts=3, base_delay=0.05, max_delay=0.2)
LAYER = os.urandom(3_000_000)


async def _push_layer(client: RegistryClient, ref: ImageReference) -> str:
    return await client.push_blob(ref, LAYER)


async def test_private_ca_is_used_only_through_hosts_toml(tls_registry, repo_name, tmp_path):
    ref = ImageReference.parse(f"{tls_registry.host}/{repo_name}:ca")
    write_https_hosts(tmp_path, tls_registry)
    async with RegistryClient(hosts_dir=str(tmp_path)) as client:
        digest = await _push_layer(client, ref)
        assert await client.get_range(ref, digest, 1000, 5000) == LAYER[1000:6000]
        assert client.transport.served[(tls_registry.host, "server")] >= 2
    # Without the CA the system's store is all there is: the registry is not trusted.
    write_https_hosts(tmp_path, tls_registry, ca=False)
    async with RegistryClient(hosts_dir=str(tmp_path), retry=FAST_RETRY) as client:
        with pytest.raises(RegistryUnavailableError, match="CERTIFICATE_VERIFY_FAILED"):
            await client.blob_size(ref, digest)


async def test_client_certificates_from_hosts_toml(mtls_registry, repo_name, tmp_path):
    ref = ImageReference.parse(f"{mtls_registry.host}/{repo_name}:mtls")
    write_https_hosts(tmp_path, mtls_registry)
    async with RegistryClient(hosts_dir=str(tmp_path)) as client:
        digest = await _push_layer(client, ref)
        assert await client.get_range(ref, digest, 0, 100) == LAYER[:100]
    write_https_hosts(tmp_path, mtls_registry, client=False)
    async with RegistryClient(hosts_dir=str(tmp_path), retry=FAST_RETRY) as client:
        with pytest.raises(RegistryUnavailableError, match=r"CERTIFICATE_REQUIRED|alert"):
            await client.blob_size(ref, digest)


def _mirror_hosts(hosts_dir: Path, registry: RegistryServer, *mirrors: str, **extra: Any) -> None:
    """hosts.toml: ``mirrors`` (plain http, pull only) before the registry itself."""
    tables = {f"http://{m}": {"capabilities": ["pull"], **extra} for m in mirrors}
    write_hosts_toml(hosts_dir, registry.host, {"server": registry.url, "host": tables})


async def test_mirror_serves_content_server_resolves(
    registry, image_pusher, built_busybox, tmp_path
):
    pushed = await image_pusher.push(built_busybox)
    ref = ImageReference.parse(pushed.reference)
    with FaultProxy(registry.url) as mirror:
        _mirror_hosts(tmp_path, registry, mirror.host, header={"X-Mirror-Key": ["a", "b"]})
        async with RegistryClient(hosts_dir=str(tmp_path)) as client:
            resolved = await client.resolve(ref)
            layer = resolved.manifest.layers[0]
            data = await client.get_range(ref, layer.digest, 0, 4096)
            mirrored = len(mirror.requests)
            # A push, and its check for what the registry has, go to the server only.
            await client.push_blob(ref, os.urandom(1000))
            served = dict(client.transport.served)
    assert len(data) == 4096
    assert len(mirror.requests) == mirrored
    # The tag went to the server (a pull-only mirror may not resolve); content by
    # digest to the mirror, with its headers and the namespace it stands in for.
    paths = [path for _, path, _ in mirror.requests]
    assert not any("/manifests/latest" in p for p in paths)
    assert any(f"/blobs/{layer.digest}?ns=" in p for p in paths)
    assert [h.get("X-Mirror-Key") for h in mirror.headers] == ["a, b"] * len(mirror.headers)
    assert served[(mirror.host, "mirror")] == len(mirror.requests)
    assert served[(registry.host, "server")] >= 1


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        (Fault("status", path_contains="/blobs/", status=503, times=100), "status"),
        (Fault("status", path_contains="/blobs/", status=404, times=100), "not_found"),
    ],
)
async def test_mirror_error_status_falls_to_server(registry, repo_name, tmp_path, fault, reason):
    ref = ImageReference.parse(f"{registry.host}/{repo_name}:s")
    async with RegistryClient() as client:
        digest = await _push_layer(client, ref)
    with FaultProxy(registry.url) as mirror:
        mirror.add(fault)
        _mirror_hosts(tmp_path, registry, mirror.host)
        async with RegistryClient(hosts_dir=str(tmp_path), retry=FAST_RETRY) as client:
            for _ in range(2):
                assert await client.get_range(ref, digest, 10, 100) == LAYER[10:110]
            skipped = dict(client.transport.skipped)
    # One attempt per request on a mirror, then the server: no retries spent there.
    assert fault.hits == 2
    assert skipped == {(mirror.host, "mirror", reason): 2}


async def test_unreachable_mirror_is_passed_over(registry, repo_name, tmp_path):
    ref = ImageReference.parse(f"{registry.host}/{repo_name}:down")
    dead = f"127.0.0.1:{free_port()}"
    async with RegistryClient() as client:
        digest = await _push_layer(client, ref)
    _mirror_hosts(tmp_path, registry, dead)
    async with RegistryClient(hosts_dir=str(tmp_path), retry=FAST_RETRY) as client:
        for _ in range(3):
            assert await client.get_range(ref, digest, 0, 10) == LAYER[:10]
        skipped = dict(client.transport.skipped)
        assert client.transport.served == {(registry.host, "server"): 3}
    # One failed connection, then the mirror is passed over without another try.
    assert skipped == {(dead, "mirror", "connection"): 1, (dead, "mirror", "down"): 2}


async def test_range_cut_on_mirror_resumes_on_server_from_byte_reached(
    registry, repo_name, tmp_path
):
    ref = ImageReference.parse(f"{registry.host}/{repo_name}:resume")
    async with RegistryClient() as client:
        digest = await _push_layer(client, ref)
    length, cut = 2_000_000, 700_000
    with FaultProxy(registry.url) as mirror:
        mirror.add(Fault("reset", path_contains=digest, after_bytes=cut))
        _mirror_hosts(tmp_path, registry, mirror.host)
        before = len(registry.requests())
        async with RegistryClient(hosts_dir=str(tmp_path), retry=FAST_RETRY) as client:
            assert await client.get_range(ref, digest, 5, length) == LAYER[5 : 5 + length]
            # Cut once, then passed over: the retry went straight to the server.
            assert dict(client.transport.skipped) == {
                (mirror.host, "mirror", "body"): 1,
                (mirror.host, "mirror", "down"): 1,
            }
    await asyncio.sleep(0.2)  # the registry logs a request once its handler returned
    # Two reads of the blob reached the registry: the fault proxy's (it forwards the
    # client's User-Agent) for the whole range, and the client's own, after the cut,
    # for the bytes the mirror had not delivered only.
    sizes = sorted(
        r.size
        for r in registry.requests()[before:]
        if digest in r.path and r.user_agent.startswith("acceld") and r.status == 206
    )
    assert sizes == [length - cut, length]


async def test_mirror_answers_a_401_with_its_own_credentials(
    registry, registry_basic_auth, repo_name, tmp_path
):
    ref = ImageReference.parse(f"{registry.host}/{repo_name}:auth")
    async with RegistryClient() as client:
        digest = await _push_layer(client, ref)
    mirror = registry_basic_auth.server
    _mirror_hosts(tmp_path, registry, mirror.host)
    config = tmp_path / "config.json"
    for password, reason in ((registry_basic_auth.password, "not_found"), ("wrong", "auth")):
        entry = {"username": registry_basic_auth.username, "password": password}
        config.write_text(json.dumps({"auths": {mirror.host: entry}}))
        store = CredentialStore.from_files(config, ())
        before = len(mirror.requests())
        async with RegistryClient(
            credentials=store, hosts_dir=str(tmp_path), retry=FAST_RETRY
        ) as client:
            assert await client.get_range(ref, digest, 0, 10) == LAYER[:10]
            assert dict(client.transport.skipped) == {(mirror.host, "mirror", reason): 1}
        await asyncio.sleep(0.2)  # the registry logs a request once its handler returned
        statuses = [r.status for r in mirror.requests()[before:]]
        # The mirror holds no such blob: with its credentials it answers 404, with
        # wrong ones 401 again; either way the server served the read.
        assert statuses == [401, 404 if reason == "not_found" else 401], statuses
