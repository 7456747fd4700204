"""Fault injection for actors and supervised children, with no monkeypatching.

A :class:`FaultInjector` is an object you hand to what you want to break: an
:class:`~deviceapi.otp.Actor` takes it as its ``faults`` hook; any other supervised child is
wrapped with :meth:`FaultInjector.wrap`. Tests and the chaos benchmark then arm faults by actor
name:

- ``crash`` raises (``InjectedCrash`` unless you pass an error), ``exit`` raises ``ActorExit``
  (a normal exit), ``hang`` sleeps shielded for a duration, so the actor neither serves nor
  answers cancellation (the "hangs past its shutdown timeout" case);
- *when*: ``now`` (default; reaches an actor even while it idles on its mailbox, through
  ``wait_injected``), ``after=k`` (let k more messages through, fault on the next one, whose
  caller then hears ``ActorCrashed``), or ``at="start"`` / ``at="stop"`` (the next time the
  child starts / is being stopped: delivered by ``wrap``, or by an actor that awaits
  :meth:`FaultInjector.starting` / :meth:`FaultInjector.stopping` in its init / terminate).

A hang armed ``now`` runs from the moment it is armed for its duration, whichever incarnation
is running: an actor takes no message until it is over; a wrapped plain child keeps running
but cannot be cancelled until then. Every armed fault is recorded with when it was armed and
when it fired (:meth:`FaultInjector.history`), for chaos reports. Faults armed for an actor
that is not running wait for its next incarnation.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Literal

import trio

from ..otp import ActorExit, StartFn

FaultKind = Literal["crash", "hang", "exit"]
Trigger = Literal["now", "message", "start", "stop"]
At = Literal["now", "start", "stop"]


class InjectedCrash(Exception):
    """The error an injected crash raises unless the test chose another."""


@dataclasses.dataclass(frozen=True, slots=True)
class Injection:
    """One armed fault: what, for whom, on which trigger, and when it was armed / fired."""

    actor: str
    fault: FaultKind
    trigger: Trigger
    after: int
    duration: float
    armed_at: float
    fired_at: float | None


@dataclasses.dataclass(slots=True)
class _Armed:
    actor: str
    fault: FaultKind
    trigger: Trigger
    after: int
    duration: float
    error: BaseException | None
    armed_at: float
    remaining: int = 0
    fired_at: float | None = None


@dataclasses.dataclass(slots=True)
class _Slot:
    """Everything armed for one actor name."""

    now: collections.deque[_Armed] = dataclasses.field(default_factory=collections.deque)
    messages: list[_Armed] = dataclasses.field(default_factory=list)
    start: collections.deque[_Armed] = dataclasses.field(default_factory=collections.deque)
    stop: collections.deque[_Armed] = dataclasses.field(default_factory=collections.deque)
    lot: trio.lowlevel.ParkingLot = dataclasses.field(default_factory=trio.lowlevel.ParkingLot)
    hang_until: float = -float("inf")


class FaultInjector:
    """Arms faults by actor name and delivers them at the hook points (see module docstring).

    Implements the ``FaultHook`` protocol of ``deviceapi.otp``. Arming needs a running trio
    (it reads trio's clock for the record).
    """

    def __init__(self) -> None:
        self._slots: dict[str, _Slot] = {}
        self._history: list[_Armed] = []

    # -- arming ------------------------------------------------------------------------------

    def crash(
        self,
        actor: str,
        *,
        after: int | None = None,
        at: At = "now",
        error: Exception | None = None,
    ) -> None:
        """Make ``actor`` raise ``error`` (default :class:`InjectedCrash`)."""
        error = error or InjectedCrash(f"injected crash: {actor}")
        self._arm(actor, "crash", after, at, 0.0, error)

    def hang(
        self, actor: str, duration: float, *, after: int | None = None, at: At = "now"
    ) -> None:
        """Make ``actor`` stop serving and ignore cancellation for ``duration`` seconds."""
        if not duration >= 0:
            raise ValueError("a hang lasts >= 0 seconds")
        self._arm(actor, "hang", after, at, duration, None)

    def exit(self, actor: str, *, after: int | None = None, at: At = "now") -> None:
        """Make ``actor`` exit normally (``ActorExit``; a wrapped child returns)."""
        self._arm(actor, "exit", after, at, 0.0, None)

    def _arm(
        self,
        actor: str,
        fault: FaultKind,
        after: int | None,
        at: At,
        duration: float,
        error: BaseException | None,
    ) -> None:
        if after is not None and (after < 0 or at != "now"):
            raise ValueError("after=k counts messages (k >= 0) and only goes with at='now'")
        trigger: Trigger = "message" if after is not None else at
        armed = _Armed(actor, fault, trigger, after or 0, duration, error, trio.current_time())
        armed.remaining = armed.after
        slot = self._slot(actor)
        if trigger == "now":
            if fault == "hang":  # it hangs from now on, even before the watcher task runs
                slot.hang_until = max(slot.hang_until, armed.armed_at + duration)
            slot.now.append(armed)
            slot.lot.unpark_all()
        elif trigger == "message":
            slot.messages.append(armed)
        elif trigger == "start":
            slot.start.append(armed)
        else:
            slot.stop.append(armed)
        self._history.append(armed)

    def _slot(self, actor: str) -> _Slot:
        slot = self._slots.get(actor)
        if slot is None:
            slot = self._slots[actor] = _Slot()
        return slot

    # -- reporting ---------------------------------------------------------------------------

    def history(self) -> tuple[Injection, ...]:
        """Every fault armed so far, in arming order (frozen records)."""
        return tuple(
            Injection(a.actor, a.fault, a.trigger, a.after, a.duration, a.armed_at, a.fired_at)
            for a in self._history
        )

    def pending(self, actor: str) -> int:
        """How many faults armed for ``actor`` have not fired yet."""
        return sum(1 for a in self._history if a.actor == actor and a.fired_at is None)

    # -- hook points -------------------------------------------------------------------------

    async def before_message(self, actor: str) -> None:
        """Before each message: count down ``after=k`` faults; honour a hang in progress."""
        slot = self._slot(actor)
        await self._wait_hang(slot)
        due = next((armed for armed in slot.messages if armed.remaining == 0), None)
        for armed in slot.messages:
            if armed is not due and armed.remaining > 0:
                armed.remaining -= 1
        if due is not None:
            slot.messages.remove(due)
            await self._fire(slot, due)

    async def wait_injected(self, actor: str) -> None:
        """Run beside the actor: deliver ``now`` faults as they are armed (hangs loop on)."""
        slot = self._slot(actor)
        while True:
            while not slot.now:
                await slot.lot.park()
            await self._fire(slot, slot.now.popleft())

    async def starting(self, actor: str) -> None:
        """Where a child starts: deliver one ``at="start"`` fault, if armed."""
        slot = self._slot(actor)
        if slot.start:
            await self._fire(slot, slot.start.popleft())

    async def stopping(self, actor: str) -> None:
        """Where a child is being stopped: deliver one ``at="stop"`` fault, if armed.

        An ``exit`` here just lets the stop proceed (a stop already is a normal end).
        """
        slot = self._slot(actor)
        if slot.stop:
            armed = slot.stop.popleft()
            if armed.fault == "exit":
                armed.fired_at = trio.current_time()
                return
            await self._fire(slot, armed)

    async def _fire(self, slot: _Slot, armed: _Armed) -> None:
        armed.fired_at = trio.current_time()
        if armed.fault == "crash":
            assert armed.error is not None
            raise armed.error
        if armed.fault == "exit":
            raise ActorExit(f"injected exit: {armed.actor}")
        slot.hang_until = max(slot.hang_until, armed.fired_at + armed.duration)
        await self._wait_hang(slot)

    @staticmethod
    async def _wait_hang(slot: _Slot) -> None:
        """Sleep, deaf to cancellation, until the hang in progress (if any) is over."""
        if slot.hang_until > trio.current_time():
            with trio.CancelScope(shield=True):
                await trio.sleep_until(slot.hang_until)

    # -- plain children ----------------------------------------------------------------------

    def wrap(self, actor: str, start: StartFn) -> StartFn:
        """Make any supervised child injectable under the name ``actor``.

        The returned start function delivers ``at="start"`` faults before ``start`` runs,
        ``now`` faults while it runs (even when it is idle), ``at="stop"`` faults when it is
        cancelled from outside, and turns an injected (or its own) ``ActorExit`` into a normal
        return. Wrapping an Actor's ``run`` is fine too.
        """

        async def run(*, task_status: trio.TaskStatus[None]) -> None:
            injected = False

            async def deliver() -> None:
                nonlocal injected
                try:
                    await self.wait_injected(actor)
                except trio.Cancelled:
                    raise
                except BaseException:
                    injected = True
                    raise

            try:
                await self.starting(actor)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(deliver)
                    try:
                        await start(task_status=task_status)
                    except trio.Cancelled:
                        if not injected:
                            await self.stopping(actor)  # cancelled from outside: a stop
                        raise
                    nursery.cancel_scope.cancel()
            except* ActorExit:
                pass

        return run
