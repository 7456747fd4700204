"""The actor base, in the shape of OTP's gen_server: init → handle messages → terminate.

An actor is started with ``await nursery.start(actor.run)``: ``start`` returns once ``init`` has
finished, so "started" means "ready to serve" (never a sleep). Its mailbox and any state that must
survive a crash are handed in by the owner, so a supervisor can run a fresh incarnation over the
same mailbox and state: queued messages and callers' handles survive the restart.

How an actor ends:
- ``handle`` raises :class:`ActorExit` → normal exit (``run`` returns; a transient child is not
  restarted);
- ``handle`` raises anything else → crash: the request being handled, if it expects a reply, is
  answered with :class:`ActorCrashed` (the caller never waits forever), ``terminate`` runs, and
  the exception propagates to the supervisor;
- its mailbox is closed and drained → normal exit;
- cancellation → ``terminate`` runs (shielded, bounded by ``terminate_timeout``) and Cancelled
  propagates.

A :class:`FaultHook` (the fault-injection kit in ``deviceapi.testing.faults``) is consulted before
each message and may inject a crash, a hang or a normal exit at any moment, without reaching into
the actor's internals.
"""

from __future__ import annotations

import abc
import logging
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import outcome
import trio

from ._mailbox import Mailbox, MailboxClosed, Reply

M = TypeVar("M")

log = logging.getLogger("deviceapi.actor")


class ActorExit(Exception):
    """Raise inside an actor to stop it normally (OTP's ``{stop, normal, State}``)."""


class ActorCrashed(Exception):
    """The actor stopped (crashed, exited or was cancelled) while handling this request; the
    request may or may not have applied."""


@runtime_checkable
class ExpectsReply(Protocol):
    """A message that carries a reply slot (requests made with ``Mailbox.call``)."""

    @property
    def reply(self) -> Reply[Any]: ...


class FaultHook(Protocol):
    """Where the fault-injection kit plugs into every actor (no monkeypatching needed)."""

    async def before_message(self, actor: str) -> None:
        """Called before each message; may raise (crash), block (hang) or raise ActorExit."""

    async def wait_injected(self, actor: str) -> None:
        """Block until a fault is injected for ``actor`` now, then raise it."""


class Actor(abc.ABC, Generic[M]):
    """Base class of every actor. Subclasses implement ``handle`` and may override the hooks."""

    #: Seconds ``terminate`` may take when the actor is being cancelled.
    terminate_timeout: float = 5.0
    #: Queued messages handled in one go before the actor yields to other tasks.
    batch_size: int = 64

    def __init__(self, name: str, mailbox: Mailbox[M], *, faults: FaultHook | None = None) -> None:
        self.name = name
        self.mailbox = mailbox
        self._faults = faults

    async def init(self) -> None:
        """Prepare to serve. Runs before ``started`` is reported; raising fails the start."""

    @abc.abstractmethod
    async def handle(self, message: M) -> None:
        """Process one message. Resolve its reply (if any) before returning."""

    def message_done(self, message: M) -> None:
        """Called after every received message, handled or lost to a crash (bookkeeping)."""

    async def terminate(self, reason: BaseException | None) -> None:
        """Clean up after the loop ends (``reason`` is None on a normal exit)."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run this incarnation until it exits; see the module docstring for how it ends."""
        await self.init()
        reason: BaseException | None = None
        try:
            try:
                async with trio.open_nursery() as nursery:
                    if self._faults is not None:
                        nursery.start_soon(self._faults.wait_injected, self.name)
                    task_status.started()
                    await self._loop()
                    nursery.cancel_scope.cancel()
            except* ActorExit:
                log.debug("actor exit requested", extra={"actor": self.name})
        except BaseException as exc:
            reason = exc
            raise
        finally:
            with trio.move_on_after(self.terminate_timeout, shield=True):
                await self.terminate(reason)

    async def _loop(self) -> None:
        while True:
            try:
                message = await self.mailbox.receive()
            except MailboxClosed:
                return
            # Drain what is already queued before yielding again: one scheduling round per
            # batch, not per message (in guest mode a round costs a host-loop iteration, which
            # under watch load is milliseconds).
            for _ in range(self.batch_size):
                await self._process(message)
                try:
                    message = self.mailbox.receive_nowait()
                except trio.WouldBlock:
                    break
                except MailboxClosed:
                    return
            else:
                await self._process(message)

    async def _process(self, message: M) -> None:
        try:
            if self._faults is not None:
                await self._faults.before_message(self.name)
            await self.handle(message)
        except BaseException:
            # Crash, exit or cancellation before an answer: never leave the caller waiting
            # (a reply already resolved by ``handle`` is not changed: resolving is one-shot).
            if isinstance(message, ExpectsReply):
                message.reply.resolve(outcome.Error(ActorCrashed(self.name)))
            raise
        finally:
            self.message_done(message)
