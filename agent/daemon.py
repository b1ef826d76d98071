"""The node agent process: FUSE mount, fetcher and snapshotter in one event loop.

Start order matters. The FUSE connection comes first (taking it over from a running
agent waits until that one has drained, and only then may this one open the chunk
cache they share); then the snapshotter restores the remote snapshots' layers, so that
the kernel's node IDs find their files before a request is read; then FUSE is served,
and last the snapshotter's socket opens, so containerd never sees a lowerdir that is
not served. Stop serves FUSE no more first (with a keeper, requests wait for the next
agent), then closes the rest; the keeper keeps the connection, or without one it ends.
The watchdog starts first and stops last, so a hang while starting or stopping is
reported too; it and /metrics, /healthz run on threads, so they keep answering while
the loop is stuck.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path
from typing import Any

from agent import metrics
from agent.config import AgentConfig
from agent.fs.fuse_connection import FuseConnection
from agent.fs.in_flight import InFlightRequests
from agent.fs.inode_slots import InodeSlots, InodeSlotsError
from agent.fs.keeper_client import KeeperBusyError, KeeperClient
from agent.fs.mount import FuseMount, connect_new
from agent.fs.operations import LayerFS
from agent.image_sessions import ImageSessions
from agent.k8s_credentials import KubernetesCredentialStore, keep_credentials_updated
from agent.layers.discovery import LayerDiscovery
from agent.layers.distrust import DistrustedMetadata
from agent.lazy_provider import LazyLayerProvider
from agent.metrics_server import MetricsServer
from agent.prefetch_planner import PrefetchPlanner
from agent.snapshotter.server import SnapshotterServer
from agent.startup_recorder import RecorderSettings, StartupRecorder
from agent.watchdog import Watchdog
from common.logging import get_logger
from fetcher.chunk_cache import ChunkCache
from fetcher.chunks import Priority
from fetcher.credentials import CredentialStore
from fetcher.memory_budget import MemoryBudget
from fetcher.read_path import ReadPath
from fetcher.registry import RegistryClient
from fetcher.registry_policy import RegistryPolicy
from profiles.predecessors import ProfileInheritance

log = get_logger(__name__)
CACHE_GAUGE_INTERVAL = 5.0


def make_private_directory(path: Path) -> None:
    """Create ``path`` (or tighten it) to owner-only: below it lie chunks of private
    images, the snapshot database and containers' writable layers, which other users of
    the node must not read (containerd keeps its own snapshot root 0700 for the same
    reason). Only the directory is changed; what it contains keeps its own modes."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)


def load_credentials(config: AgentConfig) -> CredentialStore:
    """Docker config and pull secrets named by the config (later sources win); with
    `kubernetes_credentials`, labelled cluster secrets are layered on top, live."""
    kind = KubernetesCredentialStore if config.kubernetes_credentials else CredentialStore
    return kind.from_files(config.docker_config, config.pull_secrets)


