"""Static supervisors beyond the matrix: readiness, ordering, intensity, records, logs, actors."""

from __future__ import annotations

import dataclasses
import logging
import math

import outcome
import pytest
import trio
from supervision_helpers import capture_supervisor_log, running, settle, worker

from deviceapi.otp import (
    Actor,
    ActorCrashed,
    ChildSpec,
    Mailbox,
    Reply,
    RestartIntensityExceeded,
    Supervisor,
    SupervisorStatistics,
)
from deviceapi.testing import FaultInjector, InjectedCrash


async def test_started_means_every_child_is_ready(autojump_clock: trio.abc.Clock) -> None:
    ready: list[str] = []

    def slow(name: str, seconds: float) -> ChildSpec:
        async def start(*, task_status: trio.TaskStatus[None]) -> None:
            await trio.sleep(seconds)  # the scenario: a child that takes a while to get ready
            ready.append(name)
            task_status.started()
            await trio.sleep_forever()

        return ChildSpec(name, start)

    sup = Supervisor("s", [slow("a", 3), slow("b", 1), slow("c", 2)])
    async with running(sup):
        assert ready == ["a", "b", "c"]  # in order, each after the previous was ready
        assert trio.current_time() == 6
        assert sup.statistics().running == ("a", "b", "c")


async def test_cancelling_a_tree_stops_children_in_reverse_order() -> None:
    stopped: list[str] = []

    def child(name: str) -> ChildSpec:
        async def start(*, task_status: trio.TaskStatus[None]) -> None:
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                stopped.append(name)

        return ChildSpec(name, start)

    sup = Supervisor("s", [child(n) for n in "abcd"])
    async with running(sup) as run:
        run.cancel()
        await run.wait_done()
    assert stopped == ["d", "c", "b", "a"]
    assert run.error is None


async def test_a_restart_that_fails_to_start_counts_toward_intensity(
    autojump_clock: trio.abc.Clock,
) -> None:
    """OTP retries a failed restart as another restart: here the retry exceeds 1 in 5 s."""
    faults = FaultInjector()
    sup = Supervisor("s", [ChildSpec(n, worker(n, faults)) for n in "ab"],
                     strategy="one_for_one")
    with capture_supervisor_log() as log:
        async with running(sup) as run:
            faults.crash("b", at="start")  # the restart of b will fail
            faults.crash("b")
            await run.wait_done()
    assert isinstance(run.error, RestartIntensityExceeded)
    assert run.error.child == "b"
    assert isinstance(run.error.__cause__, InjectedCrash)
    assert log.actors("restart") == ["b"]
    assert [e.reason for e in log.select("exit") if e.actor == "b"][-1].startswith(
        "start failed")
    assert log.actors("stop", after=0)[-1] == "a"


async def test_a_failed_restart_is_retried_within_the_intensity(
    autojump_clock: trio.abc.Clock,
) -> None:
    faults = FaultInjector()
    restarted: list[str] = []
    sup = Supervisor("s", [ChildSpec(n, worker(n, faults)) for n in "abc"],
                     strategy="rest_for_one", max_restarts=3, on_restart=restarted.append)
    with capture_supervisor_log() as log:
        async with running(sup) as run:
            faults.crash("c", at="start")  # b and c are restarted; c's first restart fails
            faults.crash("b")
            await log.wait_for("start", "c", count=2)
            await settle()
            assert sup.statistics().running == ("a", "b", "c")
            assert not run.done.is_set()
    # b crashed → restart b, c (c fails to start) → c crashed → restart c
    assert restarted == ["b", "c", "c"]
    assert dict(sup.statistics().restarts) == {"b": 1, "c": 2}


async def test_restarts_spread_beyond_the_period_never_escalate(
    autojump_clock: trio.abc.Clock,
) -> None:
    faults = FaultInjector()
    sup = Supervisor("s", [ChildSpec("a", worker("a", faults))], max_restarts=2, period=10)
    with capture_supervisor_log() as log:
        async with running(sup) as run:
            for n in range(1, 7):
                faults.crash("a")
                await log.wait_for("restart", "a", count=n)
                await trio.sleep(5.1)  # the scenario's pace: 2 restarts per 10 s at most
            assert not run.done.is_set()
            assert sup.statistics().restarts["a"] == 6
            faults.crash("a")  # three within 10 s: 5.1 s ago, now, and this one
            faults_time = trio.current_time()
            await log.wait_for("restart", "a", count=7)
            faults.crash("a")
            await run.wait_done()
    assert isinstance(run.error, RestartIntensityExceeded)
    assert "more than 2 restart(s) in 10 s" in str(run.error)
    assert run.ended_at == faults_time


