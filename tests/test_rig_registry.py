"""The registry rig itself, checked with plain urllib / aiohttp (not acceld's client).

If these fail, every test built on the `registry*` fixtures is meaningless, so they pin
down what the rig promises: the real distribution registry answering the v2 API with
no auth, Basic auth and Bearer tokens from `rig.token_service`, Range GETs, push
notifications, network-namespace prefixes, and a request log that sees blob GETs.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from base64 import b64encode
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from rig.ports import free_port, port_accepts, wait_for_port
from rig.registry import RegistryServer, deep_merge, parse_access_log
from rig.threaded_server import ThreadedServer
from rig.token_service import Scope, grant, write_signing_material

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _http(
    method: str, url: str, data: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, Any, bytes]:
    """(status, headers, body) without raising on 4xx/5xx."""
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def _basic(username: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + b64encode(f"{username}:{password}".encode()).decode()}


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    """Split ``Bearer realm="x",service="y"`` into the scheme and its parameters."""
    scheme, _, rest = header.partition(" ")
    params = {}
    for part in rest.split('",'):
        key, _, value = part.partition("=")
        params[key.strip()] = value.strip().strip('"')
    return scheme, params


def _get_token(realm: str, service: str, scope: str, user: tuple[str, str] | None) -> str:
    query = urllib.parse.urlencode({"service": service, "scope": scope})
    status, _, body = _http("GET", f"{realm}?{query}", headers=_basic(*user) if user else None)
    assert status == 200, body
    answer = json.loads(body)
    assert answer["token"] == answer["access_token"]
    assert answer["expires_in"] > 0 and answer["issued_at"].endswith("Z")
    return str(answer["token"])


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _push_blob(base: str, repo: str, data: bytes, headers: dict[str, str]) -> str:
    status, answer, body = _http("POST", f"{base}/v2/{repo}/blobs/uploads/", headers=headers)
    assert status == 202, body
    location = urllib.parse.urljoin(base, answer["Location"])
    separator = "&" if "?" in location else "?"
    digest = _digest(data)
    status, _, body = _http(
        "PUT",
        f"{location}{separator}digest={digest}",
        data=data,
        headers={**headers, "Content-Type": "application/octet-stream"},
    )
    assert status == 201, body
    return digest


def _manifest(config: bytes, layer: bytes) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": _digest(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": _digest(layer),
                    "size": len(layer),
                }
            ],
        }
    ).encode()


def _push_image(base: str, repo: str, tag: str, headers: dict[str, str]) -> tuple[str, bytes]:
    """Push a config, a random layer and a manifest; return (manifest digest, layer)."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {}}).encode()
    layer = secrets.token_bytes(100_000)
    _push_blob(base, repo, config, headers)
    _push_blob(base, repo, layer, headers)
    manifest = _manifest(config, layer)
    status, answer, body = _http(
        "PUT",
        f"{base}/v2/{repo}/manifests/{tag}",
        data=manifest,
        headers={**headers, "Content-Type": OCI_MANIFEST},
    )
    assert status == 201, body
    assert answer["Docker-Content-Digest"] == _digest(manifest)
    return _digest(manifest), layer


def test_ports_helpers():
    port = free_port()
    assert not port_accepts("127.0.0.1", port)
    with pytest.raises(TimeoutError, match=str(port)):
        wait_for_port("127.0.0.1", port, 0.2)


def test_plain_registry_answers_v2(registry):
    status, headers, _ = _http("GET", f"{registry.url}/v2/")
    assert status == 200
    assert headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert registry.host == registry.url.removeprefix("http://")
    assert registry.host.startswith("127.0.0.1:")


