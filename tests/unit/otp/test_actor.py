"""The actor base: started means ready, how it ends, and restarts over the same mailbox."""

from __future__ import annotations

import dataclasses

import outcome
import pytest
import trio
import trio.testing

from deviceapi.otp import Actor, ActorCrashed, ActorExit, Mailbox, Reply, TrioReply, unwrap


@dataclasses.dataclass(frozen=True, slots=True)
class Add:
    n: int
    reply: Reply[int]


@dataclasses.dataclass(frozen=True, slots=True)
class Crash:
    reply: Reply[int]


@dataclasses.dataclass(frozen=True, slots=True)
class Stop:
    reply: Reply[int]


Msg = Add | Crash | Stop


@dataclasses.dataclass
class Journal:
    """State that outlives an incarnation, and what each incarnation went through."""

    total: int = 0
    events: list[str] = dataclasses.field(default_factory=list)
    reasons: list[BaseException | None] = dataclasses.field(default_factory=list)


class Counter(Actor[Msg]):
    def __init__(self, mailbox: Mailbox[Msg], journal: Journal, *, init_fails: bool = False,
                 terminate_hangs: bool = False) -> None:
        super().__init__("counter", mailbox)
        self.journal = journal
        self.init_fails = init_fails
        self.terminate_hangs = terminate_hangs

    async def init(self) -> None:
        self.journal.events.append("init")
        if self.init_fails:
            raise OSError("no device")

    async def handle(self, message: Msg) -> None:
        if isinstance(message, Crash):
            raise RuntimeError("crash")
        if isinstance(message, Stop):
            message.reply.resolve(outcome.Value(self.journal.total))
            raise ActorExit
        self.journal.total += message.n
        message.reply.resolve(outcome.Value(self.journal.total))

    async def terminate(self, reason: BaseException | None) -> None:
        self.journal.events.append("terminate")
        self.journal.reasons.append(reason)
        if self.terminate_hangs:
            await trio.sleep_forever()


async def test_started_means_init_is_done_and_a_closed_mailbox_ends_normally() -> None:
    mailbox: Mailbox[Msg] = Mailbox(4)
    journal = Journal()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(Counter(mailbox, journal).run)
            assert journal.events == ["init"]
            assert await mailbox.call(lambda r: Add(2, r), timeout=1) == 2
            mailbox.close()
    assert journal.events == ["init", "terminate"]
    assert journal.reasons == [None]


async def test_a_failing_init_fails_the_start() -> None:
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            with pytest.raises(OSError, match="no device"):
                await nursery.start(Counter(Mailbox(1), Journal(), init_fails=True).run)


async def test_a_crash_answers_the_caller_and_propagates() -> None:
    mailbox: Mailbox[Msg] = Mailbox(4)
    journal = Journal()
    failure: list[BaseException] = []

    async def run(*, task_status: trio.TaskStatus[None]) -> None:
        try:
            await Counter(mailbox, journal).run(task_status=task_status)
        except Exception as exc:
            failure.append(exc)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(run)
            with pytest.raises(ActorCrashed):
                await mailbox.call(Crash, timeout=1)
    assert [type(unwrap(exc)) for exc in failure] == [RuntimeError]
    assert journal.events == ["init", "terminate"]
    reason = journal.reasons[0]
    assert reason is not None and isinstance(unwrap(reason), RuntimeError)


async def test_actor_exit_is_a_normal_exit() -> None:
    mailbox: Mailbox[Msg] = Mailbox(4)
    journal = Journal(total=5)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(Counter(mailbox, journal).run)
            assert await mailbox.call(Stop, timeout=1) == 5
    assert journal.reasons == [None]


async def test_a_restart_over_the_same_mailbox_keeps_queued_messages() -> None:
    mailbox: Mailbox[Msg] = Mailbox(8)
    journal = Journal()
    crashed: TrioReply[int] = TrioReply()
    replies: list[TrioReply[int]] = [TrioReply(), TrioReply()]
    mailbox.send_nowait(Crash(crashed))
    mailbox.send_nowait(Add(1, replies[0]))
    mailbox.send_nowait(Add(2, replies[1]))
    with trio.fail_after(5):
        with pytest.raises(ExceptionGroup):
            async with trio.open_nursery() as nursery:
                await nursery.start(Counter(mailbox, journal).run)  # first incarnation
        with pytest.raises(ActorCrashed):
            await crashed.wait()
        assert mailbox.statistics().depth == 2  # nothing else was lost
        async with trio.open_nursery() as nursery:
            await nursery.start(Counter(mailbox, journal).run)  # second incarnation
            assert [await reply.wait() for reply in replies] == [1, 3]
            mailbox.close()
    assert journal.events == ["init", "terminate", "init", "terminate"]


async def test_cancellation_runs_terminate_and_propagates() -> None:
    mailbox: Mailbox[Msg] = Mailbox(4)
    journal = Journal()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(Counter(mailbox, journal).run)
            nursery.cancel_scope.cancel()
    assert nursery.cancel_scope.cancelled_caught
    assert journal.events == ["init", "terminate"]
    reason = journal.reasons[0]
    assert reason is not None and isinstance(unwrap(reason), trio.Cancelled)


async def test_a_hanging_terminate_is_bounded(autojump_clock: trio.abc.Clock) -> None:
    mailbox: Mailbox[Msg] = Mailbox(4)
    actor = Counter(mailbox, Journal(), terminate_hangs=True)
    actor.terminate_timeout = 3.0
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(actor.run)
            start = trio.current_time()
            nursery.cancel_scope.cancel()
    assert trio.current_time() == start + 3.0


async def test_cancelling_the_actor_mid_call_fails_the_caller() -> None:
    """The actor is cancelled while handling a request: its caller hears ActorCrashed."""
    gate = trio.Event()

    class Slow(Counter):
        async def handle(self, message: Msg) -> None:
            await gate.wait()

    mailbox: Mailbox[Msg] = Mailbox(4)
    with trio.fail_after(5):
        async with trio.open_nursery() as outer:
            actor_scope = trio.CancelScope()

            async def run_actor() -> None:
                with actor_scope:
                    await Slow(mailbox, Journal()).run()

            outer.start_soon(run_actor)
            reply: TrioReply[int] = TrioReply()
            await mailbox.send(Add(1, reply))
            await trio.testing.wait_all_tasks_blocked()
            actor_scope.cancel()
            with pytest.raises(ActorCrashed):
                await reply.wait()