async def test_statistics_are_a_frozen_record(autojump_clock: trio.abc.Clock) -> None:
    faults = FaultInjector()
    sup = Supervisor("s", [ChildSpec("a", worker("a", faults))], max_restarts=5)
    with capture_supervisor_log() as log:
        async with running(sup):
            for n in (1, 2):
                faults.crash("a")
                await log.wait_for("start", "a", count=n + 1)
            stats = sup.statistics()
    assert isinstance(stats, SupervisorStatistics)
    assert dict(stats.restarts) == {"a": 2}
    assert stats.running == ("a",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.kills = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        stats.restarts["a"] = 0  # type: ignore[index]
    # counters survive the run (metrics are monotonic)
    assert sup.statistics().total_restarts == stats.total_restarts


async def test_every_event_is_a_structured_log_line(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    faults = FaultInjector()
    sup = Supervisor("s", [ChildSpec("a", worker("a", faults))])
    caplog.set_level(logging.DEBUG, logger="deviceapi.supervisor")
    async with running(sup) as run:
        faults.crash("a")
        faults.crash("a", at="start")
        await run.wait_done()
    records = [r for r in caplog.records if r.name == "deviceapi.supervisor"]
    events = [getattr(r, "event", None) for r in records]
    for event in ("start", "exit", "restart", "escalation"):
        assert event in events
    for record in records:
        assert record.supervisor == "s"  # type: ignore[attr-defined]
        assert record.actor == "a"  # type: ignore[attr-defined]
        assert isinstance(record.reason, str) and record.reason  # type: ignore[attr-defined]
    crash = next(r for r in records if getattr(r, "event", "") == "exit")
    assert crash.levelno == logging.WARNING
    assert "InjectedCrash" in crash.reason  # type: ignore[attr-defined]
    escalation = next(r for r in records if getattr(r, "event", "") == "escalation")
    assert escalation.levelno == logging.ERROR


async def test_a_supervisor_runs_again_after_it_returned(autojump_clock: trio.abc.Clock) -> None:
    faults = FaultInjector()
    sup = Supervisor("s", [ChildSpec("a", worker("a", faults), restart="temporary")])
    async with running(sup):
        faults.crash("a")
        await settle()
        assert sup.count_children().specs == 0  # the temporary child is gone...
    async with running(sup):
        assert sup.statistics().running == ("a",)  # ...and back in the next incarnation
        with pytest.raises(RuntimeError, match="already running"):
            await sup.run()


async def test_a_transient_child_that_finishes_leaves_the_supervisor_running(
    autojump_clock: trio.abc.Clock,
) -> None:
    done = trio.Event()

    async def job(*, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        await done.wait()

    sup = Supervisor("s", [ChildSpec("job", job, restart="transient")])
    async with running(sup) as run:
        done.set()
        await settle()
        assert sup.count_children().active == 0
        assert sup.count_children().specs == 1
        assert not run.done.is_set()
    assert sup.statistics().total_restarts == 0


def test_invalid_configurations() -> None:
    async def start(*, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()

    with pytest.raises(ValueError, match="duplicate"):
        Supervisor("s", [ChildSpec("a", start), ChildSpec("a", start)])
    with pytest.raises(ValueError, match="strategy"):
        Supervisor("s", [], strategy="one_for_some")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Supervisor("", [])
    with pytest.raises(ValueError):
        ChildSpec("", start)
    with pytest.raises(ValueError):
        ChildSpec("a", start, restart="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ChildSpec("a", start, shutdown=-1)
    with pytest.raises(ValueError):
        ChildSpec("a", start, shutdown=math.nan)


# -- an Actor under a supervisor ---------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Add:
    n: int
    reply: Reply[int]


@dataclasses.dataclass(frozen=True, slots=True)
class Boom:
    reply: Reply[int]


Msg = Add | Boom


@dataclasses.dataclass
class Total:
    """State that survives restarts: owned by whoever builds the actor, not by the actor."""

    value: int = 0


class Adder(Actor[Msg]):
    def __init__(self, mailbox: Mailbox[Msg], total: Total, faults: FaultInjector) -> None:
        super().__init__("adder", mailbox, faults=faults)
        self.total = total

    async def handle(self, message: Msg) -> None:
        if isinstance(message, Boom):
            raise RuntimeError("boom")
        self.total.value += message.n
        message.reply.resolve(outcome.Value(self.total.value))


async def test_an_actor_child_restarts_over_its_mailbox_and_state(
    autojump_clock: trio.abc.Clock,
) -> None:
    faults = FaultInjector()
    mailbox: Mailbox[Msg] = Mailbox(8)
    total = Total()

    async def start_adder(*, task_status: trio.TaskStatus[None]) -> None:
        await Adder(mailbox, total, faults).run(task_status=task_status)

    sup = Supervisor("s", [ChildSpec("adder", start_adder)], max_restarts=3)
    with capture_supervisor_log() as log:
        async with running(sup):
            assert await mailbox.call(lambda r: Add(1, r), timeout=1) == 1
            with pytest.raises(ActorCrashed):
                await mailbox.call(Boom, timeout=1)
            await log.wait_for("restart", "adder")
            assert await mailbox.call(lambda r: Add(2, r), timeout=1) == 3
            faults.crash("adder")  # now, while it idles on its mailbox
            await log.wait_for("restart", "adder", count=2)
            assert await mailbox.call(lambda r: Add(3, r), timeout=1) == 6
    assert sup.statistics().restarts["adder"] == 2
    crash = log.select("exit")[0]
    assert crash.reason == "RuntimeError('boom')"  # the actor's group of one is unwrapped


async def test_started_may_be_reported_from_a_helper_task(autojump_clock: trio.abc.Clock) -> None:
    crash = trio.Event()
    incarnations: list[int] = []

    async def start(*, task_status: trio.TaskStatus[None]) -> None:
        async def helper() -> None:
            task_status.started()  # a child may hand its task_status to a task of its own

        incarnations.append(len(incarnations))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(helper)
        if len(incarnations) > 1:
            await trio.sleep_forever()
        await crash.wait()
        raise RuntimeError("after a helper reported started")

    sup = Supervisor("s", [ChildSpec("a", start)])
    with capture_supervisor_log() as log:
        async with running(sup) as run:
            assert sup.statistics().running == ("a",)
            crash.set()
            await log.wait_for("start", "a", count=2)
            await settle()
            assert sup.statistics().running == ("a",)
            assert not run.done.is_set()
    assert sup.statistics().restarts["a"] == 1
    assert log.actors("stop")[-1] == "a"  # the shielded incarnation was stopped at the end