def test_push_pull_range_and_request_log(registry, repo_name):
    base = registry.url
    manifest_digest, layer = _push_image(base, repo_name, "v1", {})
    status, headers, body = _http(
        "GET", f"{base}/v2/{repo_name}/manifests/v1", headers={"Accept": OCI_MANIFEST}
    )
    assert status == 200 and _digest(body) == manifest_digest
    layer_digest = json.loads(body)["layers"][0]["digest"]
    blob_url = f"{base}/v2/{repo_name}/blobs/{layer_digest}"
    status, _, body = _http("GET", blob_url)
    assert status == 200 and body == layer
    status, headers, body = _http("GET", blob_url, headers={"Range": "bytes=1000-5095"})
    assert status == 206
    assert body == layer[1000:5096]
    assert headers["Content-Range"] == f"bytes 1000-5095/{len(layer)}"

    blob_gets = [r for r in registry.requests() if r.method == "GET" and layer_digest in r.path]
    assert [(r.status, r.size) for r in blob_gets] == [(200, len(layer)), (206, 4096)]
    assert blob_gets[0].path == f"/v2/{repo_name}/blobs/{layer_digest}"
    assert blob_gets[0].user_agent.startswith("Python-urllib")
    puts = [r for r in registry.requests() if r.method == "PUT" and repo_name in r.path]
    assert any(f"digest={layer_digest}" in r.query for r in puts)

    status, _, _ = _http("DELETE", f"{base}/v2/{repo_name}/manifests/{manifest_digest}")
    assert status == 202, "deletes are enabled by default"
    status, _, _ = _http("GET", f"{base}/v2/{repo_name}/manifests/{manifest_digest}")
    assert status == 404


def test_basic_auth_registry(registry_basic_auth, repo_name):
    server, username, password = registry_basic_auth
    status, headers, _ = _http("GET", f"{server.url}/v2/")
    assert status == 401
    assert headers["WWW-Authenticate"] == 'Basic realm="acceld-rig"'
    assert _http("GET", f"{server.url}/v2/", headers=_basic(username, "wrong"))[0] == 401
    assert _http("GET", f"{server.url}/v2/", headers=_basic(username, password))[0] == 200
    _push_image(server.url, repo_name, "b", _basic(username, password))
    assert "$2y$" in server.htpasswd_path.read_text(), "htpasswd entries must be bcrypt"
    # Requests refused by auth are in the access log too (the app log skips them).
    refused = [r for r in server.requests() if r.path == "/v2/" and r.status == 401]
    assert len(refused) >= 2


def test_bearer_challenge_names_the_token_service(registry_token_auth):
    server, tokens, _ = registry_token_auth
    status, headers, _ = _http("GET", f"{server.url}/v2/")
    assert status == 401
    scheme, params = _challenge(headers["WWW-Authenticate"])
    assert scheme == "Bearer"
    assert params == {"realm": tokens.realm, "service": tokens.service}


async def test_token_flow_push_read_back_and_range(registry_token_auth, repo_name):
    server, tokens, users = registry_token_auth
    blob_url = f"{server.url}/v2/{repo_name}/blobs/uploads/"
    status, headers, _ = _http("POST", blob_url)
    assert status == 401
    _, params = _challenge(headers["WWW-Authenticate"])
    scope = params["scope"]  # the registry lists the actions in random order
    assert scope.rpartition(":")[0] == f"repository:{repo_name}"
    assert set(scope.rpartition(":")[2].split(",")) == {"pull", "push"}
    token = _get_token(params["realm"], params["service"], scope, users["writer"])
    bearer = {"Authorization": f"Bearer {token}"}
    manifest_digest, layer = _push_image(server.url, repo_name, "t", bearer)

    pull = _get_token(tokens.realm, tokens.service, f"repository:{repo_name}:pull", None)
    assert jwt.decode(pull, options={"verify_signature": False})["access"] == []
    reader_token = _get_token(
        tokens.realm, tokens.service, f"repository:{repo_name}:pull", users["reader"]
    )
    auth = {"Authorization": f"Bearer {reader_token}"}
    async with aiohttp.ClientSession(headers=auth) as session:
        url = f"{server.url}/v2/{repo_name}/manifests/t"
        async with session.get(url, headers={"Accept": OCI_MANIFEST}) as response:
            assert response.status == 200
            manifest = await response.read()
        assert _digest(manifest) == manifest_digest
        layer_url = (
            f"{server.url}/v2/{repo_name}/blobs/{json.loads(manifest)['layers'][0]['digest']}"
        )
        async with session.get(layer_url, headers={"Range": "bytes=99990-"}) as response:
            assert response.status == 206
            assert await response.read() == layer[99990:]
        async with aiohttp.ClientSession() as anonymous, anonymous.get(url) as response:
            assert response.status == 401

    seen = [r for r in tokens.requests() if repo_name in (r.scope or "")]
    assert [(r.account, r.scope, r.status) for r in seen] == [
        ("writer", scope, 200),
        (None, f"repository:{repo_name}:pull", 200),
        ("reader", f"repository:{repo_name}:pull", 200),
    ]
    assert seen[0].granted == (("repository", repo_name, tuple(scope.split(":")[2].split(","))),)


