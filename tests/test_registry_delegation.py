"""Where a registry may send the client, and what goes along (issue 21, item 7):
credentials reach a token realm only over https or on the registry's own host,
redirects and token realms never lead a public registry's client to non-public
addresses (written as such, or names that resolve to them, also when the name server
changes its answer between lookups), and Docker credential helpers run off the event
loop, once per HELPER_TTL_S.

Registries on public addresses and names that resolve where a test says exist only in
a network and mount namespace of the test's own (`rig.isolated_net`): the scenarios
below run there, in a child process, and the tests judge what they report."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from fetcher.credentials import Credential, CredentialStore
from fetcher.delegation import (
    delegate_allowed,
    may_send_credentials,
    registry_host,
    written_non_public,
)
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from rig.delegating_registry import (
    MANIFEST,
    DelegatingRegistry,
    StorageDelegate,
    read_outcome,
    serving,
)
from rig.dns_server import DnsServer
from rig.isolated_net import run_isolated
from rig.threaded_server import ThreadedServer


class _TokenRegistry:
    """A registry whose token realm is at ``realm_host`` (plain http), recording whether
    the token requests carried credentials."""

    def __init__(self, realm_host: str) -> None:
        self.realm_host = realm_host
        self.token_auth: list[str | None] = []
        self.server = ThreadedServer(self._app, name="token-registry")

    async def _app(self) -> web.Application:
        async def manifest(request: web.Request) -> web.Response:
            if request.headers.get("Authorization") != "Bearer t0ken":
                realm = f"http://{self.realm_host}:{self.server.port}/token"
                challenge = f'Bearer realm="{realm}",service="svc"'
                return web.Response(status=401, headers={"WWW-Authenticate": challenge})
            media = "application/vnd.oci.image.manifest.v1+json"
            return web.Response(body=MANIFEST, headers={"Content-Type": media})

        async def token(request: web.Request) -> web.Response:
            self.token_auth.append(request.headers.get("Authorization"))
            return web.json_response({"token": "t0ken", "expires_in": 300})

        app = web.Application()
        app.router.add_get("/v2/{repo}/manifests/{reference}", manifest)
        app.router.add_get("/token", token)
        return app


@pytest.fixture
def token_registry(request: pytest.FixtureRequest) -> Iterator[_TokenRegistry]:
    registry = _TokenRegistry(request.param)
    registry.server.start()
    yield registry
    registry.server.stop()


@pytest.mark.parametrize(
    ("token_registry", "sent"),
    [("127.0.0.1", True), ("localhost", False)],
    indirect=["token_registry"],
)
async def test_credentials_reach_a_plain_http_realm_only_on_the_registry_host(
    token_registry: _TokenRegistry, sent: bool
) -> None:
    host = token_registry.server.host  # 127.0.0.1:<port>
    credentials = CredentialStore()
    credentials.add(host, Credential(username="alice", password="s3cret"))
    async with RegistryClient(credentials=credentials, plain_http_hosts={host}) as client:
        fetched = await client.get_manifest(ImageReference.parse(f"{host}/app:v1"))
    assert fetched.body == MANIFEST
    assert len(token_registry.token_auth) == 1
    assert (token_registry.token_auth[0] is not None) == sent


@pytest.mark.parametrize(
    ("registry", "realm", "allowed"),
    [
        ("registry.example.com", "https://auth.example.net/token", True),
        ("registry.example.com", "http://auth.example.net/token", False),
        ("registry.example.com:5000", "http://registry.example.com:5001/token", True),
        ("10.0.0.5:5000", "http://10.0.0.5/token", True),
    ],
)
def test_the_realm_rule(registry: str, realm: str, allowed: bool) -> None:
    assert may_send_credentials(registry, realm) is allowed


@pytest.mark.parametrize(
    ("registry", "location", "allowed"),
    [
        ("registry.example.com", "https://cdn.example.net/blob?sig=1", True),
        ("registry.example.com", "http://169.254.169.254/latest/meta-data/", False),
        ("registry.example.com", "http://127.0.0.1:2375/containers/json", False),
        ("registry.example.com", "http://localhost/x", False),
        ("registry.example.com", "http://10.1.2.3/blob", False),
        ("registry.example.com", "http://[::1]:80/blob", False),
        ("registry.example.com", "http://[fe80::1]/blob", False),
        ("127.0.0.1:5000", "http://127.0.0.1:9000/blob", True),
        ("10.0.0.5:5000", "http://10.0.0.6/blob", True),
        ("[::1]:5000", "http://[::1]:9000/blob", True),
    ],
)
def test_the_redirect_rule(registry: str, location: str, allowed: bool) -> None:
    registry_public = not written_non_public(registry_host(registry))
    assert delegate_allowed(registry_public, location) is allowed


# -- names that resolve to non-public addresses ----------------------------------------

PUBLIC_REGISTRY = "11.0.0.10"
PUBLIC_STORAGE = "11.0.0.20"
"""Public addresses that exist only inside a test's own network namespace."""


async def _public_registry_delegates_to_names() -> dict[str, Any]:
    """A registry on a public address redirects, and names token realms, by name: to
    names that resolve to loopback and to names that resolve to a public address."""
    delegate = StorageDelegate()
    registry = DelegatingRegistry(
        PUBLIC_REGISTRY,
        delegate,
        redirects={
            "private": "http://storage.private.test:{port}/blob",
            "public": "http://storage.public.test:{port}/blob",
        },
        realms={
            "private": "http://auth.private.test:{port}/token",
            "public": "http://auth.public.test:{port}/token",
        },
    )
    with serving(delegate, registry):
        name = f"registry.public.test:{registry.port}"
        outcomes = {
            f"{what} {repository}": await read_outcome(name, repository, what)
            for what in ("blob", "manifest")
            for repository in ("private", "public")
        }
    return {"outcomes": outcomes, "reached": delegate.reached}


