"""Credentials from labelled dockerconfigjson secrets, with the Kubernetes client's own
models and event decoding, used against a real registry that requires Basic auth.

No API server can run here, so the list+watch loop itself (SecretWatcher._sync_forever)
is not exercised; what it feeds the store is: watch events decoded by
`kubernetes.watch.Watch.unmarshal_event` from the JSON lines an API server streams.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from kubernetes import client, watch

from agent.k8s_credentials import (
    CREDENTIALS_LABEL,
    KubernetesCredentialStore,
    SecretCredentials,
    credentials_from_secret,
)
from fetcher.credentials import Credential
from fetcher.errors import CredentialsError, UnauthorizedError
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient


def dockerconfig(auths: dict[str, dict[str, str]]) -> str:
    return base64.b64encode(json.dumps({"auths": auths}).encode()).decode()


def basic(username: str, password: str) -> dict[str, str]:
    return {"auth": base64.b64encode(f"{username}:{password}".encode()).decode()}


def secret_json(
    name: str,
    auths: dict[str, dict[str, str]],
    namespace: str = "team-a",
    version: str = "1",
    secret_type: str = "kubernetes.io/dockerconfigjson",
) -> dict[str, Any]:
    """A Secret as the API server serialises it (data values base64)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "resourceVersion": version,
            "labels": {CREDENTIALS_LABEL: "true"},
        },
        "type": secret_type,
        "data": {".dockerconfigjson": dockerconfig(auths)},
    }


def event(event_type: str, secret: dict[str, Any]) -> tuple[str, Any]:
    """Decode one watch line with the client's own code, as its stream() does."""
    line = json.dumps({"type": event_type, "object": secret})
    decoded = watch.Watch().unmarshal_event(line, "V1Secret")
    assert isinstance(decoded["object"], client.V1Secret)
    return decoded["type"], decoded["object"]


def test_secret_model_is_parsed():
    secret = client.V1Secret(
        metadata=client.V1ObjectMeta(name="pull", namespace="team-a"),
        type="kubernetes.io/dockerconfigjson",
        data={
            ".dockerconfigjson": dockerconfig(
                {
                    "https://index.docker.io/v1/": basic("hub-user", "hub-pass"),
                    "registry.example.com:5000": {"username": "u", "password": "p"},
                }
            )
        },
    )

    found = credentials_from_secret(secret)

    assert found["docker.io"] == Credential("hub-user", "hub-pass")
    assert found["registry.example.com:5000"] == Credential("u", "p")


def test_credential_helpers_in_a_secret_are_ignored():
    doc = {"auths": {}, "credsStore": "evil", "credHelpers": {"reg.example": "evil"}}
    secret = client.V1Secret(
        metadata=client.V1ObjectMeta(name="helpers", namespace="team-a"),
        type="kubernetes.io/dockerconfigjson",
        data={".dockerconfigjson": base64.b64encode(json.dumps(doc).encode()).decode()},
    )
    store = KubernetesCredentialStore()
    SecretCredentials(store).resync([secret])

    assert credentials_from_secret(secret) == {}
    assert store.lookup("reg.example") is None  # would have run docker-credential-evil


@pytest.mark.parametrize(
    ("secret", "message"),
    [
        (
            client.V1Secret(
                metadata=client.V1ObjectMeta(name="opaque", namespace="ns"),
                type="Opaque",
                data={"password": "c2VjcmV0LXZhbHVl"},
            ),
            "type is 'Opaque'",
        ),
        (
            client.V1Secret(
                metadata=client.V1ObjectMeta(name="nokey", namespace="ns"),
                type="kubernetes.io/dockerconfigjson",
                data={},
            ),
            "no .dockerconfigjson key",
        ),
        (
            client.V1Secret(
                metadata=client.V1ObjectMeta(name="garbled", namespace="ns"),
                type="kubernetes.io/dockerconfigjson",
                data={".dockerconfigjson": "c2VjcmV0LXZhbHVl!!"},
            ),
            "not base64 JSON",
        ),
    ],
)
def test_unusable_secrets_are_named_without_their_values(secret, message):
    with pytest.raises(CredentialsError) as caught:
        credentials_from_secret(secret)

    assert message in str(caught.value)
    assert f"ns/{secret.metadata.name}" in str(caught.value)
    assert "c2VjcmV0LXZhbHVl" not in str(caught.value)
    assert "secret-value" not in str(caught.value)


