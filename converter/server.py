"""`accelctl convert-server`: convert images as they are pushed.

The registry calls us for every push (its `notifications.endpoints`) and retries until
we answer 2xx, blocking its notification queue meanwhile, so events are acknowledged at
once and conversions run from a queue, one at a time (conversion is CPU-bound). Each
finished conversion is reported three ways: a log line, Prometheus metrics, and an
optional outgoing webhook.

What an event can make us do is bounded: /events needs the configured bearer token,
only configured registries are contacted, the queue has a size (429 past it), and one
conversion that fails in any way is recorded as failed without stopping the worker.
A rule with `record_profile` also has each new conversion started once, sandboxed, to
publish its startup profile (`converter.record_at_conversion`); that start runs in the
same worker, after its conversion, and its failure never fails the conversion.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from common.logging import get_logger
from converter.convert import ConversionResult, ConvertOptions, convert_image
from converter.errors import ConversionError
from converter.push_events import PushedImage, RepositoryRule, ServerConfig, images_to_convert
from converter.record_at_conversion import RECORD_FAILURES, record_at_conversion
from fetcher.credentials import CredentialStore
from fetcher.errors import RegistryError
from fetcher.proxy_env import ProxyRefusedError, process_proxies
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient

log = get_logger(__name__)


@dataclass
class _Metrics:
    registry: CollectorRegistry
    conversions: Counter
    seconds: Histogram
    events: Counter
    profiles: Counter

    @classmethod
    def create(cls) -> _Metrics:
        registry = CollectorRegistry()
        return cls(
            registry,
            Counter(
                "acceld_conversions_total",
                "Conversions finished, by mode and outcome",
                ["mode", "outcome"],
                registry=registry,
            ),
            Histogram(
                "acceld_conversion_seconds",
                "Time to convert and publish an image",
                ["mode"],
                registry=registry,
                buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800),
            ),
            Counter(
                "acceld_push_events_total",
                "Registry push notifications, by decision",
                ["decision"],
                registry=registry,
            ),
            Counter(
                "acceld_conversion_profiles_total",
                "Starts recorded at conversion, by outcome (ok = profile published)",
                ["outcome"],
                registry=registry,
            ),
        )


class ConvertServer:
    """Receives notifications and runs conversions in the background."""

    def __init__(self, config: ServerConfig) -> None:
        config.check_servable()
        self.config = config
        self.metrics = _Metrics.create()
        self.results: list[ConversionResult] = []
        self.failed = 0
        self._queue: asyncio.Queue[PushedImage] = asyncio.Queue(config.queue_size)
        self._pending: set[tuple[str, str, str]] = set()
        self._worker: asyncio.Task[None] | None = None
        self._client: RegistryClient | None = None
        self._credentials: CredentialStore | None = None
        self._http: aiohttp.ClientSession | None = None

    def app(self) -> web.Application:
        """The aiohttp application (routes + start/stop of the worker)."""
        app = web.Application(client_max_size=4 << 20)
        app.router.add_post("/events", self._events)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, _app: web.Application) -> None:
        credentials = CredentialStore.from_environment()
        if self.config.docker_config:
            credentials.load_docker_config(self.config.docker_config)
        self._credentials = credentials
        self._client = RegistryClient(
            credentials=credentials,
            plain_http_hosts=frozenset(self.config.plain_http),
            hosts_dir=self.config.hosts_dir,
        )
        await self._client.__aenter__()
        self._http = aiohttp.ClientSession()
        self._worker = asyncio.create_task(self._work())

    async def _stop(self, _app: web.Application) -> None:
        if self._worker:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        if self._client:
            await self._client.__aexit__(None, None, None)
        if self._http:
            await self._http.close()

    async def _events(self, request: web.Request) -> web.Response:
        assert self.config.token is not None
        offered = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(offered, f"Bearer {self.config.token}".encode()):
            self.metrics.events.labels("unauthorized").inc()
            log.warning("convert_server.unauthorized", peer=request.remote)
            return web.Response(status=401, headers={"WWW-Authenticate": "Bearer"})
        try:
            envelope = json.loads(await request.read())
            pushed = images_to_convert(envelope, self.config.registry)
        except ValueError as exc:
            self.metrics.events.labels("malformed").inc()
            log.warning("convert_server.bad_envelope", error=str(exc))
            return web.Response(status=400, text=str(exc))
        for image in pushed:
            key = (image.registry, image.repository, image.digest)
            if not self.config.allows(image.registry):
                self.metrics.events.labels("registry_not_allowed").inc()
                log.warning("convert_server.registry_not_allowed", registry=image.registry)
                continue
            if self.config.rule_for(image.repository) is None:
                self.metrics.events.labels("no_rule").inc()
                continue
            if key in self._pending:
                self.metrics.events.labels("duplicate").inc()
                continue
            if self._queue.full():
                # The registry sends the envelope again; what was queued is deduplicated.
                self.metrics.events.labels("queue_full").inc()
                return web.Response(status=429, headers={"Retry-After": "10"})
            self._pending.add(key)
            self.metrics.events.labels("queued").inc()
            log.info(
                "convert_server.queued",
                repository=image.repository,
                tag=image.tag,
                digest=image.digest,
            )
            self._queue.put_nowait(image)
        return web.Response(status=200)

    async def _metrics(self, _request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry), content_type="text/plain")

    async def _healthz(self, _request: web.Request) -> web.Response:
        working = self._worker is not None and not self._worker.done()
        body = {
            "queued": self._queue.qsize(),
            "done": len(self.results),
            "failed": self.failed,
            "worker": "running" if working else "stopped",
        }
        return web.json_response(body, status=200 if working else 503)

    async def _work(self) -> None:
        while True:
            image = await self._queue.get()
            try:
                await self._convert(image)
            except Exception as exc:
                # Whatever one push makes go wrong is that push's failure, not the end
                # of conversions for every later one.
                self.failed += 1
                self.metrics.conversions.labels("unknown", "failed").inc()
                log.exception("convert_server.failed", image=image.repository, error=repr(exc))
            finally:
                self._pending.discard((image.registry, image.repository, image.digest))
                self._queue.task_done()

    async def _convert(self, image: PushedImage) -> None:
        rule = self.config.rule_for(image.repository)
        assert rule is not None and self._client is not None
        # Pinned to the pushed digest: the registry sends the event before it links the
        # tag, so a lookup by tag alone can still miss (or find an older manifest).
        ref = ImageReference.parse(
            f"{image.registry}/{image.repository}:{image.tag}@{image.digest}"
        )
        options = ConvertOptions(mode=rule.mode, prefetch=rule.prefetch)
        report: dict[str, object] = {"image": str(ref), "digest": image.digest, "mode": rule.mode}
        with self.metrics.seconds.labels(rule.mode).time():
            try:
                result = await convert_image(self._client, ref, options)
            except (ConversionError, RegistryError, OSError) as exc:
                self.failed += 1
                self.metrics.conversions.labels(rule.mode, "failed").inc()
                log.error("convert_server.failed", image=str(ref), error=str(exc))
                report.update(outcome="failed", error=str(exc))
            else:
                outcome = "skipped" if result.skipped else "converted"
                self.metrics.conversions.labels(rule.mode, outcome).inc()
                self.results.append(result)
                log.info(
                    "convert_server.converted",
                    image=str(ref),
                    target=str(result.target),
                    digest=result.result_digest,
                    outcome=outcome,
                )
                report.update(
                    outcome=outcome,
                    target=str(result.target),
                    target_digest=result.result_digest,
                    source_bytes=result.source_bytes,
                    output_bytes=result.output_bytes,
                )
        if rule.record is not None and report["outcome"] == "converted":
            report["profile"] = await self._record(rule, result)
        await self._notify(report)

    async def _record(self, rule: RepositoryRule, result: ConversionResult) -> dict[str, object]:
        """The start at conversion of a fresh conversion; its report entry."""
        assert rule.record is not None and self._client is not None
        try:
            recorded = await record_at_conversion(
                self._client, result, rule.record, self.config.containerd, self._credentials
            )
        except RECORD_FAILURES as exc:
            self.metrics.profiles.labels("failed").inc()
            log.error("convert_server.record_failed", image=str(result.source), error=str(exc))
            return {"outcome": "failed", "error": str(exc)}
        self.metrics.profiles.labels(str(recorded.outcome)).inc()
        return {
            "outcome": str(recorded.outcome),
            "image": recorded.image,
            "exit_code": recorded.exit_code,
            "digest": recorded.profile_digest,
            "files": recorded.files,
        }

    async def _notify(self, report: dict[str, object]) -> None:
        if not self.config.webhook_url or self._http is None:
            return
        try:
            async with self._http.post(
                self.config.webhook_url,
                json=report,
                timeout=aiohttp.ClientTimeout(total=10),
                proxy=process_proxies().proxy_for(self.config.webhook_url),
            ) as resp:
                if resp.status >= 300:
                    log.warning("convert_server.webhook_refused", status=resp.status)
        except (aiohttp.ClientError, TimeoutError, ProxyRefusedError) as exc:
            log.warning("convert_server.webhook_failed", error=exc.__class__.__name__)

    async def drain(self) -> None:
        """Wait until every queued conversion has finished (tests, graceful stop)."""
        await self._queue.join()


def serve(config: ServerConfig) -> None:
    """Run the server until interrupted."""
    server = ConvertServer(config)
    log.info("convert_server.listening", host=config.listen_host, port=config.listen_port)
    web.run_app(
        server.app(), host=config.listen_host, port=config.listen_port, print=None, access_log=None
    )
