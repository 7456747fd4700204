"""ProviderSessions + run_heartbeat_monitor over a real CacheStore/CacheOwner (SPEC §4), on
trio's virtual clock: deadlines at their edge, one MODIFIED per owned GPU, others untouched,
never-heartbeated providers never time out, resumed heartbeats restore Ready."""

from __future__ import annotations

import trio
import trio.testing
from core_helpers import (
    HEARTBEAT_TIMEOUT_REASON,
    READY,
    cond,
    conditions_of,
    make_hub,
    make_store,
    ready_of,
    running_owner,
    status,
)

from deviceapi.cache._store import MaskProvider, RegisterGpu, Result, UnmaskProvider
from deviceapi.cache.cache_owner import CacheStore
from deviceapi.cache.provider_session import ProviderSessions, run_heartbeat_monitor
from deviceapi.cache.watcher import Subscription, WatchHub
from deviceapi.otp import TrioReply
from deviceapi.proto.device.v1alpha1.gpu_pb2 import Condition, GpuSpec
from deviceapi.testing.faults import FaultInjector

A, B, C, D = "GPU-0a", "GPU-0b", "GPU-0c", "GPU-0d"
HEALTHY = (READY, "True", "Healthy", "ok")


# ---- the bookkeeping alone -------------------------------------------------------------------


def test_overdue_exactly_at_the_timeout_and_only_once() -> None:
    sessions = ProviderSessions(heartbeat_timeout=30)
    assert sessions.heartbeat("p1", 100.0) is None
    sessions.touch("p2")  # wrote, never heartbeated
    sessions.touch("")  # no provider id: no session
    assert sessions.next_deadline() == 130.0
    assert sessions.take_overdue(129.999) == []
    assert sessions.take_overdue(130.0) == [MaskProvider("p1")]
    assert sessions.take_overdue(10_000.0) == []  # already masked; p2 never times out
    assert sessions.next_deadline() is None
    stats = sessions.statistics()
    assert (stats.active, stats.masked, stats.heartbeat_timeouts) == (2, 1, 1)
    assert sessions.heartbeat("p1", 10_001.0) == UnmaskProvider("p1")
    assert sessions.heartbeat("p1", 10_002.0) is None
    assert sessions.statistics().masked == 0
    assert sessions.next_deadline() == 10_032.0


def test_each_provider_has_its_own_deadline() -> None:
    sessions = ProviderSessions(heartbeat_timeout=10)
    sessions.heartbeat("p1", 0.0)
    sessions.heartbeat("p2", 5.0)
    assert sessions.take_overdue(10.0) == [MaskProvider("p1")]
    assert sessions.take_overdue(14.9) == []
    assert sessions.take_overdue(15.0) == [MaskProvider("p2")]


# ---- with the cache -------------------------------------------------------------------------


async def populate(store: CacheStore) -> None:
    await store.write(RegisterGpu(A, GpuSpec(), status(cond("X"), cond(*HEALTHY)), "p1"))
    await store.write(RegisterGpu(B, GpuSpec(), status(cond("X")), "p1"))  # no Ready written
    await store.write(RegisterGpu(C, GpuSpec(), status(cond(READY)), "p2"))
    await store.write(RegisterGpu(D, GpuSpec(), status(cond(READY)), "p3"))


def masked_view(store: CacheStore) -> dict[str, tuple[str, str] | None]:
    def shown(c: Condition | None) -> tuple[str, str] | None:
        return (c.status, c.reason) if c is not None else None

    return {name: shown(ready_of(g)) for name, g in sorted(store.state.gpus.items())}


def names_of(sub: Subscription) -> list[tuple[str, str]]:
    batch = sub.take(1000)
    for item in batch:
        sub.delivered(item, trio.current_time())
    return [(d.event.type, d.event.gpu.metadata.name) for d in batch]


async def beat(sessions: ProviderSessions, store: CacheStore, provider: str) -> None:
    """What the Heartbeat handler does: record it, and submit the unmask if one is due."""
    unmask = sessions.heartbeat(provider, trio.current_time())
    if unmask is not None:
        await store.write(unmask)


async def heartbeat_every(sessions: ProviderSessions, store: CacheStore, provider: str,
                          period: float) -> None:
    while True:
        await beat(sessions, store, provider)
        await trio.sleep(period)


