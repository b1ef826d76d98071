"""Security of a node running acceld (issue #7).

Other users of the node can neither dial the snapshotter socket nor read the agent's
state; the metrics endpoint listens on loopback only and carries no secret; pull
credentials appear nowhere the agent writes or answers (logs, metrics, profiles, its
files, error messages); and only the registries the configuration allows are contacted.
Everything runs against the real agent process, registry, token service and containerd.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from accelctl.cri.client import CRIImageClient
from converter.convert import ConvertOptions, convert_image
from fetcher.credentials import Credential, CredentialStore
from fetcher.errors import RegistryError, RegistryNotAllowedError
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from fetcher.registry_policy import RegistryPolicy
from fetcher.retry import RetryPolicy
from profiles.registry_sync import fetch_profile
from rig.agent_process import AgentProcess
from rig.containerd import ACCELD_SNAPSHOTTER, CRI_NAMESPACE, ContainerdServer
from rig.images import BuiltImage, build_image, busybox_image_spec, push_image
from rig.layers import Directory, File, LayerSpec
from rig.ports import free_port
from rig.registry import RegistryServer
from tests.fixtures.registry import BasicAuthRegistry, TokenAuthRegistry

SMALL: dict[str, Any] = {"chunk_size": 256 << 10, "span": 1 << 20}
NOBODY = 65534
FAST_RETRY = RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.02)
AGENT_USER_AGENT = "acceld/"

# Runs as `nobody`: tries each access and prints which errno (or "ok") it got.
PROBE = """
import errno, json, os, socket, sys
result = {}
for spec in sys.argv[1:]:
    kind, path = spec.split(":", 1)
    try:
        if kind == "connect":
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(path)
        elif kind == "list":
            os.listdir(path)
        else:
            with open(path, "rb") as handle:
                handle.read(1)
        result[spec] = "ok"
    except OSError as exc:
        result[spec] = errno.errorcode.get(exc.errno, str(exc.errno))
print(json.dumps(result))
"""


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Secret:
    """A credential in the byte form it would leak in; ``label`` names it in reports."""

    label: str
    value: bytes


def leaks(sources: Iterable[tuple[str, bytes]], secrets: list[Secret]) -> list[str]:
    """'<secret label> in <source>' for every secret found in every source."""
    return [
        f"{secret.label} in {where}"
        for where, data in sources
        for secret in secrets
        if secret.value in data
    ]


def files_under(root: Path) -> Iterator[tuple[str, bytes]]:
    """(path, content) of every regular file below ``root`` (symlinks not followed)."""
    for directory, _dirs, names in os.walk(root):
        for name in names:
            path = Path(directory) / name
            if stat.S_ISREG(path.lstat().st_mode):
                yield str(path), path.read_bytes()


def basic_secrets(username: str, password: str, what: str) -> list[Secret]:
    """A password and the Basic header payload made from it."""
    encoded = base64.b64encode(f"{username}:{password}".encode())
    return [Secret(f"{what} password", password.encode()), Secret(f"{what} user:pw", encoded)]


def docker_config(path: Path, auths: dict[str, tuple[str, str]]) -> Path:
    """A Docker config.json holding ``auths`` (host -> (username, password))."""
    doc = {
        "auths": {
            host: {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}
            for host, (user, password) in auths.items()
        }
    }
    path.write_text(json.dumps(doc))
    path.chmod(0o600)
    return path


def agent_with_config(workdir: Path, **settings: Any) -> AgentProcess:
    """An AgentProcess reading a YAML config with ``settings`` (no background fill)."""
    return AgentProcess(workdir, settings={"background_fill": False, **settings})


def metric_samples(agent: AgentProcess, name: str, label: str) -> float:
    """Sum of the samples of ``name`` whose label set contains ``label``."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in agent.metrics().splitlines()
        if line.startswith(name + "{") and label in line
    )