class Agent:
    """One acceld instance."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        make_private_directory(config.root)
        self.client = RegistryClient(
            credentials=load_credentials(config),
            plain_http_hosts=frozenset(config.plain_http),
            hosts_dir=config.hosts_dir,
            max_connections_per_host=config.max_connections_per_registry,
            policy=RegistryPolicy(config.allowed_registries),
        )
        self.cache: ChunkCache | None = None
        self.read_path: ReadPath | None = None
        self.fs: LayerFS | None = None
        self.mount: FuseMount | None = None
        self.snapshotter: SnapshotterServer | None = None
        self.fuse_requests = InFlightRequests()
        self.watchdog: Watchdog | None = None
        self._metrics_server: MetricsServer | None = None
        self._gauge_task: asyncio.Task[None] | None = None
        self._secrets_task: asyncio.Task[None] | None = None
        self.provider: LazyLayerProvider | None = None
        self.recorder: StartupRecorder | None = None
        self.keeper: KeeperClient | None = None
        self._handover = (0.0, 0.0)
        """For a resumed connection: how long it had gone unserved at the handover, and
        the loop time then (the wait goes on until this agent serves it)."""

    async def start(self) -> None:
        """Bring every part up; on failure, tear down what already started."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        config = self.config
        self.watchdog = Watchdog(
            self.fuse_requests,
            stall_threshold_s=config.watchdog_stall_threshold_s,
            request_threshold_s=config.watchdog_request_threshold_s,
        )
        self.watchdog.start(asyncio.get_running_loop())
        await self.client.__aenter__()
        # First the connection: taking it over from a running agent waits until that
        # one has drained, and only then may this one open the chunk cache they share.
        connection, slots = await self._connect_fuse()
        # One budget for the bytes kept in memory instead of on disk: the cache's
        # spill, the write-behind's held chunks and the fetcher's warmed ranges.
        cache = self.cache = ChunkCache(config.cache_dir, config.cache_max_bytes, MemoryBudget())
        # The object graph, built here and only here: each part gets what it uses.
        read_path = self.read_path = ReadPath.build(
            self.client,
            cache,
            max_connections_per_registry=config.max_connections_per_registry,
            demand_timeout=config.demand_timeout,
        )
        fetcher = read_path.fetcher
        read_path.stats.add_observer(_observe_request)
        metrics.REGISTRY.register(
            metrics.FetcherCollector(lambda: self.read_path.stats if self.read_path else None)
        )
        metrics.REGISTRY.register(metrics.RetryCollector(lambda: self.client.transport.retries))
        metrics.REGISTRY.register(metrics.RegistryHostsCollector(self.client.transport))
        distrust = DistrustedMetadata(config.root / "distrusted-metadata.json")
        sessions = ImageSessions()
        if config.record_profiles:
            settings = RecorderSettings(
                record_starts=config.record_starts,
                sample_rate=config.profile_sample_rate,
                quiet_s=config.trace_quiet_s,
                deadline_s=config.trace_deadline_s,
                use_ebpf=config.ebpf,
            )
            self.recorder = StartupRecorder(self.client, sessions, settings)
            self.recorder.preload()
        self.fs = LayerFS(
            read_path.reader,
            listener=self.recorder,
            requests=self.fuse_requests,
            distrust=distrust,
            slots=slots,
        )
        planner = PrefetchPlanner(
            self.client,
            fetcher,
            cache,
            sessions,
            prefetch=config.prefetch,
            profiles=config.profiles,
            inheritance=ProfileInheritance(self.client) if config.profile_inheritance else None,
        )
        # The allow-list is enforced by the client's policy, under every request (also
        # profile and twin lookups), with its host/wildcard rules: discovery's own
        # exact-name check would refuse hosts the policy allows.
        discovery = LayerDiscovery(
            self.client,
            config.discover_referrers,
            fetcher.demand_only,
            distrust,
            on_early=planner.layer_decoded,
            on_toc=planner.toc_decoded,
        )
        provider = LazyLayerProvider(
            discovery,
            self.fs,
            fetcher,
            cache,
            planner,
            config.fuse_mountpoint,
            config.background_fill,
            config.background_fill_delay_s,
            config.discovery_timeout_s,
        )
        self.provider = provider
        self.snapshotter = SnapshotterServer(config.snapshots_dir, config.socket, provider)
        # The layers come back before the connection is served: after a restart the
        # kernel's node IDs name their files, and requests wait until then.
        await self.snapshotter.restore()
        lasting = self.keeper is not None
        self.mount = FuseMount(
            self.fs,
            config.fuse_mountpoint,
            connection,
            lasting,
            read_ahead_kib=config.read_ahead_kib,
        )
        await self.mount.start(resumed=slots.resumed)
        if slots.resumed:
            # The longest any request waited: unserved at the keeper, then while this
            # agent restored the layers.
            gap, handed_over_at = self._handover
            unserved = gap + asyncio.get_running_loop().time() - handed_over_at
            metrics.FUSE_RESUME_GAP.set(unserved)
            log.info("fs.resumed", path=str(config.fuse_mountpoint), longest_wait_s=unserved)
        await self.snapshotter.listen()
        self._metrics_server = MetricsServer(
            config.metrics_address, metrics.REGISTRY, self.watchdog.status
        )
        self._metrics_server.start()
        self._gauge_task = asyncio.create_task(self._update_cache_gauge())
        credentials = self.client.transport.credentials
        if isinstance(credentials, KubernetesCredentialStore):
            self._secrets_task = asyncio.create_task(
                keep_credentials_updated(
                    credentials, config.kubernetes_credentials_namespace or None
                )
            )
        log.info(
            "agent.started",
            root=str(config.root),
            socket=str(config.socket),
            mountpoint=str(config.fuse_mountpoint),
            metrics=config.metrics_address,
        )

    async def _connect_fuse(self) -> tuple[FuseConnection, InodeSlots]:
        """The FUSE connection to serve and its inode slots: the keeper's, when an
        earlier agent served it (and its slot table can be trusted), else a new one."""
        config = self.config
        mountpoint = config.fuse_mountpoint
        slots_path = config.root / "fuse-inodes.json"
        if config.keeper:
            self.keeper = await self._connect_keeper()
            held = await self._attach_when_free(self.keeper, mountpoint)
            if held is not None:
                connection, gap = held
                try:
                    slots = InodeSlots.resume(slots_path)
                    waiting = connection.waiting()
                    metrics.FUSE_RESUMES.inc()
                    self._handover = (gap, asyncio.get_running_loop().time())
                    metrics.FUSE_RESUME_WAITING.set(waiting)
                    log.info("fs.resuming", path=str(mountpoint), gap_s=gap, waiting=waiting)
                    return connection, slots
                except InodeSlotsError as exc:
                    log.error("fs.resume_refused", path=str(mountpoint), error=str(exc))
                    os.close(connection.fd)
                    await self.keeper.release(mountpoint)
        connection = await connect_new(mountpoint)
        # A new connection: its numbers start afresh, kept for an agent that resumes it
        # (written before the keeper holds it, so no successor finds an older table).
        slots = InodeSlots.fresh(slots_path)
        if self.keeper is not None:
            await self.keeper.hold(mountpoint, connection)
        return connection, slots

    async def _connect_keeper(self) -> KeeperClient:
        config = self.config
        return await KeeperClient.connect(
            config.keeper_address,
            config.keeper_grace_s,
            config.keeper_spawn,
            config.root / "keeper.log",
        )

    async def _attach_when_free(
        self, keeper: KeeperClient, mountpoint: Path
    ) -> tuple[FuseConnection, float] | None:
        """The keeper's connection for ``mountpoint``. A busy keeper (another agent did
        not drain in time, or this pod's keeper retired in a rollout and its pod is on
        the way out) is asked again for up to the grace period, then given up on."""
        deadline = asyncio.get_running_loop().time() + self.config.keeper_grace_s
        while True:
            try:
                return await keeper.attach(mountpoint)
            except KeeperBusyError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                log.warning("keeper.busy", path=str(mountpoint))
                await asyncio.sleep(2.0)

    async def _update_cache_gauge(self) -> None:
        while True:
            if self.cache is not None:
                metrics.CACHE_BYTES.set(self.cache.size())
            await asyncio.sleep(CACHE_GAUGE_INTERVAL)

    async def stop(self) -> None:
        """Stop in reverse order; every step runs even if an earlier one fails."""
        try:
            await self._stop_parts()
        finally:
            if self.watchdog is not None:
                self.watchdog.stop()
                self.watchdog = None
        log.info("agent.stopped")

    async def _stop_parts(self) -> None:
        for task in (self._gauge_task, self._secrets_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._metrics_server is not None:
            await asyncio.to_thread(self._metrics_server.stop)
            self._metrics_server = None
        if self.mount is not None:
            # First: with a keeper, requests from here on wait for the next agent
            # (and those cut short are queued again for it) instead of meeting the
            # fetcher closed below.
            await self.mount.stop()
            self.mount = None
        if self.snapshotter is not None:
            await self.snapshotter.stop()
            self.snapshotter = None
        if self.provider is not None:
            await self.provider.close()
            self.provider = None
        if self.recorder is not None:
            await self.recorder.close()
            self.recorder = None
        if self.read_path is not None:
            await self.read_path.close()
            self.read_path = None
        if self.keeper is not None:
            self.keeper.close()  # the keeper holds the connection for the next agent
            self.keeper = None
        await self.client.__aexit__(None, None, None)

    async def run_until_signalled(self) -> None:
        """Serve until SIGTERM or SIGINT, then stop cleanly."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        waits: list[asyncio.Task[Any]] = [asyncio.create_task(stop.wait())]
        if self.keeper is not None:
            waits.append(asyncio.create_task(self._watch_keeper()))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
            await self.stop()

    async def _watch_keeper(self) -> None:
        """Return when the keeper asks this agent to drain (a successor takes over). A
        keeper that goes away (restarted) is replaced and given the connection again,
        which this agent's own descriptor kept alive meanwhile."""
        config = self.config
        while self.keeper is not None and self.mount is not None:
            if await self.keeper.drain_requested():
                log.info("agent.draining", reason="a successor takes the connection over")
                return
            log.error("keeper.lost", socket=str(config.keeper_address))
            self.keeper.close()
            try:
                self.keeper = await self._connect_keeper()
                await self.keeper.hold(config.fuse_mountpoint, self.mount.connection)
            except OSError as exc:
                log.error("keeper.unavailable", error=str(exc))
                self.keeper = None  # the connection now ends with this agent
                self.mount.lasting = False
        await asyncio.Event().wait()


def _observe_request(priority: Priority, nbytes: int, seconds: float) -> None:
    label = priority.name.lower()
    metrics.FETCH_BYTES.labels(label).inc(nbytes)
    metrics.RANGE_REQUESTS.labels(label).inc()
    metrics.RANGE_SECONDS.labels(label).observe(seconds)


def run(config: AgentConfig) -> None:
    """Run an agent in a fresh event loop (the `acceld run` command)."""
    asyncio.run(Agent(config).run_until_signalled())
