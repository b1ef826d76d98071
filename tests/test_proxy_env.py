"""The proxy rules against Go's (golang.org/x/net/http/httpproxy, which containerd's
registry client uses through `http.ProxyFromEnvironment`): the cases of its own tests
(proxy_test.go: proxyForURLTests, UseProxyTests, FromEnvironment), plus acceld's
refusal of proxy schemes it does not support; and, through the real transport, that a
loopback registry is reached directly whatever the variables say."""

from __future__ import annotations

import pytest

from fetcher.proxy_env import (
    NoProxy,
    ProxyConfigError,
    ProxyEnvironment,
    ProxyRefusedError,
    ProxySelector,
    go_split_host_port,
    redact,
)
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient

# (HTTP_PROXY, HTTPS_PROXY, NO_PROXY, request URL, proxy chosen or None), after
# proxy_test.go's proxyForURLTests; its default request is http://example.com.
PROXY_FOR_URL = [
    ("127.0.0.1:8080", "", "", "http://example.com", "http://127.0.0.1:8080"),
    (
        "cache.corp.example.com:1234",
        "",
        "",
        "http://example.com",
        "http://cache.corp.example.com:1234",
    ),
    ("cache.corp.example.com", "", "", "http://example.com", "http://cache.corp.example.com"),
    # A single-label name parses as a URL scheme; Go (and acceld) then read it as a host.
    ("localhost", "", "", "http://example.com", "http://localhost"),
    ("http://127.0.0.1:8080", "", "", "http://example.com", "http://127.0.0.1:8080"),
    ("http.proxy.tld", "secure.proxy.tld", "", "http://insecure.tld/", "http://http.proxy.tld"),
    ("http.proxy.tld", "secure.proxy.tld", "", "https://secure.tld/", "http://secure.proxy.tld"),
    ("http.proxy.tld", "", "", "https://secure.tld/", None),
    ("http.proxy.tld", "", "", "ftp://insecure.tld/", None),
    ("", "", "", "http://example.com", None),
    ("proxy", "", "example.com", "http://example.com/", None),
    ("proxy", "", ".example.com", "http://example.com/", "http://proxy"),
    ("proxy", "", "ample.com", "http://example.com/", "http://proxy"),
    ("proxy", "", "example.com", "http://foo.example.com/", None),
    ("proxy", "", ".foo.com", "http://example.com/", "http://proxy"),
    ("proxy", "", ".示例.com", "http://www.示例.com", None),
    ("proxy", "", "xn--fsq092h.com", "http://www.示例.com", None),
    ("proxy", "", "示例.com", "http://www.xn--fsq092h.com", None),
    # An IPv6 zone is not a name (CVE-2025-22870).
    ("proxy", "", "example.com", "http://[1000::%25.example.com]:123", "http://proxy"),
    # Beyond Go's table, by its code: ports, credentials, loopback whatever NO_PROXY.
    ("", "proxy:3128", "example.com:443", "https://example.com/v2/", None),
    ("", "proxy:3128", "example.com:443", "https://example.com:8443/v2/", "http://proxy:3128"),
    ("", "http://u:p@proxy:3128", "", "https://r.io/", "http://u:p@proxy:3128"),
    ("", "proxy:3128", "", "https://[::1]:5000/v2/", None),
    ("", "proxy:3128", "", "https://127.9.9.9/v2/", None),
    ("", "proxy:3128", "", "https://[::ffff:127.0.0.1]/v2/", None),
    ("", "proxy:3128", "", "https://LOCALHOST/v2/", "http://proxy:3128"),  # Go compares as written
    ("", "proxy:3128", "10.1.0.0/16", "https://10.1.2.3:5000/v2/", None),
    ("", "proxy:3128", "10.1.0.0/16", "https://10.2.2.3:5000/v2/", "http://proxy:3128"),
    ("", "proxy:3128", "10.1.2.3", "https://[::ffff:10.1.2.3]/v2/", None),
    ("", "proxy:3128", "10.0.0.0/8", "https://registry.10.in-addr.test/", "http://proxy:3128"),
    ("", "proxy:3128", "*.corp", "https://corp/", "http://proxy:3128"),
    ("", "proxy:3128", "*.corp", "https://r.corp/", None),
    ("", "proxy:3128", "r.io,*", "https://anything.example/", None),
]


@pytest.mark.parametrize(("http", "https", "no_proxy", "url", "want"), PROXY_FOR_URL)
def test_proxy_for_url(http: str, https: str, no_proxy: str, url: str, want: str | None) -> None:
    selector = ProxySelector(ProxyEnvironment(http, https, no_proxy))
    assert selector.proxy_for(url) == want


def test_http_proxy_is_refused_in_a_cgi_process() -> None:
    selector = ProxySelector(ProxyEnvironment(http_proxy="http://10.1.2.3:8080", cgi=True))
    with pytest.raises(ProxyRefusedError):
        selector.proxy_for("http://example.com")
    with pytest.raises(ProxyRefusedError):  # before the loopback rule, as in Go
        selector.proxy_for("http://127.0.0.1/")


def test_https_proxy_still_serves_a_cgi_process() -> None:
    selector = ProxySelector(ProxyEnvironment(https_proxy="http://secure.proxy.tld", cgi=True))
    assert selector.proxy_for("https://secure.tld/") == "http://secure.proxy.tld"


