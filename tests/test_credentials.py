"""Credentials load from Docker config.json and Kubernetes dockerconfigjson secrets."""

import base64
import json

import pytest

from fetcher.credentials import Credential, CredentialStore
from fetcher.errors import CredentialsError


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


CONFIG = {
    "auths": {
        "https://index.docker.io/v1/": {"auth": _b64("hubuser:hubpass")},
        "127.0.0.1:5000": {"username": "alice", "password": "s3cret"},
        "https://reg.example:8443/v2/": {"identitytoken": "refresh-me"},
    }
}


def test_docker_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(CONFIG))
    store = CredentialStore()
    store.load_docker_config(path)
    assert store.lookup("docker.io") == Credential("hubuser", "hubpass")
    assert store.lookup("registry-1.docker.io") == Credential("hubuser", "hubpass")
    assert store.lookup("127.0.0.1:5000") == Credential("alice", "s3cret")
    assert store.lookup("reg.example:8443").identity_token == "refresh-me"
    assert store.lookup("other.example") is None


def test_secret_values_never_in_repr():
    cred = Credential("alice", "s3cret", identity_token="zq-refresh")
    assert "s3cret" not in repr(cred) and "zq-refresh" not in repr(cred)
    assert "alice" not in repr(cred)


def test_kubernetes_secret_object_yaml(tmp_path):
    path = tmp_path / "secret.yaml"
    path.write_text(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: pull}\n"
        "type: kubernetes.io/dockerconfigjson\n"
        f"data:\n  .dockerconfigjson: {_b64(json.dumps(CONFIG))}\n"
    )
    store = CredentialStore()
    store.load_kubernetes_secret(path)
    assert store.lookup("127.0.0.1:5000") == Credential("alice", "s3cret")


def test_kubernetes_mounted_secret_file(tmp_path):
    path = tmp_path / ".dockerconfigjson"
    path.write_text(json.dumps(CONFIG))
    store = CredentialStore()
    store.load_kubernetes_secret(path)
    assert store.lookup("docker.io") == Credential("hubuser", "hubpass")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"auths": {"h": {"auth": "!!!"}}}), "not base64"),
        (json.dumps({"auths": {"h": {"auth": _b64("nocolon")}}}), "not user:password"),
        (json.dumps({"auths": []}), "must be an object"),
    ],
)
def test_bad_config_is_a_clear_error_without_secrets(tmp_path, content, message):
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(CredentialsError, match=message) as info:
        CredentialStore().load_docker_config(path)
    assert "nocolon" not in str(info.value)


def test_wrong_secret_type(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("kind: Secret\ntype: Opaque\ndata: {}\n")
    with pytest.raises(CredentialsError, match=r"need kubernetes\.io/dockerconfigjson"):
        CredentialStore().load_kubernetes_secret(path)
