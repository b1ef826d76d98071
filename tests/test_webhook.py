"""The admission webhook over real HTTPS with AdmissionReview v1 documents as the API
server sends them, deciding against the real registry (images converted by the real
converter). Every patched pod is re-validated against the Kubernetes Pod schema."""

from __future__ import annotations

import base64
import copy
import json
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import kubernetes_validate
import pytest

from accelctl.webhook.labels import NODE_LABEL, ON_DEMAND_LABEL
from accelctl.webhook.lookup import AcceleratedImageLookup
from accelctl.webhook.mutation import REQUIRED, PodMutator
from accelctl.webhook.server import NAMESPACE_LABEL_PATH, POD_LABEL_PATH, WebhookServer, tls_context
from converter.convert import ConvertOptions, convert_image
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from fetcher.retry import RetryPolicy
from formats.accelerated import ANNOTATION_SOURCE_DIGEST
from rig.certificates import write_self_signed
from rig.fault_proxy import Fault, FaultProxy
from rig.images import build_image, busybox_image_spec

SMALL: dict[str, Any] = {"chunk_size": 256 << 10, "span": 1 << 20}
K8S_VERSION = "1.30"
LOOKUP_TIMEOUT = 1.5


class Clock:
    """A clock the test moves by hand, to expire the lookup cache without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _self_signed(directory: Path) -> tuple[Path, Path]:
    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    write_self_signed(
        key_path,
        cert_path,
        "acceld-webhook.acceld.svc",
        dns_names=["acceld-webhook.acceld.svc"],
        ip_addresses=["127.0.0.1"],
    )
    return cert_path, key_path


class Webhook:
    """A running webhook and an HTTPS client that trusts only its certificate."""

    def __init__(self, server: WebhookServer, session: aiohttp.ClientSession, clock: Clock):
        self.server = server
        self.session = session
        self.clock = clock

    async def post(self, path: str, body: bytes) -> tuple[int, Any]:
        url = f"https://127.0.0.1:{self.server.port}{path}"
        async with self.session.post(
            url, data=body, headers={"Content-Type": "application/json"}
        ) as resp:
            return resp.status, await resp.json(content_type=None)

    async def review(self, pod: dict[str, Any], path: str = POD_LABEL_PATH) -> dict[str, Any]:
        uid = str(uuid.uuid4())
        status, answer = await self.post(path, json.dumps(admission_review(pod, uid)).encode())
        assert status == 200, answer
        assert answer["apiVersion"] == "admission.k8s.io/v1"
        assert answer["kind"] == "AdmissionReview"
        response: dict[str, Any] = answer["response"]
        assert response["uid"] == uid
        assert response["allowed"] is True
        return response


@pytest.fixture
async def webhook(tmp_path: Path) -> AsyncIterator[Webhook]:
    cert, key = _self_signed(tmp_path)
    clock = Clock()
    # One attempt per request: with a dead registry the deadline, not retries, decides.
    client = RegistryClient(retry=RetryPolicy(attempts=1), connect_timeout=1.0, read_timeout=5.0)
    async with client:
        lookup = AcceleratedImageLookup(client, ttl=60.0, clock=clock)
        server = WebhookServer(
            PodMutator(lookup, timeout=LOOKUP_TIMEOUT), "127.0.0.1", 0, tls_context(cert, key)
        )
        await server.start()
        trust = ssl.create_default_context(cafile=str(cert))
        try:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trust)) as session:
                yield Webhook(server, session, clock)
        finally:
            await server.stop()


def make_pod(
    image: str,
    labels: dict[str, str] | None = None,
    init_image: str | None = None,
    sidecar_image: str | None = None,
) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "app-", "namespace": "shop", "labels": labels or {}},
        "spec": {
            "containers": [
                {"name": "app", "image": image, "command": ["/bin/sh", "-c", "sleep 3600"]},
            ]
        },
    }
    if sidecar_image:
        pod["spec"]["containers"].append({"name": "sidecar", "image": sidecar_image})
    if init_image:
        pod["spec"]["initContainers"] = [{"name": "init", "image": init_image}]
    return pod


def admission_review(pod: dict[str, Any], uid: str) -> dict[str, Any]:
    """A review as kube-apiserver 1.30 sends it for `kubectl run` / a ReplicaSet."""
    gvk = {"group": "", "version": "v1", "kind": "Pod"}
    gvr = {"group": "", "version": "v1", "resource": "pods"}
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": gvk,
            "resource": gvr,
            "requestKind": gvk,
            "requestResource": gvr,
            "name": "",
            "namespace": pod["metadata"]["namespace"],
            "operation": "CREATE",
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "groups": ["system:serviceaccounts", "system:authenticated"],
            },
            "object": pod,
            "oldObject": None,
            "dryRun": False,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"},
        },
    }


def _pointer(path: str) -> list[str]:
    return [part.replace("~1", "/").replace("~0", "~") for part in path.split("/")[1:]]


def apply_patch(doc: dict[str, Any], patch: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 `add` / `replace`, the only operations the webhook emits."""
    result = copy.deepcopy(doc)
    for op in patch:
        assert op["op"] in ("add", "replace"), op
        *parents, last = _pointer(op["path"])
        target: Any = result
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        if isinstance(target, list):
            if last == "-":
                target.append(op["value"])
            elif op["op"] == "add":
                target.insert(int(last), op["value"])
            else:
                target[int(last)] = op["value"]
        else:
            assert op["op"] == "add" or last in target, op
            target[last] = op["value"]
    return result


