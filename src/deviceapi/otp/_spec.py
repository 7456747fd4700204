"""Child specifications: what a supervisor needs to know to start, restart and stop a child.

A child is any async callable ``start(*, task_status)`` run with ``nursery.start``: it reports
``task_status.started()`` once it is ready to serve (OTP's ``start_link`` returning), then runs
until it returns (a normal exit), raises (a crash) or is cancelled by its supervisor. An
:class:`~deviceapi.otp.Actor`'s bound ``run`` method is such a callable; so is a
supervisor's ``run``. Returning *before* ``started`` is OTP's ``ignore``: the child is simply not
running, and that is not a failure.

The same callable is called again for every restart, so anything that must survive a crash (a
mailbox, a store) belongs to whoever built the callable, not to the incarnation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Awaitable
from typing import Literal, Protocol

import trio

Restart = Literal["permanent", "transient", "temporary"]
"""permanent: always restarted; transient: restarted only after a crash; temporary: never."""

ChildType = Literal["worker", "supervisor"]

RESTART_TYPES: tuple[Restart, ...] = ("permanent", "transient", "temporary")

DEFAULT_SHUTDOWN = 5.0
"""Seconds a worker may take to finish once cancelled (OTP's default worker shutdown)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Backoff:
    """Restart delay for a child whose failures are expected to last (a missing GPU driver):
    the supervisor waits ``initial`` seconds before the first restart, ``factor`` times longer
    before each next one, at most ``maximum``; an incarnation that ran ``reset_after`` seconds
    starts the sequence over. The restart is counted (intensity, ``on_restart``) when decided,
    and the supervisor keeps handling other children while it waits.

    With the defaults the delays between six restarts in a row add up to more than 30 seconds,
    so such a child alone never exceeds an intensity of 5 restarts in 30 seconds.
    """

    initial: float = 1.0
    maximum: float = 300.0
    factor: float = 2.0
    reset_after: float = 30.0

    def __post_init__(self) -> None:
        if not 0 <= self.initial <= self.maximum or self.factor < 1 or self.reset_after < 0:
            raise ValueError(f"invalid backoff {self!r}")

    def delay(self, failures: int) -> float:
        """Seconds to wait before restarting after ``failures`` earlier quick failures."""
        return float(min(self.maximum, self.initial * self.factor ** min(failures, 64)))


class StartFn(Protocol):
    """How a supervisor starts one incarnation of a child (``await nursery.start(start)``)."""

    def __call__(self, *, task_status: trio.TaskStatus[None]) -> Awaitable[None]: ...


@dataclasses.dataclass(frozen=True, slots=True)
class ChildSpec:
    """One supervised child.

    ``shutdown`` bounds how long the supervisor waits for the child to finish after cancelling
    it; past that it is abandoned as *killed* (see ``Supervisor`` for what that means under
    trio). Supervisor children should keep ``math.inf`` so a subtree always stops in order.
    ``backoff``: wait before restarting it (None: restart at once, as OTP does).
    """

    id: str
    start: StartFn
    restart: Restart = "permanent"
    shutdown: float = DEFAULT_SHUTDOWN
    type: ChildType = "worker"
    backoff: Backoff | None = None

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("a child needs a non-empty id")
        if self.restart not in RESTART_TYPES:
            raise ValueError(f"child {self.id!r}: unknown restart type {self.restart!r}")
        if self.type not in ("worker", "supervisor"):
            raise ValueError(f"child {self.id!r}: unknown child type {self.type!r}")
        if math.isnan(self.shutdown) or self.shutdown < 0:
            raise ValueError(f"child {self.id!r}: shutdown must be >= 0 seconds or math.inf")
