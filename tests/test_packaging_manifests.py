"""The Helm chart rendered by Helm's own engine and every object validated offline against
the Kubernetes API schemas; then the contracts between the manifests and the code.

Rendering uses helm-python-sdk, which wraps Helm's Go SDK (the engine `helm template`
runs), so no helm binary is needed. Validation uses kubernetes-validate, which bundles
the OpenAPI-derived JSON schemas of each Kubernetes release (strict: unknown fields are
errors). The ServiceMonitor is a Prometheus Operator CRD, absent from those schemas; its
structure is checked by hand below.
"""

from __future__ import annotations

import base64
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from cryptography import x509

from accelctl.webhook.command import webhook as webhook_command
from accelctl.webhook.labels import NODE_LABEL, ON_DEMAND_LABEL
from accelctl.webhook.server import NAMESPACE_LABEL_PATH, POD_LABEL_PATH
from agent.config import AgentConfig
from fetcher.proxy_env import ProxyEnvironment, ProxySelector

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "packaging" / "helm" / "acceld"
KUBERNETES_VERSIONS = ("1.25", "1.30", "1.37")
NAMESPACE = "acceld-system"
FULL_VALUES: dict[str, Any] = {
    "image": {"repository": "registry.example.com/acceld/acceld", "tag": "0.1.0"},
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
    "webhook": {"pullSecretName": "acceld-pull", "plainHttp": ["registry.lan:5000"]},
    "agent": {"tolerations": [{"operator": "Exists"}], "plainHttp": ["registry.lan:5000"]},
    "imagePullSecrets": [{"name": "acceld-pull"}],
    "proxy": {
        "httpProxy": "http://proxy.lan:3128",
        "httpsProxy": "http://node:secret@proxy.lan:3128",
        "noProxy": "registry.lan,10.0.0.0/8",
    },
    "registryHosts": {
        "files": {
            "registry.lan_5000_": '[host."http://mirror.lan:5000"]\ncapabilities = ["pull"]\n'
        }
    },
}


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    with helm.Chart.load(str(CHART)) as chart:
        rendered = chart.render(values, name="acceld", namespace=NAMESPACE)
    docs: list[dict[str, Any]] = []
    for text in rendered.values():
        docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    found = [d for d in by_kind(docs, kind) if d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


@pytest.fixture(scope="module")
def default_docs() -> list[dict[str, Any]]:
    return render({})


@pytest.fixture(scope="module")
def full_docs() -> list[dict[str, Any]]:
    return render(FULL_VALUES)


def test_chart_lints_clean() -> None:
    report = helm.lint(str(CHART))
    assert report["errors"] == [], report
    assert [m for m in report["messages"] if m["severity"] > 1] == [], report


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("values", ["default", "full"])
def test_every_object_validates_against_the_kubernetes_schemas(
    version: str, values: str, default_docs: list[dict[str, Any]], full_docs: list[dict[str, Any]]
) -> None:
    docs = default_docs if values == "default" else full_docs
    checked = []
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue
        kubernetes_validate.validate(doc, version, strict=True)
        checked.append(doc["kind"])
    assert {"DaemonSet", "ClusterRole", "MutatingWebhookConfiguration", "Deployment"} <= set(
        checked
    )


def test_validation_really_rejects_a_broken_object(default_docs: list[dict[str, Any]]) -> None:
    daemonset = one(default_docs, "DaemonSet")
    broken = yaml.safe_load(yaml.safe_dump(daemonset))
    broken["spec"]["template"]["spec"]["hostPID"] = "yes"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.30", strict=True)


def test_service_monitor_selects_the_agent_metrics_service(full_docs: list[dict[str, Any]]) -> None:
    monitor = one(full_docs, "ServiceMonitor")
    services = [
        s for s in by_kind(full_docs, "Service") if s["metadata"]["name"].endswith("-metrics")
    ]
    assert len(services) == 1
    service = services[0]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert [p["name"] for p in service["spec"]["ports"]] == ["metrics"]
    daemonset = one(full_docs, "DaemonSet")
    assert (
        service["spec"]["selector"].items()
        <= daemonset["spec"]["template"]["metadata"]["labels"].items()
    )
    assert not by_kind(render({}), "ServiceMonitor")


def _volumes(pod_spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in pod_spec["volumes"]}


def _mounts(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in container["volumeMounts"]}


def test_daemonset_runs_privileged_on_opted_in_nodes(default_docs: list[dict[str, Any]]) -> None:
    pod = one(default_docs, "DaemonSet")["spec"]["template"]
    spec = pod["spec"]
    assert spec["nodeSelector"] == {NODE_LABEL: "true"}
    assert spec["hostPID"] is True
    containers = {container["name"]: container for container in spec["containers"]}
    agent = containers["acceld"]
    assert agent["securityContext"]["privileged"] is True
    volumes = _volumes(spec)
    mounts = _mounts(agent)
    assert volumes[mounts["/dev/fuse"]["name"]]["hostPath"] == {
        "path": "/dev/fuse",
        "type": "CharDevice",
    }
    cache = mounts["/var/lib/acceld"]
    assert cache["mountPropagation"] == "Bidirectional"
    assert volumes[cache["name"]]["hostPath"]["path"] == "/var/lib/acceld"
    assert volumes[mounts["/run/acceld"]["name"]]["hostPath"]["path"] == "/run/acceld"
    assert volumes[mounts["/run/containerd"]["name"]]["hostPath"]["path"] == "/run/containerd"
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "9797"
    assert agent["ports"][0]["containerPort"] == 9797
    # The keeper holds the FUSE connection while the agent container restarts: its own
    # container, where the agent's config expects it, able to detach the mount.
    keeper = containers["keeper"]
    command = keeper["command"]
    assert command[0] == "/opt/acceld/bin/acceld-keeper"
    assert keeper["securityContext"]["privileged"] is True
    assert _mounts(keeper)["/var/lib/acceld"]["mountPropagation"] == "Bidirectional"
    config = AgentConfig.from_dict(
        yaml.safe_load(one(default_docs, "ConfigMap")["data"]["config.yaml"])
    )
    assert config.keeper and not config.keeper_spawn
    # The agent reaches its own pod's keeper (a volume only the pod has); the keepers of
    # an old and a new pod meet on the host, so a rollout hands the connection over.
    socket = Path(command[command.index("--socket") + 1])
    assert socket == config.keeper_address
    shared = _mounts(keeper)[str(socket.parent)]["name"]
    assert _mounts(agent)[str(socket.parent)]["name"] == shared
    assert volumes[shared] == {"name": shared, "emptyDir": {}}
    assert command[command.index("--handoff") + 1].startswith("/var/lib/acceld/")
    strategy = one(default_docs, "DaemonSet")["spec"]["updateStrategy"]["rollingUpdate"]
    assert (strategy["maxSurge"], strategy["maxUnavailable"]) == (1, 0)


def test_agent_config_is_one_the_agent_accepts(
    default_docs: list[dict[str, Any]], full_docs: list[dict[str, Any]]
) -> None:
    config_map = one(default_docs, "ConfigMap", "-agent")
    config = AgentConfig.from_dict(yaml.safe_load(config_map["data"]["config.yaml"]))
    spec = one(default_docs, "DaemonSet")["spec"]["template"]["spec"]
    init = spec["initContainers"][0]["command"]
    assert init[0] == "/usr/local/bin/acceld-configure-containerd"
    assert init[init.index("--socket") + 1] == str(config.socket)
    assert config.metrics_address == "0.0.0.0:9797"
    assert config.root == Path("/var/lib/acceld")
    assert config.cache_max_bytes == 20 << 30
    assert config.hosts_dir == "/etc/containerd/certs.d"
    agent_map = one(full_docs, "ConfigMap", "-agent")
    full = AgentConfig.from_dict(yaml.safe_load(agent_map["data"]["config.yaml"]))
    assert full.plain_http == ("registry.lan:5000",)
    assert full.hosts_dir == "/etc/acceld/certs.d:/etc/containerd/certs.d"


def test_agent_reads_the_nodes_registry_hosts_read_only(full_docs: list[dict[str, Any]]) -> None:
    spec = one(full_docs, "DaemonSet")["spec"]["template"]["spec"]
    agent = next(c for c in spec["containers"] if c["name"] == "acceld")
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    node = mounts["/etc/containerd/certs.d"]
    assert node["readOnly"] and volumes[node["name"]]["hostPath"]["path"] == node["mountPath"]
    files = mounts["/etc/acceld/certs.d"]
    items = volumes[files["name"]]["configMap"]["items"]
    assert items == [{"key": "registry.lan_5000_", "path": "registry.lan_5000_/hosts.toml"}]
    hosts = one(full_docs, "ConfigMap", "-registry-hosts")["data"]["registry.lan_5000_"]
    assert tomllib.loads(hosts)["host"]["http://mirror.lan:5000"]["capabilities"] == ["pull"]


def test_init_container_edits_the_mounted_host_config(
    default_docs: list[dict[str, Any]], tmp_path: Path
) -> None:
    spec = one(default_docs, "DaemonSet")["spec"]["template"]["spec"]
    init = spec["initContainers"][0]
    config_arg = init["command"][init["command"].index("--config") + 1]
    assert config_arg == "/host/etc/containerd/config.toml"
    mount = _mounts(init)["/host/etc/containerd"]
    assert _volumes(spec)[mount["name"]]["hostPath"]["path"] == "/etc/containerd"
    # The command line the init container runs works against a real config (dry run).
    host_config = tmp_path / "config.toml"
    host_config.write_text("version = 2\n")
    args = [a if a != config_arg else str(host_config) for a in init["command"][1:]]
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "packaging/containerd/configure_containerd.py"),
            *args,
            "--dry-run",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "would run: nsenter --target 1 --mount" in result.stdout


