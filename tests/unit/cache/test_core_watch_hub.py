"""WatchHub and Subscription (SPEC §3): snapshot/replay joined to live events with no gap and no
duplicate, resume bounds, limits, eviction (queue full, stalled), shutdown, statistics.

A real CacheStore + CacheOwner produce the commits; consumers are plain code calling
``take``/``delivered`` (or a small trio pump), so every interleaving is chosen by the test.
"""

from __future__ import annotations

import functools
import random

import pytest
import trio
import trio.testing
from core_helpers import cond, make_hub, make_store, running_owner, rvs, status

from deviceapi._errors import OutOfRange, ResourceExhausted, Unavailable
from deviceapi.cache._store import (
    Command,
    DeleteGpu,
    Event,
    RegisterGpu,
    Result,
    State,
    UpdateCondition,
)
from deviceapi.cache.cache_owner import CacheStore
from deviceapi.cache.slow_consumers import SlowConsumerPolicy, run_slow_consumer_janitor
from deviceapi.cache.watcher import Delivery, StreamEnd, Subscription
from deviceapi.otp import TrioReply
from deviceapi.proto.device.v1alpha1.gpu_pb2 import Gpu, GpuSpec


def name(i: int) -> str:
    return f"GPU-{i:02x}"


def register(i: int) -> Command:
    return RegisterGpu(name(i), GpuSpec(), status(cond("Ready")), "p1")


def touch(i: int, value: str = "False") -> Command:
    return UpdateCondition(name(i), cond("Ready", value))


def drain(sub: Subscription, limit: int = 10_000) -> list[Delivery]:
    """Take and acknowledge up to ``limit`` queued events, as a fast consumer would."""
    batch = sub.take(limit)
    for item in batch:
        sub.delivered(item, trio.current_time())
    return batch


async def write_all(store: CacheStore, commands: list[Command]) -> list[Result]:
    return [await store.write(c) for c in commands]


def replay(start: dict[str, Gpu], events: list[Event]) -> dict[str, Gpu]:
    """Apply a stream's events to a starting view, checking each makes sense there."""
    view = dict(start)
    for event in events:
        key = event.gpu.metadata.name
        if event.type == "ADDED":
            assert key not in view, f"ADDED for a GPU already seen: {key}"
            view[key] = event.gpu
        elif event.type == "MODIFIED":
            assert key in view and view[key].resource_version < event.rv
            view[key] = event.gpu
        else:
            assert event.type == "DELETED" and key in view
            del view[key]
    return view


# ---- snapshot, replay, atomicity -------------------------------------------------------------


async def test_snapshot_then_live_without_duplicate() -> None:
    store = make_store()
    hub = make_hub(store)
    with trio.fail_after(5):
        async with running_owner(store):
            await write_all(store, [register(2), register(1), register(3)])
            sub = hub.subscribe(0)
            await store.write(touch(1))
    items = drain(sub)
    # The snapshot comes in version order (SPEC §3's resume contract), not name order.
    assert [(d.event.type, d.event.gpu.metadata.name) for d in items] == [
        ("ADDED", name(2)), ("ADDED", name(1)), ("ADDED", name(3)), ("MODIFIED", name(1))]
    assert [d.resume_rv for d in items] == [0, 0, 3, 4]  # mid-snapshot: relist
    assert items[1].event.gpu.resource_version == 2  # the object as stored
    assert sub.resume_rv == 4 and sub.pending == 0


async def test_resuming_from_the_last_snapshot_event_yields_exactly_the_unseen_events() -> None:
    """SPEC §3: the last event received (a snapshot event included) is where to resume from.
    In name order the last snapshot event carried an old version, and resuming from it
    replayed states the snapshot already held, as older states."""
    store = make_store()
    hub = make_hub(store)
    with trio.fail_after(5):
        async with running_owner(store):
            await write_all(store, [register(i) for i in range(1, 6)])
            await write_all(store, [touch(1), touch(1, "True"), touch(3), touch(5), touch(2)])
            first = hub.subscribe(0)
            snapshot = drain(first)
            hub.unsubscribe(first)
            last = snapshot[-1].event.rv
            assert last == store.state.rv  # the snapshot ends at the newest version
            assert sorted(d.event.rv for d in snapshot) == [d.event.rv for d in snapshot]
            resumed = hub.subscribe(last)
            assert drain(resumed) == []  # nothing unseen yet: no replay
            await store.write(touch(4))
    assert [(d.event.type, d.event.gpu.metadata.name) for d in drain(resumed)] == [
        ("MODIFIED", name(4))]


