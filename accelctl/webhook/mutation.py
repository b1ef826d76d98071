"""AdmissionReview v1 in, AdmissionReview v1 out: the pod mutation as a JSON patch.

The API server may call the webhook twice for one pod (a pod labelled itself in a
labelled namespace matches both webhook entries), so every patch is idempotent: an
image already on its `_accelerated` tag is not looked up again, and the node-affinity
requirement is added to a selector term only when the term lacks it.
"""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import dataclass
from typing import Any

from accelctl.webhook.labels import NODE_LABEL, ON_DEMAND_LABEL, OPTED_IN, OPTED_OUT
from accelctl.webhook.lookup import (
    AcceleratedImageLookup,
    Acceleration,
    LookupResult,
    RegistryLookupError,
)
from common.logging import get_logger

log = get_logger(__name__)

API_VERSION = "admission.k8s.io/v1"
CONTAINER_LISTS = ("initContainers", "containers")
REQUIRED = "requiredDuringSchedulingIgnoredDuringExecution"
NODE_REQUIREMENT: dict[str, Any] = {"key": NODE_LABEL, "operator": "In", "values": [OPTED_IN]}

JsonPatch = list[dict[str, Any]]


class ReviewError(ValueError):
    """The request body is not a usable AdmissionReview v1 (answered with HTTP 400)."""


@dataclass(frozen=True)
class PodAdmission:
    """The parts of an AdmissionReview request the mutation needs."""

    uid: str
    operation: str
    namespace: str
    pod: dict[str, Any] | None
    """The pod object, or None when the request is for anything but a pod."""


