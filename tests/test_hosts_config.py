"""containerd's hosts.toml rules (remotes/docker/config/hosts.go), as `fetcher.hosts_config`
reads them: the expectations are containerd's own test cases and documented examples."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from fetcher.errors import HostsConfigError
from fetcher.hosts_config import (
    ALL_CAPABILITIES,
    RESOLVING,
    Capability,
    HostsConfig,
    HostTLS,
    RegistryHost,
    find_host_dir,
    host_directory_name,
    parse_hosts_toml,
    registry_hosts,
    split_roots,
    tls_context,
)
from fetcher.reference import ImageReference
from rig.certificates import write_self_signed

PULL = Capability.PULL

# containerd's TestParseHostFile document, verbatim.
CONTAINERD_EXAMPLE = """
server = "https://test-default.registry"
ca = "/etc/path/default"
[header]
  x-custom-1 = "custom header"

[host."https://mirror.registry"]
  capabilities = ["pull"]
  ca = "/etc/certs/mirror.pem"
  skip_verify = false
  [host."https://mirror.registry".header]
    x-custom-2 = ["value1", "value2"]

[host."https://mirror-bak.registry/us"]
  capabilities = ["pull"]
  skip_verify = true

[host."http://mirror.registry"]
  capabilities = ["pull"]

[host."https://test-1.registry"]
  capabilities = ["pull", "resolve", "push"]
  ca = ["/etc/certs/test-1-ca.pem", "/etc/certs/special.pem"]
  client = [["/etc/certs/client.cert", "/etc/certs/client.key"],["/etc/certs/client.pem", ""]]

[host."https://test-2.registry"]
  client = "/etc/certs/client.pem"

[host."https://test-3.registry"]
  client = ["/etc/certs/client-1.pem", "/etc/certs/client-2.pem"]

[host."https://noncompliantmirror.registry/v2/namespaceprefix"]
  capabilities = ["pull"]
  override_path = true

[host."https://noprefixnoncompliant.registry"]
  override_path = true