async def test_timeout_masks_exactly_the_providers_gpus_and_resume_restores(
        autojump_clock: trio.testing.MockClock) -> None:
    store = make_store()
    hub: WatchHub = make_hub(store)
    sessions = ProviderSessions(heartbeat_timeout=30)
    with trio.fail_after(1000):
        async with running_owner(store), trio.open_nursery() as nursery:
            await populate(store)
            for provider in ("p1", "p2", "p3"):
                sessions.touch(provider)
            sub = hub.subscribe(store.state.rv)
            untouched = {n: store.state.gpus[n] for n in (C, D)}
            start = trio.current_time()
            await beat(sessions, store, "p1")  # p1 beats once, then goes quiet
            nursery.start_soon(heartbeat_every, sessions, store, "p2", 10.0)  # p2 stays alive
            # p3 never sends a heartbeat: it is never timed out
            await nursery.start(run_heartbeat_monitor, sessions, store.submit)

            await trio.sleep_until(start + 30 - 0.001)  # timeout - ε
            assert names_of(sub) == [] and store.state.masked == {}
            await trio.sleep_until(start + 30 + 1)  # timeout + the monitor's interval
            assert names_of(sub) == [("MODIFIED", A), ("MODIFIED", B)]  # one each
            assert masked_view(store) == {
                A: ("Unknown", HEARTBEAT_TIMEOUT_REASON), B: ("Unknown", HEARTBEAT_TIMEOUT_REASON),
                C: ("True", ""), D: ("True", ""),
            }
            assert all(store.state.gpus[n] is g for n, g in untouched.items())

            await trio.sleep(500)  # no second mask, p2 and p3 never masked
            assert names_of(sub) == []
            stats = sessions.statistics()
            assert (stats.active, stats.masked, stats.heartbeat_timeouts) == (3, 1, 1)

            await beat(sessions, store, "p1")  # heartbeats resume
            assert names_of(sub) == [("MODIFIED", A), ("MODIFIED", B)]
            assert HEALTHY in conditions_of(store.state.gpus[A])
            assert conditions_of(store.state.gpus[B]) == [("X", "True", "", "")]
            assert store.state.masked == {}
            assert all(store.state.gpus[n] is g for n, g in untouched.items())

            resumed = trio.current_time()  # and going quiet again times out again
            await trio.sleep_until(resumed + 30 - 0.001)
            assert store.state.masked == {}
            await trio.sleep_until(resumed + 31)
            assert sorted(store.state.masked) == [A, B]
            assert sessions.statistics().heartbeat_timeouts == 2
            nursery.cancel_scope.cancel()


async def test_a_heartbeat_between_checks_times_out_on_the_next_check(
        autojump_clock: trio.testing.MockClock) -> None:
    store = make_store()
    sessions = ProviderSessions(heartbeat_timeout=8)  # monitor interval: 1 s
    with trio.fail_after(100):
        async with running_owner(store), trio.open_nursery() as nursery:
            await populate(store)
            start = trio.current_time()
            await nursery.start(run_heartbeat_monitor, sessions, store.submit)
            await trio.sleep(0.5)
            await beat(sessions, store, "p1")  # deadline start + 8.5, checks at whole seconds
            await trio.sleep_until(start + 8.5 - 0.001)
            assert store.state.masked == {}
            await trio.sleep_until(start + 8.5 + 1)
            assert sorted(store.state.masked) == [A, B]
            nursery.cancel_scope.cancel()


async def test_short_timeouts_poll_at_a_quarter_of_the_timeout(
        autojump_clock: trio.testing.MockClock) -> None:
    store = make_store()
    sessions = ProviderSessions(heartbeat_timeout=2)  # interval 0.5 s
    with trio.fail_after(100):
        async with running_owner(store), trio.open_nursery() as nursery:
            await populate(store)
            start = trio.current_time()
            await beat(sessions, store, "p2")
            await nursery.start(run_heartbeat_monitor, sessions, store.submit)
            await trio.sleep_until(start + 2 - 0.001)
            assert store.state.masked == {}
            await trio.sleep_until(start + 2.5)
            assert sorted(store.state.masked) == [C]
            nursery.cancel_scope.cancel()


async def test_sessions_survive_a_monitor_restart(
        autojump_clock: trio.testing.MockClock) -> None:
    store = make_store()
    sessions = ProviderSessions(heartbeat_timeout=30)
    with trio.fail_after(1000):
        async with running_owner(store):
            await populate(store)
            await beat(sessions, store, "p1")
            async with trio.open_nursery() as nursery:
                await nursery.start(run_heartbeat_monitor, sessions, store.submit)
                await trio.sleep(31)
                nursery.cancel_scope.cancel()
            rv = store.state.rv
            assert sorted(store.state.masked) == [A, B]
            async with trio.open_nursery() as nursery:  # a fresh incarnation: no re-mask
                await nursery.start(run_heartbeat_monitor, sessions, store.submit)
                await trio.sleep(100)
                nursery.cancel_scope.cancel()
            assert store.state.rv == rv
            await beat(sessions, store, "p1")
            assert store.state.masked == {}


async def test_a_heartbeat_racing_a_multi_provider_timeout_is_not_lost(
        autojump_clock: trio.testing.MockClock) -> None:
    store = make_store()
    faults = FaultInjector()
    sessions = ProviderSessions(heartbeat_timeout=30)
    with trio.fail_after(1000):
        async with running_owner(store, faults), trio.open_nursery() as nursery:
            await populate(store)
            start = trio.current_time()
            await beat(sessions, store, "p1")
            await beat(sessions, store, "p2")
            faults.hang("cache_owner", 0.5, after=0)  # p1's mask write takes half a second
            await nursery.start(run_heartbeat_monitor, sessions, store.submit)
            await trio.sleep_until(start + 30.1)  # both overdue; the monitor waits on p1's
            late: TrioReply[Result] = TrioReply()
            unmask = sessions.heartbeat("p2", trio.current_time())  # p2 was only just late
            assert unmask == UnmaskProvider("p2")
            store.submit(unmask, late)
            await late.wait()
            nursery.start_soon(heartbeat_every, sessions, store, "p2", 5.0)  # p2 stays alive
            await trio.sleep(20)
            assert sessions.statistics().masked == 1  # only p1, as far as sessions know
            assert masked_view(store)[C] == ("True", "")  # p2's GPU must be Ready again
            nursery.cancel_scope.cancel()
