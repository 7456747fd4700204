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


class StartFn(Protocol):
    """How a supervisor starts one incarnation of a child (``await nursery.start(start)``)."""

    def __call__(self, *, task_status: trio.TaskStatus[None]) -> Awaitable[None]: ...


@dataclasses.dataclass(frozen=True, slots=True)
class ChildSpec:
    """One supervised child.

    ``shutdown`` bounds how long the supervisor waits for the child to finish after cancelling
    it; past that it is abandoned as *killed* (see ``Supervisor`` for what that means under
    trio). Supervisor children should keep ``math.inf`` so a subtree always stops in order.
    """

    id: str
    start: StartFn
    restart: Restart = "permanent"
    shutdown: float = DEFAULT_SHUTDOWN
    type: ChildType = "worker"

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("a child needs a non-empty id")
        if self.restart not in RESTART_TYPES:
            raise ValueError(f"child {self.id!r}: unknown restart type {self.restart!r}")
        if self.type not in ("worker", "supervisor"):
            raise ValueError(f"child {self.id!r}: unknown child type {self.type!r}")
        if math.isnan(self.shutdown) or self.shutdown < 0:
            raise ValueError(f"child {self.id!r}: shutdown must be >= 0 seconds or math.inf")
