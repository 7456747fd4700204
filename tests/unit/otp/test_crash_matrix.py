"""The crash matrix: which child x when x how x strategy x restart type.

Three workers a, b, c (first, middle, last) under one supervisor; the target child has the
restart type under test, the others are permanent. Every child stops within SHUTDOWN seconds
unless it hangs (HANG > SHUTDOWN, shielded). Faults come from the FaultInjector only.

- start: the target faults before reporting started (initial start);
- steady: all children serve; the target faults (a hang is exposed by a sibling's crash that
  needs the target stopped); a second failure within the period escalates;
- shutdown: the supervisor is cancelled and the target faults while being stopped.
"""

from __future__ import annotations

import collections
import itertools

import pytest
import trio
from supervision_helpers import (
    TIMEOUT,
    SupervisorLog,
    capture_supervisor_log,
    oracle,
    running,
    settle,
    worker,
)

from deviceapi.otp import (
    ChildSpec,
    ChildStartFailed,
    Restart,
    RestartIntensityExceeded,
    Strategy,
    Supervisor,
)
from deviceapi.testing import FaultInjector, InjectedCrash

CHILDREN = ["a", "b", "c"]
WHICH = {"first": "a", "middle": "b", "last": "c"}
PHASES = ("start", "steady", "shutdown")
HOWS = ("raise", "hang", "exit")
STRATEGIES: tuple[Strategy, ...] = ("one_for_one", "one_for_all", "rest_for_one")
RESTARTS: tuple[Restart, ...] = ("permanent", "transient", "temporary")
SHUTDOWN = 1.0
HANG = 10.0

CASES = [
    pytest.param(which, phase, how, strategy, restart,
                 id=f"{which}-{phase}-{how}-{strategy}-{restart}")
    for which, phase, how, strategy, restart in itertools.product(
        WHICH, PHASES, HOWS, STRATEGIES, RESTARTS)
]


class Scenario:
    def __init__(self, target: str, strategy: Strategy, restart: Restart) -> None:
        self.target = target
        self.strategy = strategy
        self.faults = FaultInjector()
        self.restarted: list[str] = []
        self.types: dict[str, Restart] = {
            c: restart if c == target else "permanent" for c in CHILDREN}
        self.sup = Supervisor(
            "sup",
            [ChildSpec(c, worker(c, self.faults), restart=self.types[c], shutdown=SHUTDOWN)
             for c in CHILDREN],
            strategy=strategy,
            on_restart=self.restarted.append,
        )
        index = CHILDREN.index(target)
        self.before, self.after = CHILDREN[:index], CHILDREN[index + 1:]


@pytest.mark.parametrize(("which", "phase", "how", "strategy", "restart"), CASES)
async def test_crash_matrix(which: str, phase: str, how: str, strategy: Strategy,
                            restart: Restart, autojump_clock: trio.abc.Clock) -> None:
    scenario = Scenario(WHICH[which], strategy, restart)
    with capture_supervisor_log() as log:
        if phase == "start":
            await during_start(scenario, log, how)
        elif phase == "steady":
            await in_steady_state(scenario, log, how)
        else:
            await during_shutdown(scenario, log, how)


async def during_start(s: Scenario, log: SupervisorLog, how: str) -> None:
    t0 = trio.current_time()
    if how == "raise":
        s.faults.crash(s.target, at="start")
        with trio.fail_after(TIMEOUT), pytest.raises(ChildStartFailed) as info:
            await s.sup.run()
        assert (info.value.supervisor, info.value.child) == ("sup", s.target)
        assert isinstance(info.value.__cause__, InjectedCrash)
        assert "'sup'" in str(info.value) and f"'{s.target}'" in str(info.value)
        # the children before it started, then stopped in reverse; none after it started
        assert log.actors("start") == s.before
        assert log.actors("stop") == s.before[::-1]
        assert log.actors("escalation") == [s.target]
    elif how == "exit":
        # returning before started is OTP's ignore: not a failure, the others run
        s.faults.exit(s.target, at="start")
        async with running(s.sup):
            await settle()
            others = [c for c in CHILDREN if c != s.target]
            assert s.sup.statistics().running == tuple(others)
            assert log.actors("ignore") == [s.target]
            mark = log.mark()
        assert log.actors("stop", after=mark) == others[::-1]
    else:
        # the parent gives up on the start after SHUTDOWN s, but a child that ignores
        # cancellation cannot be preempted: the supervisor ends when the hang does, no later,
        # having stopped in reverse order whatever it had started
        s.faults.hang(s.target, HANG, at="start")
        with trio.fail_after(TIMEOUT), trio.move_on_after(SHUTDOWN) as parent:
            await s.sup.run()
        assert parent.cancelled_caught
        assert trio.current_time() == t0 + HANG
        started = log.actors("start")
        assert started[: len(s.before)] == s.before
        assert not set(started) & set(s.after)
        assert log.actors("stop") == started[::-1]
    assert s.restarted == []
    assert s.sup.statistics().total_restarts == 0
    assert s.faults.pending(s.target) == 0


