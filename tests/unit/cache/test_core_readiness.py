"""ReadinessGate and run_readiness_timer (SPEC §4), and the Core.build wiring around them."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from core_helpers import cond, make_store, running_owner, status

from deviceapi._app import core_settings
from deviceapi._config import Config
from deviceapi._errors import Unavailable
from deviceapi.cache._store import DeleteGpu, RegisterGpu
from deviceapi.cache.cache_owner import CacheOwner
from deviceapi.cache.core import Core
from deviceapi.cache.readiness import (
    WAITING_MESSAGE,
    Readiness,
    ReadinessGate,
    run_readiness_timer,
)
from deviceapi.proto.device.v1alpha1.gpu_pb2 import GpuSpec


def now(gate: ReadinessGate) -> Readiness:
    """The gate's state, read afresh (a call, so type checkers do not narrow it)."""
    return gate.state


def register(i: int) -> RegisterGpu:
    return RegisterGpu(f"GPU-{i:02x}", GpuSpec(), status(cond("Ready")), "p1")


def test_waiting_refuses_reads_with_the_spec_message() -> None:
    gate = ReadinessGate(min_gpus=1, provider_timeout=30)
    assert gate.state is Readiness.WAITING_FOR_PROVIDERS and not gate.serving
    with pytest.raises(Unavailable) as info:
        gate.check_read()
    assert str(info.value) == "server initializing, waiting for GPU providers" == WAITING_MESSAGE
    assert gate.reason() == WAITING_MESSAGE


@pytest.mark.parametrize("min_gpus", [1, 3])
async def test_min_gpus_edge(min_gpus: int) -> None:
    store = make_store()
    gate = ReadinessGate(min_gpus=min_gpus, provider_timeout=30)
    store.add_listener(gate)
    changes: list[Readiness] = []
    gate.add_listener(changes.append)
    with trio.fail_after(5):
        async with running_owner(store):
            for i in range(min_gpus - 1):
                await store.write(register(i))
            assert gate.state is Readiness.WAITING_FOR_PROVIDERS  # min - 1
            await store.write(register(99))
            assert now(gate) is Readiness.READY and gate.serving  # min
            gate.check_read()
            await gate.wait_ready()
            # the gate opens once: losing GPUs later does not close it again
            for name in list(store.state.gpus):
                await store.write(DeleteGpu(name))
            assert now(gate) is Readiness.READY
    assert changes == [Readiness.WAITING_FOR_PROVIDERS, Readiness.READY]


async def test_provider_timeout_opens_the_gate(autojump_clock: trio.testing.MockClock) -> None:
    gate = ReadinessGate(min_gpus=1, provider_timeout=30)
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_readiness_timer, gate)
            await trio.sleep(29.999)
            assert gate.state is Readiness.WAITING_FOR_PROVIDERS
            await gate.wait_ready()
            assert trio.current_time() == pytest.approx(30)
            assert gate.reason() == "ready"
            gate.check_read()


async def test_the_timer_ends_early_when_gpus_arrive(
        autojump_clock: trio.testing.MockClock) -> None:
    store = make_store()
    gate = ReadinessGate(min_gpus=1, provider_timeout=30)
    store.add_listener(gate)
    changes: list[Readiness] = []
    gate.add_listener(changes.append)
    with trio.fail_after(100):
        async with running_owner(store), trio.open_nursery() as nursery:
            await nursery.start(run_readiness_timer, gate)
            await trio.sleep(5)
            await store.write(register(1))
        # the timer task finished on its own (the nursery closed without a cancel)
        assert trio.current_time() == pytest.approx(5)
    assert changes == [Readiness.WAITING_FOR_PROVIDERS, Readiness.READY]


async def test_min_gpus_zero_is_ready_at_once() -> None:
    gate = ReadinessGate(min_gpus=0, provider_timeout=30)
    assert gate.state is Readiness.READY and gate.serving
    gate.check_read()
    with trio.fail_after(1):
        await gate.wait_ready()
        await run_readiness_timer(gate)  # returns at once, changes nothing
    assert gate.state is Readiness.READY


def test_begin_shutdown_after_ready() -> None:
    gate = ReadinessGate(min_gpus=0, provider_timeout=30)
    changes: list[Readiness] = []
    gate.add_listener(changes.append)
    gate.begin_shutdown()
    assert gate.state is Readiness.SHUTTING_DOWN and not gate.serving
    assert gate.reason() == "server shutting down"
    gate.check_read()  # in-flight consumers may still finish their reads
    gate.provider_timeout_elapsed()  # no way back to READY
    gate.begin_shutdown()  # idempotent: no second notification
    assert changes == [Readiness.READY, Readiness.SHUTTING_DOWN]


def test_shutdown_before_ready_still_refuses_reads() -> None:
    gate = ReadinessGate(min_gpus=1, provider_timeout=30)
    gate.begin_shutdown()
    with pytest.raises(Unavailable):
        gate.check_read()


async def test_core_build_wires_the_hub_and_the_gate() -> None:
    config = Config(min_gpus=2, watch_history=8, max_gpus=3, max_watchers=2, watch_queue=4,
                    subscribe_rate=1, subscribe_burst=2, heartbeat_timeout=7)
    core = Core.build(core_settings(config))
    assert core.store.limits.max_gpus == 3
    assert core.sessions.heartbeat_timeout == 7
    sub = core.hub.subscribe(0)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(CacheOwner(core.store).run)
            await core.store.write(register(1))
            assert core.gate.state is Readiness.WAITING_FOR_PROVIDERS
            await core.store.write(register(2))
            assert now(core.gate) is Readiness.READY
            nursery.cancel_scope.cancel()
    base = core.store.version_base
    assert [d.event.rv for d in sub.take(10)] == [base + 1, base + 2]
    assert core.hub.max_watchers == 2 and core.hub.queue_size == 4