def cri_pull(containerd: ContainerdServer, image: str, credentials: CredentialStore) -> None:
    """CRI pull with credentials, as the kubelet passes an image pull secret."""
    with CRIImageClient(str(containerd.address), timeout=300) as cri:
        cri.pull(image, credentials)


def run_lazy(containerd: ContainerdServer, image: str) -> str:
    """Run ``image`` (already pulled through CRI) to completion; its stdout."""
    out = containerd.run_container(
        image,
        f"sec-{uuid.uuid4().hex[:8]}",
        snapshotter=ACCELD_SNAPSHOTTER,
        namespace=CRI_NAMESPACE,
        timeout=120,
    )
    return out.stdout.strip()


def run_as_nobody(containerd: ContainerdServer, image: str) -> str:
    """Like `run_lazy`, reading the image's greeting as uid/gid 65534 (ctr 1.6 has no
    --user, and busybox's setpriv cannot change ids: its start-stop-daemon can, for a
    user in the image's /etc/passwd)."""
    out = containerd.run_container(
        image,
        f"sec-{uuid.uuid4().hex[:8]}",
        "/bin/busybox",
        "start-stop-daemon",
        "-S",
        "-c",
        "nobody",
        "-n",
        "no-such-process",
        "-a",
        "/bin/busybox",
        "--",
        "sh",
        "-c",
        "id -u; cat /etc/hello.txt",
        snapshotter=ACCELD_SNAPSHOTTER,
        namespace=CRI_NAMESPACE,
        timeout=120,
    )
    return out.stdout.strip()


def wait_for_log(agent: AgentProcess, event: str, timeout: float = 20.0) -> None:
    """The agent logs asynchronously to the reply containerd gets: give it a moment."""
    deadline = time.monotonic() + timeout
    while event not in agent.log_path.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"no {event} in agent log:\n{agent.log_tail(40)}"
        time.sleep(0.2)


def agent_requests(registry: RegistryServer, since: int) -> list[str]:
    """Requests the agent (by its User-Agent) made to ``registry`` after number ``since``."""
    time.sleep(0.5)  # the registry writes an access line once the handler returns
    return [
        f"{r.method} {r.path} {r.status}"
        for r in registry.requests()[since:]
        if r.user_agent.startswith(AGENT_USER_AGENT)
    ]


