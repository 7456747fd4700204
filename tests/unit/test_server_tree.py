"""The declared supervision tree (``_tree.py``): a pure function from handles to child specs.

Building it twice gives the same tree, starts nothing and changes no handle; the shape, the
restart types and the NVML backoff are the ones DESIGN.md documents."""

from __future__ import annotations

import dataclasses
from typing import Any

from prometheus_client import CollectorRegistry

from deviceapi import _bridge
from deviceapi._app import core_settings
from deviceapi._config import Config
from deviceapi._tree import (
    CORE_INTENSITY,
    PROVIDERS_INTENSITY,
    ROOT_INTENSITY,
    EmbeddedNvml,
    Handles,
    Loopback,
    root_supervisor,
    server_children,
)
from deviceapi.cache.cache_owner import CacheOwner
from deviceapi.cache.core import Core
from deviceapi.otp import ChildSpec, Supervisor
from deviceapi.providers.nvml import FakeNvml, PollerOptions
from deviceapi.providers.nvml.service import NVML_BACKOFF
from deviceapi.transport.grpc_server import GrpcServer
from deviceapi.transport.http import HttpEndpoints
from deviceapi.transport.metrics import ServerMetrics


def handles(config: Config) -> Handles:
    core = Core.build(core_settings(config))
    bridge = _bridge.Bridge()
    grpc = GrpcServer(core.port, config, bridge=bridge)
    metrics = ServerMetrics(CollectorRegistry(), version="test", node="node")
    nvml = (EmbeddedNvml(FakeNvml, PollerOptions.from_config(config))
            if config.enable_nvml_provider else None)
    return Handles(config=config, core=core, owner=CacheOwner(core.store), grpc=grpc,
                   http=HttpEndpoints((None, 0), (None, 0), lambda: (True, ""), metrics),
                   loopback=Loopback(grpc, bridge), nvml=nvml, on_restart=lambda _: None)


def shape(specs: tuple[ChildSpec, ...] | list[ChildSpec]) -> list[Any]:
    """(id, restart, type, backoff, children...) for every spec, recursively."""
    out: list[Any] = []
    for spec in specs:
        supervisor = getattr(spec.start, "__self__", None)
        if isinstance(supervisor, Supervisor):
            intensity = supervisor.intensity
            out.append((spec.id, spec.restart, spec.type, supervisor.strategy,
                        intensity.restarts, intensity.period, shape(supervisor.children)))
        else:
            out.append((spec.id, spec.restart, spec.type, spec.backoff))
    return out


# Async tests: the core reads trio's clock when built.


async def test_the_tree_is_declared_and_building_it_changes_nothing() -> None:
    config = Config(simulate=4, enable_nvml_provider=True)
    h = handles(config)
    first = shape(server_children(h))
    assert first == shape(server_children(h))  # pure: same handles, same tree
    assert h.nvml is not None and h.nvml.pollers == []  # nothing started
    assert h.grpc.listeners.unix_socket is None and h.http.ports.health == 0
    core_n, core_period = CORE_INTENSITY
    prov_n, prov_period = PROVIDERS_INTENSITY
    assert first == [
        ("core", "permanent", "supervisor", "rest_for_one", core_n, core_period, [
            ("cache_owner", "permanent", "worker", None),
            ("readiness_timer", "transient", "worker", None),
            ("heartbeat_monitor", "permanent", "worker", None),
            ("watch_janitor", "permanent", "worker", None),
        ]),
        ("grpc", "permanent", "worker", None),
        ("http", "permanent", "worker", None),
        ("providers", "permanent", "supervisor", "one_for_one", prov_n, prov_period, [
            ("nvml", "permanent", "worker", NVML_BACKOFF),  # restarts counted, with a backoff
            ("simulator", "transient", "worker", None),
        ]),
    ]
    root = root_supervisor(h)
    assert (root.name, root.strategy, root.intensity.restarts, root.intensity.period) == (
        "root", "one_for_one", *ROOT_INTENSITY)


async def test_without_providers_there_is_no_providers_supervisor() -> None:
    ids = [spec.id for spec in server_children(handles(Config()))]
    assert ids == ["core", "grpc", "http"]


async def test_the_fault_kit_wraps_plain_children_by_name() -> None:
    wrapped: list[str] = []

    def injectable(actor: str, start: Any) -> Any:
        wrapped.append(actor)
        return start

    h = dataclasses.replace(handles(Config(simulate=1)), injectable=injectable)
    server_children(h)
    assert sorted(wrapped) == ["grpc", "heartbeat_monitor", "simulator", "watch_janitor"]
