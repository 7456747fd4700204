"""OTP-style supervisors on trio: start children in order, restart them by strategy, escalate.

Each child incarnation runs in the supervisor's nursery inside its own cancel scope. The
supervisor's task is the only one that decides: children report their exits to it, and it
applies the pure plan from ``_strategy`` (which siblings to stop, which children to start again)
within the restart intensity of ``_intensity``. Past the intensity it stops every child in
reverse start order and raises :class:`RestartIntensityExceeded` (escalation), so the parent
decides, exactly as OTP.

Mapping OTP onto trio:

- "started" is ``nursery.start``: ``run`` reports started once every child has (``start_link``);
  a child that returns before reporting started is OTP's ``ignore``;
- a child *exits normally* by returning and *crashes* by raising an ``Exception`` (exception
  groups included); other BaseExceptions (KeyboardInterrupt) are not child failures and take the
  supervisor down with them;
- stopping a child cancels its scope and waits up to ``ChildSpec.shutdown`` seconds. trio cannot
  preempt a task that ignores cancellation (a shielded section, a thread that does not return),
  so past the timeout the child is *killed* the only way trio allows: the supervisor stops waiting
  for it, logs and counts the kill, and carries on (restart, next sibling, escalation). The
  abandoned task stays inside the supervisor's nursery, already cancelled, so it can only finish;
  ``run`` returns once it has (structured concurrency: nothing outlives its supervisor);
- a supervisor that is cancelled stops its children in reverse start order under a shield (each
  bounded by its own shutdown timeout), then lets Cancelled propagate.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import trio

from ._intensity import Intensity, RestartWindow
from ._spec import DEFAULT_SHUTDOWN, ChildSpec, ChildType, StartFn
from ._strategy import STRATEGIES, ExitKind, RestartPlan, Strategy, plan_restart

log = logging.getLogger("deviceapi.supervisor")

OnRestart = Callable[[str], None]


class SupervisorError(Exception):
    """A supervisor gave up because of one of its children; names both."""

    def __init__(self, message: str, *, supervisor: str, child: str) -> None:
        super().__init__(message)
        self.supervisor = supervisor
        self.child = child


class ChildStartFailed(SupervisorError):
    """A child raised before reporting started (OTP's ``{error, {shutdown, ...}}``)."""


class RestartIntensityExceeded(SupervisorError):
    """Too many restarts within the period: the supervisor stopped everything and escalates."""


class SupervisorNotRunning(RuntimeError):
    """``start_child`` / ``terminate_child`` on a supervisor that is not running (or stopping)."""


class TooManyChildren(RuntimeError):
    """A dynamic supervisor is at its ``max_children`` bound."""


@dataclasses.dataclass(frozen=True, slots=True)
class SupervisorStatistics:
    """Counters of one supervisor; ``restarts`` and ``kills`` accumulate across its restarts."""

    name: str
    running: tuple[str, ...]
    restarts: Mapping[str, int]
    total_restarts: int
    kills: int


@dataclasses.dataclass(frozen=True, slots=True)
class ChildCounts:
    """OTP's ``count_children``: specs known, children running, and running ones by type."""

    specs: int
    active: int
    supervisors: int
    workers: int


def unwrap(exc: BaseException) -> BaseException:
    """The single leaf of nested one-exception groups (strict nurseries wrap every crash)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def describe(exc: BaseException | None) -> str:
    """A one-line reason for logs and error messages.

    A child supervisor's failure is summarised (who gave up on whom), so that messages stay one
    level deep; the full chain is in ``__cause__`` (and in :class:`TreeFailed` at the root).
    """
    if exc is None:
        return "normal"
    exc = unwrap(exc)
    if isinstance(exc, SupervisorError):
        return f"{type(exc).__name__}(supervisor={exc.supervisor!r}, child={exc.child!r})"
    if isinstance(exc, BaseExceptionGroup):
        leaves = ", ".join(describe(leaf) for leaf in exc.exceptions)
        return f"{type(exc).__name__}[{leaves}]"
    return repr(exc)


class _Incarnation:
    """One run of one child: its cancel scope, how it ended, and who already dealt with that."""

    __slots__ = (
        "born", "done", "error", "handled", "killed", "scope", "spec", "started", "stopping",
        "task",
    )

    def __init__(self, spec: ChildSpec) -> None:
        self.spec = spec
        self.task: trio.lowlevel.Task | None = None  # the task that runs it
        self.scope = trio.CancelScope()
        self.done = trio.Event()
        self.started = False
        self.stopping = False  # the supervisor cancelled it: its exit is not a failure
        self.handled = False  # its exit was acted on (or made moot by a stop)
        self.killed = False  # it outlived its shutdown timeout and was abandoned
        self.error: BaseException | None = None
        self.born = trio.current_time()  # for the child's backoff: did it run long?


class _StartWatch(trio.TaskStatus[None]):
    """Forwards ``started``; from then on only the supervisor may cancel the child.

    Before ``started`` the child runs under its starter's cancellation (a start can always be
    abandoned); after it, the shield keeps a cancelled parent from reaching the children all at
    once, so the supervisor can stop them one by one in reverse start order. When the starter
    was cancelled meanwhile, trio leaves the child where it is to be cancelled: then it never
    counts as started and must not be shielded.
    """

    __slots__ = ("_inc", "_nursery", "_outer", "reported")

    def __init__(
        self, inc: _Incarnation, outer: trio.TaskStatus[bool], nursery: trio.Nursery
    ) -> None:
        self._inc = inc
        self._outer = outer
        self._nursery = nursery
        self.reported = False

    def started(self, value: None = None) -> None:
        self._outer.started(True)
        self.reported = True
        task = self._inc.task
        if task is not None and task.parent_nursery is self._nursery:
            self._inc.scope.shield = True
            self._inc.started = True


class _SupervisorBase:
    """What static and dynamic supervisors share: running, stopping, restarting, escalating."""

    def __init__(
        self, name: str, *, max_restarts: int, period: float, on_restart: OnRestart | None
    ) -> None:
        if not name:
            raise ValueError("a supervisor needs a non-empty name")
        self.name = name
        self.intensity = Intensity(max_restarts, period)
        self._on_restart = on_restart
        self._restart_counts: collections.Counter[str] = collections.Counter()
        #: Per child with a backoff: quick failures in a row (the next delay's exponent).
        self._quick_failures: collections.Counter[str] = collections.Counter()
        #: Restarts waiting out a backoff; cancelled when the supervisor stops.
        self._delays: set[trio.CancelScope] = set()
        self._kills = 0
        self._nursery: trio.Nursery | None = None
        self._closing = False
        self._specs: dict[str, ChildSpec] = {}
        self._running: dict[str, _Incarnation] = {}
        self._exits: collections.deque[_Incarnation] = collections.deque()
        self._wakeup = trio.Event()
        self._window = RestartWindow(self.intensity)

    # -- hooks for the two kinds -------------------------------------------------------------

    def _initial_specs(self) -> dict[str, ChildSpec]:
        raise NotImplementedError

    async def _start_initial(self) -> SupervisorError | None:
        raise NotImplementedError

    def _plan(self, failed: str, exit: ExitKind) -> RestartPlan:
        raise NotImplementedError

    def _in_start_order(self) -> list[_Incarnation]:
        """Running (and starting) children in start order: stopping goes the other way."""
        return list(self._running.values())

    # -- public ------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._nursery is not None and not self._closing

    def statistics(self) -> SupervisorStatistics:
        return SupervisorStatistics(
            name=self.name,
            running=tuple(inc.spec.id for inc in self._in_start_order() if inc.started),
            restarts=types.MappingProxyType(dict(self._restart_counts)),
            total_restarts=sum(self._restart_counts.values()),
            kills=self._kills,
        )

    def count_children(self) -> ChildCounts:
        active = [inc for inc in self._running.values() if inc.started]
        supervisors = sum(1 for inc in active if inc.spec.type == "supervisor")
        return ChildCounts(
            specs=len(self._specs),
            active=len(active),
            supervisors=supervisors,
            workers=len(active) - supervisors,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run one incarnation: start the children, supervise them until cancelled or escalation.

        Raises :class:`ChildStartFailed` (before reporting started) or
        :class:`RestartIntensityExceeded` after stopping every child in reverse start order. On
        cancellation the children are stopped the same way (shielded) and Cancelled propagates.
        The same object can be run again after it returned (a parent restarting it).
        """
        if self._nursery is not None:
            raise RuntimeError(f"supervisor {self.name!r} is already running")
        self._specs = self._initial_specs()
        self._window = RestartWindow(self.intensity)
        self._exits.clear()
        self._closing = False
        failure: SupervisorError | None = None
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    failure = await self._start_initial()
                    if failure is None:
                        task_status.started()
                        failure = await self._supervise()
                finally:
                    with trio.CancelScope(shield=True):
                        await self._stop_all()
        finally:
            self._nursery = None
            self._running.clear()
        if failure is not None:
            raise failure

    # -- children ----------------------------------------------------------------------------

    async def _child_main(self, inc: _Incarnation, *, task_status: trio.TaskStatus[bool]) -> None:
        """The task around one incarnation: reports started/ignore, then its exit."""
        assert self._nursery is not None
        inc.task = trio.lowlevel.current_task()
        watch = _StartWatch(inc, task_status, self._nursery)
        try:
            with inc.scope:
                await inc.spec.start(task_status=watch)
        except Exception as exc:
            if not inc.started:
                inc.done.set()
                raise  # a start failure: raised from nursery.start to the starter
            inc.error = exc
        except BaseException:
            inc.done.set()
            raise
        if not inc.started:
            inc.done.set()
            if not watch.reported:
                task_status.started(False)  # returned before started: OTP's ignore
            return
        self._log_exit(inc)
        inc.done.set()
        if not inc.stopping:
            self._exits.append(inc)
            self._wakeup.set()

    async def _start(self, spec: ChildSpec) -> bool:
        """Start one incarnation and wait until it reports started; False if it ignored."""
        assert self._nursery is not None
        inc = _Incarnation(spec)
        self._running[spec.id] = inc  # before starting, so an early exit is never orphaned
        try:
            started: bool = await self._nursery.start(self._child_main, inc, name=spec.id)
        except BaseException as exc:
            # Cancelled can arrive just after the child reported started: then it is running
            # and must stay known, so that stopping everything stops it too.
            if not inc.started:
                self._forget_incarnation(inc)
                if isinstance(exc, Exception):
                    self._log(logging.WARNING, "exit", spec.id, f"start failed: {describe(exc)}")
            raise
        if not started:
            self._forget_incarnation(inc)
            self._log(logging.INFO, "ignore", spec.id, "returned before reporting started")
            return False
        self._log(logging.INFO, "start", spec.id, "started")
        return True

    def _forget_incarnation(self, inc: _Incarnation) -> None:
        if self._running.get(inc.spec.id) is inc:
            del self._running[inc.spec.id]

    async def _stop(self, inc: _Incarnation, why: str) -> None:
        """Cancel one child and wait up to its shutdown timeout; past it, abandon (kill) it."""
        inc.stopping = inc.handled = True
        inc.scope.cancel()
        self._log(logging.DEBUG, "stop", inc.spec.id, why)
        try:
            with trio.move_on_after(inc.spec.shutdown):
                await inc.done.wait()
            if not inc.done.is_set() and not inc.killed:
                inc.killed = True
                self._kills += 1
                self._log(
                    logging.ERROR,
                    "kill",
                    inc.spec.id,
                    f"did not stop within {inc.spec.shutdown:g} s ({why}); abandoned",
                )
        finally:
            self._forget_incarnation(inc)

    async def _stop_all(self) -> None:
        """Stop every running child in reverse start order (callers shield this)."""
        self._closing = True
        for scope in self._delays:
            scope.cancel()
        while self._running:
            await self._stop(self._in_start_order()[-1], "supervisor stopping")

    # -- supervising -------------------------------------------------------------------------

    async def _supervise(self) -> SupervisorError | None:
        while True:
            while not self._exits:
                self._wakeup = trio.Event()
                await self._wakeup.wait()
            inc = self._exits.popleft()
            if inc.handled:
                continue  # stopped as part of an earlier restart: its exit is moot
            inc.handled = True
            self._forget_incarnation(inc)
            backoff = inc.spec.backoff
            if backoff is not None and trio.current_time() - inc.born >= backoff.reset_after:
                self._quick_failures[inc.spec.id] = 0  # it ran long enough: start over
            exit: ExitKind = "normal" if inc.error is None else "crash"
            failure = await self._recover(inc.spec.id, exit, inc.error)
            if failure is not None:
                return failure

    async def _recover(
        self, failed: str, exit: ExitKind, error: BaseException | None
    ) -> SupervisorError | None:
        """Apply the strategy to one exit; restarts that fail to start are exits in turn."""
        exits: collections.deque[tuple[str, ExitKind, BaseException | None]] = (
            collections.deque([(failed, exit, error)])
        )
        pending: dict[str, str] = {}  # child id → why it is restarted
        while exits or pending:
            if exits:
                failed, exit, error = exits.popleft()
                if failed not in self._specs:
                    continue  # terminated meanwhile (dynamic supervisors)
                plan = self._plan(failed, exit)
                why = f"{failed!r} {'exited' if exit == 'normal' else 'crashed'}: {describe(error)}"
                if plan.restart and not self._window.allow(trio.current_time()):
                    return self._give_up(failed, exit, error)
                for sibling in plan.stop:
                    inc = self._running.get(sibling)
                    if inc is not None:
                        await self._stop(inc, f"restart after {why}")
                for gone in plan.remove:
                    self._specs.pop(gone, None)
                    pending.pop(gone, None)
                for cid in plan.restart:
                    pending.setdefault(cid, why)
                continue
            in_order = [c for c in self._specs if c in pending]
            if not in_order:
                return None  # everything pending was terminated meanwhile
            cid = in_order[0]
            why = pending.pop(cid)
            if cid in self._running:
                continue  # already running again (started concurrently)
            self._restart_counts[cid] += 1
            self._log(logging.INFO, "restart", cid, why)
            if self._on_restart is not None:
                self._on_restart(cid)
            spec = self._specs[cid]
            if spec.backoff is not None:
                delay = spec.backoff.delay(self._quick_failures[cid])
                self._quick_failures[cid] += 1
                assert self._nursery is not None
                self._nursery.start_soon(self._restart_later, spec, delay, name=f"{cid}.backoff")
                continue
            try:
                await self._start(spec)
            except Exception as exc:
                exits.append((cid, "crash", exc))
        return None

    async def _restart_later(self, spec: ChildSpec, delay: float) -> None:
        """A backoff restart: wait, then start the child unless it is running again, removed,
        or the supervisor is stopping. A failed start is an exit like any other."""
        scope = trio.CancelScope()
        self._delays.add(scope)
        try:
            with scope:
                await trio.sleep(delay)
        finally:
            self._delays.discard(scope)
        if scope.cancelled_caught or self._closing or self._specs.get(spec.id) is not spec \
                or spec.id in self._running:
            return
        try:
            await self._start(spec)
        except Exception as exc:
            failed = _Incarnation(spec)
            failed.error = exc
            self._exits.append(failed)
            self._wakeup.set()

    def _give_up(
        self, child: str, exit: ExitKind, error: BaseException | None
    ) -> RestartIntensityExceeded:
        how = "exited normally" if exit == "normal" else f"crashed: {describe(error)}"
        failure = RestartIntensityExceeded(
            f"supervisor {self.name!r} gave up: more than {self.intensity}; "
            f"last failure: child {child!r} {how}",
            supervisor=self.name,
            child=child,
        )
        failure.__cause__ = None if error is None else unwrap(error)
        self._log(logging.ERROR, "escalation", child, str(failure))
        return failure

    def _start_failed(self, child: str, error: BaseException) -> ChildStartFailed:
        failure = ChildStartFailed(
            f"supervisor {self.name!r} could not start child {child!r}: {describe(error)}",
            supervisor=self.name,
            child=child,
        )
        failure.__cause__ = unwrap(error)
        self._log(logging.ERROR, "escalation", child, str(failure))
        return failure

    # -- logging -----------------------------------------------------------------------------

    def _log_exit(self, inc: _Incarnation) -> None:
        if inc.stopping:
            reason = "shutdown" if inc.error is None else f"shutdown error: {describe(inc.error)}"
            level = logging.INFO if inc.error is None else logging.WARNING
        else:
            reason = describe(inc.error)
            level = logging.INFO if inc.error is None else logging.WARNING
        if inc.killed:
            reason = f"killed child finished: {reason}"
        self._log(level, "exit", inc.spec.id, reason)

    def _log(self, level: int, event: str, actor: str, reason: str) -> None:
        log.log(
            level,
            "%s %s %s: %s",
            self.name,
            event,
            actor,
            reason,
            extra={"actor": actor, "supervisor": self.name, "reason": reason, "event": event},
        )