@pytest.fixture(scope="module")
def built_with_nobody(image_layout: Path) -> BuiltImage:
    """busybox plus an /etc/passwd naming `nobody`, so the container can drop to it."""
    spec = busybox_image_spec()
    passwd = LayerSpec(
        [Directory("etc"), File("etc/passwd", f"nobody:x:{NOBODY}:{NOBODY}::/:/bin/sh\n".encode())]
    )
    return build_image(replace(spec, layers=(*spec.layers, passwd)), image_layout, "sec-nobody")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user may traverse, unlike pytest's 0700 temp dirs: without it
    `nobody` would be stopped by the path, and the modes under test would not matter."""
    path = Path(tempfile.mkdtemp(prefix="acceld-sec-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- the grep itself


def test_leak_grep_finds_planted_secrets(tmp_path):
    """The grep must be able to fail: plant each secret form and find it again."""
    secrets = [*basic_secrets("user", "pa55-word_x", "planted"), Secret("jwt", b"eyJhbGciOi")]
    planted = tmp_path / "state" / "deep"
    planted.mkdir(parents=True)
    (planted / "a.db").write_bytes(b"\0\1binary pa55-word_x tail")
    (planted / "b.log").write_text('{"event":"x","auth":"Basic dXNlcjpwYTU1LXdvcmRfeA=="}')
    (planted / "c.txt").write_text("Authorization: Bearer eyJhbGciOiJFUzI1NiJ9.e30.sig")
    (tmp_path / "state" / "clean").write_text("nothing to see")
    found = leaks(files_under(tmp_path / "state"), secrets)
    assert sorted(found) == sorted(
        [
            f"planted password in {planted / 'a.db'}",
            f"planted user:pw in {planted / 'b.log'}",
            f"jwt in {planted / 'c.txt'}",
        ]
    )


# --------------------------------------------------------------------------- registry policy


@pytest.mark.parametrize(
    ("entries", "registry", "allowed"),
    [
        ((), "anything.example:5000", True),
        (("reg.example.com:5000",), "reg.example.com:5000", True),
        (("reg.example.com:5000",), "reg.example.com:5001", False),
        (("reg.example.com:5000",), "reg.example.com", False),
        (("reg.example.com",), "reg.example.com:443", True),
        (("reg.example.com",), "REG.Example.com", True),
        (("reg.example.com",), "evil-reg.example.com", False),
        (("*.example.com",), "a.b.example.com:5000", True),
        (("*.example.com",), "example.com", False),
        (("*.example.com",), "example.com.evil.net", False),
        (("*.example.com:443",), "a.example.com:80", False),
        (("docker.io",), "registry-1.docker.io", True),
        (("https://reg.example.com/v2/",), "reg.example.com", True),
        (("[::1]:5000",), "[::1]:5000", True),
        (("[::1]",), "[::1]:6000", True),
        (("127.0.0.1",), "127.0.0.2:5000", False),
    ],
)
def test_registry_policy_matching(entries, registry, allowed):
    assert RegistryPolicy(entries).allows(registry) is allowed


@pytest.mark.parametrize("entry", ["*", "*.", "a*.example.com", ""])
def test_registry_policy_refuses_malformed_entries(entry):
    with pytest.raises(ValueError, match="allowed registry"):
        RegistryPolicy([entry])


async def test_disallowed_registry_is_never_contacted(registry, image_pusher, built_busybox):
    pushed = await image_pusher.push(built_busybox)
    ref = ImageReference.parse(pushed.reference)
    before = len(registry.requests())
    policy = RegistryPolicy(["registry.example.com", "*.example.com"])
    async with RegistryClient(policy=policy) as client:
        with pytest.raises(RegistryNotAllowedError, match=f"registry {ref.registry} is not"):
            await client.get_manifest(ref)
        with pytest.raises(RegistryNotAllowedError):
            await client.get_range(ref, built_busybox.layers[0].digest, 0, 10)
    await asyncio.sleep(0.5)
    assert registry.requests()[before:] == []
    async with RegistryClient(policy=RegistryPolicy([ref.registry])) as client:
        assert (await client.get_manifest(ref)).digest == pushed.digest


async def test_refused_registry_gets_no_connection_at_all():
    """Not even a TCP handshake (which no access log would show) reaches a refused host."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        host = f"127.0.0.1:{listener.getsockname()[1]}"
        ref = ImageReference.parse(f"{host}/rig/refused:v1")
        async with RegistryClient(policy=RegistryPolicy(["127.0.0.1:1"])) as client:
            with pytest.raises(RegistryNotAllowedError):
                await client.get_manifest(ref)
            with pytest.raises(RegistryNotAllowedError):
                await client.push_blob(ref, b"data")
        with pytest.raises(BlockingIOError):
            listener.accept()
        async with RegistryClient(
            policy=RegistryPolicy(["127.0.0.1"]), retry=FAST_RETRY, read_timeout=0.5
        ) as client:
            with pytest.raises(RegistryError):
                await client.get_manifest(ref)
        listener.accept()[0].close()  # the control: an allowed client does connect