async def test_snapshot_excludes_writes_still_queued_and_they_arrive_live() -> None:
    store = make_store()
    hub = make_hub(store)
    with trio.fail_after(5):
        async with running_owner(store):
            await store.write(register(1))
            queued: TrioReply[Result] = TrioReply()
            store.submit(touch(1), queued)  # not processed yet: nothing ran since
            sub = hub.subscribe(0)
            assert [d.event.type for d in sub.take(0)] == []
            await queued.wait()
    items = drain(sub)
    assert [(d.event.type, d.event.rv) for d in items] == [("ADDED", 1), ("MODIFIED", 2)]


async def test_subscribe_on_an_empty_cache() -> None:
    store = make_store()
    hub = make_hub(store)
    sub = hub.subscribe(0)
    assert sub.take(10) == [] and sub.resume_rv == 0
    with trio.fail_after(5):
        async with running_owner(store):
            await store.write(register(1))
            await store.write(DeleteGpu(name(1)))
            late = hub.subscribe(0)  # everything deleted: empty snapshot at version 2
    assert [d.event.type for d in drain(sub)] == ["ADDED", "DELETED"]
    assert late.take(10) == [] and late.resume_rv == 2


async def test_replay_from_n_yields_exactly_the_later_events() -> None:
    store = make_store()
    hub = make_hub(store)
    with trio.fail_after(5):
        async with running_owner(store):
            await write_all(store, [register(i) for i in range(4)] + [touch(1), touch(2)]
                            + [DeleteGpu(name(0))] + [touch(3, "Unknown")] * 2)
            subs = {n: hub.subscribe(n) for n in range(1, 10)}
            await store.write(register(9))
    assert store.state.rv == 10
    for n, sub in subs.items():
        items = drain(sub)
        assert rvs(d.event for d in items) == list(range(n + 1, 11)), n
        assert [d.resume_rv for d in items] == list(range(n + 1, 11))
        assert sub.resume_rv == 10


async def test_out_of_range_for_too_old_and_future_versions() -> None:
    store = make_store(history=4)
    hub = make_hub(store)
    with trio.fail_after(5):
        async with running_owner(store):
            await write_all(store, [register(i) for i in range(10)])
    with pytest.raises(OutOfRange, match="too old"):
        hub.subscribe(5)
    with pytest.raises(OutOfRange, match="too old"):
        hub.subscribe(1)
    assert rvs(d.event for d in hub.subscribe(6).take(10)) == [7, 8, 9, 10]
    with pytest.raises(OutOfRange, match="newer"):
        hub.subscribe(11)
    with pytest.raises(OutOfRange):
        hub.subscribe(2**63 - 1)
    assert hub.subscribe(10).take(10) == []
    assert hub.statistics().active == 2  # refused subscriptions hold no slot


@pytest.mark.parametrize("seed", range(6))
async def test_interleaved_writes_and_subscriptions_never_gap_or_duplicate(seed: int) -> None:
    """Random interleavings of writes (awaited or left queued), snapshot and resume
    subscriptions and partial consumption: every stream, applied to where it started,
    ends exactly at the final state."""
    rng = random.Random(seed)
    store = make_store(history=32, queue=512)
    hub = make_hub(store)
    states: dict[int, State] = {0: store.state}

    class Recorder:
        def on_commit(self, state: State, events: object) -> None:
            states[state.rv] = state

    store.add_listener(Recorder())
    streams: list[tuple[dict[str, Gpu], Subscription, list[Event]]] = []
    live: set[int] = set()
    with trio.fail_after(10):
        async with running_owner(store):
            for _ in range(120):
                roll = rng.random()
                if roll < 0.55:
                    i = rng.randrange(8)
                    command: Command
                    if i not in live:
                        command = register(i)
                        live.add(i)
                    elif rng.random() < 0.7:
                        command = touch(i, rng.choice(["True", "False"]))
                    else:
                        command = DeleteGpu(name(i))
                        live.discard(i)
                    store.submit(command, TrioReply())
                    if rng.random() < 0.5:
                        await store.wait_processed(store.ticket())
                elif roll < 0.75:
                    streams.append(({}, hub.subscribe(0), []))
                elif roll < 0.9:
                    oldest = store.oldest_resumable_rv()
                    if store.state.rv > oldest:
                        n = rng.randint(max(oldest, 1), store.state.rv)
                        streams.append((dict(states[n].gpus), hub.subscribe(n), []))
                else:
                    for _, sub, seen in streams:
                        seen.extend(d.event for d in drain(sub, rng.randrange(1, 5)))
            await store.wait_processed(store.ticket())
    assert streams
    for start, sub, seen in streams:
        seen.extend(d.event for d in drain(sub))
        assert sub.end is None
        assert replay(start, seen) == dict(store.state.gpus)
        assert sub.resume_rv == store.state.rv