def patched(pod: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    assert response["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(response["patch"]))
    result = apply_patch(pod, ops)
    kubernetes_validate.validate(result, K8S_VERSION, strict=True)
    return result


def node_terms(pod: dict[str, Any]) -> list[dict[str, Any]]:
    terms: list[dict[str, Any]] = pod["spec"]["affinity"]["nodeAffinity"][REQUIRED][
        "nodeSelectorTerms"
    ]
    return terms


OPT_IN = {"key": NODE_LABEL, "operator": "In", "values": ["true"]}


async def _converted(image_pusher, built, mode: str, host: str | None = None) -> str:
    """Push ``built`` to a fresh repository, convert it, return the original reference."""
    pushed = await image_pusher.push(built)
    async with RegistryClient() as client:
        await convert_image(
            client, ImageReference.parse(pushed.reference), ConvertOptions(mode=mode, **SMALL)
        )
    if host is None:
        return str(pushed.reference)
    return str(pushed.reference).replace(image_pusher.registry.host, host, 1)


async def test_full_mode_image_is_rewritten_and_pod_steered(
    webhook, image_pusher, built_busybox, registry
):
    image = await _converted(image_pusher, built_busybox, "full")
    plain = (await image_pusher.push(built_busybox)).reference
    pod = make_pod(image, {ON_DEMAND_LABEL: "true"}, init_image=image, sidecar_image=plain)
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)

    response = await webhook.review(pod)

    result = patched(pod, response)
    async with RegistryClient() as client:
        twin = await client.get_manifest(ImageReference.parse(f"{image}_accelerated"))
    # Pinned to the twin checked at admission: the tag may move before the pod starts.
    assert result["spec"]["containers"][0]["image"] == f"{image}_accelerated@{twin.digest}"
    assert result["spec"]["initContainers"][0]["image"] == f"{image}_accelerated@{twin.digest}"
    assert result["spec"]["containers"][1] == pod["spec"]["containers"][1]
    assert node_terms(result) == [{"matchExpressions": [OPT_IN]}]
    # A second call (the namespace entry also matched) leaves the patched pod alone.
    again = await webhook.review(result, NAMESPACE_LABEL_PATH)
    assert "patch" not in again


async def test_index_only_form_keeps_image_but_steers_pod(webhook, image_pusher, built_busybox):
    image = await _converted(image_pusher, built_busybox, "index")
    pod = make_pod(image, labels={ON_DEMAND_LABEL: "true"})

    result = patched(pod, await webhook.review(pod))

    assert [c["image"] for c in result["spec"]["containers"]] == [
        c["image"] for c in pod["spec"]["containers"]
    ]
    assert node_terms(result) == [{"matchExpressions": [OPT_IN]}]


async def test_unlabelled_pod_is_untouched_and_registry_not_asked(
    webhook, image_pusher, built_busybox, registry
):
    image = await _converted(image_pusher, built_busybox, "full")
    repository = ImageReference.parse(image).repository
    before = len([r for r in registry.requests() if repository in r.path])

    response = await webhook.review(make_pod(image, labels={"app": "shop"}))

    assert "patch" not in response and "patchType" not in response
    assert len([r for r in registry.requests() if repository in r.path]) == before


async def test_namespace_entry_mutates_unlabelled_pods_but_honours_opt_out(
    webhook, image_pusher, built_busybox
):
    image = await _converted(image_pusher, built_busybox, "full")

    selected = await webhook.review(make_pod(image), NAMESPACE_LABEL_PATH)
    opted_out = await webhook.review(
        make_pod(image, labels={ON_DEMAND_LABEL: "false"}), NAMESPACE_LABEL_PATH
    )

    rewritten = patched(make_pod(image), selected)["spec"]["containers"][0]["image"]
    assert rewritten.startswith(f"{image}_accelerated@sha256:")
    assert "patch" not in opted_out


async def test_requirement_is_anded_into_existing_node_selector_terms(
    webhook, image_pusher, built_busybox
):
    image = await _converted(image_pusher, built_busybox, "full")
    pod = make_pod(image, labels={ON_DEMAND_LABEL: "true"})
    zone = {"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["a"]}
    gpu = {"key": "gpu", "operator": "Exists"}
    pod["spec"]["affinity"] = {
        "nodeAffinity": {
            REQUIRED: {
                "nodeSelectorTerms": [
                    {"matchExpressions": [zone]},
                    {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n"]}]},
                    {"matchExpressions": [gpu, OPT_IN]},
                ]
            }
        },
        "podAntiAffinity": {},
    }

    result = patched(pod, await webhook.review(pod))

    terms = node_terms(result)
    assert terms[0]["matchExpressions"] == [zone, OPT_IN]
    assert terms[1]["matchExpressions"] == [OPT_IN]
    assert (
        terms[1]["matchFields"]
        == pod["spec"]["affinity"]["nodeAffinity"][REQUIRED]["nodeSelectorTerms"][1]["matchFields"]
    )
    assert terms[2]["matchExpressions"] == [gpu, OPT_IN]
    assert result["spec"]["affinity"]["podAntiAffinity"] == {}


async def test_image_without_accelerated_form_is_untouched(webhook, image_pusher, built_busybox):
    pushed = await image_pusher.push(built_busybox)

    response = await webhook.review(make_pod(pushed.reference, labels={ON_DEMAND_LABEL: "true"}))

    assert "patch" not in response
    assert "warnings" not in response


async def test_stale_accelerated_form_is_not_used(
    webhook, image_pusher, built_busybox, image_layout
):
    image = await _converted(image_pusher, built_busybox, "full")
    # The original tag moves on after the conversion: its `_accelerated` form is old content.
    moved = build_image(busybox_image_spec(hello="moved on\n"), image_layout, "busybox-moved")
    ref = ImageReference.parse(image)
    await image_pusher.push(moved, repository=ref.repository, tag=ref.tag or "latest")

    response = await webhook.review(make_pod(image, labels={ON_DEMAND_LABEL: "true"}))

    assert "patch" not in response


async def test_answers_are_cached_for_the_ttl(webhook, image_pusher, built_busybox, registry):
    image = await _converted(image_pusher, built_busybox, "full")
    repository = ImageReference.parse(image).repository
    pod = make_pod(image, labels={ON_DEMAND_LABEL: "true"})

    def lookups() -> int:
        return len([r for r in registry.requests() if f"{repository}/manifests" in r.path])

    await webhook.review(pod)
    first = lookups()
    await webhook.review(pod)
    cached = lookups()
    webhook.clock.now += 61
    await webhook.review(pod)

    assert first > 0
    assert cached == first
    assert lookups() > cached


async def test_registry_down_admits_pod_unchanged(webhook, make_registry, built_busybox, tmp_path):
    from tests.fixtures.images import ImagePusher

    server = make_registry()
    image = await _converted(ImagePusher(server), built_busybox, "full")
    server.stop()
    started = time.monotonic()

    response = await webhook.review(make_pod(image, labels={ON_DEMAND_LABEL: "true"}))

    assert "patch" not in response
    assert "registry lookup failed" in response["warnings"][0]
    assert time.monotonic() - started < LOOKUP_TIMEOUT + 2


async def test_slow_registry_admits_pod_unchanged_within_deadline(
    webhook, image_pusher, built_busybox, registry
):
    with FaultProxy(registry.url) as proxy:
        image = await _converted(image_pusher, built_busybox, "full", host=proxy.host)
        stall = proxy.add(
            Fault(
                "stall", path_contains="/manifests/", times=10, stall_seconds=LOOKUP_TIMEOUT + 1.5
            )
        )
        started = time.monotonic()

        response = await webhook.review(make_pod(image, labels={ON_DEMAND_LABEL: "true"}))

        elapsed = time.monotonic() - started
        assert stall.hits >= 1
    assert "patch" not in response
    assert f"no answer within {LOOKUP_TIMEOUT:g}s" in response["warnings"][0]
    assert LOOKUP_TIMEOUT - 0.2 < elapsed < LOOKUP_TIMEOUT + 2


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not JSON"),
        (b"[]", "JSON object"),
        (json.dumps({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview"}), "v1"),
        (json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}), "request"),
        (
            json.dumps(
                {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {}}
            ),
            "request.uid",
        ),
    ],
)
async def test_malformed_review_is_a_clear_400(webhook, body, message):
    payload = body if isinstance(body, bytes) else body.encode()

    status, answer = await webhook.post(POD_LABEL_PATH, payload)

    assert status == 400
    assert message in answer["error"]


async def test_reviews_of_other_kinds_pass_untouched(webhook):
    review = admission_review(make_pod("busybox"), "uid-1")
    review["request"]["kind"] = {"group": "apps", "version": "v1", "kind": "Deployment"}
    review["request"]["object"] = {"kind": "Deployment", "metadata": {"labels": {}}}

    status, answer = await webhook.post(POD_LABEL_PATH, json.dumps(review).encode())

    assert status == 200
    assert answer["response"] == {"uid": "uid-1", "allowed": True}


def _pod_review_with(**spec_or_metadata: Any) -> bytes:
    review = admission_review(make_pod("busybox", labels={ON_DEMAND_LABEL: "true"}), "uid-2")
    pod = review["request"]["object"]
    for key, value in spec_or_metadata.items():
        (pod if key == "metadata" else pod["spec"])[key] = value
    return json.dumps(review).encode()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (_pod_review_with(metadata=["not", "an", "object"]), "metadata"),
        (_pod_review_with(metadata={"labels": "acceld=true"}), "labels"),
        (_pod_review_with(containers={"name": "c"}), "containers"),
        (_pod_review_with(affinity=["zone"]), "affinity"),
        (
            _pod_review_with(affinity={"nodeAffinity": {REQUIRED: {"nodeSelectorTerms": "x"}}}),
            "nodeSelectorTerms",
        ),
    ],
)
async def test_a_malformed_pod_is_a_clear_400_not_a_500(webhook, body, message):
    status, answer = await webhook.post(POD_LABEL_PATH, body)

    assert status == 400
    assert message in answer["error"]


async def test_a_twin_that_names_no_source_is_not_used(webhook, image_pusher, built_busybox):
    """Anyone who can push a tag can push `<tag>_accelerated`: a twin is used only if it
    records the digest of the image the tag names now."""
    image = await _converted(image_pusher, built_busybox, "full")
    twin_ref = ImageReference.parse(f"{image}_accelerated")
    async with RegistryClient() as client:
        twin = await client.get_manifest(twin_ref)
        doc = json.loads(twin.body)
        del doc["annotations"][ANNOTATION_SOURCE_DIGEST]
        await client.push_manifest(twin_ref, json.dumps(doc).encode(), twin.media_type)

    response = await webhook.review(make_pod(image), NAMESPACE_LABEL_PATH)

    assert "patch" not in response
