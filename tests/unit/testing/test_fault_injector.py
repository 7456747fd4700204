"""The fault-injection kit against a real Actor and against a plain (wrapped) child."""

from __future__ import annotations

import dataclasses

import outcome
import pytest
import trio
import trio.testing

from deviceapi.otp import (
    Actor,
    ActorCrashed,
    CallTimeout,
    Mailbox,
    Reply,
    StartFn,
    TrioReply,
    unwrap,
)
from deviceapi.testing import FaultInjector, InjectedCrash


@dataclasses.dataclass(frozen=True, slots=True)
class Echo:
    n: int
    reply: Reply[int]


class EchoActor(Actor[Echo]):
    async def handle(self, message: Echo) -> None:
        message.reply.resolve(outcome.Value(message.n))


@dataclasses.dataclass
class Outcome:
    error: BaseException | None = None
    returned: bool = False
    ended_at: float | None = None


async def run_actor(actor: Actor[Echo], result: Outcome, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    try:
        await actor.run(task_status=task_status)
        result.returned = True
    except Exception as exc:
        result.error = unwrap(exc)
    finally:
        result.ended_at = trio.current_time()


async def test_crash_now_reaches_an_idle_actor() -> None:
    faults = FaultInjector()
    result = Outcome()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_actor, EchoActor("echo", Mailbox(2), faults=faults), result)
            await trio.testing.wait_all_tasks_blocked()  # idle on its mailbox
            faults.crash("echo", error=OSError("pulled"))
    assert isinstance(result.error, OSError)
    (record,) = faults.history()
    assert (record.actor, record.fault, record.trigger) == ("echo", "crash", "now")
    assert record.fired_at is not None and faults.pending("echo") == 0


@pytest.mark.parametrize("k", [0, 1, 3])
async def test_crash_after_k_messages_fails_the_next_caller(k: int) -> None:
    faults = FaultInjector()
    mailbox: Mailbox[Echo] = Mailbox(8)
    result = Outcome()
    faults.crash("echo", after=k)
    replies = [TrioReply[int]() for _ in range(k + 2)]
    for n, reply in enumerate(replies):
        mailbox.send_nowait(Echo(n, reply))
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_actor, EchoActor("echo", mailbox, faults=faults), result)
        assert [await reply.wait() for reply in replies[:k]] == list(range(k))
        with pytest.raises(ActorCrashed):
            await replies[k].wait()
    assert isinstance(result.error, InjectedCrash)
    assert mailbox.statistics().depth == 1  # the rest waits for the next incarnation
    assert faults.history()[0].trigger == "message"


async def test_a_hang_stops_serving_and_ignores_cancellation(
    autojump_clock: trio.abc.Clock,
) -> None:
    faults = FaultInjector()
    mailbox: Mailbox[Echo] = Mailbox(8)
    result = Outcome()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_actor, EchoActor("echo", mailbox, faults=faults), result)
            t0 = trio.current_time()
            faults.hang("echo", 10)
            with pytest.raises(CallTimeout):
                await mailbox.call(lambda r: Echo(1, r), timeout=4)
            assert await mailbox.call(lambda r: Echo(2, r), timeout=60) == 2
            assert trio.current_time() == t0 + 10  # served again once the hang is over
            faults.hang("echo", 20, after=0)  # the next message hangs
            nursery.start_soon(mailbox.call, lambda r: Echo(3, r), 60)
            await trio.testing.wait_all_tasks_blocked()
            t1 = trio.current_time()
            nursery.cancel_scope.cancel()
    assert result.ended_at == t1 + 20  # deaf to cancellation for the whole hang


async def test_exit_now_is_a_normal_exit() -> None:
    faults = FaultInjector()
    result = Outcome()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_actor, EchoActor("echo", Mailbox(2), faults=faults), result)
            faults.exit("echo")
    assert result.returned and result.error is None


async def test_faults_armed_between_incarnations_wait_for_the_next() -> None:
    faults = FaultInjector()
    faults.crash("echo")
    result = Outcome()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_actor, EchoActor("echo", Mailbox(2), faults=faults), result)
    assert isinstance(result.error, InjectedCrash)


async def test_injectors_are_independent_objects() -> None:
    first, second = FaultInjector(), FaultInjector()
    first.crash("echo")
    result = Outcome()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_actor, EchoActor("echo", Mailbox(2), faults=second), result)
            await trio.testing.wait_all_tasks_blocked()
            assert result.ended_at is None  # the other injector's fault never reaches it
            nursery.cancel_scope.cancel()
    assert first.pending("echo") == 1 and second.history() == ()


async def test_invalid_faults_are_refused() -> None:
    faults = FaultInjector()
    with pytest.raises(ValueError):
        faults.crash("x", after=-1)
    with pytest.raises(ValueError):
        faults.exit("x", after=2, at="start")
    with pytest.raises(ValueError):
        faults.hang("x", -1.0)
    assert faults.history() == ()


# -- wrapped plain children ------------------------------------------------------------------


def idle_child(log: list[str]) -> StartFn:
    async def body(*, task_status: trio.TaskStatus[None]) -> None:
        log.append("started")
        task_status.started()
        await trio.sleep_forever()

    return body


async def test_wrap_delivers_start_faults() -> None:
    faults = FaultInjector()
    log: list[str] = []
    child = faults.wrap("plain", idle_child(log))
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            faults.crash("plain", at="start")
            with pytest.raises(InjectedCrash):
                await nursery.start(child)
            faults.exit("plain", at="start")  # returns before started: the start "ignores"
            with pytest.raises(RuntimeError, match="without calling"):
                await nursery.start(child)
    assert log == []
    assert [r.trigger for r in faults.history()] == ["start", "start"]


async def test_wrap_delivers_now_and_stop_faults(autojump_clock: trio.abc.Clock) -> None:
    faults = FaultInjector()
    log: list[str] = []
    child = faults.wrap("plain", idle_child(log))
    with trio.fail_after(60):
        # exit now: the wrapped child returns normally
        async with trio.open_nursery() as nursery:
            await nursery.start(child)
            faults.exit("plain")
        # a crash while being stopped replaces the cancellation
        with pytest.raises(ExceptionGroup) as info:
            async with trio.open_nursery() as nursery:
                await nursery.start(child)
                faults.crash("plain", at="stop")
                nursery.cancel_scope.cancel()
        assert isinstance(unwrap(info.value), InjectedCrash)
        # a hang while being stopped delays the stop by its duration
        async with trio.open_nursery() as nursery:
            await nursery.start(child)
            faults.hang("plain", 7, at="stop")
            t0 = trio.current_time()
            nursery.cancel_scope.cancel()
        assert trio.current_time() == t0 + 7
    assert log == ["started"] * 3
    assert faults.pending("plain") == 0
