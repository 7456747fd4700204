"""Typed, bounded mailboxes and one-shot replies: how actors receive work.

A mailbox is a trio memory channel with a fixed capacity (never ``math.inf``: a full mailbox is
back-pressure or an explicit ``WouldBlock``), plus counters for ``statistics()``. The mailbox is
created by whoever owns the actor's lifetime and handed to each incarnation of the actor, so a
restart keeps every queued message and every caller's handle stays valid (see _actor.py).

``call`` is request/reply: the message carries a :class:`Reply` the actor resolves. Replies are
a Protocol because the caller may live in trio (:class:`TrioReply`) or in asyncio (the bridge's
future-backed reply); the actor resolves either the same way, synchronously.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

import outcome
import trio

M = TypeVar("M")
T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
T_contra = TypeVar("T_contra", contravariant=True)


class MailboxClosed(Exception):
    """The mailbox's owner has shut it down; no actor will ever read the message."""


class CallTimeout(Exception):
    """A ``call`` got no reply within its timeout. The actor may still process the message."""


class Reply(Protocol[T_contra]):
    """Where an actor puts the answer to one request. Resolving twice is a no-op."""

    def resolve(self, result: outcome.Outcome[T_contra]) -> None: ...


class TrioReply(Generic[T]):
    """A reply slot awaited from trio."""

    __slots__ = ("_event", "_result")

    def __init__(self) -> None:
        self._event = trio.Event()
        self._result: outcome.Outcome[T] | None = None

    def resolve(self, result: outcome.Outcome[T]) -> None:
        if self._result is None:
            self._result = result
            self._event.set()

    @property
    def done(self) -> bool:
        return self._result is not None

    async def wait(self) -> T:
        """Wait for the actor's answer; re-raise the error it resolved with."""
        await self._event.wait()
        assert self._result is not None
        return self._result.unwrap()


@dataclasses.dataclass(frozen=True, slots=True)
class MailboxStatistics:
    """Point-in-time counters of one mailbox (metrics and tests read these)."""

    depth: int
    capacity: int
    peak: int
    dropped: int
    received: int


class Mailbox(Generic[M]):
    """A bounded FIFO of messages of one closed union type ``M``.

    ``send`` waits while the mailbox is full; ``send_nowait`` raises ``trio.WouldBlock`` instead
    (and counts the message as dropped). Both raise :class:`MailboxClosed` after ``close``.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("a mailbox needs a capacity of at least 1")
        self._capacity = capacity
        self._send, self._receive = trio.open_memory_channel[M](capacity)
        self._peak = 0
        self._dropped = 0
        self._received = 0

    def _note_depth(self) -> None:
        depth = self._send.statistics().current_buffer_used
        if depth > self._peak:
            self._peak = depth

    async def send(self, message: M) -> None:
        """Queue ``message``, waiting for room. Cancellation leaves it unqueued."""
        try:
            await self._send.send(message)
        except (trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            raise MailboxClosed from exc
        self._note_depth()

    def send_nowait(self, message: M) -> None:
        """Queue ``message`` now or raise ``trio.WouldBlock`` (full) / MailboxClosed."""
        try:
            self._send.send_nowait(message)
        except trio.WouldBlock:
            self._dropped += 1
            raise
        except (trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            raise MailboxClosed from exc
        self._note_depth()

    cast = send_nowait
    """OTP's cast: fire and forget, never blocking the sender."""

    async def call(self, make: Callable[[Reply[T]], M], timeout: float) -> T:
        """Send ``make(reply)`` and wait up to ``timeout`` seconds for the actor's answer.

        On timeout raises :class:`CallTimeout`; on cancellation the request stays queued and
        its late answer is discarded (as with OTP's gen_server:call).
        """
        reply: TrioReply[T] = TrioReply()
        with trio.move_on_after(timeout) as scope:
            await self.send(make(reply))
            return await reply.wait()
        assert scope.cancelled_caught
        raise CallTimeout(f"no reply within {timeout:g} s")

    async def receive(self) -> M:
        """Take the next message, waiting for one. Raises MailboxClosed once closed and empty."""
        try:
            message = await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError) as exc:
            raise MailboxClosed from exc
        self._received += 1
        return message

    def receive_nowait(self) -> M:
        """Take the next message or raise ``trio.WouldBlock``."""
        try:
            message = self._receive.receive_nowait()
        except (trio.EndOfChannel, trio.ClosedResourceError) as exc:
            raise MailboxClosed from exc
        self._received += 1
        return message

    def close(self) -> None:
        """Refuse new messages; the reader still drains what is queued, then sees MailboxClosed."""
        self._send.close()

    def statistics(self) -> MailboxStatistics:
        return MailboxStatistics(
            depth=self._send.statistics().current_buffer_used,
            capacity=self._capacity,
            peak=self._peak,
            dropped=self._dropped,
            received=self._received,
        )