def parse_review(body: bytes) -> PodAdmission:
    """Validate an AdmissionReview v1 document; errors name the field that is wrong."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReviewError(f"body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ReviewError("body must be a JSON object (an AdmissionReview)")
    if doc.get("apiVersion") != API_VERSION or doc.get("kind") != "AdmissionReview":
        raise ReviewError(
            f"expected apiVersion {API_VERSION} kind AdmissionReview, got "
            f"{doc.get('apiVersion')!r} {doc.get('kind')!r}"
        )
    request = doc.get("request")
    if not isinstance(request, dict):
        raise ReviewError("AdmissionReview has no request object")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise ReviewError("request.uid is missing")
    kind = request.get("kind") or {}
    obj = request.get("object")
    is_pod = isinstance(kind, dict) and kind.get("group", "") == "" and kind.get("kind") == "Pod"
    if is_pod and not isinstance(obj, dict):
        raise ReviewError("request.object must be the Pod")
    if is_pod and not isinstance(obj.get("spec"), dict):  # type: ignore[union-attr]
        raise ReviewError("request.object.spec must be an object")
    if is_pod:
        _check_pod_shape(obj)  # type: ignore[arg-type]
    return PodAdmission(
        uid=uid,
        operation=str(request.get("operation", "")),
        namespace=str(request.get("namespace", "")),
        pod=obj if is_pod else None,
    )


def _check_pod_shape(pod: dict[str, Any]) -> None:
    """ReviewError unless every part of the pod this webhook reads has its API type: a
    malformed review gets a 400 that names the field, never a 500."""

    def expect(value: Any, kind: type, where: str) -> Any:
        if value is not None and not isinstance(value, kind):
            raise ReviewError(f"{where} must be {'an object' if kind is dict else 'a list'}")
        return value if value is not None else kind()

    metadata = expect(pod.get("metadata"), dict, "request.object.metadata")
    expect(metadata.get("labels"), dict, "request.object.metadata.labels")
    spec = pod["spec"]
    for list_name in CONTAINER_LISTS:
        expect(spec.get(list_name), list, f"request.object.spec.{list_name}")
    affinity = expect(spec.get("affinity"), dict, "request.object.spec.affinity")
    node = expect(affinity.get("nodeAffinity"), dict, "spec.affinity.nodeAffinity")
    required = expect(node.get(REQUIRED), dict, f"nodeAffinity.{REQUIRED}")
    terms = expect(required.get("nodeSelectorTerms"), list, "nodeSelectorTerms")
    for index, term in enumerate(terms):
        term = expect(term, dict, f"nodeSelectorTerms[{index}]")
        expressions = expect(term.get("matchExpressions"), list, "matchExpressions")
        for expression in expressions:
            expect(expression, dict, f"nodeSelectorTerms[{index}].matchExpressions[]")


def review_response(uid: str, patch: JsonPatch, warning: str | None = None) -> dict[str, Any]:
    """An allowing AdmissionReview response, with ``patch`` when there is one."""
    response: dict[str, Any] = {"uid": uid, "allowed": True}
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
    if warning:
        response["warnings"] = [warning]
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}


def pod_opted_in(pod: dict[str, Any]) -> bool:
    """Whether the pod itself carries the on-demand label."""
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return labels.get(ON_DEMAND_LABEL) == OPTED_IN


def pod_opted_out(pod: dict[str, Any]) -> bool:
    """A pod in an opted-in namespace can still refuse with the label set to false."""
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return labels.get(ON_DEMAND_LABEL) == OPTED_OUT


def _container_images(pod: dict[str, Any]) -> list[tuple[str, int, str]]:
    found = []
    for list_name in CONTAINER_LISTS:
        for index, container in enumerate(pod["spec"].get(list_name) or []):
            if isinstance(container, dict) and isinstance(container.get("image"), str):
                found.append((list_name, index, container["image"]))
    return found


def _has_requirement(term: dict[str, Any]) -> bool:
    return any(
        expr.get("key") == NODE_LABEL
        and expr.get("operator") == "In"
        and expr.get("values") == [OPTED_IN]
        for expr in term.get("matchExpressions") or []
    )


def node_affinity_patch(pod: dict[str, Any]) -> JsonPatch:
    """Require an opted-in node, ANDed into every existing node selector term.

    Terms are ORed by the scheduler, so the requirement goes into each of them; adding it
    as a term of its own would let the pod land anywhere another term allows.
    """
    spec = pod["spec"]
    term: dict[str, Any] = {"matchExpressions": [NODE_REQUIREMENT]}
    affinity = spec.get("affinity")
    if not affinity:
        value: dict[str, Any] = {"nodeAffinity": {REQUIRED: {"nodeSelectorTerms": [term]}}}
        return [{"op": "add", "path": "/spec/affinity", "value": value}]
    node_affinity = affinity.get("nodeAffinity")
    if not node_affinity:
        required_only = {REQUIRED: {"nodeSelectorTerms": [term]}}
        return [{"op": "add", "path": "/spec/affinity/nodeAffinity", "value": required_only}]
    required = node_affinity.get(REQUIRED)
    terms = (required or {}).get("nodeSelectorTerms") or []
    if not terms:
        path = f"/spec/affinity/nodeAffinity/{REQUIRED}"
        return [{"op": "add", "path": path, "value": {"nodeSelectorTerms": [term]}}]
    patch: JsonPatch = []
    for index, existing in enumerate(terms):
        if _has_requirement(existing):
            continue
        base = f"/spec/affinity/nodeAffinity/{REQUIRED}/nodeSelectorTerms/{index}/matchExpressions"
        if existing.get("matchExpressions"):
            patch.append({"op": "add", "path": f"{base}/-", "value": NODE_REQUIREMENT})
        else:
            patch.append({"op": "add", "path": base, "value": [NODE_REQUIREMENT]})
    return patch


@dataclass(frozen=True)
class Decision:
    """The patch for one pod (empty: admit unchanged) and a warning for its creator."""

    patch: JsonPatch
    warning: str | None = None


UNCHANGED = Decision([])


class PodMutator:
    """Decides the patch for one admission, asking the registry with a deadline."""

    def __init__(self, lookup: AcceleratedImageLookup, timeout: float = 3.0) -> None:
        self.lookup = lookup
        self.timeout = timeout

    async def mutate(self, admission: PodAdmission, require_pod_label: bool) -> Decision:
        """What to do with ``admission``.

        ``require_pod_label`` is set on the entry that selects pods by their own label;
        the namespace entry has already been selected by the API server.
        """
        pod = admission.pod
        if pod is None or admission.operation != "CREATE":
            return UNCHANGED
        if pod_opted_out(pod) or (require_pod_label and not pod_opted_in(pod)):
            return UNCHANGED
        images = _container_images(pod)
        try:
            results = await asyncio.wait_for(self._lookup_all(images), self.timeout)
        except (RegistryLookupError, TimeoutError) as exc:
            reason = str(exc) or f"no answer within {self.timeout:g}s"
            log.warning(
                "webhook.registry_unavailable",
                uid=admission.uid,
                namespace=admission.namespace,
                error=reason,
            )
            return Decision([], f"acceld: registry lookup failed, pod admitted unchanged: {reason}")
        patch: JsonPatch = []
        for (list_name, index, image), result in zip(images, results, strict=True):
            if result.acceleration is Acceleration.FULL and result.image != image:
                path = f"/spec/{list_name}/{index}/image"
                patch.append({"op": "replace", "path": path, "value": result.image})
        accelerated = any(r.acceleration is not Acceleration.NONE for r in results)
        if accelerated:
            patch += node_affinity_patch(pod)
        log.info(
            "webhook.mutated",
            uid=admission.uid,
            namespace=admission.namespace,
            images_rewritten=sum(1 for op in patch if op["path"].endswith("/image")),
            affinity=accelerated,
        )
        return Decision(patch)

    async def _lookup_all(self, images: list[tuple[str, int, str]]) -> list[LookupResult]:
        unique = sorted({image for _, _, image in images})
        answers = await asyncio.gather(*(self.lookup.lookup(image) for image in unique))
        by_image = dict(zip(unique, answers, strict=True))
        return [by_image[image] for _, _, image in images]
