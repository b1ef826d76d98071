"""The HTTPS endpoint the API server calls, one path per MutatingWebhookConfiguration entry.

`/mutate/pods` serves the entry that selects pods by their own label and checks that
label again (a misconfigured selector must not rewrite every pod); `/mutate/namespaces`
serves the entry that selects by namespace label, which only the API server can see.
Whatever goes wrong while deciding, the pod is admitted unchanged: the failure policy
is Ignore, and a webhook that blocks pods would turn a registry outage into a cluster one.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from accelctl.webhook.mutation import PodMutator, ReviewError, parse_review, review_response
from common.logging import get_logger

log = get_logger(__name__)

MAX_REVIEW_BYTES = 8 << 20
POD_LABEL_PATH = "/mutate/pods"
NAMESPACE_LABEL_PATH = "/mutate/namespaces"


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context for the certificate the API server was told to trust."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


def make_app(mutator: PodMutator) -> web.Application:
    """The aiohttp application: both mutate paths and /healthz."""

    def handler(
        require_pod_label: bool,
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def mutate(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            try:
                admission = parse_review(body)
            except ReviewError as exc:
                log.warning("webhook.bad_review", path=request.path, error=str(exc))
                return web.json_response({"error": str(exc)}, status=400)
            decision = await mutator.mutate(admission, require_pod_label)
            return web.json_response(
                review_response(admission.uid, decision.patch, decision.warning)
            )

        return mutate

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application(client_max_size=MAX_REVIEW_BYTES)
    app.router.add_post(POD_LABEL_PATH, handler(require_pod_label=True))
    app.router.add_post(NAMESPACE_LABEL_PATH, handler(require_pod_label=False))
    app.router.add_get("/healthz", healthz)
    return app


class WebhookServer:
    """The app on an HTTPS listener; `start()` returns once it accepts connections."""

    def __init__(self, mutator: PodMutator, host: str, port: int, context: ssl.SSLContext):
        self.app = make_app(mutator)
        self.host = host
        self.port = port
        self.context = context
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Listen; with port 0 the chosen port is stored in ``self.port``."""
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.context)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        log.info("webhook.listening", host=self.host, port=self.port)

    async def stop(self) -> None:
        """Close the listener and pending requests."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
