"""The bridge's crossings in both arrangements (``_bridge.py``).

Plain (sync) tests that start their own run with ``_bridge.run``, so each arrangement is
exercised whatever ``--bridge`` the suite runs with. The guest-mode wake-up is the subtle part:
trio, waiting for I/O in its worker thread, does not notice a task that asyncio code made
runnable unless it is poked; ``call`` pokes it.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import outcome
import pytest
import trio
import trio.testing

from deviceapi import _bridge
from deviceapi.otp import Reply

MODES = _bridge.MODES


class Boom(Exception):
    pass


@pytest.mark.parametrize("mode", MODES)
def test_run_returns_and_reports_the_mode(mode: _bridge.Mode) -> None:
    async def main() -> str:
        async with _bridge.open_loop():
            return _bridge.mode()

    assert _bridge.run(main, mode=mode) == mode
    assert _bridge.mode() == "trio-asyncio"  # nothing left behind after a guest run


def test_each_run_has_its_own_bridge_no_process_global() -> None:
    """The bridge is a value per trio run: a guest run in one thread and a trio-asyncio run in
    another, at the same time, each see only their own (a process global would leak the guest
    loop into the other run), and asyncio code of the guest run sees its run's bridge too."""
    guest_inside = threading.Event()
    release = threading.Event()
    seen: dict[str, object] = {}

    async def guest_main() -> None:
        bridge = _bridge.current()
        seen["guest"] = bridge

        async def on_asyncio() -> bool:
            return _bridge.current() is bridge and asyncio.get_running_loop() is bridge.loop

        async with bridge.open_loop():
            seen["guest_from_asyncio"] = await bridge.aio_as_trio(on_asyncio)()
        guest_inside.set()
        await trio.to_thread.run_sync(release.wait)

    thread = threading.Thread(target=_bridge.run, args=(guest_main,), kwargs={"mode": "guest"})
    thread.start()
    try:
        assert guest_inside.wait(30)

        async def plain_main() -> tuple[_bridge.Bridge, _bridge.Mode]:
            return _bridge.current(), _bridge.mode()

        bridge, mode = _bridge.run(plain_main, mode="trio-asyncio")
    finally:
        release.set()
        thread.join(30)
    guest = seen["guest"]
    assert isinstance(guest, _bridge.Bridge) and guest.mode == "guest" and guest.loop is not None
    assert seen["guest_from_asyncio"] is True
    assert mode == "trio-asyncio" and bridge.loop is None and bridge is not guest


@pytest.mark.parametrize("mode", MODES)
def test_run_raises_what_main_raises(mode: _bridge.Mode) -> None:
    async def main() -> None:
        await trio.lowlevel.checkpoint()
        raise Boom("from trio")

    with pytest.raises(Boom, match="from trio"):
        _bridge.run(main, mode=mode)


@pytest.mark.parametrize("mode", MODES)
def test_virtual_clock_drives_trio_timers(mode: _bridge.Mode) -> None:
    async def main() -> float:
        await trio.sleep(3600)
        return trio.current_time()

    started = time.monotonic()
    assert _bridge.run(main, mode=mode, clock=trio.testing.MockClock(autojump_threshold=0)) \
        == pytest.approx(3600)
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("mode", MODES)
def test_call_reaches_an_idle_trio_actor_at_once(mode: _bridge.Mode) -> None:
    """An asyncio task (started by an asyncio timer, as grpclib starts handlers) hands a
    message to a trio actor blocked on its mailbox. Trio has no timer of its own due for
    30 s: without the wake-up, the actor would sleep through the message until then."""

    async def main() -> float:
        send, receive = trio.open_memory_channel[Reply[int]](1)
        answers: list[int] = []

        async def handler() -> None:  # asyncio code
            answers.append(await _bridge.call(send.send_nowait))

        async with _bridge.open_loop():
            loop = asyncio.get_running_loop()
            with trio.fail_after(30):
                sent_at = time.monotonic()
                loop.call_later(0.05, lambda: asyncio.ensure_future(handler()))
                reply = await receive.receive()
                reply.resolve(outcome.Value(42))
                await _bridge.aio_as_trio(asyncio.sleep)(0.01)  # let the handler finish
            assert answers == [42]
            return time.monotonic() - sent_at

    assert _bridge.run(main, mode=mode) < 5


