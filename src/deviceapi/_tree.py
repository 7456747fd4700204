"""The server's supervision tree, declared: a pure function from handles to child specs.

    root (one_for_one)
    ├── core (rest_for_one): cache_owner → readiness_timer → heartbeat_monitor → watch_janitor
    ├── grpc (the listeners; a crash restarts them on the same socket paths)
    ├── http (healthz/readyz, metrics: after the listeners, so READY is never served before them)
    └── providers (one_for_one, optional): nvml (restarted with a backoff), simulator

A *handle* is an object built once per runtime that outlives its child's incarnations and
keeps what they must share or report (the core's state, the listeners' addresses, the bound
HTTP ports, the NVML health ledger and pollers). :func:`server_children` only reads handles
and returns specs: building the tree starts nothing, patches nothing, and reads the same for
every run, so what restarts what — and with which delay — is all in this file.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Awaitable, Callable

import trio

from ._bridge import Bridge
from ._config import Config
from .cache.cache_owner import CacheOwner
from .cache.core import Core
from .cache.provider_session import run_heartbeat_monitor
from .cache.readiness import run_readiness_timer
from .cache.slow_consumers import run_slow_consumer_janitor
from .client.trio_client import TrioProviderClient
from .otp import ChildSpec, StartFn, Strategy, Supervisor, supervisor_spec
from .providers.nvml import NvmlBackend, NvmlPoller, PollerOptions
from .providers.nvml.ledger import HealthLedger
from .providers.nvml.service import nvml_child
from .providers.sim import SimulatedProvider
from .transport.grpc_server import GrpcServer
from .transport.http import HttpEndpoints

#: Restart intensities: (max restarts, in seconds) per supervisor.
ROOT_INTENSITY = (3, 5.0)
CORE_INTENSITY = (10, 5.0)
PROVIDERS_INTENSITY = (5, 30.0)


def no_faults(_actor: str, start: StartFn) -> StartFn:
    """A tree without a fault kit: every child runs as it is."""
    return start


@dataclasses.dataclass(slots=True)
class EmbeddedNvml:
    """The embedded NVML provider's long-lived state: the health ledger (a GPU that threw a
    fatal XID stays unhealthy across restarts of its poller) and every poller incarnation so
    far (the last one is current: metrics and tests read it)."""

    make_backend: Callable[[], NvmlBackend]
    options: PollerOptions
    ledger: HealthLedger = dataclasses.field(default_factory=HealthLedger)
    pollers: list[NvmlPoller] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True, slots=True)
class Loopback:
    """How an in-process provider reaches the server: through the public API, at whatever
    address the current listeners have."""

    grpc: GrpcServer
    bridge: Bridge

    async def connect(self) -> TrioProviderClient:
        listeners = self.grpc.listeners
        if listeners.unix_socket:
            return await TrioProviderClient.connect(unix_socket=listeners.unix_socket,
                                                    bridge=self.bridge)
        return await TrioProviderClient.connect(address=f"127.0.0.1:{listeners.tcp_port}",
                                                bridge=self.bridge)


@dataclasses.dataclass(frozen=True, slots=True)
class Handles:
    """Everything the tree's children run on, built by ``open_runtime``."""

    config: Config
    core: Core
    owner: CacheOwner
    grpc: GrpcServer
    http: HttpEndpoints
    loopback: Loopback
    nvml: EmbeddedNvml | None
    #: Counts each restart, by child id (``actor_restarts_total``).
    on_restart: Callable[[str], None]
    #: Lets the fault kit crash, hang or stop a plain (non-actor) child by name.
    injectable: Callable[[str, StartFn], StartFn] = no_faults


def server_children(h: Handles) -> list[ChildSpec]:
    """The root supervisor's children, in start order."""
    children = [
        _supervisor("core", core_children(h), CORE_INTENSITY, h, strategy="rest_for_one"),
        ChildSpec("grpc", h.injectable("grpc", h.grpc.run),
                  shutdown=h.config.shutdown_timeout + 5),
        # After the listeners: /readyz must never answer 200 before the gRPC socket exists
        # (with --min-gpus 0 the gate is READY at once).
        ChildSpec("http", h.http.run),
    ]
    providers = provider_children(h)
    if providers:
        children.append(_supervisor("providers", providers, PROVIDERS_INTENSITY, h))
    return children


def root_supervisor(h: Handles) -> Supervisor:
    restarts, period = ROOT_INTENSITY
    return Supervisor("root", server_children(h), strategy="one_for_one",
                      max_restarts=restarts, period=period, on_restart=h.on_restart)


def core_children(h: Handles) -> list[ChildSpec]:
    """The actors that drive the core, in dependency order (rest_for_one)."""
    core = h.core
    return [
        ChildSpec("cache_owner", h.owner.run),
        ChildSpec("readiness_timer", _bind(run_readiness_timer, core.gate), restart="transient"),
        ChildSpec("heartbeat_monitor", h.injectable(
            "heartbeat_monitor", _bind(run_heartbeat_monitor, core.sessions, core.store.submit))),
        ChildSpec("watch_janitor", h.injectable(
            "watch_janitor", _bind(run_slow_consumer_janitor, core.slow_consumers, core.hub))),
    ]


def provider_children(h: Handles) -> list[ChildSpec]:
    """Built-in providers; each reaches the server over loopback, as any provider would."""
    specs: list[ChildSpec] = []
    if h.nvml is not None:
        nvml = h.nvml
        specs.append(nvml_child(nvml.make_backend, h.loopback.connect, nvml.options,
                                ledger=nvml.ledger, on_poller=nvml.pollers.append,
                                wrap=h.injectable))
    if h.config.simulate:
        specs.append(ChildSpec("simulator", h.injectable(
            "simulator", functools.partial(run_simulator, h.loopback, h.config)),
            restart="transient"))
    return specs


async def run_simulator(loopback: Loopback, config: Config, *,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """``--simulate N``: N simulated GPUs, registered and kept alive over loopback."""
    api = await loopback.connect()
    try:
        provider = SimulatedProvider(
            api, config.simulate, heartbeat_interval=config.heartbeat_timeout / 3,
            flap_interval=config.simulate_flap_interval)
        await provider.run(task_status=task_status)
    finally:
        api.close()


def _supervisor(name: str, children: list[ChildSpec], intensity: tuple[int, float],
                h: Handles, *, strategy: Strategy = "one_for_one") -> ChildSpec:
    """A supervisor child (stopped in order: ``shutdown=math.inf``)."""
    restarts, period = intensity
    return supervisor_spec(Supervisor(name, children, strategy=strategy, max_restarts=restarts,
                                      period=period, on_restart=h.on_restart))


def _bind(fn: Callable[..., Awaitable[None]], *args: object) -> StartFn:
    """A start function for a ChildSpec from a task function and its leading arguments."""

    async def start(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await fn(*args, task_status=task_status)

    return start