# ---- limits ----------------------------------------------------------------------------------


async def test_max_watchers_at_the_limit_and_one_more() -> None:
    store = make_store()
    hub = make_hub(store, max_watchers=3)
    subs = [hub.subscribe(0) for _ in range(3)]
    with pytest.raises(ResourceExhausted) as info:
        hub.subscribe(0)
    assert info.value.reason == "max_watchers"
    hub.evict(subs[0], "slow_subscriber")  # ended, but its stream has not let go yet
    with pytest.raises(ResourceExhausted):
        hub.subscribe(0)
    hub.unsubscribe(subs[0])
    hub.subscribe(0)
    assert hub.statistics().active == 3


async def test_subscribe_rate_burst_then_refill(autojump_clock: trio.testing.MockClock) -> None:
    store = make_store()
    hub = make_hub(store, rate=4, burst=5)
    for _ in range(5):
        hub.subscribe(0)
    with pytest.raises(ResourceExhausted) as info:
        hub.subscribe(0)
    assert info.value.reason == "subscribe_rate"
    await trio.sleep(0.125)  # half a token
    with pytest.raises(ResourceExhausted):
        hub.subscribe(0)
    await trio.sleep(0.125)  # 1/rate seconds after the burst ran out: one token
    hub.subscribe(0)
    with pytest.raises(ResourceExhausted):
        hub.subscribe(0)
    await trio.sleep(3600)  # refill is capped at the burst
    for _ in range(5):
        hub.subscribe(0)
    with pytest.raises(ResourceExhausted):
        hub.subscribe(0)
    assert hub.statistics().subscribed_total == 11


# ---- eviction --------------------------------------------------------------------------------


async def test_queue_full_evicts_at_capacity_plus_one_with_last_delivered_version() -> None:
    store = make_store()
    hub = make_hub(store, queue_size=3)
    reasons: list[str] = []
    hub.on_evict = reasons.append
    with trio.fail_after(5):
        async with running_owner(store):
            await store.write(register(1))  # rv 1
            sub = hub.subscribe(0)
            drain(sub)  # the snapshot: resume from 1
            notified: list[int] = []
            sub.on_change = lambda: notified.append(store.state.rv)
            await write_all(store, [touch(1, v) for v in ("False", "True", "False")])  # rv 2..4
            assert sub.end is None and sub.pending == 3 and notified == [2, 3, 4]
            assert [d.event.rv for d in drain(sub, 1)] == [2]  # delivered: resume from 2
            in_flight = sub.take(1)  # rv 3 handed to the transport, not yet accepted
            await write_all(store, [touch(1, "True"), touch(1, "False")])  # rv 5, 6: live = 3
            assert sub.end is None
            await store.write(touch(1, "Unknown"))  # rv 7: one more than the queue holds
    end: StreamEnd | None = sub.end
    assert end is not None and end == StreamEnd("evicted", "queue_full", 2)
    assert "last delivered resource version 2" in end.message()
    assert "opts.resource_version=2" in end.message()
    assert notified[-1] == 7 and sub.take(10) == []
    assert [d.event.rv for d in in_flight] == [3]
    assert reasons == ["queue_full"]
    assert hub.statistics().evictions == {"queue_full": 1}
    # resuming where the message says misses nothing
    assert rvs(d.event for d in hub.subscribe(end.resume_rv).take(100)) == [3, 4, 5, 6, 7]


def modified(state: State, rvs_: range) -> list[Event]:
    """Events of one commit carrying several (as a batch would), each a new version."""
    events = []
    for rv in rvs_:
        gpu = Gpu()
        gpu.CopyFrom(state.gpus[name(1)])
        gpu.resource_version = rv
        events.append(Event("MODIFIED", gpu))
    return events


