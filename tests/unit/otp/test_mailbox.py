"""Mailbox: bounded sends, replies, timeouts, and cancellation at every waiting point."""

from __future__ import annotations

import dataclasses

import outcome
import pytest
import trio
import trio.testing

from deviceapi.otp import CallTimeout, Mailbox, MailboxClosed, Reply, TrioReply


@dataclasses.dataclass(frozen=True, slots=True)
class Ask:
    question: str
    reply: Reply[str]


async def test_send_waits_while_the_mailbox_is_full() -> None:
    mailbox: Mailbox[int] = Mailbox(2)
    await mailbox.send(1)
    await mailbox.send(2)
    sent = trio.Event()

    async def third() -> None:
        await mailbox.send(3)
        sent.set()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(third)
            await trio.testing.wait_all_tasks_blocked()
            assert not sent.is_set()  # back-pressure: the sender waits for room
            assert mailbox.receive_nowait() == 1
            await sent.wait()
    stats = mailbox.statistics()
    assert (stats.depth, stats.capacity, stats.peak, stats.dropped, stats.received) == (
        2, 2, 2, 0, 1)
    assert [mailbox.receive_nowait(), mailbox.receive_nowait()] == [2, 3]


async def test_send_nowait_on_a_full_mailbox_raises_and_counts_a_drop() -> None:
    mailbox: Mailbox[int] = Mailbox(1)
    mailbox.send_nowait(1)
    with pytest.raises(trio.WouldBlock):
        mailbox.send_nowait(2)
    with pytest.raises(trio.WouldBlock):
        mailbox.cast(3)  # OTP's cast is the same never-blocking send
    assert mailbox.statistics().dropped == 2
    assert mailbox.statistics().depth == 1


async def test_a_closed_mailbox_refuses_sends_and_drains_to_its_reader() -> None:
    mailbox: Mailbox[int] = Mailbox(4)
    with pytest.raises(trio.WouldBlock):
        mailbox.receive_nowait()
    await mailbox.send(1)
    mailbox.close()
    with pytest.raises(MailboxClosed):
        await mailbox.send(2)
    with pytest.raises(MailboxClosed):
        mailbox.send_nowait(2)
    with pytest.raises(MailboxClosed):
        await mailbox.call(lambda r: Ask("?", r), timeout=1)
    assert await mailbox.receive() == 1  # what was queued is still delivered
    with pytest.raises(MailboxClosed):
        await mailbox.receive()
    with pytest.raises(MailboxClosed):
        mailbox.receive_nowait()


async def test_call_gets_the_answer_or_the_error() -> None:
    mailbox: Mailbox[Ask] = Mailbox(4)

    async def server() -> None:
        for _ in range(2):
            message = await mailbox.receive()
            if message.question == "bad":
                message.reply.resolve(outcome.Error(KeyError("bad")))
            else:
                message.reply.resolve(outcome.Value(message.question.upper()))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            assert await mailbox.call(lambda r: Ask("hi", r), timeout=1) == "HI"
            with pytest.raises(KeyError):
                await mailbox.call(lambda r: Ask("bad", r), timeout=1)


async def test_call_times_out_and_leaves_the_request_queued(
    autojump_clock: trio.abc.Clock,
) -> None:
    mailbox: Mailbox[Ask] = Mailbox(4)
    start = trio.current_time()
    with pytest.raises(CallTimeout, match="5 s"):
        await mailbox.call(lambda r: Ask("late", r), timeout=5)
    assert trio.current_time() == start + 5
    late = mailbox.receive_nowait()  # the actor may still process it...
    late.reply.resolve(outcome.Value("too late"))  # ...and its answer goes nowhere


async def test_a_call_blocked_on_a_full_mailbox_times_out_unqueued(
    autojump_clock: trio.abc.Clock,
) -> None:
    mailbox: Mailbox[Ask] = Mailbox(1)
    mailbox.send_nowait(Ask("first", TrioReply()))
    with pytest.raises(CallTimeout):
        await mailbox.call(lambda r: Ask("second", r), timeout=2)
    assert mailbox.statistics().depth == 1


async def test_cancelling_an_idle_receiver_loses_nothing() -> None:
    mailbox: Mailbox[int] = Mailbox(2)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(mailbox.receive)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        await mailbox.send(7)
        assert await mailbox.receive() == 7
    assert mailbox.statistics().received == 1


async def test_cancelling_a_blocked_send_leaves_the_message_unqueued() -> None:
    mailbox: Mailbox[int] = Mailbox(1)
    mailbox.send_nowait(1)
    with trio.fail_after(5):
        with trio.CancelScope() as scope:
            scope.cancel()
            await mailbox.send(2)
    assert scope.cancelled_caught
    assert mailbox.statistics().depth == 1
    assert mailbox.receive_nowait() == 1


async def test_cancelling_a_caller_mid_call_keeps_the_request_and_drops_the_answer() -> None:
    mailbox: Mailbox[Ask] = Mailbox(2)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(mailbox.call, lambda r: Ask("q", r), 10)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()  # the caller is waiting for the answer
        assert nursery.cancel_scope.cancelled_caught
        queued = mailbox.receive_nowait()  # as in OTP, the request stays queued
        queued.reply.resolve(outcome.Value("nobody listens"))


async def test_cancelling_a_caller_mid_reply_delivers_the_answer_then_cancelled() -> None:
    """The answer was resolved, then the caller cancelled before it ran again: trio completes
    the finished wait (the answer is not lost) and Cancelled arrives at the next checkpoint
    (it is not swallowed)."""
    mailbox: Mailbox[Ask] = Mailbox(2)
    answers: list[str] = []
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            caller = trio.CancelScope()

            async def call() -> None:
                with caller:
                    answers.append(await mailbox.call(lambda r: Ask("q", r), timeout=10))
                    await trio.lowlevel.checkpoint()
                    answers.append("not reached")

            nursery.start_soon(call)
            request = await mailbox.receive()
            await trio.testing.wait_all_tasks_blocked()  # the caller waits for its answer
            request.reply.resolve(outcome.Value("answer"))
            caller.cancel()  # before the caller got to run again
    assert caller.cancelled_caught
    assert answers == ["answer"]


def test_a_reply_resolves_once() -> None:
    reply: TrioReply[int] = TrioReply()
    assert not reply.done
    reply.resolve(outcome.Value(1))
    reply.resolve(outcome.Value(2))
    assert reply.done


async def test_a_resolved_reply_is_read_without_waiting() -> None:
    reply: TrioReply[int] = TrioReply()
    reply.resolve(outcome.Value(1))
    reply.resolve(outcome.Error(RuntimeError("ignored")))
    assert await reply.wait() == 1


def test_a_mailbox_is_bounded() -> None:
    with pytest.raises(ValueError):
        Mailbox[int](0)