GO_NO_PROXY = (
    "foobar.com, .barbaz.net, *.wildcard.io, 192.168.1.1, 192.168.1.2:81, 192.168.1.3:80,"
    " 10.0.0.0/30, 2001:db8::52:0:1, [2001:db8::52:0:2]:443, [2001:db8::52:0:3]:80,"
    " 2002:db8:a::45/64"
)
# (host, proxied) for a request to host:80, from proxy_test.go's UseProxyTests.
USE_PROXY = [
    ("localhost", False),
    ("127.0.0.1", False),
    ("127.0.0.2", False),
    ("[::1]", False),
    ("[::2]", True),
    ("192.168.1.1", False),
    ("192.168.1.2", True),
    ("192.168.1.3", False),
    ("192.168.1.4", True),
    ("10.0.0.2", False),
    ("[2001:db8::52:0:1]", False),
    ("[2001:db8::52:0:2]", True),
    ("[2001:db8::52:0:3]", False),
    ("[2002:db8:a::123]", False),
    ("[fe80::424b:c8be:1643:a1b6]", True),
    ("barbaz.net", True),
    ("www.barbaz.net", False),
    ("foobar.com", False),
    ("www.foobar.com", False),
    ("foofoobar.com", True),
    ("baz.com", True),
    ("localhost.net", True),
    ("local.localhost", True),
    ("barbarbaz.net", True),
    ("wildcard.io", True),
    ("nested.wildcard.io", False),
    ("awildcard.io", True),
]


@pytest.mark.parametrize(("host", "proxied"), USE_PROXY)
def test_use_proxy(host: str, proxied: bool) -> None:
    selector = ProxySelector(ProxyEnvironment(http_proxy="proxy", no_proxy=GO_NO_PROXY))
    assert (selector.proxy_for(f"http://{host}:80/") is not None) == proxied


@pytest.mark.parametrize(("host", "_proxied"), USE_PROXY)
def test_an_asterisk_bypasses_every_host(host: str, _proxied: bool) -> None:
    selector = ProxySelector(ProxyEnvironment(http_proxy="proxy", no_proxy="*"))
    assert selector.proxy_for(f"http://{host}:80/") is None


def test_a_malformed_entry_is_ignored() -> None:
    assert NoProxy.parse(":1") == NoProxy()
    assert not NoProxy.parse(":1").bypass("example.com", "80")


@pytest.mark.parametrize(
    ("hostport", "split"),
    [
        ("foo.com:80", ("foo.com", "80")),
        ("[::1]:80", ("::1", "80")),
        ("foo.com:", ("foo.com", "")),
        ("foo.com", None),
        ("2001:db8::1", None),
        ("[2001:db8::1]", None),
        ("[::1]x:80", None),
    ],
)
def test_split_host_port_as_go(hostport: str, split: tuple[str, str] | None) -> None:
    assert go_split_host_port(hostport) == split


@pytest.mark.parametrize(
    ("environ", "want"),
    [
        (
            {"HTTP_PROXY": "httpproxy", "HTTPS_PROXY": "httpsproxy", "NO_PROXY": "noproxy"},
            ProxyEnvironment("httpproxy", "httpsproxy", "noproxy", cgi=False),
        ),
        (
            {"http_proxy": "httpproxy", "https_proxy": "httpsproxy", "no_proxy": "noproxy"},
            ProxyEnvironment("httpproxy", "httpsproxy", "noproxy", cgi=False),
        ),
        (
            {"HTTP_PROXY": "upper", "http_proxy": "lower", "REQUEST_METHOD": "PUT"},
            ProxyEnvironment(http_proxy="upper", cgi=True),
        ),
        ({"HTTPS_PROXY": "", "https_proxy": "lower"}, ProxyEnvironment(https_proxy="lower")),
        ({"REQUEST_METHOD": ""}, ProxyEnvironment()),
    ],
)
def test_from_environment(environ: dict[str, str], want: ProxyEnvironment) -> None:
    assert ProxyEnvironment.from_environ(environ) == want


@pytest.mark.parametrize(
    "value",
    [
        "https://proxy.corp:3128",
        "socks5://127.0.0.1:1080",
        "socks5h://proxy.corp",
        "foo://host",
        "http://proxy.corp:99999",
        "http://proxy.corp:port",
    ],
)
def test_proxies_acceld_cannot_use_fail_at_start_up(value: str) -> None:
    with pytest.raises(ProxyConfigError) as refused:
        ProxySelector(ProxyEnvironment(https_proxy=value))
    assert "HTTPS_PROXY" in str(refused.value)


def test_credentials_stay_out_of_logs_and_errors() -> None:
    selector = ProxySelector(ProxyEnvironment(https_proxy="http://alice:s3cret@proxy:3128"))
    assert "s3cret" not in str(selector.describe())
    assert selector.describe()["https_proxy"] == "http://alice:***@proxy:3128"
    with pytest.raises(ProxyConfigError) as refused:
        ProxySelector(ProxyEnvironment(http_proxy="socks5://bob:hunter2@proxy:1080"))
    assert "hunter2" not in str(refused.value)
    assert redact("proxy:3128") == "proxy:3128"


async def test_a_loopback_registry_is_reached_directly_whatever_the_variables_say(
    registry, image_pusher, built_busybox
) -> None:
    """The rule aiohttp's own ``trust_env`` breaks: a proxy that answers nothing (the
    discard port) would fail every request that went to it."""
    pushed = await image_pusher.push(built_busybox)
    nowhere = "http://127.0.0.1:9"
    async with RegistryClient(plain_http_hosts={registry.host}) as client:
        client.transport.proxies = ProxySelector(ProxyEnvironment(nowhere, nowhere))
        manifest = await client.get_manifest(ImageReference.parse(pushed.reference))
    assert manifest.digest == pushed.digest
