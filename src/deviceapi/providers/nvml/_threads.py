"""Where blocking NVML calls run, and how we know none is still running.

NVML calls are blocking C calls, so the poller runs them through a :class:`BlockingRunner`:
:func:`run_in_worker_thread` in production, :func:`run_inline` for the non-blocking fake in
virtual-time tests (see ``_fake.py``). Worker calls are *abandoned* on cancellation, so a hung
driver can never hold the poller's shutdown hostage; :class:`CallTracker` then tells the poller
whether an abandoned call is still inside NVML, so it never frees an event set (or shuts NVML
down) under a thread that is still using it. :class:`NvmlCalls` puts the three together: every
NVML call the poller makes goes through it, run by the runner, tracked, and abandoned with
:class:`NvmlCallHung` after a time limit.
"""

from __future__ import annotations

import enum
import functools
import threading
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

import trio

from ._backend import NvmlError

T = TypeVar("T")


class BlockingRunner(Protocol):
    """Runs one blocking call and returns its result; may abandon it on cancellation."""

    async def __call__(self, fn: Callable[[], T], /) -> T: ...


async def run_in_worker_thread(fn: Callable[[], T], /) -> T:
    """Run ``fn`` in trio's worker thread pool; cancellation abandons the thread."""
    return await trio.to_thread.run_sync(fn, abandon_on_cancel=True)


async def run_inline(fn: Callable[[], T], /) -> T:
    """Run ``fn`` in the trio thread after a checkpoint: only for calls that never block."""
    await trio.lowlevel.checkpoint()
    return fn()


class _State(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"


class CallNotRun(Exception):
    """A tracked call was abandoned before it started; it never ran."""


class TrackedCall(Generic[T]):
    """One call counted as in flight from creation until it finishes or is abandoned unrun."""

    __slots__ = ("_fn", "_state", "_tracker")

    def __init__(self, tracker: CallTracker, fn: Callable[[], T]) -> None:
        self._tracker = tracker
        self._fn = fn
        self._state = _State.PENDING

    def __call__(self) -> T:
        """Run in whatever thread the runner picked."""
        cond = self._tracker._cond
        with cond:
            if self._state is _State.CANCELLED:
                raise CallNotRun
            self._state = _State.RUNNING
        try:
            return self._fn()
        finally:
            with cond:
                self._state = _State.DONE
                self._tracker._in_flight -= 1
                cond.notify_all()

    def settle(self) -> None:
        """Called by the caller once its runner returned or raised: a call that never
        started will never start now, so it stops counting as in flight."""
        cond = self._tracker._cond
        with cond:
            if self._state is _State.PENDING:
                self._state = _State.CANCELLED
                self._tracker._in_flight -= 1
                cond.notify_all()


class CallTracker:
    """Counts NVML calls in flight in any thread (thread-safe)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._in_flight = 0

    def track(self, fn: Callable[[], T]) -> TrackedCall[T]:
        with self._cond:
            self._in_flight += 1
        return TrackedCall(self, fn)

    @property
    def in_flight(self) -> int:
        with self._cond:
            return self._in_flight

    def wait_idle_blocking(self, timeout: float) -> bool:
        """Block (in a worker thread) until no call is in flight; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._in_flight == 0, timeout)

    async def wait_idle(self, within: float) -> bool:
        """Wait until no call is in flight, at most ``within`` seconds; False if still busy.

        The wait runs in a worker thread (the calls finish in other threads) that gives up by
        itself after ``within`` seconds, so cancelling this leaks no thread for long."""
        if self.in_flight == 0:
            return True
        return await trio.to_thread.run_sync(
            self.wait_idle_blocking, within, abandon_on_cancel=True
        )


class NvmlCallHung(NvmlError):
    """An NVML call did not return within ``call_timeout``; its thread was abandoned."""


class NvmlCalls:
    """How the poller makes every NVML call: through ``run_blocking``, counted by ``tracker``,
    abandoned after ``call_timeout`` seconds (trio time) unless the call names its own limit.

    One object per poller, shared by its discovery, event and recovery code, so the tracker sees
    every call and shutdown can wait until none is inside NVML any more.
    """

    def __init__(self, run_blocking: BlockingRunner, call_timeout: float) -> None:
        self._run_blocking = run_blocking
        self._call_timeout = call_timeout
        self.tracker = CallTracker()

    async def __call__(self, fn: Callable[..., T], *args: object, limit: float | None = None) -> T:
        """Run one blocking backend call through the runner, tracked, abandoned after ``limit``
        seconds (default ``call_timeout``) with :class:`NvmlCallHung`."""
        call = self.tracker.track(functools.partial(fn, *args))
        if limit is None:
            limit = self._call_timeout
        try:
            with trio.move_on_after(limit) as scope:
                return await self._run_blocking(call)
        finally:
            call.settle()
        assert scope.cancelled_caught
        name = getattr(fn, "__name__", repr(fn))
        raise NvmlCallHung(f"{name} did not return within {limit:g} s")