@pytest.mark.parametrize("mode", MODES)
def test_aio_as_trio_returns_raises_and_cancels(mode: _bridge.Mode) -> None:
    async def double(x: int) -> int:
        await asyncio.sleep(0.01)
        return x * 2

    async def fails() -> None:
        await asyncio.sleep(0)
        raise Boom("from asyncio")

    cancelled: list[bool] = []

    async def forever() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def main() -> int:
        async with _bridge.open_loop():
            with pytest.raises(Boom):
                await _bridge.aio_as_trio(fails)()
            with trio.move_on_after(0.1) as scope:
                await _bridge.aio_as_trio(forever)()
            assert scope.cancelled_caught
            assert cancelled == [True]  # the asyncio task was cancelled and waited for
            result: int = await _bridge.aio_as_trio(double)(21)
            return result

    assert _bridge.run(main, mode=mode) == 42


@pytest.mark.parametrize("mode", MODES)
def test_trio_as_aio_returns_and_raises(mode: _bridge.Mode) -> None:
    async def trio_double(x: int) -> int:
        await trio.sleep(0.01)
        return x * 2

    async def trio_fails() -> None:
        await trio.lowlevel.checkpoint()
        raise Boom("from trio")

    async def asyncio_side() -> int:
        with pytest.raises(Boom):
            await _bridge.trio_as_aio(trio_fails)()
        return await _bridge.trio_as_aio(trio_double)(21)

    async def main() -> int:
        async with _bridge.open_loop():
            result: int = await _bridge.aio_as_trio(asyncio_side)()
            return result

    assert _bridge.run(main, mode=mode) == 42


@pytest.mark.parametrize("mode", MODES)
def test_ctrl_c_stops_trio_cleanly_and_raises_keyboard_interrupt(mode: _bridge.Mode) -> None:
    """SIGINT before the program handles it itself: like ``trio.run``, the run ends with
    KeyboardInterrupt after trio's side has unwound (its ``finally`` ran), never abandoned."""
    cleaned_up: list[bool] = []

    async def main() -> None:
        try:
            signal.raise_signal(signal.SIGINT)
            await trio.sleep(30)
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(0.01)  # cleanup that needs the loop
            cleaned_up.append(True)

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        _bridge.run(main, mode=mode)
    assert cleaned_up == [True]
    assert time.monotonic() - started < 10


def test_guest_mode_keeps_trio_on_the_host_while_crossings_come_and_parks_when_idle() -> None:
    """After a crossing, trio's ticks stay on the host loop (no worker thread) while more
    crossings follow, sleeping in short polls of the host's selector between them; once they
    stop, trio parks: an idle server neither spins nor polls."""

    async def main() -> tuple[int, int, int, float]:
        send, receive = trio.open_memory_channel[Reply[int]](100)
        bridge = _bridge.current()
        assert bridge.mode == "guest"
        hot = bridge.hot
        assert hot is not None

        async def actor() -> None:
            async for reply in receive:
                reply.resolve(outcome.Value(1))

        async def crossings() -> float:  # asyncio code, a few ms apart as requests are
            started = time.monotonic()
            for _ in range(50):
                await _bridge.call(send.send_nowait)
                await asyncio.sleep(0.002)
            return (time.monotonic() - started) / 50

        async with _bridge.open_loop(), trio.open_nursery() as nursery:
            nursery.start_soon(actor)
            with trio.fail_after(30):
                per_call = await _bridge.aio_as_trio(crossings)()
                ticks, polls = hot.ticks, hot.polls
                await trio.sleep(0.3)  # idle, longer than the linger
                idle_ticks = hot.ticks
                await trio.sleep(0.3)
            nursery.cancel_scope.cancel()
        return ticks, polls, hot.ticks - idle_ticks, per_call

    ticks, polls, ticks_while_idle, per_call = _bridge.run(main, mode="guest")
    assert ticks >= 50 and polls >= 1  # hot between the crossings, sleeping in polls
    assert ticks_while_idle == 0  # parked
    assert per_call < 0.05
