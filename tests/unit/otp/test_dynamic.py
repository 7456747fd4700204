"""DynamicSupervisor: many children of one kind, started and terminated while it runs."""

from __future__ import annotations

import pytest
import trio
from supervision_helpers import capture_supervisor_log, running, settle, worker

from deviceapi.otp import (
    ChildStartFailed,
    DynamicSupervisor,
    RestartIntensityExceeded,
    SupervisorNotRunning,
    TooManyChildren,
)
from deviceapi.testing import FaultInjector, InjectedCrash


async def test_start_count_and_terminate_children(autojump_clock: trio.abc.Clock) -> None:
    faults = FaultInjector()
    sup = DynamicSupervisor("watchers", max_children=8)
    async with running(sup):
        for n in range(5):
            assert await sup.start_child(f"w{n}", worker(f"w{n}", faults))
        counts = sup.count_children()
        assert (counts.specs, counts.active, counts.workers, counts.supervisors) == (5, 5, 5, 0)
        assert await sup.terminate_child("w2")
        assert not await sup.terminate_child("w2")
        assert sup.statistics().running == ("w0", "w1", "w3", "w4")
        assert await sup.start_child("w2", worker("w2", faults))  # the id is free again
        with pytest.raises(ValueError, match="already has"):
            await sup.start_child("w2", worker("w2", faults))


async def test_temporary_children_are_forgotten_when_they_end(
    autojump_clock: trio.abc.Clock,
) -> None:
    faults = FaultInjector()
    sup = DynamicSupervisor("watchers", restart="temporary")
    async with running(sup) as run:
        await sup.start_child("a", worker("a", faults))
        await sup.start_child("b", worker("b", faults))
        faults.crash("a")
        faults.exit("b")
        await settle()
        assert sup.count_children().specs == 0
        assert not run.done.is_set()
    assert sup.statistics().total_restarts == 0


async def test_transient_children_come_back_only_from_a_crash(
    autojump_clock: trio.abc.Clock,
) -> None:
    faults = FaultInjector()
    restarted: list[str] = []
    sup = DynamicSupervisor("sessions", restart="transient", on_restart=restarted.append)
    with capture_supervisor_log() as log:
        async with running(sup):
            await sup.start_child("a", worker("a", faults))
            await sup.start_child("b", worker("b", faults))
            faults.crash("a")
            await log.wait_for("restart", "a")
            faults.exit("b")
            await settle()
            assert sup.statistics().running == ("a",)
    assert restarted == ["a"]


async def test_max_children_bounds_the_supervisor(autojump_clock: trio.abc.Clock) -> None:
    faults = FaultInjector()
    sup = DynamicSupervisor("watchers", max_children=2)
    async with running(sup):
        await sup.start_child("a", worker("a", faults))
        await sup.start_child("b", worker("b", faults))
        with pytest.raises(TooManyChildren):
            await sup.start_child("c", worker("c", faults))
        await sup.terminate_child("a")
        await sup.start_child("c", worker("c", faults))


async def test_a_failed_start_is_the_callers_error_not_a_restart(
    autojump_clock: trio.abc.Clock,
) -> None:
    faults = FaultInjector()
    sup = DynamicSupervisor("watchers", restart="transient", max_restarts=0)
    async with running(sup) as run:
        faults.crash("a", at="start")
        with pytest.raises(ChildStartFailed) as info:
            await sup.start_child("a", worker("a", faults))
        assert (info.value.supervisor, info.value.child) == ("watchers", "a")
        assert isinstance(info.value.__cause__, InjectedCrash)
        faults.exit("b", at="start")
        assert not await sup.start_child("b", worker("b", faults))  # ignore
        await settle()
        assert sup.count_children().specs == 0
        assert not run.done.is_set()


async def test_escalation_stops_children_in_reverse_start_order(
    autojump_clock: trio.abc.Clock,
) -> None:
    faults = FaultInjector()
    sup = DynamicSupervisor("sessions", restart="transient")
    with capture_supervisor_log() as log:
        async with running(sup) as run:
            for name in ("p", "q", "r", "s"):
                await sup.start_child(name, worker(name, faults))
            faults.crash("q")
            await log.wait_for("restart", "q")
            mark = log.mark()
            faults.crash("r")
            await run.wait_done()
    assert isinstance(run.error, RestartIntensityExceeded)
    assert run.error.child == "r"
    # q was restarted, so it started last: reverse start order is q, s, p
    assert log.actors("stop", after=mark) == ["q", "s", "p"]


async def test_terminating_a_hung_child_kills_it_after_its_shutdown(
    autojump_clock: trio.abc.Clock,
) -> None:
    faults = FaultInjector()
    sup = DynamicSupervisor("watchers", shutdown=2.0)
    with capture_supervisor_log() as log:
        async with running(sup):
            await sup.start_child("a", worker("a", faults))
            faults.hang("a", 60)
            await settle()
            t0 = trio.current_time()
            assert await sup.terminate_child("a")
            assert trio.current_time() == t0 + 2.0
            assert log.actors("kill") == ["a"]
            assert sup.statistics().kills == 1
            assert sup.count_children().specs == 0


async def test_cancelling_start_child_cancels_the_start(autojump_clock: trio.abc.Clock) -> None:
    async def never_ready(*, task_status: trio.TaskStatus[None]) -> None:
        await trio.sleep_forever()

    sup = DynamicSupervisor("watchers")
    async with running(sup):
        with trio.move_on_after(1):
            await sup.start_child("slow", never_ready)
        assert sup.count_children().specs == 0


async def test_a_stopped_supervisor_refuses_children() -> None:
    sup = DynamicSupervisor("watchers")
    with pytest.raises(SupervisorNotRunning):
        await sup.start_child("a", worker("a", FaultInjector()))
    with pytest.raises(SupervisorNotRunning):
        await sup.terminate_child("a")


async def test_many_children_stop_cleanly(autojump_clock: trio.abc.Clock) -> None:
    faults = FaultInjector()
    sup = DynamicSupervisor("watchers", max_children=300)
    with capture_supervisor_log() as log:
        async with running(sup) as run:
            names = [f"w{n:03}" for n in range(256)]
            for name in names:
                await sup.start_child(name, worker(name, faults))
            mark = log.mark()
            run.cancel()
            await run.wait_done()
    assert log.actors("stop", after=mark) == names[::-1]


def test_dynamic_children_are_transient_or_temporary() -> None:
    with pytest.raises(ValueError):
        DynamicSupervisor("x", restart="permanent")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        DynamicSupervisor("x", max_children=0)