def test_agent_rbac_is_secrets_read_only(default_docs: list[dict[str, Any]]) -> None:
    role = one(default_docs, "ClusterRole")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch"]}
    ]
    binding = one(default_docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    agent_account = one(default_docs, "DaemonSet")["spec"]["template"]["spec"]["serviceAccountName"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": agent_account, "namespace": NAMESPACE}
    ]
    assert not by_kind(default_docs, "Role")


def _webhook_entries(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    config = one(docs, "MutatingWebhookConfiguration")
    return {entry["clientConfig"]["service"]["path"]: entry for entry in config["webhooks"]}


def test_webhook_entries_match_the_server(default_docs: list[dict[str, Any]]) -> None:
    entries = _webhook_entries(default_docs)
    assert set(entries) == {POD_LABEL_PATH, NAMESPACE_LABEL_PATH}
    for entry in entries.values():
        assert entry["failurePolicy"] == "Ignore"
        assert entry["sideEffects"] == "None"
        assert entry["admissionReviewVersions"] == ["v1"]
        assert entry["rules"][0]["resources"] == ["pods"]
        assert entry["rules"][0]["operations"] == ["CREATE"]
        excluded = entry["namespaceSelector"]["matchExpressions"][0]
        assert excluded["operator"] == "NotIn" and NAMESPACE in excluded["values"]
    by_pod = entries[POD_LABEL_PATH]
    assert by_pod["objectSelector"]["matchExpressions"] == [
        {"key": ON_DEMAND_LABEL, "operator": "In", "values": ["true"]}
    ]
    by_namespace = entries[NAMESPACE_LABEL_PATH]
    assert {"key": ON_DEMAND_LABEL, "operator": "In", "values": ["true"]} in by_namespace[
        "namespaceSelector"
    ]["matchExpressions"]
    assert by_namespace["objectSelector"]["matchExpressions"] == [
        {"key": ON_DEMAND_LABEL, "operator": "NotIn", "values": ["false"]}
    ]


def test_generated_tls_chain_is_valid_for_the_service(default_docs: list[dict[str, Any]]) -> None:
    entry = next(iter(_webhook_entries(default_docs).values()))
    service = entry["clientConfig"]["service"]
    ca = x509.load_pem_x509_certificate(base64.b64decode(entry["clientConfig"]["caBundle"]))
    secret = one(default_docs, "Secret")
    serving = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    serving.verify_directly_issued_by(ca)
    names = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert f"{service['name']}.{service['namespace']}.svc" in names.get_values_for_type(
        x509.DNSName
    )
    assert any(s["metadata"]["name"] == service["name"] for s in by_kind(default_docs, "Service"))


def test_webhook_command_line_is_one_accelctl_accepts(
    full_docs: list[dict[str, Any]], tmp_path: Path
) -> None:
    deployment = one(full_docs, "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    command = container["command"]
    assert command[:2] == ["/opt/acceld/bin/accelctl", "webhook"]
    for path in ("/tls/tls.crt", "/tls/tls.key", "/pull-secret/.dockerconfigjson"):
        local = tmp_path / Path(path).name
        local.write_text("{}")
        command = [str(local) if arg == path else arg for arg in command]
    context = webhook_command.make_context("webhook", command[2:])
    assert context.params["listen"] == "0.0.0.0:8443"
    assert context.params["plain_http"] == ("registry.lan:5000",)
    assert context.params["hosts_dir"] == "/etc/acceld/certs.d"
    assert container["ports"][0]["containerPort"] == 8443


def _proxy_env(docs: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """The proxy variables (either case) of the agent's and the webhook's containers."""
    agent = next(
        c
        for c in one(docs, "DaemonSet")["spec"]["template"]["spec"]["containers"]
        if c["name"] == "acceld"
    )
    webhook = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    return {
        name: {e["name"]: e["value"] for e in c["env"] if e["name"].upper().endswith("_PROXY")}
        for name, c in (("agent", agent), ("webhook", webhook))
    }


def test_proxy_values_reach_the_agent_and_the_webhook_as_containerd_reads_them(
    default_docs: list[dict[str, Any]], full_docs: list[dict[str, Any]]
) -> None:
    expected = {
        "HTTP_PROXY": "http://proxy.lan:3128",
        "HTTPS_PROXY": "http://node:secret@proxy.lan:3128",
        "NO_PROXY": "registry.lan,10.0.0.0/8",
    }
    assert _proxy_env(full_docs) == {"agent": expected, "webhook": expected}
    # The names are the ones the code reads: https goes through the proxy, except to
    # what NO_PROXY names.
    selector = ProxySelector(ProxyEnvironment.from_environ(expected))
    assert selector.proxy_for("https://registry.example.com/v2/") == expected["HTTPS_PROXY"]
    assert selector.proxy_for("http://registry.example.com/v2/") == expected["HTTP_PROXY"]
    assert selector.proxy_for("https://registry.lan/v2/") is None
    assert selector.proxy_for("https://10.1.2.3:5000/v2/") is None
    # Unset by default: no variable at all.
    assert _proxy_env(default_docs) == {"agent": {}, "webhook": {}}
    one_only = _proxy_env(render({"proxy": {"httpsProxy": "http://proxy.lan:3128"}}))
    assert one_only["agent"] == one_only["webhook"] == {"HTTPS_PROXY": "http://proxy.lan:3128"}


def test_disabled_webhook_renders_no_webhook_objects() -> None:
    docs = render({"webhook": {"enabled": False}})
    assert not by_kind(docs, "MutatingWebhookConfiguration")
    assert not by_kind(docs, "Deployment")


def test_reference_drop_in_matches_what_the_setup_step_writes(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "packaging/containerd/configure_containerd.py"),
            "--config",
            str(config),
            "--restart-command",
            "",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    reference = tomllib.loads((REPO / "packaging/containerd/acceld.toml").read_text())
    assert tomllib.loads(config.read_text()) == reference


def test_systemd_units_verify(tmp_path: Path) -> None:
    """The agent's unit and its keeper's, together (the agent's requires the keeper's)."""
    bin_dir = Path(sys.executable).parent
    units = {}
    for name in ("acceld.service", "acceld-keeper.service"):
        units[name] = (REPO / "packaging/systemd" / name).read_text()
        # systemd-analyze checks that ExecStart exists: point it at this checkout's.
        (tmp_path / name).write_text(units[name].replace("/opt/acceld/bin/", f"{bin_dir}/"))
    result = subprocess.run(
        ["systemd-analyze", "verify", *(str(tmp_path / name) for name in units)],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    agent, keeper = units["acceld.service"], units["acceld-keeper.service"]
    assert "ExecStart=/opt/acceld/bin/acceld run --config /etc/acceld/config.yaml" in agent
    assert "Requires=acceld-keeper.service" in agent
    assert "ExecStart=/opt/acceld/bin/acceld-keeper --socket /var/lib/acceld/keeper.sock" in keeper
