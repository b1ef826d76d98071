"""Registry credentials from labelled `kubernetes.io/dockerconfigjson` secrets, kept live.

Operators already store pull credentials as such secrets; the agent lists and watches the
ones that carry CREDENTIALS_LABEL (its RBAC allows get/list/watch on secrets and nothing
else, and the label keeps every other secret out of its memory) and answers registry
logins from them, so a rotated password reaches running nodes without a restart.

Secrets win over the node's own config.json; among secrets naming the same registry the
one that sorts last by namespace/name wins, so the choice does not depend on the order
events arrive in. A secret that stops matching (deleted, or label removed) takes its
credentials with it. Credential helpers in a secret are ignored: a secret must never make
the agent run a program. No secret value is ever logged.

The Kubernetes client is synchronous (urllib3), so list+watch runs on a daemon thread and
hands each event to the event loop, where the store is read and updated.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from common.logging import get_logger
from fetcher.credentials import (
    DOCKERCONFIGJSON_KEY,
    DOCKERCONFIGJSON_TYPE,
    Credential,
    CredentialStore,
    normalize_registry_key,
)
from fetcher.errors import CredentialsError

log = get_logger(__name__)

CREDENTIALS_LABEL = "acceld.io/credentials"
LABEL_SELECTOR = f"{CREDENTIALS_LABEL}=true"
WATCH_TIMEOUT = 300
"""Seconds one watch call lasts server-side; also bounds how long stopping takes."""
RETRY_DELAY = 5.0

SecretKey = tuple[str, str]


class KubernetesCredentialStore(CredentialStore):
    """A CredentialStore with a replaceable layer of secret-derived credentials on top."""

    def __init__(self) -> None:
        super().__init__()
        self._from_secrets: dict[str, Credential] = {}

    def replace_secret_credentials(self, credentials: dict[str, Credential]) -> None:
        """Swap the whole secret layer (hosts missing now are forgotten)."""
        self._from_secrets = {normalize_registry_key(h): c for h, c in credentials.items()}

    def lookup(self, registry: str, ask_helper: bool = True) -> Credential | None:
        """Secrets first, then the node's own sources."""
        found = self._from_secrets.get(normalize_registry_key(registry))
        return found if found is not None else super().lookup(registry, ask_helper)


def credentials_from_secret(secret: Any) -> dict[str, Credential]:
    """The credentials in a V1Secret; CredentialsError (value-free message) if unusable."""
    where = f"secret {secret.metadata.namespace}/{secret.metadata.name}"
    if secret.type != DOCKERCONFIGJSON_TYPE:
        raise CredentialsError(f"{where}: type is {secret.type!r}, need {DOCKERCONFIGJSON_TYPE}")
    encoded = (secret.data or {}).get(DOCKERCONFIGJSON_KEY)
    if not isinstance(encoded, str):
        raise CredentialsError(f"{where}: no {DOCKERCONFIGJSON_KEY} key")
    try:
        doc = json.loads(base64.b64decode(encoded, validate=True))
    except (binascii.Error, UnicodeDecodeError, json.JSONDecodeError):
        raise CredentialsError(f"{where}: {DOCKERCONFIGJSON_KEY} is not base64 JSON") from None
    if not isinstance(doc, dict):
        raise CredentialsError(f"{where}: {DOCKERCONFIGJSON_KEY} is not a JSON object")
    scratch = CredentialStore()
    auths = doc.get("auths") or {}
    scratch.add_docker_config({"auths": auths}, where)
    found = {normalize_registry_key(key): scratch.lookup(key) for key in auths}
    return {host: credential for host, credential in found.items() if credential is not None}


