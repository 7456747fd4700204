"""The one seam between trio and asyncio (the only module that imports trio_asyncio).

grpclib is an asyncio library; our actors are trio. Everything runs in one thread, in one of
two arrangements, chosen once per process by :func:`run` (``--bridge``):

- ``guest`` (the server's default): a native asyncio loop is the host and trio runs as its
  guest (``trio.lowlevel.start_guest_run``). grpclib's I/O runs on the plain asyncio loop,
  without trio-asyncio's per-callback costs (docs/BENCHMARKS.md: about a fifth less server
  CPU per unary call); trio's own I/O wait runs in a worker thread.
- ``trio-asyncio``: trio is the main loop and ``trio_asyncio.open_loop()`` runs an asyncio loop
  on top of it. pytest-trio runs tests this way by default, with virtual time driving every
  timer of both loops; ``pytest --bridge guest`` runs the same tests as guests.

Crossings (the same API in both):

- asyncio → trio, the *direct crossing* (ARCHITECTURE §4): a handler hands an actor a message
  carrying a :class:`FutureReply` with ``send_nowait`` (legal: same thread) and awaits the
  asyncio future, which the actor resolves synchronously. In guest mode trio waits for I/O in
  a worker thread; a task made runnable from asyncio code still runs at once, because trio's
  ``reschedule`` forces a guest tick when its run queue was empty (tests/unit/test_bridge.py
  holds us to that).
- trio → asyncio: :meth:`Bridge.aio_as_trio` for the few calls into grpclib from trio (starting
  and closing servers, client calls of the in-process providers).

The arrangement is a value, :class:`Bridge`, made by :func:`run` (or, for a plain ``trio.run``
such as pytest-trio's, on first use) and kept per trio run in a ``RunVar``: no process global,
so two runs in one process (tests) never see each other's loop. The runner reads it once
(:func:`current`) and passes it as a handle to what crosses (the gRPC server and its services,
the in-process clients, the NVML sidecar, the testing runtime). The module-level functions
are conveniences for code that runs inside a trio run and holds no handle (tests, benches).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import select
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence, Sized
from contextlib import AbstractAsyncContextManager
from typing import Any, Generic, Literal, TypeVar

import outcome
import trio

from .otp import Reply

T = TypeVar("T")
Mode = Literal["trio-asyncio", "guest"]
MODES: tuple[Mode, ...] = ("trio-asyncio", "guest")
#: Guest mode, after a crossing (see _HotHost): seconds one quiet poll of the host may sleep,
#: and quiet polls in a row before trio goes back to waiting in its thread.
HOT_POLL_S = 0.0005
HOT_IDLE_POLLS = 40


class _HotHost:
    """Guest mode: keeps trio ticking on the host loop while requests keep coming.

    When trio has nothing to run, guest mode waits for trio's I/O in a worker thread, so each
    crossing from asyncio into an idle trio costs two thread switches: the worker wakes, takes
    the GIL, posts the tick back to the host. On a busy machine each switch waits for a CPU
    (and for the GIL): measured here under load, writes waited tens of milliseconds for their
    tick and a watch storm's acknowledgements queued for seconds while the server used 10 % of
    a core (docs/BENCHMARKS.md, issue 15; ``--bridge trio-asyncio``, which has no thread, had
    half the unary latency).

    So after a crossing, one trio task checkpoints once per host-loop iteration, which keeps
    trio's ticks on the host (``run_sync_soon_not_threadsafe``, no thread): the next crossings
    find a tick already scheduled. When the host has nothing queued, the task blocks for at
    most ``HOT_POLL_S`` in ``select`` on the host selector's own file descriptor — it becomes
    readable when any of the host's sockets is — so a hot but quiet server sleeps rather than
    spins, and wakes as soon as a request arrives. After ``HOT_IDLE_POLLS`` quiet polls in a
    row (about 20 ms without a crossing) the task parks and trio goes back to its thread, so
    an idle server stays idle. Private attributes of the stdlib loop are read (``_ready``,
    ``_scheduled``, ``_selector``); a loop without them just never blocks, and parks sooner.
    """

    __slots__ = ("_fd", "_loop", "_ready", "_scheduled", "_wake", "polls", "ticks")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._ready: Sized = getattr(loop, "_ready", ())
        self._scheduled: list[asyncio.TimerHandle] = getattr(loop, "_scheduled", [])
        selector = getattr(loop, "_selector", None)
        fileno = getattr(selector, "fileno", None)
        self._fd: int = fileno() if callable(fileno) else -1
        self._wake = trio.Event()
        #: Ticks kept on the host, and quiet polls among them (tests read these).
        self.ticks = 0
        self.polls = 0

    def kick(self) -> None:
        """asyncio code just handed trio work: stay hot for a while."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            quiet = 0
            while quiet < HOT_IDLE_POLLS:
                if self._wake.is_set():
                    self._wake = trio.Event()
                    quiet = 0
                elif self._ready:
                    quiet = 0
                else:
                    quiet += 1
                    self._poll()
                self.ticks += 1
                await trio.lowlevel.checkpoint()

    def _poll(self) -> None:
        """Sleep until the host has I/O, a timer due, or ``HOT_POLL_S`` have passed."""
        if self._fd < 0:
            return
        statistics = trio.lowlevel.current_statistics()
        if statistics.tasks_runnable:
            return
        timeout = min(HOT_POLL_S, statistics.seconds_to_next_deadline)
        if self._scheduled:
            timeout = min(timeout, self._scheduled[0].when() - self._loop.time())
        if timeout > 0:
            self.polls += 1
            select.select([self._fd], [], [], timeout)


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class Bridge:
    """How this trio run shares its thread with asyncio: the handle every crossing goes through.

    ``guest``: the host loop, the trio token, the main task's context (for trio tasks started on
    asyncio's behalf) and the hot-host task. ``trio-asyncio``: none of them (trio-asyncio's loop
    is opened by :meth:`open_loop` and found by trio-asyncio itself).
    """

    mode: Mode = "trio-asyncio"
    loop: asyncio.AbstractEventLoop | None = None
    token: trio.lowlevel.TrioToken | None = None
    context: contextvars.Context | None = None
    hot: _HotHost | None = None

    async def call(self, send: Callable[[Reply[T]], None]) -> T:
        """From asyncio: hand a reply slot to ``send`` (which queues a message) and await it."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        send(FutureReply(future))
        if self.hot is not None:
            self.hot.kick()
        return await future

    def open_loop(self) -> AbstractAsyncContextManager[Any]:
        """The run's one asyncio loop: opened on top of trio, or (guest mode) the host's."""
        if self.loop is not None:
            return _host_loop(self.loop)
        return _trio_asyncio().open_loop()  # type: ignore[no-any-return]

    def trio_as_aio(self, fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        """Wrap a trio async function so asyncio code can await it (≈93 µs a crossing under
        trio-asyncio: keep it off hot paths)."""
        if self.loop is None or self.token is None or self.context is None:
            return _trio_asyncio().trio_as_aio(fn)  # type: ignore[no-any-return]
        loop, token, context = self.loop, self.token, self.context

        @functools.wraps(fn)
        async def wrapper(*args: Any) -> T:
            future: asyncio.Future[T] = loop.create_future()

            async def in_trio() -> None:
                result = await outcome.acapture(fn, *args)
                if not future.done():
                    _settle(future, result)

            token.run_sync_soon(functools.partial(
                trio.lowlevel.spawn_system_task, in_trio, context=context.copy()))
            return await future

        return wrapper

    def aio_as_trio(self, fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        """Wrap an asyncio coroutine function so trio code can await it."""
        if self.loop is None:
            return _trio_asyncio().aio_as_trio(fn)  # type: ignore[no-any-return]
        loop = self.loop

        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> T:
            task = asyncio.ensure_future(fn(*args, **kwargs), loop=loop)
            finished = trio.Event()
            # Setting a trio Event from an asyncio callback is fine in guest mode: same thread,
            # between trio ticks, and trio schedules a tick for the woken task.
            task.add_done_callback(lambda _: finished.set())
            try:
                await finished.wait()
            except BaseException:
                task.cancel()
                with trio.CancelScope(shield=True):
                    await finished.wait()
                raise
            return task.result()

        return wrapper


#: The bridge of the current trio run (per run, not per process).
_CURRENT: trio.lowlevel.RunVar[Bridge] = trio.lowlevel.RunVar("deviceapi.bridge")


def current() -> Bridge:
    """The current trio run's bridge (a plain ``trio.run`` gets a trio-asyncio one on first
    use). Callable from trio tasks and, in either arrangement, from asyncio code of the run
    (same thread: trio's run context is set while the run is alive)."""
    try:
        return _CURRENT.get()
    except LookupError:
        bridge = Bridge()
        _CURRENT.set(bridge)
        return bridge


def mode() -> Mode:
    """The arrangement of the current run ("trio-asyncio" outside any run)."""
    try:
        return current().mode
    except RuntimeError:  # not inside a trio run
        return "trio-asyncio"


def run(
    async_fn: Callable[..., Awaitable[T]],
    *args: Any,
    mode: Mode = "trio-asyncio",
    clock: trio.abc.Clock | None = None,
    instruments: Sequence[trio.abc.Instrument] = (),
) -> T:
    """Run ``async_fn(*args)`` (a trio function) as the process's main loop, bridged as asked.

    ``clock`` and ``instruments`` go to trio (the test suite's guest-mode runner passes
    pytest-trio's). ``KeyboardInterrupt`` propagates as from ``trio.run``.
    """
    if mode == "trio-asyncio":
        return trio.run(async_fn, *args, clock=clock, instruments=instruments)
    # A plain selector loop: once imported, trio_asyncio's policy makes loops that run on trio.
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        return runner.run(_host(async_fn, args, clock, instruments))


async def _host(async_fn: Callable[..., Awaitable[T]], args: tuple[Any, ...],
                clock: trio.abc.Clock | None, instruments: Sequence[trio.abc.Instrument]) -> T:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[outcome.Outcome[T]] = loop.create_future()
    interrupt = trio.CancelScope()

    bridges: list[Bridge] = []

    async def guest_main() -> T:
        patched = sys.modules.get("trio_asyncio")
        if patched is not None:
            # trio_asyncio, once imported (by a test process that also used the default),
            # answers "which asyncio loop is running" in trio tasks from its context variable.
            patched.current_loop.set(loop)
        hot = _HotHost(loop)
        bridge = Bridge("guest", loop, trio.lowlevel.current_trio_token(),
                        contextvars.copy_context(), hot)
        _CURRENT.set(bridge)
        bridges.append(bridge)
        # A system task: trio cancels it when the main task is done.
        trio.lowlevel.spawn_system_task(hot.run, name="deviceapi.bridge.hot_host")
        with interrupt:
            return await async_fn(*args)
        raise KeyboardInterrupt  # cancelled by Ctrl-C (below), as trio.run would raise

    trio.lowlevel.start_guest_run(
        guest_main,
        run_sync_soon_threadsafe=loop.call_soon_threadsafe,
        run_sync_soon_not_threadsafe=loop.call_soon,
        done_callback=done.set_result,
        host_uses_signal_set_wakeup_fd=True,
        clock=clock,
        instruments=instruments,
    )
    try:
        result = await asyncio.shield(done)
    except asyncio.CancelledError:
        # Ctrl-C while nothing in trio handles SIGINT (asyncio.Runner then cancels this task):
        # stop the trio side and let it clean up, rather than abandon it half-run. A second
        # Ctrl-C makes the Runner raise KeyboardInterrupt at once.
        if bridges and bridges[0].token is not None:
            bridges[0].token.run_sync_soon(interrupt.cancel)
        else:
            interrupt.cancel()  # not entered yet: it starts cancelled
        result = await done
    return result.unwrap()


def _trio_asyncio() -> Any:
    """trio_asyncio, imported on first use: importing it patches asyncio's loop lookup, which a
    guest-mode process must not have.

    grpclib looks up the running task through ``grpclib.utils._current_task``, bound to
    ``asyncio.current_task`` when grpclib is imported — before this import. On 3.11 the
    original finds trio-asyncio's loop anyway (it is pure Python and calls the patched loop
    lookup); from 3.12 it is C code that does not, and every grpclib deadline or cancellation
    helper then fails with "no running event loop". So hand grpclib the patched lookup too.
    """
    import grpclib.utils
    import trio_asyncio

    grpclib.utils._current_task = asyncio.current_task
    return trio_asyncio


class FutureReply(Generic[T]):
    """A reply slot backed by an asyncio future; resolving a cancelled one is a no-op."""

    __slots__ = ("_future",)

    def __init__(self, future: asyncio.Future[T]) -> None:
        self._future = future

    def resolve(self, result: outcome.Outcome[T]) -> None:
        if not self._future.done():
            _settle(self._future, result)


async def call(send: Callable[[Reply[T]], None]) -> T:
    """:meth:`Bridge.call` on the current run's bridge."""
    return await current().call(send)


def open_loop() -> AbstractAsyncContextManager[Any]:
    """:meth:`Bridge.open_loop` on the current run's bridge."""
    return current().open_loop()


@contextlib.asynccontextmanager
async def _host_loop(loop: asyncio.AbstractEventLoop) -> AsyncIterator[asyncio.AbstractEventLoop]:
    yield loop


def trio_as_aio(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """:meth:`Bridge.trio_as_aio` on the current run's bridge."""
    return current().trio_as_aio(fn)


def aio_as_trio(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """:meth:`Bridge.aio_as_trio` on the current run's bridge."""
    return current().aio_as_trio(fn)


def _settle(future: asyncio.Future[T], result: outcome.Outcome[T]) -> None:
    if isinstance(result, outcome.Value):
        future.set_result(result.value)
    else:
        assert isinstance(result, outcome.Error)
        future.set_exception(result.error)