def test_watch_events_add_rotate_and_remove_credentials():
    store = KubernetesCredentialStore()
    store.add("reg.example", Credential("node-user", "node-pass"))
    credentials = SecretCredentials(store)

    credentials.apply(*event("ADDED", secret_json("pull", {"reg.example": basic("a", "1")})))
    assert store.lookup("reg.example") == Credential("a", "1")

    credentials.apply(
        *event("MODIFIED", secret_json("pull", {"reg.example": basic("a", "2")}, version="2"))
    )
    assert store.lookup("reg.example") == Credential("a", "2")

    credentials.apply(*event("DELETED", secret_json("pull", {}, version="3")))
    # The node's own credential is what is left, not the deleted secret's.
    assert store.lookup("reg.example") == Credential("node-user", "node-pass")
    assert credentials.secrets == []


def test_a_secret_turning_unusable_drops_its_old_credentials():
    store = KubernetesCredentialStore()
    credentials = SecretCredentials(store)
    credentials.apply(*event("ADDED", secret_json("pull", {"reg.example": basic("a", "1")})))

    broken = secret_json("pull", {}, version="2")
    broken["data"][".dockerconfigjson"] = "not base64!"
    credentials.apply(*event("MODIFIED", broken))

    assert store.lookup("reg.example") is None


def test_precedence_between_secrets_does_not_depend_on_event_order():
    first = secret_json("a-creds", {"reg.example": basic("from-a", "x")}, namespace="ns1")
    second = secret_json("b-creds", {"reg.example": basic("from-b", "y")}, namespace="ns1")
    results = []
    for order in ((first, second), (second, first)):
        store = KubernetesCredentialStore()
        credentials = SecretCredentials(store)
        for secret in order:
            credentials.apply(*event("ADDED", secret))
        results.append(store.lookup("reg.example"))

    assert results == [Credential("from-b", "y"), Credential("from-b", "y")]


def test_resync_replaces_what_a_missed_delete_left_behind():
    store = KubernetesCredentialStore()
    credentials = SecretCredentials(store)
    credentials.apply(*event("ADDED", secret_json("old", {"old.example": basic("o", "o")})))
    secret_list = {
        "apiVersion": "v1",
        "kind": "SecretList",
        "metadata": {"resourceVersion": "42"},
        "items": [secret_json("new", {"new.example": basic("n", "n")})],
    }
    listed = client.ApiClient().deserialize(
        json.dumps(secret_list), "V1SecretList", "application/json"
    )

    credentials.resync(listed.items)

    assert store.lookup("old.example") is None
    assert store.lookup("new.example") == Credential("n", "n")
    assert credentials.secrets == [("team-a", "new")]


async def test_registry_login_follows_the_secret(registry_basic_auth, repo_name, built_busybox):
    server, username, password = registry_basic_auth
    store = KubernetesCredentialStore()
    credentials = SecretCredentials(store)
    credentials.apply(
        *event("ADDED", secret_json("pull", {server.host: basic(username, password)}))
    )
    ref = ImageReference.parse(f"{server.host}/{repo_name}:latest")
    async with RegistryClient(credentials=store) as registry_client:
        await registry_client.push_blob(ref, built_busybox.config_bytes)
        assert await registry_client.blob_size(ref, built_busybox.config.digest)

    credentials.apply(*event("DELETED", secret_json("pull", {})))

    async with RegistryClient(credentials=store) as registry_client:
        with pytest.raises(UnauthorizedError):
            await registry_client.blob_size(ref, built_busybox.config.digest)
