"""CacheStore + CacheOwner in trio, no network: tickets, history ring, commit order, crashes.

Hangs and crashes come from the FaultInjector hook (no monkeypatching); time is trio's
MockClock (``autojump_clock``), so a 100 s hang costs nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import outcome
import pytest
import trio
import trio.testing
from core_helpers import cond, make_store, running_owner, rvs, status

from deviceapi._errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from deviceapi.cache._store import (
    Command,
    DeleteGpu,
    Event,
    RegisterGpu,
    Result,
    State,
    UpdateCondition,
)
from deviceapi.cache.cache_owner import CacheOwner, CacheStore
from deviceapi.otp import ActorCrashed, TrioReply
from deviceapi.proto.device.v1alpha1.gpu_pb2 import GpuSpec
from deviceapi.testing.faults import FaultInjector, InjectedCrash


def register(i: int, provider: str = "p1") -> Command:
    return RegisterGpu(f"GPU-{i:02x}", GpuSpec(), status(cond("Ready")), provider)


def submit(store: CacheStore, command: Command) -> TrioReply[Result]:
    reply: TrioReply[Result] = TrioReply()
    store.submit(command, reply)
    return reply


async def test_write_goes_through_the_owner_and_is_published() -> None:
    store = make_store()
    with trio.fail_after(5):
        async with running_owner(store):
            result = await store.write(register(1))
            assert result.created and result.rv == 1
            assert store.state.gpus["GPU-01"] is result.gpu
            with pytest.raises(NotFound):
                await store.write(DeleteGpu("GPU-02"))
            with pytest.raises(InvalidArgument):
                await store.write(UpdateCondition("GPU-01", cond("Ready", "yes")))
    stats = store.statistics()
    assert (stats.rv, stats.gpus, stats.history) == (1, 1, 1)
    assert (stats.submitted, stats.processed, stats.writes_ok, stats.writes_rejected) == (
        3, 3, 1, 2)


async def test_a_read_ticket_waits_for_a_write_queued_before_it(
        autojump_clock: trio.testing.MockClock) -> None:
    store = make_store()
    faults = FaultInjector()
    with trio.fail_after(500):
        async with running_owner(store, faults):
            faults.hang("cache_owner", 50, after=0)  # the next write sits for 50 s
            submit(store, register(1))
            ticket = store.ticket()
            assert not store.is_processed(ticket)
            await store.wait_processed(ticket)
            assert trio.current_time() >= 50
            assert "GPU-01" in store.state.gpus  # read-your-writes


async def test_a_read_ticket_does_not_wait_for_later_writes(
        autojump_clock: trio.testing.MockClock) -> None:
    store = make_store()
    faults = FaultInjector()
    with trio.fail_after(500):
        async with running_owner(store, faults):
            faults.hang("cache_owner", 100, after=1)  # the second write sits for 100 s
            submit(store, register(1))
            early = store.ticket()
            submit(store, register(2))
            late = store.ticket()
            with trio.fail_after(1):
                await store.wait_processed(early)
            assert trio.current_time() < 100
            assert "GPU-01" in store.state.gpus and "GPU-02" not in store.state.gpus
            assert not store.is_processed(late)
            await store.wait_processed(late)
            assert trio.current_time() >= 100 and "GPU-02" in store.state.gpus


async def test_ticket_waiters_resolve_in_ticket_order() -> None:
    """The waiter heap, driven by hand (no owner): each resolves exactly when due."""
    store = make_store()
    replies = {t: TrioReply[None]() for t in (3, 1, 2, 2)}
    for ticket, reply in replies.items():
        store.add_ticket_waiter(ticket, reply)
    immediate: TrioReply[None] = TrioReply()
    store.add_ticket_waiter(0, immediate)
    assert immediate.done
    done = []
    for _ in range(3):
        store.note_processed(True)
        done.append(sorted(t for t, r in replies.items() if r.done))
    assert done == [[1], [1, 2], [1, 2, 3]]


async def test_history_ring_is_bounded() -> None:
    store = make_store(history=4)
    with trio.fail_after(5):
        async with running_owner(store):
            for i in range(10):
                await store.write(register(i))
    assert store.state.rv == 10
    assert store.events_after(10) == []
    assert store.events_after(11) == []  # the hub answers OUT_OF_RANGE for the future itself
    assert rvs(store.events_after(9) or []) == [10]
    assert rvs(store.events_after(6) or []) == [7, 8, 9, 10]
    assert store.events_after(5) is None
    assert store.events_after(0) is None
    assert store.oldest_resumable_rv() == 6
    assert store.statistics().history == 4


async def test_history_ring_holds_everything_until_full() -> None:
    store = make_store(history=16)
    assert store.events_after(0) == []
    with trio.fail_after(5):
        async with running_owner(store):
            for i in range(5):
                await store.write(register(i))
            await store.write(DeleteGpu("GPU-00"))
    events = store.events_after(0) or []
    assert rvs(events) == [1, 2, 3, 4, 5, 6]
    assert [e.type for e in events] == ["ADDED"] * 5 + ["DELETED"]
    assert store.oldest_resumable_rv() == 0


async def test_history_of_size_zero_never_replays() -> None:
    store = make_store(history=0)
    with trio.fail_after(5):
        async with running_owner(store):
            await store.write(register(1))
    assert store.events_after(0) is None
    assert store.events_after(1) == []


async def test_listeners_hear_the_commit_before_the_writer_is_acknowledged() -> None:
    store = make_store()
    seen: list[tuple[int, list[int], bool]] = []
    reply: TrioReply[Result] = TrioReply()

    class Listener:
        def on_commit(self, state: State, events: Sequence[Event]) -> None:
            assert store.state is state  # already published
            seen.append((state.rv, rvs(events), reply.done))

    store.add_listener(Listener())
    with trio.fail_after(5):
        async with running_owner(store):
            store.submit(register(1), reply)
            await reply.wait()
            with pytest.raises(NotFound):  # a rejected write commits nothing
                await store.write(DeleteGpu("GPU-77"))
    assert seen == [(1, [1], False)]


async def test_submit_never_blocks_full_queue_or_closed_mailbox() -> None:
    store = make_store(queue=2)
    submit(store, register(1))
    submit(store, register(2))
    with pytest.raises(ResourceExhausted) as info:
        submit(store, register(3))
    assert info.value.reason == "write_queue"
    assert store.ticket() == 2  # a refused write is not waited for
    store.mailbox.close()
    with pytest.raises(Unavailable):
        submit(store, register(4))


# ---- crashes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 3, 5])
async def test_crash_after_k_messages_then_restart_loses_nothing_acknowledged(k: int) -> None:
    store = make_store()
    faults = FaultInjector()
    faults.crash("cache_owner", after=k)
    replies = [submit(store, register(i)) for i in range(8)]
    everything = store.ticket()
    with trio.fail_after(5):
        with pytest.RaisesGroup(InjectedCrash):
            await CacheOwner(store, faults=faults).run()
    # the first k writes were applied and acknowledged; the k-th caller hears of the crash
    assert [r.done for r in replies] == [True] * (k + 1) + [False] * (7 - k)
    acknowledged = [(await r.wait()).rv for r in replies[:k]]
    assert acknowledged == list(range(1, k + 1))
    with pytest.raises(ActorCrashed):
        await replies[k].wait()
    assert store.state.rv == k
    assert f"GPU-{k:02x}" not in store.state.gpus
    assert not store.is_processed(everything)
    # a new incarnation over the same store: the queued writes are still there
    with trio.fail_after(5):
        async with running_owner(store, faults):
            later = [(await r.wait()).rv for r in replies[k + 1:]]
            await store.wait_processed(everything)
    assert later == list(range(k + 1, 8))  # the version counter continues
    assert sorted(store.state.gpus) == sorted(f"GPU-{i:02x}" for i in range(8) if i != k)
    assert rvs(store.events_after(0) or []) == list(range(1, 8))  # contiguous history
    stats = store.statistics()
    assert (stats.submitted, stats.processed, stats.writes_ok, stats.writes_rejected) == (
        8, 8, 7, 1)
    assert [i.fired_at is not None for i in faults.history()] == [True]


async def test_repeated_crashes_under_a_restart_loop(
        autojump_clock: trio.testing.MockClock) -> None:
    """Writers keep submitting while the owner crashes every few messages and is restarted:
    every caller gets an answer, every acknowledged write is in the state, versions are
    contiguous and in submission order."""
    store = make_store(queue=256)
    faults = FaultInjector()
    for k in (2, 4, 1, 6):
        faults.crash("cache_owner", after=k)
    restarts = 0

    async def supervise(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        nonlocal restarts
        while True:
            try:
                await CacheOwner(store, faults=faults).run(task_status=task_status)
                return
            except* InjectedCrash:
                restarts += 1
            task_status = trio.TASK_STATUS_IGNORED

    outcomes: dict[int, outcome.Outcome[Result]] = {}

    async def writer(i: int) -> None:
        await trio.sleep(i * 0.01)
        command = register(i) if i % 5 else UpdateCondition("GPU-ff", cond("X"))  # NotFound
        outcomes[i] = await outcome.acapture(store.write, command)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(supervise)
            async with trio.open_nursery() as writers:
                for i in range(30):
                    writers.start_soon(writer, i)
            nursery.cancel_scope.cancel()
    assert restarts == 4
    in_order = [outcomes[i] for i in sorted(outcomes)]
    results = [o.unwrap() for o in in_order if isinstance(o, outcome.Value)]
    errors = [type(o.error) for o in in_order if isinstance(o, outcome.Error)]
    assert len(outcomes) == 30
    assert errors.count(ActorCrashed) == 4
    assert set(errors) <= {ActorCrashed, NotFound}
    assert [r.rv for r in results] == list(range(1, len(results) + 1))
    assert store.state.rv == len(results)
    assert {r.gpu.metadata.name for r in results if r.gpu is not None} == set(store.state.gpus)
    assert store.statistics().processed == store.statistics().submitted == 30


async def test_a_transition_that_raises_crashes_the_owner_and_changes_nothing() -> None:
    store = make_store()
    with trio.fail_after(5):
        async with running_owner(store):
            await store.write(register(1))
    before = store.state
    reply: TrioReply[Result] = TrioReply()
    store.submit(object(), reply)  # type: ignore[arg-type]  # not a command: apply raises
    with trio.fail_after(5), pytest.RaisesGroup(AssertionError):
        await CacheOwner(store).run()
    with pytest.raises(ActorCrashed):
        await reply.wait()
    assert store.state is before
    with trio.fail_after(5):
        async with running_owner(store):
            assert (await store.write(register(2))).rv == 2