async def test_one_shared_log_read_by_cursor_evicts_exactly_past_the_queue() -> None:
    """Every subscription reads the hub's one log at its own place: a commit tells a hub
    listener once (however many subscriptions), evicts exactly the subscriptions it leaves
    more than ``queue_size`` events behind (a commit of several events at once included),
    each of the others gets every event once and in order, and the log keeps no more than
    the queue can still ask for."""
    store = make_store()
    hub = make_hub(store, queue_size=4)
    commits: list[int] = []
    hub.listen(lambda: commits.append(store.state.rv))
    with trio.fail_after(5):
        async with running_owner(store):
            await store.write(register(1))  # rv 1
            caught_up, fast, busy = hub.subscribe(0), hub.subscribe(0), hub.subscribe(0)
            for sub in (caught_up, fast, busy):
                drain(sub)
            await write_all(store, [touch(1, v) for v in ("False", "True")])  # rv 2, 3
            got = drain(fast)
            in_flight = busy.take(1)  # rv 2 handed to the transport, not accepted
            assert [caught_up.pending, fast.pending, busy.pending] == [2, 0, 2]
    assert commits == [2, 3]  # rv 1 had nobody to queue for
    hub.on_commit(store.state, modified(store.state, range(4, 7)))  # one commit of 3
    assert commits == [2, 3, 3]
    assert caught_up.end == StreamEnd("evicted", "queue_full", 1)  # 5 behind
    assert busy.end is None and busy.pending == 5  # 4 queued + 1 in flight: not over
    hub.on_commit(store.state, modified(store.state, range(7, 8)))
    assert busy.end == StreamEnd("evicted", "queue_full", 1) and busy.pending == 1
    assert [d.event.rv for d in in_flight] == [2] and busy.take(10) == []
    got += drain(fast)
    for rv in range(8, 100):  # a consumer that keeps up: the log stays bounded
        hub.on_commit(store.state, modified(store.state, range(rv, rv + 1)))
        got += drain(fast, 1)
        assert hub._end - hub._base <= 2 * hub.queue_size
    assert [d.event.rv for d in got] == list(range(2, 100)) and fast.end is None
    assert fast.resume_rv == 99 and fast.pending == 0
    assert hub.statistics().evictions == {"queue_full": 2}


async def test_stall_clock_starts_when_work_arrives_for_an_idle_watcher(
        autojump_clock: trio.testing.MockClock) -> None:
    """The shared log keeps each event's commit time: a watcher with nothing pending starts
    its stall clock when an event arrives, not when it last delivered; one already behind
    keeps the clock of its last delivery."""
    store = make_store()
    hub = make_hub(store)
    with trio.fail_after(500):
        async with running_owner(store):
            await store.write(register(1))
            idle, behind = hub.subscribe(0), hub.subscribe(0)
            drain(idle)
            behind_item = behind.take(1)  # in flight, never accepted
            await trio.sleep(100)
            await store.write(touch(1))
            await trio.sleep(29)
            assert hub.evict_stalled(policy(30)) == 1  # only `behind`: 129 s since its progress
            assert behind.end is not None and idle.end is None
            taken = idle.take(1)  # taking is not accepting: the clock runs from the commit
            await trio.sleep(1)
            assert hub.evict_stalled(policy(30)) == 1
    assert taken and behind_item and idle.end == StreamEnd("evicted", "slow_subscriber", 1)


async def test_eviction_during_the_snapshot_asks_for_a_relist() -> None:
    store = make_store()
    hub = make_hub(store, queue_size=1)
    with trio.fail_after(5):
        async with running_owner(store):
            await write_all(store, [register(1), register(2)])
            sub = hub.subscribe(0)
            drain(sub, 1)  # one of two snapshot items
            await write_all(store, [touch(1), touch(2)])  # live queue of 1: evicted
    assert sub.end is not None and sub.end.resume_rv == 0
    assert "relist" in sub.end.message()


def policy(timeout: float) -> SlowConsumerPolicy:
    """The slow-consumer policy on trio's clock, as Core.build makes it."""
    return SlowConsumerPolicy(timeout, trio.current_time)


