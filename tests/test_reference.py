"""Image reference parsing follows the distribution grammar and Docker Hub defaults."""

import pytest

from fetcher.errors import InvalidReferenceError
from fetcher.reference import ImageReference

DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest"),
    [
        ("ubuntu", "docker.io", "library/ubuntu", "latest", None),
        ("ubuntu:22.04", "docker.io", "library/ubuntu", "22.04", None),
        ("bitnami/redis", "docker.io", "bitnami/redis", "latest", None),
        ("127.0.0.1:5000/app:v1", "127.0.0.1:5000", "app", "v1", None),
        ("localhost/a/b/c:t", "localhost", "a/b/c", "t", None),
        (f"ghcr.io/o/r@{DIGEST}", "ghcr.io", "o/r", None, DIGEST),
        (f"ghcr.io/o/r:t@{DIGEST}", "ghcr.io", "o/r", "t", DIGEST),
        ("[::1]:5000/x:y", "[::1]:5000", "x", "y", None),
    ],
)
def test_parse(text, registry, repository, tag, digest):
    ref = ImageReference.parse(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        registry,
        repository,
        tag,
        digest,
    )


@pytest.mark.parametrize(
    "text",
    ["", "UPPER/case", "a//b", "reg:5000/", "x@sha256:abc", "x:tag with space", " x", "a:b:c/d"],
)
def test_invalid(text):
    with pytest.raises(InvalidReferenceError):
        ImageReference.parse(text)


def test_docker_hub_api_host_and_reference():
    ref = ImageReference.parse("alpine")
    assert ref.api_host == "registry-1.docker.io"
    assert ref.reference == "latest"
    assert ref.with_digest(DIGEST).reference == DIGEST
    assert str(ref.with_tag("3.19")) == "docker.io/library/alpine:3.19"


@pytest.mark.parametrize(
    "text",
    [
        "x",
        "x:latest",
        "library/x",
        "docker.io/x",
        "docker.io/library/x",
        "index.docker.io/x",
        "index.docker.io/library/x:latest",
    ],
)
def test_docker_hub_names_are_one_repository(text):
    """distribution's ParseNormalizedNamed, which containerd and the kubelet use: the
    default domain, its legacy name, and `library/` for single-component names."""
    ref = ImageReference.parse(text)
    assert str(ref) == "docker.io/library/x:latest"
    assert ref.api_host == "registry-1.docker.io"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("index.docker.io/org/x", "docker.io/org/x:latest"),
        ("registry-1.docker.io/x", "registry-1.docker.io/x:latest"),  # a host, not an alias
        ("docker.io/org/team/x:v1", "docker.io/org/team/x:v1"),
    ],
)
def test_docker_hub_names_beyond_library(text, expected):
    assert str(ImageReference.parse(text)) == expected