async def test_blob_redirect_to_another_host_is_followed(make_redirecting_registry, built_busybox):
    """A CDN a registry redirects to is no registry: allowing the registry is enough."""
    server, cdn = make_redirecting_registry()
    reference = f"{server.host}/rig/redirected:v1"
    async with RegistryClient() as client:
        await push_image(client, reference, built_busybox)
    layer = built_busybox.layers[0]
    assert cdn.url.split("//", 1)[1] != server.host
    async with RegistryClient(policy=RegistryPolicy([server.host])) as client:
        data = await client.get_range(ImageReference.parse(reference), layer.digest, 0, 64)
    assert len(data) == 64
    assert any(
        method == "GET" and layer.digest.split(":")[1] in path for method, path, _ in cdn.requests
    )


# --------------------------------------------------------------------------- local access


def probe_as(user: int | None, *accesses: str) -> dict[str, str]:
    """Run PROBE (as ``user``, or as root for None); errno name or "ok" per access."""
    prefix = []
    if user is not None:
        prefix = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
    done = subprocess.run(
        [*prefix, "/usr/bin/python3", "-I", "-c", PROBE, *accesses],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    result: dict[str, str] = json.loads(done.stdout)
    return result


def listening_addresses(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp{,6} has them) of TCP listeners on ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, _, hex_port = fields[1].rpartition(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:
                found.append(address)
    return found


def test_socket_state_and_metrics_are_closed_to_other_users(shared_dir):
    workdir = shared_dir / "agent"
    (workdir / "run").mkdir(parents=True, mode=0o755)
    (workdir / "root").mkdir(mode=0o755)  # an operator's lax directory gets tightened
    with agent_with_config(workdir, record_profiles=False) as agent:
        sock = agent.socket
        info = sock.stat()
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o600
        assert (info.st_uid, info.st_gid) == (0, 0)
        root = agent.root
        private = {
            root: 0o700,
            root / "cache": 0o700,
            root / "snapshotter": 0o700,
            root / "snapshotter" / "metadata.db": 0o600,
        }
        modes = {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in private}
        assert modes == {str(p): oct(m) for p, m in private.items()}
        accesses = (
            f"connect:{sock}",
            f"list:{root}",
            f"list:{root / 'cache'}",
            f"list:{agent.mountpoint}",
            f"read:{root / 'snapshotter' / 'metadata.db'}",
        )
        as_nobody = probe_as(NOBODY, f"list:{sock.parent}", *accesses)
        assert as_nobody == {f"list:{sock.parent}": "ok"} | dict.fromkeys(accesses, "EACCES")
        assert probe_as(None, *accesses) == dict.fromkeys(accesses, "ok")  # probe works

        port = agent.metrics_port
        assert listening_addresses(port) == ["0100007F"]  # 127.0.0.1, nothing else
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.2", port), timeout=5).close()
        assert "acceld_layers_total" in agent.metrics()


# --------------------------------------------------------------------------- credentials


@dataclass
class AuthSetup:
    """An authenticated registry, the agent's credentials for it, and what must not leak."""

    registry: RegistryServer
    username: str
    password: str
    secrets: list[Secret]


def _jwt_header(tokens_realm: str, service: str, username: str, password: str) -> str:
    """The header segment every token of this service starts with (learned by asking it)."""
    query = f"?service={service}&scope=repository:rig/probe:pull&account={username}"
    request = urllib.request.Request(tokens_realm + query)
    basic = base64.b64encode(f"{username}:{password}".encode()).decode()
    request.add_header("Authorization", f"Basic {basic}")
    with urllib.request.urlopen(request, timeout=10) as response:
        token = str(json.loads(response.read())["token"])
    assert token.startswith("eyJ")
    return token.split(".", 1)[0]


@pytest.fixture(params=["basic", "token"])
def auth_setup(request: pytest.FixtureRequest) -> AuthSetup:
    if request.param == "basic":
        basic: BasicAuthRegistry = request.getfixturevalue("registry_basic_auth")
        return AuthSetup(
            basic.server,
            basic.username,
            basic.password,
            basic_secrets(basic.username, basic.password, "registry"),
        )
    token: TokenAuthRegistry = request.getfixturevalue("registry_token_auth")
    username, password = token.users["writer"]
    header = _jwt_header(token.tokens.realm, token.tokens.service, username, password)
    return AuthSetup(
        token.server,
        username,
        password,
        [
            *basic_secrets(username, password, "registry"),
            Secret("bearer token (header of this service's JWTs)", header[:40].encode()),
            Secret("any JWT", b"eyJhbGciOi"),
        ],
    )


async def _collect_errors(setup: AuthSetup, alias: str, wrong_password: str) -> list[str]:
    """Failing requests made with the credentials at hand; their messages, as raised."""
    right = CredentialStore()
    right.add(setup.registry.host, Credential(setup.username, setup.password))
    dead_host = f"127.0.0.1:{free_port()}"
    right.add(dead_host, Credential(setup.username, setup.password))
    wrong = CredentialStore()
    wrong.add(alias, Credential(setup.username, wrong_password))
    attempts = [
        (right, f"{setup.registry.host}/rig/missing-{uuid.uuid4().hex[:6]}:none"),
        (right, f"{dead_host}/rig/down:v1"),
        (wrong, f"{alias}/rig/anything:v1"),
    ]
    messages = []
    for store, reference in attempts:
        async with RegistryClient(credentials=store, retry=FAST_RETRY) as client:
            with pytest.raises(RegistryError) as raised:
                await client.get_manifest(ImageReference.parse(reference))
            messages += [str(raised.value), repr(raised.value)]
    return messages


async def _profile_artifacts(client: RegistryClient, reference: str, digest: str) -> list[bytes]:
    """Every referrer of the image (manifest, config, layers) as pushed, once a profile is."""
    deadline = time.monotonic() + 60
    while await fetch_profile(client, reference, digest) is None:
        assert time.monotonic() < deadline, "the agent pushed no profile"
        await asyncio.sleep(1)
    ref = ImageReference.parse(reference)
    found = []
    for descriptor in await client.referrers(ref, digest):
        fetched = await client.get_manifest(ref.with_digest(descriptor.digest))
        found.append(fetched.body)
        parsed = fetched.parsed
        for blob in (parsed.config, *parsed.layers):  # type: ignore[union-attr]
            found.append(await client.get_blob(ref, blob.digest))
    return found


async def test_credentials_never_leak(
    auth_setup, tmp_path, image_layout, built_busybox, containerd_factory, monkeypatch
):
    """A lazily served, profiled container from an authenticated registry, plus failures;
    then the agent's log (at DEBUG), metrics, files, pushed profiles, containerd's log and
    the raised errors hold no password, Basic payload or bearer token."""
    setup = auth_setup
    monkeypatch.setenv("ACCELD_LOG_LEVEL", "DEBUG")  # AgentProcess passes our environment on
    port = setup.registry.host.rsplit(":", 1)[1]
    alias = f"localhost:{port}"  # the same registry under a name the agent has a wrong password for
    wrong_password = "wrong-" + uuid.uuid4().hex
    secrets = setup.secrets + basic_secrets(setup.username, wrong_password, "wrong")
    credentials = CredentialStore()
    for host in (setup.registry.host, alias):
        credentials.add(host, Credential(setup.username, setup.password))

    suffix = uuid.uuid4().hex[:8]
    repo = f"rig/private-{suffix}"
    reference = f"{setup.registry.host}/{repo}:v1"
    other = build_image(
        busybox_image_spec(hello="another greeting\n"), image_layout, f"other-{suffix}"
    )
    async with RegistryClient(credentials=credentials) as client:
        await push_image(client, reference, built_busybox)
        await push_image(client, f"{setup.registry.host}/{repo}-b:v1", other)
        await convert_image(
            client, ImageReference.parse(reference), ConvertOptions(mode="index", **SMALL)
        )

    config = docker_config(
        tmp_path / "docker-config.json",
        {
            setup.registry.host: (setup.username, setup.password),
            alias: (setup.username, wrong_password),
        },
    )
    agent = agent_with_config(
        tmp_path / "agent", docker_config=str(config), record_starts=1, trace_quiet_s=2.0
    )
    with agent:
        node = containerd_factory(snapshotter=ACCELD_SNAPSHOTTER, acceld_socket=agent.socket)
        await asyncio.to_thread(cri_pull, node, reference, credentials)
        assert metric_samples(agent, "acceld_layers_total", '"lazy"') == len(built_busybox.layers)
        assert await asyncio.to_thread(run_lazy, node, reference) == "hello from acceld"
        # The agent's own credential for this name is wrong: its requests fail, it falls back.
        await asyncio.to_thread(cri_pull, node, f"{alias}/{repo}-b:v1", credentials)
        await asyncio.to_thread(wait_for_log, agent, "agent.layer_fallback")
        assert metric_samples(agent, "acceld_fallbacks_total", '"registry-error"') >= 1
        async with RegistryClient(credentials=credentials) as client:
            artifacts = await _profile_artifacts(client, reference, built_busybox.digest)
        metrics_text = agent.metrics()
    errors = await _collect_errors(setup, alias, wrong_password)
    assert any("401" in message for message in errors)

    sources: list[tuple[str, bytes]] = [
        ("agent log", agent.log_path.read_bytes()),
        ("metrics", metrics_text.encode()),
        ("containerd log", node.log_path.read_bytes()),
        *((f"profile artifact {i}", body) for i, body in enumerate(artifacts)),
        *((f"error message {i}", text.encode()) for i, text in enumerate(errors)),
        *files_under(agent.root),
    ]
    assert len(artifacts) >= 3
    assert any(name.endswith("metadata.db") for name, _ in sources)
    assert leaks(sources, secrets) == []
    assert setup.username.encode() not in metrics_text.encode()


# --------------------------------------------------------------------------- allowed registries


@pytest.mark.parametrize(
    ("allowed", "lazy"),
    [(["registry.example.com", "*.example.com"], False), (["127.0.0.1"], True)],
    ids=["other-registries-only", "fixture-host-any-port"],
)
async def test_agent_contacts_only_allowed_registries(
    allowed, lazy, tmp_path, registry, image_pusher, built_with_nobody, containerd_factory
):
    built = built_with_nobody
    pushed = await image_pusher.push(built)
    async with RegistryClient() as client:
        await convert_image(
            client, ImageReference.parse(pushed.reference), ConvertOptions(mode="index", **SMALL)
        )
    settings = {"allowed_registries": allowed, "record_profiles": False}
    with agent_with_config(tmp_path / "agent", **settings) as agent:
        node = containerd_factory(snapshotter=ACCELD_SNAPSHOTTER, acceld_socket=agent.socket)
        before = len(registry.requests())
        await asyncio.to_thread(node.cri_pull_image, pushed.reference)
        assert await asyncio.to_thread(run_lazy, node, pushed.reference) == "hello from acceld"
        from_agent = await asyncio.to_thread(agent_requests, registry, before)
        lazy_layers = metric_samples(agent, "acceld_layers_total", '"lazy"')
        if lazy:
            assert lazy_layers == len(built.layers)
            # The agent's private state dir must not stop a non-root container reading
            # its lazily served files (overlayfs reaches them with the mounter's rights).
            as_nobody = await asyncio.to_thread(run_as_nobody, node, pushed.reference)
            assert as_nobody.split() == [str(NOBODY), "hello", "from", "acceld"]
            assert from_agent, "an allowed registry was not used"
            assert "registry_not_allowed" not in agent.log_path.read_text()
        else:
            assert from_agent == []
            assert lazy_layers == 0
            fallbacks = metric_samples(agent, "acceld_layers_total", '"fallback"')
            assert fallbacks == len(built.layers)
            await asyncio.to_thread(wait_for_log, agent, "registry_not_allowed")