class Supervisor(_SupervisorBase):
    """A static supervisor: a fixed, ordered list of children and one restart strategy.

    Children start in list order and stop in reverse list order. ``on_restart(child_id)`` is
    called for every child restarted (siblings restarted by one_for_all/rest_for_one included);
    ``statistics().restarts`` counts the same.
    """

    def __init__(
        self,
        name: str,
        children: Sequence[ChildSpec],
        *,
        strategy: Strategy = "one_for_one",
        max_restarts: int = 1,
        period: float = 5.0,
        on_restart: OnRestart | None = None,
    ) -> None:
        super().__init__(name, max_restarts=max_restarts, period=period, on_restart=on_restart)
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}")
        ids = [child.id for child in children]
        duplicates = sorted({cid for cid in ids if ids.count(cid) > 1})
        if duplicates:
            raise ValueError(f"supervisor {name!r}: duplicate child ids {duplicates}")
        self.strategy: Strategy = strategy
        self.children: tuple[ChildSpec, ...] = tuple(children)
        self._order = {cid: index for index, cid in enumerate(ids)}

    def _initial_specs(self) -> dict[str, ChildSpec]:
        return {child.id: child for child in self.children}

    async def _start_initial(self) -> SupervisorError | None:
        for spec in self.children:
            try:
                await self._start(spec)
            except Exception as exc:
                return self._start_failed(spec.id, exc)
        return None

    def _plan(self, failed: str, exit: ExitKind) -> RestartPlan:
        return plan_restart(
            self.strategy,
            list(self._specs),
            {cid: spec.restart for cid, spec in self._specs.items()},
            failed,
            exit,
        )

    def _in_start_order(self) -> list[_Incarnation]:
        return sorted(self._running.values(), key=lambda inc: self._order[inc.spec.id])