def test_reader_cannot_push(registry_token_auth, repo_name):
    server, tokens, users = registry_token_auth
    scope = f"repository:{repo_name}:pull,push"
    token = _get_token(tokens.realm, tokens.service, scope, users["reader"])
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["access"] == [{"type": "repository", "name": repo_name, "actions": ["pull"]}]
    assert claims["sub"] == "reader" and claims["aud"] == tokens.service
    status, headers, _ = _http(
        "POST",
        f"{server.url}/v2/{repo_name}/blobs/uploads/",
        headers={"Authorization": f"Bearer {token}"},
    )
    assert status in (401, 403)
    assert 'error="insufficient_scope"' in headers["WWW-Authenticate"]


def test_wrong_password_is_refused_by_token_service(registry_token_auth, repo_name):
    _, tokens, users = registry_token_auth
    scope = f"repository:{repo_name}:pull"
    query = urllib.parse.urlencode({"service": tokens.service, "scope": scope})
    status, headers, body = _http(
        "GET", f"{tokens.realm}?{query}", headers=_basic(users["reader"][0], "not-it")
    )
    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Basic ")
    assert "token" not in json.loads(body)
    status, _, _ = _http("GET", f"{tokens.realm}?{query}", headers=_basic("nobody", "x"))
    assert status == 401
    status, _, _ = _http("GET", f"{tokens.realm}?service=other&scope={scope}")
    assert status == 400
    seen = [(r.account, r.status) for r in tokens.requests() if r.scope == scope]
    assert seen == [("reader", 401), ("nobody", 401), (None, 400)]


