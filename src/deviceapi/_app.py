"""The runtime: owns the asyncio-on-trio loop, the core, and the root supervision tree.

``open_runtime`` builds the handles (metrics, the core with its observer, the gRPC and HTTP
servers, the embedded providers' state), hands them to the declared tree (``_tree``), and
yields a started :class:`Runtime`: started means every listener is bound and every actor is
serving. ``Runtime.shutdown`` runs SPEC §6's graceful sequence; leaving the context without it
cancels everything (the forced path).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Protocol, runtime_checkable

import trio
from prometheus_client import CollectorRegistry

from . import __version__, _bridge
from ._bridge import Bridge
from ._config import Config, bind_host
from ._tree import EmbeddedNvml, Handles, Loopback, no_faults, root_supervisor
from .cache import health
from .cache._store import Limits
from .cache.cache_owner import CacheOwner
from .cache.core import Core, CoreSettings, Observer
from .otp import FaultHook, StartFn, Supervisor
from .providers.nvml import NvmlBackend, NvmlPoller, PollerOptions, PynvmlBackend
from .transport.grpc_server import GrpcServer, Listeners, MappingWrapper
from .transport.http import HttpEndpoints, HttpPorts
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
    http: HttpEndpoints
    metrics: ServerMetrics
    root: Supervisor
    cancel_scope: trio.CancelScope
    #: The run's trio/asyncio bridge (what crosses goes through it).
    bridge: Bridge
    #: The embedded NVML provider's state (None without ``--enable-nvml-provider``).
    nvml: EmbeddedNvml | None = None

    @property
    def listeners(self) -> Listeners:
        """Where the current gRPC listeners are."""
        return self.grpc.listeners

    @property
    def http_ports(self) -> HttpPorts:
        """The bound health and metrics ports."""
        return self.http.ports

    @property
    def nvml_pollers(self) -> list[NvmlPoller]:
        """Every NVML poller incarnation so far (the last one is current); empty without NVML."""
        return self.nvml.pollers if self.nvml is not None else []

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


def core_settings(config: Config) -> CoreSettings:
    """The part of the server's Config the core is built from."""
    return CoreSettings(
        limits=Limits(max_gpus=config.max_gpus, max_conditions=config.max_conditions,
                      max_object_bytes=config.max_object_bytes),
        watch_history=config.watch_history,
        max_watchers=config.max_watchers,
        watch_queue=config.watch_queue,
        subscribe_rate=config.subscribe_rate,
        subscribe_burst=config.subscribe_burst,
        min_gpus=config.min_gpus,
        provider_timeout=config.provider_timeout,
        heartbeat_timeout=config.heartbeat_timeout,
        slow_consumer_timeout=config.slow_subscriber_timeout,
        problem_conditions=config.problem_conditions,
    )


def metrics_observer(metrics: ServerMetrics) -> Observer:
    """The core's counter hooks, feeding the server's metrics."""
    return Observer(
        on_update=metrics.count_update,
        on_reject=metrics.count_rejected,
        on_watch_event=metrics.count_watch_event,
        on_evict=metrics.count_eviction,
        on_heartbeat_timeout=lambda provider: metrics.count_heartbeat_timeout(),
        on_ingest=metrics.count_ingest,
    )


def connect_metrics(core: Core, metrics: ServerMetrics) -> None:
    """The metrics the core does not push: readiness, and the scrape-time refreshers."""
    core.gate.add_listener(lambda state: metrics.set_readiness(state.value))
    metrics.set_nvml_provider_enabled(False)
    problem_conditions = core.settings.problem_conditions

    def refresh_core() -> None:
        state = core.store.state
        counts = health.count(state.gpus.values(), problem_conditions)
        metrics.set_cache_gpus(total=counts.total, healthy=counts.healthy,
                               unhealthy=counts.unhealthy, unknown=counts.unknown)
        metrics.set_cache_resource_version(state.rv)
        metrics.set_watch_streams_active(core.hub.statistics().active)
        metrics.set_provider_sessions_active(core.sessions.statistics().active)

    metrics.add_refresher(refresh_core)


def connect_nvml_metrics(nvml: EmbeddedNvml, metrics: ServerMetrics) -> None:
    """The NVML provider's gauges, from its current poller at scrape time."""

    def refresh_nvml() -> None:
        if nvml.pollers:
            stats = nvml.pollers[-1].statistics()
            metrics.set_nvml_provider_enabled(stats.enabled)
            metrics.set_nvml_gpu_count(stats.gpus)
            metrics.set_nvml_health_monitor_running(stats.monitor_running)

    metrics.add_refresher(refresh_nvml)


@asynccontextmanager
async def open_runtime(
    config: Config,
    *,
    faults: FaultHook | None = None,
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
        metrics = ServerMetrics(CollectorRegistry(), version=__version__, node=config.node_name)
        core = Core.build(core_settings(config), metrics_observer(metrics),
                          version_base=version_base)
        connect_metrics(core, metrics)
        grpc = GrpcServer(core.port, config, [metrics.instrument, *(grpc_wrappers or [])],
                          bridge=bridge)
        gate = core.gate
        http = HttpEndpoints((bind_host(config.health_address), config.health_port),
                             (bind_host(config.metrics_address), config.metrics_port),
                             lambda: (gate.serving, gate.reason()), metrics)
        nvml = None
        if config.enable_nvml_provider:
            nvml = EmbeddedNvml(
                nvml_backend or (lambda: PynvmlBackend(config.nvml_driver_root)),
                PollerOptions.from_config(
                    config, provider_id=f"nvml-{config.node_name or 'node'}"))
            connect_nvml_metrics(nvml, metrics)
        handles = Handles(
            config=config, core=core,
            owner=CacheOwner(core.store, faults=faults, on_update=core.observer.on_update),
            grpc=grpc, http=http, loopback=Loopback(grpc, bridge), nvml=nvml,
            on_restart=metrics.count_restart,
            injectable=faults.wrap if isinstance(faults, ChildFaults) else no_faults)
        root = root_supervisor(handles)
        async with trio.open_nursery() as nursery:
            await nursery.start(root.run)
            runtime = Runtime(config, core, grpc, http, metrics, root, nursery.cancel_scope,
                              bridge, nvml)
            try:
                yield runtime
            finally:
                nursery.cancel_scope.cancel()