async def test_evict_stalled_after_the_timeout_and_not_before(
        autojump_clock: trio.testing.MockClock) -> None:
    store = make_store()
    hub = make_hub(store)
    with trio.fail_after(500):
        async with running_owner(store):
            sub = hub.subscribe(0)
            await trio.sleep(100)  # idle with nothing to accept: never stalled
            assert hub.evict_stalled(policy(30)) == 0
            start = trio.current_time()
            await write_all(store, [register(1), register(2), register(3)])
            await trio.sleep(20)
            drain(sub, 1)  # progress at +20 restarts the clock
            await trio.sleep(29.5)
            assert hub.evict_stalled(policy(30)) == 0
            await trio.sleep(0.5)  # exactly 30 s since the last accepted event
            assert hub.evict_stalled(policy(30)) == 1
            assert trio.current_time() - start == 50
    assert sub.end == StreamEnd("evicted", "slow_subscriber", 1)
    assert hub.statistics().evictions == {"slow_subscriber": 1}


async def test_a_snapshot_never_taken_counts_as_stalled(
        autojump_clock: trio.testing.MockClock) -> None:
    store = make_store()
    hub = make_hub(store)
    with trio.fail_after(500):
        async with running_owner(store):
            await store.write(register(1))
            sub = hub.subscribe(0)
            await trio.sleep(29)
            assert hub.evict_stalled(policy(30)) == 0
            taken = sub.take(1)  # handed to the transport, never accepted
            await trio.sleep(1)
            assert hub.evict_stalled(policy(30)) == 1
    assert taken and sub.end is not None and sub.end.kind == "evicted"


async def consume(sub: Subscription, out: list[Event], *, send_delay: float = 0.0,
                  hang_after: int | None = None) -> None:
    """A stream handler: pull batches, "send" each event, acknowledge it, sleep on on_change."""
    wake = trio.Event()

    def changed() -> None:
        wake.set()

    sub.on_change = changed
    while True:
        batch = sub.take(16)
        if not batch:
            if sub.end is not None:
                return
            await wake.wait()
            wake = trio.Event()
            continue
        for item in batch:
            if hang_after is not None and len(out) >= hang_after:
                await trio.sleep_forever()  # a client that stopped reading
            await trio.sleep(send_delay)
            if sub.end is not None:
                return
            sub.delivered(item, trio.current_time())
            out.append(item.event)


async def test_janitor_evicts_only_the_stalled_stream(
        autojump_clock: trio.testing.MockClock) -> None:
    store = make_store()
    hub = make_hub(store)
    fast: list[Event] = []
    slow: list[Event] = []
    with trio.fail_after(1000):
        async with running_owner(store), trio.open_nursery() as nursery:
            await nursery.start(run_slow_consumer_janitor, policy(30.0), hub)
            fast_sub, slow_sub = hub.subscribe(0), hub.subscribe(0)
            nursery.start_soon(consume, fast_sub, fast)
            nursery.start_soon(functools.partial(consume, slow_sub, slow, hang_after=2))
            for i in range(5):
                await store.write(register(i))
            stalled_since = trio.current_time()  # the slow one accepted #2 at once
            await trio.sleep(29.9)
            assert slow_sub.end is None
            await trio.sleep(1.1)  # timeout + the janitor's interval
            assert slow_sub.end is not None and slow_sub.end.reason == "slow_subscriber"
            assert trio.current_time() - stalled_since <= 31
            for i in range(5):
                await store.write(touch(i))
            await trio.sleep(1)
            assert fast_sub.end is None
            nursery.cancel_scope.cancel()
    assert rvs(fast) == list(range(1, 11))
    assert rvs(slow) == [1, 2]
    assert slow_sub.end.resume_rv == 2


async def test_a_stalled_subscriber_does_not_hold_up_another() -> None:
    store = make_store()
    hub = make_hub(store, queue_size=4)
    fast: list[Event] = []
    with trio.fail_after(5):
        async with running_owner(store):
            stalled = hub.subscribe(0)  # nobody ever takes from it
            fast_sub = hub.subscribe(0)
            for i in range(10):
                await store.write(register(i))  # never waits for any subscriber
                fast.extend(d.event for d in drain(fast_sub))
                assert stalled.end is None or i >= 4
    assert rvs(fast) == list(range(1, 11)) and fast_sub.end is None
    assert stalled.end == StreamEnd("evicted", "queue_full", 0)
    assert stalled.pending == 0  # its queue was freed at once


# ---- ending streams, statistics --------------------------------------------------------------