class DynamicSupervisor(_SupervisorBase):
    """Many children of one kind, added and removed while running (watchers, sessions).

    Every child shares the restart type, shutdown and type given here; each restarts on its own
    (one_for_one). A child that is not restarted is forgotten, so its id can be reused.
    ``max_children`` bounds how many it holds (habit: bounded everything).
    """

    def __init__(
        self,
        name: str,
        *,
        restart: Literal["transient", "temporary"] = "temporary",
        shutdown: float = DEFAULT_SHUTDOWN,
        type: ChildType = "worker",
        max_children: int = 1024,
        max_restarts: int = 1,
        period: float = 5.0,
        on_restart: OnRestart | None = None,
    ) -> None:
        super().__init__(name, max_restarts=max_restarts, period=period, on_restart=on_restart)
        if restart not in ("transient", "temporary"):
            raise ValueError("dynamic children are transient or temporary")
        if max_children < 1:
            raise ValueError("max_children must be >= 1")
        self.restart: Literal["transient", "temporary"] = restart
        self.shutdown = shutdown
        self.type: ChildType = type
        self.max_children = max_children

    def _initial_specs(self) -> dict[str, ChildSpec]:
        return {}  # a restarted dynamic supervisor starts empty, as in OTP

    async def _start_initial(self) -> SupervisorError | None:
        return None

    async def start_child(self, id: str, start: StartFn) -> bool:
        """Start a child and wait until it is ready; False if it ignored (returned early).

        Raises ValueError for an id in use, :class:`TooManyChildren` at the bound,
        :class:`ChildStartFailed` when it raises before started (nothing is restarted then,
        as in OTP), :class:`SupervisorNotRunning` when not running. Cancelling the caller
        cancels the start.
        """
        if not self.running:
            raise SupervisorNotRunning(f"supervisor {self.name!r} is not running")
        if id in self._specs:
            raise ValueError(f"supervisor {self.name!r} already has a child {id!r}")
        if len(self._specs) >= self.max_children:
            raise TooManyChildren(
                f"supervisor {self.name!r} holds its maximum of {self.max_children} children"
            )
        spec = ChildSpec(id, start, self.restart, self.shutdown, self.type)
        self._specs[id] = spec
        try:
            started = await self._start(spec)
        except Exception as exc:
            self._specs.pop(id, None)
            raise ChildStartFailed(
                f"supervisor {self.name!r} could not start child {id!r}: {describe(exc)}",
                supervisor=self.name,
                child=id,
            ) from unwrap(exc)
        except BaseException:
            self._specs.pop(id, None)
            raise
        if not started:
            self._specs.pop(id, None)
        return started

    async def terminate_child(self, id: str) -> bool:
        """Stop a child (shutdown timeout, then kill) and forget it; False if there is none."""
        if self._nursery is None:
            raise SupervisorNotRunning(f"supervisor {self.name!r} is not running")
        if self._specs.pop(id, None) is None:
            return False
        inc = self._running.get(id)
        if inc is not None:
            await self._stop(inc, "terminate_child")
        return True

    def _plan(self, failed: str, exit: ExitKind) -> RestartPlan:
        plan = plan_restart("one_for_one", [failed], {failed: self.restart}, failed, exit)
        if not plan.restart:
            return RestartPlan(stop=(), restart=(), remove=(failed,))
        return plan
