"""Shared test harness: a log handler that timestamps supervisor events in trio time and lets a
test wait for them (no sleeps), plain injectable workers, and a runner for a supervisor."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import trio
import trio.testing

from deviceapi.otp import DynamicSupervisor, Restart, RestartPlan, StartFn, Supervisor
from deviceapi.testing import FaultInjector

TIMEOUT = 120.0  # virtual seconds; a test that reaches it is hung, not slow


@dataclasses.dataclass(frozen=True, slots=True)
class Entry:
    time: float
    event: str
    supervisor: str
    actor: str
    reason: str


class SupervisorLog(logging.Handler):
    """Collects the structured lines of ``deviceapi.supervisor`` and wakes waiters."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.entries: list[Entry] = []
        self._changed = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.entries.append(
            Entry(
                trio.current_time(),
                getattr(record, "event", ""),
                getattr(record, "supervisor", ""),
                getattr(record, "actor", ""),
                getattr(record, "reason", ""),
            )
        )
        self._changed.set()

    def mark(self) -> int:
        """A bookmark: pass it as ``after`` to look only at lines logged from now on."""
        return len(self.entries)

    def select(self, event: str, *, supervisor: str | None = None, after: int = 0) -> list[Entry]:
        return [
            e for e in self.entries[after:]
            if e.event == event and (supervisor is None or e.supervisor == supervisor)
        ]

    def actors(self, event: str, *, supervisor: str | None = None, after: int = 0) -> list[str]:
        return [e.actor for e in self.select(event, supervisor=supervisor, after=after)]

    async def wait_for(self, event: str, actor: str | None = None, *, count: int = 1,
                       supervisor: str | None = None) -> Entry:
        """Wait until the ``count``-th matching line was logged; return it."""
        while True:
            found = [e for e in self.select(event, supervisor=supervisor)
                     if actor is None or e.actor == actor]
            if len(found) >= count:
                return found[count - 1]
            self._changed = trio.Event()
            await self._changed.wait()


@contextmanager
def capture_supervisor_log() -> Iterator[SupervisorLog]:
    logger = logging.getLogger("deviceapi.supervisor")
    handler = SupervisorLog()
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def settle() -> None:
    """Wait until every task is blocked: the supervisor has acted on everything it was told.

    Not a sleep: with autojump_clock the clock only jumps after this returns (trio wakes these
    waiters before its own autojump).
    """
    await trio.testing.wait_all_tasks_blocked()


def worker(name: str, faults: FaultInjector) -> StartFn:
    """A child that is ready at once and then idles: every fault comes from ``faults``."""

    async def body(*, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        await trio.sleep_forever()

    return faults.wrap(name, body)


class _Status:
    def __init__(self, run: Run, outer: trio.TaskStatus[None]) -> None:
        self._run, self._outer = run, outer

    def started(self, value: None = None) -> None:
        self._run.started = True
        self._outer.started()


@dataclasses.dataclass
class Run:
    """A supervisor running under a test: its outcome once it ended."""

    scope: trio.CancelScope = dataclasses.field(default_factory=trio.CancelScope)
    done: trio.Event = dataclasses.field(default_factory=trio.Event)
    started: bool = False
    error: Exception | None = None
    ended_at: float | None = None

    def cancel(self) -> None:
        self.scope.cancel()

    async def wait_done(self) -> None:
        await self.done.wait()


@asynccontextmanager
async def running(sup: Supervisor | DynamicSupervisor) -> AsyncIterator[Run]:
    """Start ``sup`` (start failures raise here) and yield a handle; leaving cancels it."""
    run = Run()

    async def runner(*, task_status: trio.TaskStatus[None]) -> None:
        try:
            with run.scope:
                await sup.run(task_status=_Status(run, task_status))
        except Exception as exc:
            if not run.started:
                raise
            run.error = exc
        finally:
            run.ended_at = trio.current_time()
            run.done.set()

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(runner)
            try:
                yield run
            finally:
                run.cancel()


def oracle(strategy: str, ids: list[str], types: dict[str, Restart], failed: str,
           exit: str) -> RestartPlan:
    """OTP's restart rules restated as plainly as possible (independent of _strategy.py)."""
    restarted = types[failed] == "permanent" or (types[failed] == "transient" and exit == "crash")
    if not restarted:
        return RestartPlan((), (), (failed,) if types[failed] == "temporary" else ())
    position = ids.index(failed)
    group = {
        "one_for_one": [failed],
        "one_for_all": ids,
        "rest_for_one": ids[position:],
    }[strategy]
    stop = [cid for cid in reversed(group) if cid != failed]
    start = [cid for cid in group if cid == failed or types[cid] != "temporary"]
    remove = [cid for cid in group if cid != failed and types[cid] == "temporary"]
    return RestartPlan(tuple(stop), tuple(start), tuple(remove))