async def in_steady_state(s: Scenario, log: SupervisorLog, how: str) -> None:
    async with running(s.sup) as run:
        t0 = trio.current_time()
        mark = log.mark()
        if how == "hang":
            # the target stops responding; a sibling's crash then needs it stopped (or not)
            s.faults.hang(s.target, HANG)
            await settle()
            trigger, kind = ("c" if s.target == "a" else "a"), "crash"
            s.faults.crash(trigger)
        elif how == "raise":
            trigger, kind = s.target, "crash"
            s.faults.crash(trigger)
        else:
            trigger, kind = s.target, "normal"
            s.faults.exit(trigger)
        plan = oracle(s.strategy, CHILDREN, s.types, trigger, kind)
        await log.wait_for("exit", trigger)
        for child in plan.restart:
            await log.wait_for("restart", child)
        await settle()

        assert log.actors("stop", after=mark) == list(plan.stop)
        assert s.restarted == list(plan.restart)
        assert log.actors("restart", after=mark) == list(plan.restart)
        assert log.actors("start", after=mark) == list(plan.restart)
        stats = s.sup.statistics()
        assert dict(stats.restarts) == dict(collections.Counter(plan.restart))
        gone = set(plan.remove) | (set() if plan.restart else {trigger})
        assert stats.running == tuple(c for c in CHILDREN if c not in gone)
        if s.types[s.target] == "temporary" and s.target in {trigger, *plan.stop}:
            assert s.target not in s.restarted  # temporary children never come back
            assert s.sup.count_children().specs == 2
        if s.types[s.target] == "transient" and kind == "normal":
            assert s.restarted == []  # transient children do not come back from a normal exit

        killed = how == "hang" and s.target in plan.stop
        assert log.actors("kill") == ([s.target] if killed else [])
        assert stats.kills == int(killed)
        # a hung sibling delays the restart by its shutdown timeout, never by the hang
        restart_times = {e.time for e in log.select("restart", after=mark)}
        assert restart_times <= {t0 + (SHUTDOWN if killed else 0.0)}

        if not plan.restart:
            assert not run.done.is_set()
            return
        # a second failure within the period exceeds the intensity (1 restart in 5 s)
        mark = log.mark()
        running_now = list(s.sup.statistics().running)
        if kind == "crash":
            s.faults.crash(trigger)
        else:
            s.faults.exit(trigger)
        await run.wait_done()
    assert isinstance(run.error, RestartIntensityExceeded)
    assert (run.error.supervisor, run.error.child) == ("sup", trigger)
    assert log.actors("escalation", after=mark) == [trigger]
    assert log.actors("stop", after=mark) == [c for c in running_now if c != trigger][::-1]
    assert s.restarted == list(plan.restart)  # no restart once the intensity is exceeded
    if kind == "crash":
        assert isinstance(run.error.__cause__, InjectedCrash)


async def during_shutdown(s: Scenario, log: SupervisorLog, how: str) -> None:
    if how == "raise":
        s.faults.crash(s.target, at="stop")
    elif how == "exit":
        s.faults.exit(s.target, at="stop")
    else:
        s.faults.hang(s.target, HANG, at="stop")
    async with running(s.sup) as run:
        t0 = trio.current_time()
        mark = log.mark()
        run.cancel()
        await run.wait_done()
    assert run.error is None  # a stop ends with the cancellation, never an escalation
    stops = log.select("stop", after=mark)
    assert [e.actor for e in stops] == CHILDREN[::-1]
    assert s.restarted == []
    assert log.actors("escalation") == []
    when = {e.actor: e.time for e in stops}
    exits = {e.actor: e.reason for e in log.select("exit", after=mark)}
    if how == "hang":
        # stopped at t0, abandoned after its shutdown timeout; the next (earlier) sibling is
        # stopped then, not after the hang; the supervisor returns once the hang is over
        assert log.actors("kill") == [s.target]
        assert s.sup.statistics().kills == 1
        assert all(when[c] == t0 for c in [*s.after, s.target])
        assert all(when[c] == t0 + SHUTDOWN for c in s.before)
        assert run.ended_at == t0 + HANG
        assert exits[s.target].startswith("killed child finished")
    else:
        assert log.actors("kill") == []
        assert set(when.values()) == {t0}
        assert run.ended_at == t0
        if how == "raise":
            assert exits[s.target].startswith("shutdown error: InjectedCrash")
        else:
            assert exits[s.target] == "shutdown"
    assert s.faults.pending(s.target) == 0
