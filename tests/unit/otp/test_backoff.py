"""Restart backoff as a child-spec field: the supervisor waits, counts, and keeps supervising.

A child whose failures are expected to last (NVML without a driver) is restarted after a delay
that doubles per quick failure; the restart is counted when decided (intensity, on_restart),
siblings are handled while it waits, a run longer than ``reset_after`` starts the sequence
over, and stopping the supervisor does not wait for a pending delay. Virtual time throughout.
"""

from __future__ import annotations

import itertools

import pytest
import trio
from supervision_helpers import TIMEOUT, capture_supervisor_log, running, settle, worker

from deviceapi.otp import Backoff, ChildSpec, Supervisor
from deviceapi.testing import FaultInjector

BACKOFF = Backoff(initial=1.0, maximum=16.0, factor=2.0, reset_after=30.0)


def failing(runs: list[float], *, lives: float = 0.0) -> ChildSpec:
    """Ready at once, then fails after ``lives`` seconds (recording when each run started)."""

    async def start(*, task_status: trio.TaskStatus[None]) -> None:
        runs.append(trio.current_time())
        task_status.started()
        await trio.sleep(lives)
        raise RuntimeError("no driver")

    return ChildSpec("nvml", start, backoff=BACKOFF)


def test_delays_double_up_to_the_maximum() -> None:
    assert [BACKOFF.delay(n) for n in range(6)] == [1, 2, 4, 8, 16, 16]
    with pytest.raises(ValueError):
        Backoff(initial=2.0, maximum=1.0)


async def test_restarts_wait_the_backoff_and_are_counted(autojump_clock: trio.abc.Clock) -> None:
    runs: list[float] = []
    counted: list[str] = []
    sup = Supervisor("providers", [failing(runs)], max_restarts=5, period=30.0,
                     on_restart=counted.append)
    with trio.fail_after(TIMEOUT), capture_supervisor_log() as log:
        async with running(sup) as run:
            await log.wait_for("start", "nvml", count=6)
            await settle()
            assert run.error is None  # delays 1+2+4+8+16: never 6 restarts in 30 s
    gaps = [b - a for a, b in itertools.pairwise(runs)]
    assert gaps == [1, 2, 4, 8, 16]
    # counted when decided: the sixth run crashed too, and its restart is counted though it
    # was still waiting its delay when the test stopped the supervisor
    assert counted == ["nvml"] * 6
    assert sup.statistics().restarts == {"nvml": 6}


async def test_the_intensity_sees_backoff_restarts(autojump_clock: trio.abc.Clock) -> None:
    """Delays too short for the intensity: the supervisor gives up as for any restarts."""
    runs: list[float] = []
    spec = ChildSpec("nvml", failing(runs).start, backoff=Backoff(initial=1.0, maximum=1.0))
    sup = Supervisor("providers", [spec], max_restarts=5, period=30.0)
    with trio.fail_after(TIMEOUT):
        async with running(sup) as run:
            await run.wait_done()
    assert run.error is not None and "more than 5 restart(s) in 30 s" in str(run.error)
    assert len(runs) == 6


async def test_a_long_run_starts_the_sequence_over(autojump_clock: trio.abc.Clock) -> None:
    runs: list[float] = []
    sup = Supervisor("providers", [failing(runs, lives=31.0)], max_restarts=5, period=30.0)
    with trio.fail_after(TIMEOUT * 3), capture_supervisor_log() as log:
        async with running(sup):
            await log.wait_for("start", "nvml", count=4)
    gaps = [b - a for a, b in itertools.pairwise(runs)]
    assert gaps == [32, 32, 32]  # each ran 31 s, so each restart waited 1 s again


async def test_siblings_are_supervised_while_a_restart_waits(
    autojump_clock: trio.abc.Clock,
) -> None:
    runs: list[float] = []
    faults = FaultInjector()
    long = Backoff(initial=100.0, maximum=100.0)
    slow = ChildSpec("nvml", failing(runs).start, backoff=long)
    sup = Supervisor("providers", [slow, ChildSpec("simulator", worker("simulator", faults))],
                     max_restarts=5, period=30.0)
    with trio.fail_after(TIMEOUT * 2), capture_supervisor_log() as log:
        async with running(sup):
            await settle()  # nvml crashed at once; its restart waits 100 s
            assert sup.statistics().running == ("simulator",)
            faults.crash("simulator")
            entry = await log.wait_for("restart", "simulator")
            assert entry.time < 1  # not held up behind nvml's delay
            await log.wait_for("start", "nvml", count=2)
            assert runs[1] - runs[0] == 100


async def test_stopping_does_not_wait_for_a_pending_restart(
    autojump_clock: trio.abc.Clock,
) -> None:
    runs: list[float] = []
    spec = ChildSpec("nvml", failing(runs).start, backoff=Backoff(initial=1000.0,
                                                                   maximum=1000.0))
    sup = Supervisor("providers", [spec], max_restarts=5, period=30.0)
    with trio.fail_after(TIMEOUT):
        async with running(sup) as run:
            await settle()
            started = trio.current_time()
        await run.wait_done()
        assert trio.current_time() - started < 1
    assert len(runs) == 1