@pytest.mark.netns
def test_names_that_resolve_to_loopback_are_refused_for_a_public_registry(
    tmp_path: Path,
) -> None:
    report = run_isolated(
        f"{__name__}:_public_registry_delegates_to_names",
        tmp_path,
        addresses=[PUBLIC_REGISTRY, PUBLIC_STORAGE],
        hosts={
            "registry.public.test": PUBLIC_REGISTRY,
            "storage.public.test": PUBLIC_STORAGE,
            "auth.public.test": PUBLIC_STORAGE,
            "storage.private.test": "127.0.0.1",
            "auth.private.test": "127.0.0.1",
        },
    )
    assert report["outcomes"] == {
        "blob private": "DelegationRefusedError",
        "blob public": "ok",
        "manifest private": "DelegationRefusedError",
        "manifest public": "ok",
    }
    assert report["reached"] == [PUBLIC_STORAGE, PUBLIC_STORAGE]


REBINDING_READS = 6


async def _rebinding_storage() -> dict[str, Any]:
    """A registry on a public address redirects to a name whose name server answers a
    public address and loopback by turns, never to be cached: each read by a fresh
    client looks the name up anew."""
    answers = 0

    def answer(name: str) -> list[str] | None:
        nonlocal answers
        if name != "storage.rebinding.test":
            return None
        answers += 1
        return [PUBLIC_STORAGE] if answers % 2 else ["127.0.0.1"]

    delegate = StorageDelegate()
    registry = DelegatingRegistry(
        PUBLIC_REGISTRY,
        delegate,
        redirects={"app": "http://storage.rebinding.test:{port}/blob"},
    )
    with DnsServer(answer), serving(delegate, registry):
        outcomes = [
            await read_outcome(registry.host, "app", "blob") for _ in range(REBINDING_READS)
        ]
    return {"outcomes": outcomes, "reached": delegate.reached}


@pytest.mark.netns
def test_a_name_rebound_to_loopback_between_lookups_never_gets_a_connection(
    tmp_path: Path,
) -> None:
    report = run_isolated(
        f"{__name__}:_rebinding_storage",
        tmp_path,
        addresses=[PUBLIC_REGISTRY, PUBLIC_STORAGE],
    )
    assert "127.0.0.1" not in report["reached"]
    assert set(report["outcomes"]) == {"ok", "DelegationRefusedError"}, report
    assert report["reached"] == [PUBLIC_STORAGE] * report["outcomes"].count("ok")


async def _private_registry_delegates_to_names() -> dict[str, Any]:
    """A registry known by a name that resolves to loopback redirects and names its
    realm by names that resolve to loopback too."""
    delegate = StorageDelegate()
    registry = DelegatingRegistry(
        "127.0.0.1",
        delegate,
        redirects={"app": "http://storage.corp.test:{port}/blob"},
        realms={"app": "http://auth.corp.test:{port}/token"},
    )
    with serving(delegate, registry):
        name = f"registry.corp.test:{registry.port}"
        outcomes = [await read_outcome(name, "app", what) for what in ("blob", "manifest")]
    return {"outcomes": outcomes, "reached": delegate.reached}


@pytest.mark.netns
def test_a_registry_whose_name_resolves_to_loopback_may_delegate_there(tmp_path: Path) -> None:
    report = run_isolated(
        f"{__name__}:_private_registry_delegates_to_names",
        tmp_path,
        hosts={
            "registry.corp.test": "127.0.0.1",
            "storage.corp.test": "127.0.0.2",
            "auth.corp.test": "127.0.0.2",
        },
    )
    assert report == {"outcomes": ["ok", "ok"], "reached": ["127.0.0.2", "127.0.0.2"]}


def _counting_helper(directory: Path, username: str, password: str) -> Path:
    """A Docker credential helper that counts its runs and takes a while to answer."""
    counter = directory / "runs"
    helper = directory / "docker-credential-counting"
    helper.write_text(
        "#!/bin/sh\n"
        f"echo run >> {counter}\n"
        "sleep 0.5\n"
        f'printf \'{{"Username": "{username}", "Secret": "{password}"}}\'\n'
    )
    helper.chmod(helper.stat().st_mode | stat.S_IEXEC)
    return counter


async def test_a_credential_helper_runs_off_the_loop_and_once(
    registry_basic_auth, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counter = _counting_helper(tmp_path, registry_basic_auth.username, registry_basic_auth.password)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    host = registry_basic_auth.server.host
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"credHelpers": {host: "counting"}}))
    credentials = CredentialStore()
    credentials.load_docker_config(config)

    ticks = 0
    stop = threading.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0.01)

    async with RegistryClient(credentials=credentials, plain_http_hosts={host}) as client:
        ticking = asyncio.create_task(ticker())
        ref = ImageReference.parse(f"{host}/nothing-here:v1")
        for _ in range(5):
            assert await client.manifest_digest(ref) is None
        stop.set()
        await ticking
    assert counter.read_text().count("run") == 1
    assert ticks > 20, "the event loop stood still while the helper ran"
