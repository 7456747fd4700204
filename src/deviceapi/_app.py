"""The runtime: owns the asyncio-on-trio loop, the core state, and the root supervision tree.

    root (one_for_one)
    ├── core (rest_for_one): cache_owner → readiness_timer → heartbeat_monitor → watch_janitor
    ├── grpc (the listeners; a crash restarts them on the same socket path)
    ├── http (healthz/readyz, metrics: after the listeners, so READY is never served before them)
    └── providers (one_for_one, optional): simulator, nvml poller

``open_runtime`` yields a started :class:`Runtime`: started means every listener is bound and
every actor is serving. ``Runtime.shutdown`` runs SPEC §6's graceful sequence; leaving the
context without it cancels everything (the forced path).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Protocol, runtime_checkable

import trio
from prometheus_client import CollectorRegistry

from . import __version__, _bridge
from ._bridge import Bridge
from ._config import Config, bind_host
from .cache import health
from .cache.cache_owner import CacheOwner
from .cache.core import Core, Observer
from .cache.provider_session import run_heartbeat_monitor
from .cache.readiness import run_readiness_timer
from .cache.watcher import run_watch_janitor
from .client.trio_client import TrioProviderClient
from .otp import ChildSpec, FaultHook, StartFn, Supervisor
from .providers.nvml import NvmlBackend, NvmlPoller, PollerOptions, ProviderApi, PynvmlBackend
from .providers.nvml.ledger import HealthLedger
from .providers.nvml.service import nvml_child
from .providers.sim import SimulatedProvider
from .transport.grpc_server import GrpcServer, Listeners, MappingWrapper
from .transport.http import health_app, metrics_app, serve_http
from .transport.metrics import ServerMetrics

log = logging.getLogger("deviceapi.app")

#: Seconds of the shutdown timeout kept for ending undrained watch streams with a status.
STREAM_END_GRACE = 1.0



@dataclasses.dataclass(slots=True)
class Runtime:
    """Handles to one running server (tests, the CLI and the chaos kit use these)."""

    config: Config
    core: Core
    grpc: GrpcServer
    listeners: Listeners
    http_ports: HttpPorts
    metrics: ServerMetrics
    root: Supervisor
    cancel_scope: trio.CancelScope
    #: The run's trio/asyncio bridge (what crosses goes through it).
    bridge: Bridge
    #: Every NVML poller incarnation so far (the last one is current); empty without NVML.
    nvml_pollers: list[NvmlPoller] = dataclasses.field(default_factory=list)

    async def shutdown(self) -> None:
        """SPEC §6: not ready → shutdown-delay → stop accepting → drain watches (then OK) and
        let in-flight calls finish within shutdown-timeout → force close → stop the providers.

        Bounded by shutdown-delay + shutdown-timeout (plus the force close's own short grace,
        :meth:`GrpcServer.close`) whatever the clients do: connected, idle or not reading.
        The last part of the timeout ends watch streams that could not be drained: they end
        UNAVAILABLE naming their last version, never OK with a silent tail (SPEC §3)."""
        config = self.config
        log.info("shutdown: not ready; draining before closing the listeners",
                 extra={"reason": f"shutdown-delay {config.shutdown_delay:g}s"})
        self.core.gate.begin_shutdown()
        await trio.sleep(config.shutdown_delay)
        log.info("shutdown: closing listeners and draining watch streams",
                 extra={"reason": f"shutdown-timeout {config.shutdown_timeout:g}s"})
        grace = min(STREAM_END_GRACE, config.shutdown_timeout / 4)
        with trio.move_on_after(config.shutdown_timeout - grace) as waited:
            self.grpc.stop_accepting()
            self.core.hub.close_all()  # each stream ends OK once it has every committed event
            await self.grpc.wait_idle()
        if waited.cancelled_caught:
            self.core.hub.abort_draining()
            with trio.move_on_after(grace) as waited:
                await self.grpc.wait_idle()
        if waited.cancelled_caught:
            log.warning("shutdown: in-flight calls did not finish in time; forcing close",
                        extra={"reason": f"{self.grpc.in_flight} calls"})
        await self.grpc.close()
        self.cancel_scope.cancel()


@runtime_checkable
class ChildFaults(Protocol):
    """A fault kit that can also wrap plain children (``deviceapi.testing.FaultInjector``)."""

    def wrap(self, actor: str, start: StartFn) -> StartFn: ...


@dataclasses.dataclass(slots=True)
class HttpPorts:
    """The bound HTTP ports (they differ from the flags when those ask for port 0)."""

    health: int = 0
    metrics: int = 0


def build_metrics(core: Core, metrics: ServerMetrics) -> None:
    """Connect the metrics to the core: push hooks, readiness, and scrape-time refreshers."""
    observer = core.observer
    observer.on_update = metrics.count_update
    observer.on_reject = metrics.count_rejected
    observer.on_watch_event = metrics.count_watch_event
    observer.on_evict = metrics.count_eviction
    observer.on_heartbeat_timeout = lambda provider: metrics.count_heartbeat_timeout()
    observer.on_ingest = metrics.count_ingest
    core.gate.add_listener(lambda state: metrics.set_readiness(state.value))
    metrics.set_nvml_provider_enabled(False)

    def refresh_core() -> None:
        state = core.store.state
        counts = health.count(state.gpus.values(), core.config.problem_conditions)
        metrics.set_cache_gpus(total=counts.total, healthy=counts.healthy,
                               unhealthy=counts.unhealthy, unknown=counts.unknown)
        metrics.set_cache_resource_version(state.rv)
        metrics.set_watch_streams_active(core.hub.statistics().active)
        metrics.set_provider_sessions_active(core.sessions.statistics().active)

    metrics.add_refresher(refresh_core)


@asynccontextmanager
async def open_runtime(
    config: Config,
    *,
    faults: FaultHook | None = None,
    observer: Observer | None = None,
    grpc_wrappers: list[MappingWrapper] | None = None,
    nvml_backend: Callable[[], NvmlBackend] | None = None,
    version_base: int | None = None,
) -> AsyncIterator[Runtime]:
    """Start a whole server inside the current trio run; yields once it is serving.

    ``nvml_backend`` replaces the real NVML library for ``--enable-nvml-provider`` (tests and
    the chaos kit hand in a ``FakeNvml`` factory). ``version_base``: the resource version this
    incarnation starts from; None (the server's only mode) derives it from the wall clock so
    versions never repeat across restarts (SPEC §2)."""
    bridge = _bridge.current()  # made by the runner (_bridge.run), passed on as a handle
    async with bridge.open_loop():
        core = Core.build(config, observer, version_base=version_base)
        metrics = ServerMetrics(CollectorRegistry(), version=__version__, node=config.node_name)
        build_metrics(core, metrics)
        grpc = GrpcServer(core, config, [metrics.instrument, *(grpc_wrappers or [])],
                          bridge=bridge)
        owner = CacheOwner(core.store, faults=faults,
                           on_update=lambda operation: core.observer.on_update(operation))
        restarts = metrics.count_restart

        def injectable(name: str, start: StartFn) -> StartFn:
            """Let the fault kit crash, hang or stop this plain (non-actor) child by name."""
            return faults.wrap(name, start) if isinstance(faults, ChildFaults) else start

        core_tree = Supervisor(
            "core",
            [
                ChildSpec("cache_owner", owner.run),
                ChildSpec("readiness_timer", _bind(run_readiness_timer, core.gate),
                          restart="transient"),
                ChildSpec("heartbeat_monitor", injectable(
                    "heartbeat_monitor",
                    _bind(run_heartbeat_monitor, core.sessions, core.store.submit))),
                ChildSpec("watch_janitor", injectable(
                    "watch_janitor",
                    _bind(run_watch_janitor, core.hub, config.slow_subscriber_timeout))),
            ],
            strategy="rest_for_one",
            max_restarts=10,
            period=5.0,
            on_restart=restarts,
        )
        listeners_box: list[Listeners] = []

        async def run_grpc(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                           ) -> None:
            async with trio.open_nursery() as nursery:
                listeners_box.append(await nursery.start(grpc.run))
                task_status.started()

        http_ports = HttpPorts()

        async def run_http(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                           ) -> None:
            gate = core.gate
            async with trio.open_nursery() as nursery:
                http_ports.health = await nursery.start(
                    serve_http, bind_host(config.health_address), config.health_port,
                    health_app(lambda: (gate.serving, gate.reason())))
                http_ports.metrics = await nursery.start(
                    serve_http, bind_host(config.metrics_address), config.metrics_port,
                    metrics_app(metrics))
                task_status.started()

        children = [
            ChildSpec("core", core_tree.run, type="supervisor", shutdown=float("inf")),
            ChildSpec("grpc", injectable("grpc", run_grpc), shutdown=config.shutdown_timeout + 5),
            # After the listeners: /readyz must never answer 200 before the gRPC socket exists
            # (with --min-gpus 0 the gate is READY at once).
            ChildSpec("http", run_http),
        ]
        pollers: list[NvmlPoller] = []
        make_backend = nvml_backend or (lambda: PynvmlBackend(config.nvml_driver_root))
        provider_specs = _provider_children(config, lambda: listeners_box[-1], metrics,
                                            injectable, make_backend, pollers, bridge)
        if provider_specs:
            children.append(ChildSpec(
                "providers",
                Supervisor("providers", provider_specs, max_restarts=5, period=30.0,
                           on_restart=restarts).run,
                type="supervisor", shutdown=float("inf")))
        root = Supervisor("root", children, strategy="one_for_one", max_restarts=3, period=5.0,
                          on_restart=restarts)
        async with trio.open_nursery() as nursery:
            await nursery.start(root.run)
            runtime = Runtime(config, core, grpc, listeners_box[-1], http_ports, metrics, root,
                              nursery.cancel_scope, bridge, pollers)
            try:
                yield runtime
            finally:
                nursery.cancel_scope.cancel()


def _bind(fn: Callable[..., Awaitable[None]], *args: object) -> Callable[..., Awaitable[None]]:
    """A start function for a ChildSpec from a task function and its leading arguments."""

    async def start(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await fn(*args, task_status=task_status)

    return start


async def connect_loopback(listeners: Listeners, bridge: Bridge) -> TrioProviderClient:
    """How an in-process provider reaches this server: through the public API."""
    if listeners.unix_socket:
        return await TrioProviderClient.connect(unix_socket=listeners.unix_socket,
                                                bridge=bridge)
    return await TrioProviderClient.connect(address=f"127.0.0.1:{listeners.tcp_port}",
                                            bridge=bridge)


def _provider_children(config: Config, listeners: Callable[[], Listeners],
                       metrics: ServerMetrics,
                       injectable: Callable[[str, StartFn], StartFn],
                       make_backend: Callable[[], NvmlBackend],
                       pollers: list[NvmlPoller], bridge: Bridge) -> list[ChildSpec]:
    """Built-in providers (each a child that reaches the server over loopback)."""
    specs: list[ChildSpec] = []
    if config.enable_nvml_provider:
        ledger = HealthLedger()  # outlives restarts of the nvml child

        def refresh_nvml() -> None:
            if pollers:
                stats = pollers[-1].statistics()
                metrics.set_nvml_provider_enabled(stats.enabled)
                metrics.set_nvml_gpu_count(stats.gpus)
                metrics.set_nvml_health_monitor_running(stats.monitor_running)

        metrics.add_refresher(refresh_nvml)

        async def connect() -> ProviderApi:
            return await connect_loopback(listeners(), bridge)

        options = PollerOptions.from_config(
            config, provider_id=f"nvml-{config.node_name or 'node'}")

        specs.append(nvml_child(make_backend, connect, options, ledger=ledger,
                                on_poller=pollers.append, wrap=injectable))
    if config.simulate:

        async def simulator(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                            ) -> None:
            api = await connect_loopback(listeners(), bridge)
            try:
                provider = SimulatedProvider(
                    api, config.simulate, heartbeat_interval=config.heartbeat_timeout / 3,
                    flap_interval=config.simulate_flap_interval)
                await provider.run(task_status=task_status)
            finally:
                api.close()

        specs.append(ChildSpec("simulator", injectable("simulator", simulator),
                               restart="transient"))
    return specs