"""


def _summary(entry: Any) -> tuple[object, ...]:
    tls: HostTLS = entry.tls
    return (
        entry.scheme,
        entry.host,
        entry.path,
        entry.capabilities,
        tuple(str(p) for p in tls.ca_files),
        tuple((str(c), str(k) if k else "") for c, k in tls.client_pairs),
        tls.skip_verify,
        entry.headers,
    )


def test_containerd_example_parses_as_containerd_does() -> None:
    certs = "/etc/certs"
    expected = [
        (
            "https",
            "mirror.registry",
            "/v2",
            PULL,
            (f"{certs}/mirror.pem",),
            (),
            False,
            (("x-custom-2", "value1"), ("x-custom-2", "value2")),
        ),
        ("https", "mirror-bak.registry", "/us/v2", PULL, (), (), True, ()),
        ("http", "mirror.registry", "/v2", PULL, (), (), None, ()),
        (
            "https",
            "test-1.registry",
            "/v2",
            ALL_CAPABILITIES,
            (f"{certs}/test-1-ca.pem", f"{certs}/special.pem"),
            ((f"{certs}/client.cert", f"{certs}/client.key"), (f"{certs}/client.pem", "")),
            None,
            (),
        ),
        (
            "https",
            "test-2.registry",
            "/v2",
            ALL_CAPABILITIES,
            (),
            ((f"{certs}/client.pem", ""),),
            None,
            (),
        ),
        (
            "https",
            "test-3.registry",
            "/v2",
            ALL_CAPABILITIES,
            (),
            ((f"{certs}/client-1.pem", ""), (f"{certs}/client-2.pem", "")),
            None,
            (),
        ),
        ("https", "noncompliantmirror.registry", "/v2/namespaceprefix", PULL, (), (), None, ()),
        ("https", "noprefixnoncompliant.registry", "", ALL_CAPABILITIES, (), (), None, ()),
        (
            "https",
            "test-default.registry",
            "/v2",
            ALL_CAPABILITIES,
            ("/etc/path/default",),
            (),
            None,
            (("x-custom-1", "custom header"),),
        ),
    ]
    assert [_summary(e) for e in parse_hosts_toml(CONTAINERD_EXAMPLE, Path("/base"))] == expected


def test_relative_paths_are_relative_to_the_host_directory() -> None:
    entries = parse_hosts_toml(
        'server = "r.example"\nca = "ca.pem"\nclient = [["c.cert", "c.key"]]\n[host."m.example"]\n',
        Path("/etc/containerd/certs.d/r.example"),
    )
    server = entries[-1]
    assert server.scheme == "https", "a server without a scheme is https"
    assert server.tls.ca_files == (Path("/etc/containerd/certs.d/r.example/ca.pem"),)
    assert server.tls.client_pairs == (
        (
            Path("/etc/containerd/certs.d/r.example/c.cert"),
            Path("/etc/containerd/certs.d/r.example/c.key"),
        ),
    )


@pytest.mark.parametrize(
    ("namespace", "directory"),
    [
        ("127.0.0.1:5000", "127.0.0.1_5000_"),
        ("registry.example.com", "registry.example.com"),
        ("[::1]:5000", "[::1]_5000_"),
    ],
)
def test_host_directory_name(namespace: str, directory: str) -> None:
    assert host_directory_name(namespace) == directory


def test_host_directory_lookup_order(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    (second / "r.example_5000_").mkdir(parents=True)
    (second / "r.example:5000").mkdir(parents=True)
    first.mkdir()
    roots = split_roots(f"{first}:{second}")
    assert roots == (first, second)
    assert find_host_dir(roots, "r.example:5000") == second / "r.example_5000_"
    (second / "r.example_5000_").rmdir()
    assert find_host_dir(roots, "r.example:5000") == second / "r.example:5000"
    (second / "_default").mkdir()
    assert find_host_dir(roots, "other.example") == second / "_default"
    # Each root is searched whole, _default included, before the next one.
    (first / "_default").mkdir()
    assert find_host_dir(roots, "r.example:5000") == first / "_default"
    assert find_host_dir((), "r.example") is None


def test_defaults_without_configuration(tmp_path: Path) -> None:
    (hub,) = registry_hosts((tmp_path,), "docker.io")
    assert (hub.scheme, hub.host, hub.path, hub.capabilities) == (
        "https",
        "registry-1.docker.io",
        "/v2",
        ALL_CAPABILITIES,
    )
    (own,) = registry_hosts((tmp_path,), "r.example:5000", default_scheme="http")
    assert (own.scheme, own.host, own.role) == ("http", "r.example:5000", "server")


def test_docker_hub_names_share_one_host_directory(tmp_path: Path) -> None:
    (tmp_path / "docker.io").mkdir()
    (tmp_path / "docker.io" / "hosts.toml").write_text(
        'server = "https://registry-1.docker.io"\n'
        '[host."https://hub-mirror.example"]\ncapabilities = ["pull"]\n'
    )
    for text in ("x", "docker.io/library/x", "index.docker.io/x"):
        namespace = ImageReference.parse(text).registry
        hosts = registry_hosts((tmp_path,), namespace)
        assert [h.host for h in hosts] == ["hub-mirror.example", "registry-1.docker.io"], text


def test_mirrors_first_then_server_and_default_fills_in(tmp_path: Path) -> None:
    directory = tmp_path / "r.example"
    directory.mkdir()
    (directory / "hosts.toml").write_text(
        'capabilities = ["pull"]\n'
        '[host."https://m1.example"]\ncapabilities = ["pull"]\n'
        '[host."http://m2.example:81"]\ncapabilities = ["pull", "resolve"]\n'
    )
    m1, m2, server = registry_hosts((tmp_path,), "r.example")
    assert (m1.host, m1.role) == ("m1.example", "mirror")
    assert (m2.host, m2.scheme) == ("m2.example:81", "http")
    # No server: the namespace's own, and containerd gives it every capability.
    assert (server.host, server.capabilities, server.role) == (
        "r.example",
        ALL_CAPABILITIES,
        "server",
    )
    assert [h.host for h in (m1, m2, server) if h.allows(RESOLVING)] == [
        "m2.example:81",
        "r.example",
    ]
    assert not m1.allows(RESOLVING), "resolve needs pull and resolve"


def test_server_only_file_is_honoured_with_a_warning(tmp_path: Path) -> None:
    (tmp_path / "r.example").mkdir()
    (tmp_path / "r.example" / "hosts.toml").write_text('server = "https://other.example:8443"\n')
    with capture_logs() as logs:
        (server,) = registry_hosts((tmp_path,), "r.example")
    assert server.host == "other.example:8443"
    assert any(e["event"] == "hosts_config.server_without_host_table" for e in logs)


@pytest.mark.parametrize(
    "text",
    [
        "server = [broken",
        '[host."https://m.example"]\ncapabilities = ["pull", "fly"]\n',
        '[host."https://m.example"]\nca = 5\n',
        '[host."https://m.example"]\nclient = [["only-one"]]\n',
        '[host."https://m.example"]\nskip_verify = "yes"\n',
    ],
)
def test_broken_file_is_logged_and_falls_back_to_certificate_files(
    tmp_path: Path, text: str
) -> None:
    directory = tmp_path / "r.example"
    directory.mkdir()
    (directory / "hosts.toml").write_text(text)
    (directory / "ca.crt").write_text("")
    with capture_logs() as logs:
        (server,) = registry_hosts((tmp_path,), "r.example")
    assert (server.host, server.tls.ca_files) == ("r.example", (directory / "ca.crt",))
    errors = [e for e in logs if e["event"] == "hosts_config.invalid"]
    assert errors and errors[0]["log_level"] == "error"
    assert errors[0]["path"] == str(directory / "hosts.toml")


def test_docker_certificate_layout(tmp_path: Path) -> None:
    directory = tmp_path / "r.example_5000_"
    directory.mkdir()
    for name in ("ca.crt", "client.cert", "client.key", "lone.cert", "notes.txt"):
        (directory / name).write_text("")
    (directory / "hosts.toml").write_text("")  # empty: as if absent
    (server,) = registry_hosts((tmp_path,), "r.example:5000")
    assert server.host == "r.example:5000"
    assert server.tls.ca_files == (directory / "ca.crt",)
    assert server.tls.client_pairs == (
        (directory / "client.cert", directory / "client.key"),
        (directory / "lone.cert", None),
    )


@pytest.mark.parametrize(
    ("host", "api", "url"),
    [
        (
            RegistryHost("https", "m.example", "/v2", mirror=True),
            "repo/blobs/sha256:ab",
            "https://m.example/v2/repo/blobs/sha256:ab?ns=r.example",
        ),
        (
            RegistryHost("https", "r.example", "/v2"),
            "repo/blobs/uploads/",
            "https://r.example/v2/repo/blobs/uploads/",
        ),
        (
            RegistryHost("https", "m.example", "", mirror=True),
            "repo/referrers/sha256:ab?artifactType=x",
            "https://m.example/repo/referrers/sha256:ab?artifactType=x&ns=r.example",
        ),
    ],
)
def test_request_urls(host: RegistryHost, api: str, url: str) -> None:
    assert host.url(api, "r.example") == url


def test_docker_hub_api_host_is_not_a_proxy_for_docker_io() -> None:
    host = RegistryHost("https", "registry-1.docker.io", "/v2")
    assert host.url("library/x/manifests/latest", "docker.io").endswith("/manifests/latest")


def test_tls_context_adds_the_ca_to_the_system_store(tmp_path: Path) -> None:
    write_self_signed(tmp_path / "ca.key", tmp_path / "ca.pem", "rig CA")
    system = ssl.create_default_context().cert_store_stats()["x509_ca"]
    context = tls_context(HostTLS(ca_files=(tmp_path / "ca.pem",)), "r.example")
    assert context.cert_store_stats()["x509_ca"] == system + 1
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


def test_tls_context_skip_verify_only_where_configured(tmp_path: Path) -> None:
    with capture_logs() as logs:
        context = tls_context(HostTLS(skip_verify=True), "r.example")
    assert context.verify_mode == ssl.CERT_NONE and not context.check_hostname
    assert [e["log_level"] for e in logs if e["event"] == "hosts_config.skip_verify"] == ["warning"]
    assert tls_context(HostTLS(skip_verify=False), "r.example").verify_mode == ssl.CERT_REQUIRED


def test_unusable_tls_files_are_an_error(tmp_path: Path) -> None:
    with pytest.raises(HostsConfigError, match=r"r\.example"):
        tls_context(HostTLS(ca_files=(tmp_path / "missing.pem",)), "r.example")
    (tmp_path / "bad.cert").write_text("not a certificate")
    with pytest.raises(HostsConfigError):
        tls_context(HostTLS(client_pairs=((tmp_path / "bad.cert", None),)), "r.example")


def test_edits_are_seen_after_the_reload_interval(tmp_path: Path) -> None:
    now = [0.0]
    config = HostsConfig((tmp_path,), clock=lambda: now[0])
    assert [h.host for h in config.hosts("r.example")] == ["r.example"]
    (tmp_path / "r.example").mkdir()
    (tmp_path / "r.example" / "hosts.toml").write_text(
        '[host."https://m.example"]\ncapabilities = ["pull"]\n'
    )
    assert [h.host for h in config.hosts("r.example")] == ["r.example"]
    now[0] = 60.0
    assert [h.host for h in config.hosts("r.example")] == ["m.example", "r.example"]
