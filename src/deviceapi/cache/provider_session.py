"""Provider sessions: who owns which GPUs, and heartbeat deadlines (SPEC §4).

A session exists per provider id. GPU ownership is recorded by the cache itself (the store's
``owners``, set by every write that names a provider), so it can never disagree with the data.
This module keeps the heartbeat side: when each provider last sent one, and whether its GPUs are
currently masked (Ready=Unknown, reason ProviderHeartbeatTimeout).

The masked flag flips when the mask/unmask *write is submitted*, and writes are processed in
submission order, so a heartbeat racing a timeout always ends with the right final state.
A provider that never sent a Heartbeat is never timed out.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import trio

from ..otp._mailbox import Reply, TrioReply
from ._store import Command, MaskProvider, UnmaskProvider

log = logging.getLogger("deviceapi.provider")


@dataclasses.dataclass(slots=True)
class _Session:
    last_heartbeat: float | None = None
    masked: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class ProviderStatistics:
    active: int
    masked: int
    heartbeat_timeouts: int


class ProviderSessions:
    """Heartbeat bookkeeping for every provider id (survives a monitor restart)."""

    def __init__(self, heartbeat_timeout: float) -> None:
        self.heartbeat_timeout = heartbeat_timeout
        self._sessions: dict[str, _Session] = {}
        self._timeouts = 0
        self.on_timeout: Callable[[str], None] | None = None

    def touch(self, provider: str) -> None:
        """A provider wrote something: make sure it has a session."""
        if provider and provider not in self._sessions:
            self._sessions[provider] = _Session()
            log.info("provider session opened", extra={"provider": provider})

    def heartbeat(self, provider: str, now: float) -> Command | None:
        """Record a heartbeat; return the unmask write to submit if its GPUs were masked."""
        self.touch(provider)
        session = self._sessions[provider]
        session.last_heartbeat = now
        if session.masked:
            session.masked = False
            log.info("provider heartbeats resumed", extra={"provider": provider})
            return UnmaskProvider(provider)
        return None

    def take_overdue(self, now: float) -> list[Command]:
        """Mask writes for every provider whose heartbeat is overdue (each only once)."""
        commands: list[Command] = []
        for provider, session in self._sessions.items():
            if (
                session.last_heartbeat is not None
                and not session.masked
                and now - session.last_heartbeat >= self.heartbeat_timeout
            ):
                session.masked = True
                self._timeouts += 1
                log.warning("provider heartbeat overdue", extra={"provider": provider,
                                                                 "reason": "heartbeat_timeout"})
                commands.append(MaskProvider(provider))
                if self.on_timeout is not None:
                    self.on_timeout(provider)
        return commands

    def next_deadline(self) -> float | None:
        deadlines = [
            s.last_heartbeat + self.heartbeat_timeout
            for s in self._sessions.values()
            if s.last_heartbeat is not None and not s.masked
        ]
        return min(deadlines, default=None)

    def statistics(self) -> ProviderStatistics:
        return ProviderStatistics(
            active=len(self._sessions),
            masked=sum(s.masked for s in self._sessions.values()),
            heartbeat_timeouts=self._timeouts,
        )


async def run_heartbeat_monitor(
    sessions: ProviderSessions,
    submit: Callable[[Command, Reply[Any]], None],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Mask the GPUs of providers whose heartbeat is overdue, as each deadline passes.

    ``submit`` queues a command for the CacheOwner. Every mask due now is queued in the same
    step that marks its session masked, before waiting for any of them: a heartbeat that
    arrives meanwhile queues its unmask *after* its mask. Polls at most once a second (or a
    quarter of the timeout), so a mask lands at most that late.
    """
    interval = min(1.0, sessions.heartbeat_timeout / 4)
    task_status.started()
    while True:
        replies: list[TrioReply[Any]] = []
        for command in sessions.take_overdue(trio.current_time()):
            reply: TrioReply[Any] = TrioReply()
            submit(command, reply)
            replies.append(reply)
        for reply in replies:
            await reply.wait()
        await trio.sleep(interval)
