"""Trees: supervisors under supervisors, escalation through levels, and the root's failure."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import trio
from supervision_helpers import TIMEOUT, capture_supervisor_log, running, settle, worker

from deviceapi.otp import (
    ChildSpec,
    DynamicSupervisor,
    RestartIntensityExceeded,
    Supervisor,
    TreeFailed,
    run_root,
    supervisor_spec,
)
from deviceapi.testing import FaultInjector, InjectedCrash


def doomed(name: str) -> ChildSpec:
    """A worker that crashes as soon as it is running, every time."""

    async def start(*, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        await trio.lowlevel.checkpoint()
        raise InjectedCrash(f"{name} always crashes")

    return ChildSpec(name, start)


async def test_escalation_two_levels_deep_ends_the_tree_with_a_clear_error(
    autojump_clock: trio.abc.Clock,
) -> None:
    faults = FaultInjector()
    mid = Supervisor("mid", [ChildSpec("steady", worker("steady", faults)), doomed("leaf")])
    root = Supervisor(
        "root", [ChildSpec("sibling", worker("sibling", faults)), supervisor_spec(mid)]
    )
    with capture_supervisor_log() as log, trio.fail_after(TIMEOUT), \
            pytest.raises(TreeFailed) as info:
        await run_root(root)
    failure = info.value
    assert failure.path == ("root", "mid", "leaf")
    assert isinstance(failure.root_cause, InjectedCrash)
    message = str(failure)
    assert message == (
        "supervision tree 'root' failed along root -> mid -> leaf: "
        "InjectedCrash('leaf always crashes') (supervisor 'root' gave up: more than 1 "
        "restart(s) in 5 s; last failure: child 'mid' crashed: "
        "RestartIntensityExceeded(supervisor='mid', child='leaf'))"
    )
    assert isinstance(failure.__cause__, RestartIntensityExceeded)
    assert failure.__cause__.child == "mid"
    # mid gave up twice (each incarnation: a restart, then too many); root restarted it once
    assert [(e.supervisor, e.actor) for e in log.select("escalation")] == [
        ("mid", "leaf"), ("mid", "leaf"), ("root", "mid")]
    assert [(e.supervisor, e.actor) for e in log.select("restart")] == [
        ("mid", "leaf"), ("root", "mid"), ("mid", "leaf")]
    # root stopped what it still ran, and the whole tree is down
    assert log.select("stop")[-1].actor == "sibling"
    assert root.statistics().running == () and mid.statistics().running == ()


async def test_a_subtree_stops_depth_first_in_reverse_order() -> None:
    stopped: list[str] = []

    def child(name: str) -> ChildSpec:
        async def start(*, task_status: trio.TaskStatus[None]) -> None:
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                stopped.append(name)

        return ChildSpec(name, start)

    inner = Supervisor("inner", [child("i1"), child("i2")])
    root = Supervisor("root", [child("r1"), supervisor_spec(inner), child("r3")])
    async with running(root):
        assert inner.statistics().running == ("i1", "i2")
    assert stopped == ["r3", "i2", "i1", "r1"]
    spec = supervisor_spec(inner)
    assert (spec.type, spec.shutdown, spec.id) == ("supervisor", math.inf, "inner")


async def test_a_restarted_dynamic_subtree_starts_empty(autojump_clock: trio.abc.Clock) -> None:
    faults = FaultInjector()
    watchers = DynamicSupervisor("watchers", max_restarts=0)
    root = Supervisor("root", [supervisor_spec(watchers)])
    with capture_supervisor_log() as log:
        async with running(root):
            await watchers.start_child("w", worker("w", faults))
            faults.crash("w")  # temporary: forgotten, nothing escalates
            await settle()
            await watchers.start_child("w", worker("w", faults))
            await watchers.start_child("x", worker("x", faults))
            assert watchers.count_children().active == 2
            faults.crash("x", at="start")
            faults.crash("x")  # fine: temporary children are never restarted
            await settle()
            assert watchers.statistics().running == ("w",)
    assert log.actors("escalation") == []


async def test_the_root_failing_to_start_is_a_tree_failure() -> None:
    faults = FaultInjector()
    faults.crash("db", at="start")
    root = Supervisor("root", [ChildSpec("db", worker("db", faults))])
    with trio.fail_after(TIMEOUT), pytest.raises(TreeFailed) as info:
        await run_root(root)
    assert info.value.path == ("root", "db")
    assert "could not start child 'db'" in str(info.value)


def test_the_program_ends_with_a_clear_error_not_a_hang() -> None:
    """run_tree as a whole program: the root's failure exits with status 1 and one message."""
    script = textwrap.dedent(
        """
        import trio
        from deviceapi.otp import ChildSpec, Supervisor, run_tree, supervisor_spec

        async def flaky(*, task_status):
            task_status.started()
            await trio.lowlevel.checkpoint()
            raise OSError("device vanished")

        core = Supervisor("core", [ChildSpec("cache", flaky)])
        run_tree(Supervisor("root", [supervisor_spec(core)], max_restarts=0))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1
    last_line = done.stderr.strip().splitlines()[-1]
    assert last_line.startswith("deviceapi: supervision tree 'root' failed along "
                                "root -> core -> cache: OSError('device vanished')")