def test_oauth2_password_and_refresh_grants(registry_token_auth, repo_name):
    server, tokens, users = registry_token_auth
    username, password = users["admin"]
    _push_image(
        server.url,
        repo_name,
        "o",
        {
            "Authorization": "Bearer "
            + _get_token(
                tokens.realm, tokens.service, f"repository:{repo_name}:push,pull", users["writer"]
            )
        },
    )
    form = {
        "grant_type": "password",
        "username": username,
        "password": password,
        "service": tokens.service,
        "scope": f"repository:{repo_name}:pull repository:{repo_name}:*",
        "client_id": "rig-test",
        "access_type": "offline",
    }
    status, _, body = _http("POST", tokens.realm, data=urllib.parse.urlencode(form).encode())
    assert status == 200, body
    answer = json.loads(body)
    refresh = answer["refresh_token"]
    refreshed_form = {
        "grant_type": "refresh_token",
        "refresh_token": refresh,
        "service": tokens.service,
        "scope": f"repository:{repo_name}:*",
        "client_id": "rig-test",
    }
    status, _, body = _http(
        "POST", tokens.realm, data=urllib.parse.urlencode(refreshed_form).encode()
    )
    assert status == 200, body
    delete_token = json.loads(body)["access_token"]
    status, answer_headers, _ = _http(
        "HEAD",
        f"{server.url}/v2/{repo_name}/manifests/o",
        headers={"Authorization": f"Bearer {answer['access_token']}", "Accept": OCI_MANIFEST},
    )
    assert status == 200
    manifest_digest = answer_headers["Docker-Content-Digest"]
    status, _, _ = _http(
        "DELETE",
        f"{server.url}/v2/{repo_name}/manifests/{manifest_digest}",
        headers={"Authorization": f"Bearer {delete_token}"},
    )
    assert status == 202
    query = urllib.parse.urlencode(
        {
            "service": tokens.service,
            "scope": f"repository:{repo_name}:pull",
            "offline_token": "true",
        }
    )
    status, _, body = _http("GET", f"{tokens.realm}?{query}", headers=_basic(username, password))
    offline = {**refreshed_form, "refresh_token": json.loads(body)["refresh_token"]}
    assert _http("POST", tokens.realm, data=urllib.parse.urlencode(offline).encode())[0] == 200
    bad = {**refreshed_form, "refresh_token": "forged"}
    assert _http("POST", tokens.realm, data=urllib.parse.urlencode(bad).encode())[0] == 401
    grants = [
        r.grant_type
        for r in tokens.requests()
        if r.method == "POST" and repo_name in (r.scope or "")
    ]
    assert grants == ["password", "refresh_token", "refresh_token", "refresh_token"]