async def test_shutdown_drains_every_committed_event_before_ok() -> None:
    """SPEC §3: shutdown first delivers every committed event (the queue used to be cleared:
    slow streams ended OK with a silent tail missing), including events committed while the
    stream drains; a stream not drained by the deadline ends UNAVAILABLE naming its last
    version, never OK."""
    store = make_store()
    hub = make_hub(store)
    with trio.fail_after(5):
        async with running_owner(store):
            await store.write(register(1))
            slow, stuck, idle = hub.subscribe(0), hub.subscribe(0), hub.subscribe(0)
            drain(idle)
            await write_all(store, [touch(1, v) for v in ("False", "True") * 5])
            drain(idle)
            assert [len(drain(slow, 3)), len(drain(stuck, 4))] == [3, 4]
            hub.close_all()
            assert idle.end == StreamEnd("closed", "server shutting down", 11)  # had it all
            assert slow.end is None and stuck.end is None
            await store.write(touch(1))  # an in-flight write committing during the drain
            got = [d.event.rv for d in drain(slow, 5)]
            assert slow.end is None  # still owes events: no OK yet
            got += [d.event.rv for d in drain(slow)]
    assert got == list(range(4, 13))
    assert slow.end == StreamEnd("closed", "server shutting down", 12)
    assert hub.abort_draining() == 1  # the deadline: only `stuck` is left
    assert stuck.end is not None and stuck.end.kind == "shutdown"
    assert stuck.end.resume_rv == 4
    assert stuck.end.message() == (
        "watch ended (server shutting down before this watch was drained): last delivered "
        "resource version 4; relist and watch again")
    assert stuck.take(10) == [] and hub.statistics().evictions == {}


async def test_close_all_ends_every_stream_closed() -> None:
    store = make_store()
    hub = make_hub(store)
    outs: list[list[Event]] = [[], [], []]
    with trio.fail_after(5):
        async with running_owner(store):
            await store.write(register(1))
            subs = [hub.subscribe(0) for _ in range(3)]
            async with trio.open_nursery() as nursery:
                for sub, out in zip(subs[:2], outs, strict=False):
                    nursery.start_soon(consume, sub, out)
                await store.write(touch(1))
                await trio.testing.wait_all_tasks_blocked()
                assert [len(out) for out in outs] == [2, 2, 0]
                hub.close_all()  # the consumers return by themselves
    assert hub.closed
    for sub in subs[:2]:
        assert sub.end is not None and sub.end.kind == "closed"
        assert sub.take(10) == []
    assert subs[0].end == StreamEnd("closed", "server shutting down", 2)
    # The third has two events it has not taken: it drains them first (SPEC §3).
    assert subs[2].end is None and subs[2].draining
    assert [d.event.rv for d in drain(subs[2])] == [1, 2]
    assert subs[2].end == StreamEnd("closed", "server shutting down", 2)
    with pytest.raises(Unavailable):
        hub.subscribe(0)
    assert hub.statistics().evictions == {}


async def test_end_one_stream_and_unsubscribe() -> None:
    store = make_store()
    hub = make_hub(store)
    a, b = hub.subscribe(0), hub.subscribe(0)
    assert hub.subscription_ids() == sorted([a.id, b.id])
    assert hub.end(a.id, "crashed", "injected")
    assert not hub.end(a.id, "crashed", "again")
    assert not hub.end(12345, "crashed", "unknown id")
    assert a.end == StreamEnd("crashed", "injected", 0)
    assert "relist" in a.end.message()
    hub.unsubscribe(a)
    hub.unsubscribe(a)  # twice is harmless
    hub.unsubscribe(b)
    assert b.end is not None and b.end.kind == "closed"
    assert hub.subscription_ids() == []


async def test_statistics_count_everything() -> None:
    store = make_store()
    hub = make_hub(store, queue_size=1)
    with trio.fail_after(5):
        async with running_owner(store):
            await write_all(store, [register(1), register(2)])
            a, b, c = hub.subscribe(0), hub.subscribe(1), hub.subscribe(2)
            assert len(drain(a)) == 2 and len(drain(b)) == 1
            hub.unsubscribe(a)
            await store.write(touch(1))  # b and c: one queued each
            assert len(drain(b)) == 1
            await store.write(touch(2))  # b has room again; c overflows
            stats = hub.statistics()
    assert stats.active == 2 and stats.subscribed_total == 3
    assert stats.evictions == {"queue_full": 1}
    assert stats.events_delivered == 4  # 2 by a (gone), 2 by b
    assert b.end is None and b.pending == 1
    assert c.end is not None and c.end.resume_rv == 2