class SecretCredentials:
    """Folds secret events into a KubernetesCredentialStore."""

    def __init__(self, store: KubernetesCredentialStore) -> None:
        self.store = store
        self._by_secret: dict[SecretKey, dict[str, Credential]] = {}

    @property
    def secrets(self) -> list[SecretKey]:
        """The secrets currently contributing credentials."""
        return sorted(self._by_secret)

    def resync(self, secrets: Iterable[Any]) -> None:
        """Replace everything with the result of a fresh list."""
        self._by_secret.clear()
        for secret in secrets:
            self._take(secret)
        self._publish()

    def apply(self, event_type: str, secret: Any) -> None:
        """One watch event: ADDED / MODIFIED (re)read the secret, DELETED drops it."""
        if event_type == "DELETED":
            self._by_secret.pop(_key(secret), None)
            log.info("k8s_credentials.secret_removed", secret="/".join(_key(secret)))
        elif event_type in ("ADDED", "MODIFIED"):
            self._take(secret)
        self._publish()

    def _take(self, secret: Any) -> None:
        key = _key(secret)
        try:
            credentials = credentials_from_secret(secret)
        except CredentialsError as exc:
            self._by_secret.pop(key, None)
            log.warning("k8s_credentials.secret_unusable", error=str(exc))
            return
        self._by_secret[key] = credentials
        log.info(
            "k8s_credentials.secret_loaded", secret="/".join(key), registries=sorted(credentials)
        )

    def _publish(self) -> None:
        merged: dict[str, Credential] = {}
        for key in sorted(self._by_secret):
            merged.update(self._by_secret[key])
        self.store.replace_secret_credentials(merged)


def _key(secret: Any) -> SecretKey:
    return (str(secret.metadata.namespace), str(secret.metadata.name))


class SecretWatcher:
    """List + watch labelled secrets on a thread; events are applied on the event loop."""

    def __init__(
        self,
        credentials: SecretCredentials,
        namespace: str | None = None,
        label_selector: str = LABEL_SELECTOR,
        api_factory: Callable[[], Any] | None = None,
    ) -> None:
        self.credentials = credentials
        self.namespace = namespace
        self.label_selector = label_selector
        self._api_factory = api_factory or _in_cluster_api
        self._stop = threading.Event()

    async def run(self) -> None:
        """Keep the store in sync until cancelled."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def finish(error: BaseException | None) -> None:
            if done.done():
                return
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(None)

        def target() -> None:
            error: BaseException | None = None
            try:
                self._sync_forever(loop)
            except BaseException as exc:
                error = exc
            # The loop may be gone already (agent stopped while a watch was open).
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(finish, error)

        thread = threading.Thread(target=target, name="k8s-secret-watch", daemon=True)
        thread.start()
        try:
            await done
        finally:
            self._stop.set()

    def _sync_forever(self, loop: asyncio.AbstractEventLoop) -> None:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        api = self._api_factory()
        list_call, kwargs = self._list_call(api)
        while not self._stop.is_set():
            try:
                listed = list_call(**kwargs)
                loop.call_soon_threadsafe(self.credentials.resync, listed.items)
                version = listed.metadata.resource_version
                while not self._stop.is_set():
                    stream = watch.Watch().stream(
                        list_call,
                        resource_version=version,
                        timeout_seconds=WATCH_TIMEOUT,
                        **kwargs,
                    )
                    for event in stream:
                        if self._stop.is_set():
                            return
                        secret = event["object"]
                        version = secret.metadata.resource_version
                        loop.call_soon_threadsafe(self.credentials.apply, event["type"], secret)
            except ApiException as exc:
                # 410 Gone: our resourceVersion expired; anything else: back off. Relist.
                log.warning("k8s_credentials.watch_failed", status=exc.status, reason=exc.reason)
                if exc.status != 410:
                    time.sleep(RETRY_DELAY)
            except Exception as exc:  # connection resets, API server restarts
                log.warning("k8s_credentials.watch_failed", error=exc.__class__.__name__)
                time.sleep(RETRY_DELAY)

    def _list_call(self, api: Any) -> tuple[Callable[..., Any], dict[str, Any]]:
        kwargs: dict[str, Any] = {"label_selector": self.label_selector}
        if self.namespace:
            kwargs["namespace"] = self.namespace
            return api.list_namespaced_secret, kwargs
        return api.list_secret_for_all_namespaces, kwargs


def _in_cluster_api() -> Any:
    """CoreV1Api from the pod's service account (or ~/.kube/config outside a cluster)."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CoreV1Api()


async def keep_credentials_updated(
    store: KubernetesCredentialStore,
    namespace: str | None = None,
    label_selector: str = LABEL_SELECTOR,
) -> None:
    """The agent's task: watch labelled secrets into ``store`` until cancelled."""
    await SecretWatcher(SecretCredentials(store), namespace, label_selector).run()