def test_registry_rejects_tokens_from_another_key(registry_token_auth, repo_name, tmp_path):
    server, tokens, users = registry_token_auth
    genuine = _get_token(
        tokens.realm, tokens.service, f"repository:{repo_name}:pull,push", users["writer"]
    )
    claims = jwt.decode(genuine, options={"verify_signature": False})
    write_signing_material(tmp_path / "key.pem", tmp_path / "cert.pem", tokens.issuer)
    key = serialization.load_pem_private_key((tmp_path / "key.pem").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    cert_der = "".join(
        line
        for line in (tmp_path / "cert.pem").read_text().splitlines()
        if not line.startswith("-----")
    )
    forged = jwt.encode(claims, key, algorithm="ES256", headers={"x5c": [cert_der]})
    url = f"{server.url}/v2/{repo_name}/blobs/uploads/"
    assert _http("POST", url, headers={"Authorization": f"Bearer {forged}"})[0] == 401
    assert _http("POST", url, headers={"Authorization": f"Bearer {genuine}"})[0] == 202


def test_notifications_reach_the_endpoint(make_registry, repo_name):
    events: list[dict[str, Any]] = []

    async def receive(request: web.Request) -> web.Response:
        events.extend((await request.json())["events"])
        return web.Response()

    async def app() -> web.Application:
        application = web.Application()
        application.router.add_post("/events", receive)
        return application

    receiver = ThreadedServer(app, name="notification-receiver")
    receiver.start()
    try:
        server = make_registry(notification_urls=[f"{receiver.url}/events"])
        manifest_digest, _ = _push_image(server.url, repo_name, "n", {})
        deadline = time.monotonic() + 10
        pushed: list[dict[str, Any]] = []
        while not pushed and time.monotonic() < deadline:
            pushed = [
                e
                for e in events
                if e["action"] == "push" and e["target"].get("mediaType") == OCI_MANIFEST
            ]
            time.sleep(0.05)
        assert pushed, f"no manifest push event among {events}"
        assert pushed[0]["target"]["repository"] == repo_name
        assert pushed[0]["target"]["digest"] == manifest_digest
        assert pushed[0]["target"]["tag"] == "n"
    finally:
        receiver.stop()


def test_command_prefix_extra_config_and_stop(make_registry, tmp_path):
    server = make_registry(
        command_prefix=["env", "ACCELD_RIG_PREFIX=seen"],
        extra_config={"http": {"headers": {"X-Rig": ["extra"]}}},
    )
    environ = Path(f"/proc/{server.pid}/environ").read_bytes().split(b"\0")
    assert b"ACCELD_RIG_PREFIX=seen" in environ
    status, headers, _ = _http("GET", f"{server.url}/v2/")
    assert status == 200 and headers["X-Rig"] == "extra"
    assert headers["X-Content-Type-Options"] == "nosniff", "merge must keep generated keys"
    server.stop()
    server.stop()
    assert not server.running
    assert not port_accepts("127.0.0.1", server.port)


def test_fixed_port_in_use_fails_with_the_log(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        server = RegistryServer(tmp_path, port=holder.getsockname()[1])
        with pytest.raises(RuntimeError, match="address already in use"):
            server.start()
        assert not server.running


@pytest.mark.netns
def test_registry_in_a_network_namespace(make_registry, repo_name):
    name = f"rigreg{secrets.token_hex(3)}"
    host_if, ns_if = f"{name}h", f"{name}n"
    subnet = f"10.254.{secrets.randbelow(250) + 1}"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    ip("netns", "add", name)
    try:
        ip("link", "add", host_if[:15], "type", "veth", "peer", "name", ns_if[:15])
        ip("link", "set", ns_if[:15], "netns", name)
        ip("addr", "add", f"{subnet}.1/30", "dev", host_if[:15])
        ip("link", "set", host_if[:15], "up")
        ip("-n", name, "addr", "add", f"{subnet}.2/30", "dev", ns_if[:15])
        ip("-n", name, "link", "set", ns_if[:15], "up")
        server = make_registry(host=f"{subnet}.2", command_prefix=["ip", "netns", "exec", name])
        assert server.url == f"http://{subnet}.2:{server.port}"
        ns_inode = os.stat(f"/proc/{server.pid}/ns/net").st_ino
        assert ns_inode == os.stat(f"/run/netns/{name}").st_ino
        _push_image(server.url, repo_name, "ns", {})
        assert any(r.remote_addr.startswith(f"{subnet}.1") for r in server.requests())
        server.stop()
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
        subprocess.run(["ip", "link", "del", host_if[:15]], check=False, capture_output=True)


def test_log_parser_and_config_merge_units():
    text = (
        '127.0.0.1 - - [28/Nov/2026:09:34:54 +0000] "GET /v2/a/blobs/sha256:ab?x=1 HTTP/1.1" '
        '206 10 "" "agent/1"\n'
        "not an access line\n"
        '10.0.0.1 - - [28/Nov/2026:09:34:55 +0000] "HEAD /v2/ HTTP/1.1" 401 - "" ""\n'
    )
    first, second = parse_access_log(text)
    assert (first.method, first.path, first.query, first.status, first.size) == (
        "GET",
        "/v2/a/blobs/sha256:ab",
        "x=1",
        206,
        10,
    )
    assert (second.remote_addr, second.status, second.size) == ("10.0.0.1", 401, 0)
    merged = deep_merge({"a": {"b": 1, "c": 2}, "d": [1]}, {"a": {"c": 3}, "d": [2]})
    assert merged == {"a": {"b": 1, "c": 3}, "d": [2]}


def test_scope_grants_units():
    assert Scope.parse("repository:host:5000/x:pull,push") == Scope(
        "repository", "host:5000/x", ("pull", "push")
    )
    assert Scope.parse("nonsense") is None
    perms = {"team/*": ["pull", "push"], "*": ["pull"]}
    scopes = [Scope("repository", "team/a", ("push", "pull")), Scope("repository", "b", ("push",))]
    assert grant(perms, scopes) == [
        {"type": "repository", "name": "team/a", "actions": ["push", "pull"]}
    ]
    assert grant({"*": ["*"]}, [Scope("registry", "catalog", ("*",))]) == []
