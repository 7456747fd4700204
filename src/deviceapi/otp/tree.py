"""Building and running trees: supervisors as children of supervisors, and the root runner.

A supervisor child gets ``shutdown=math.inf`` (OTP's ``infinity``): its parent waits for the
whole subtree to stop in order rather than abandoning it half-way. The root runner turns the
root's failure into one clear :class:`TreeFailed` naming the escalation path down to the child
that started it, so a program ends with an error message, never a hang or a traceback maze.
"""

from __future__ import annotations

import logging
import math

import trio

from ._spec import ChildSpec, Restart
from .supervisor import DynamicSupervisor, Supervisor, SupervisorError, describe, unwrap

log = logging.getLogger("deviceapi.supervisor")

AnySupervisor = Supervisor | DynamicSupervisor


def supervisor_spec(
    supervisor: AnySupervisor, *, restart: Restart = "permanent", id: str | None = None
) -> ChildSpec:
    """A ChildSpec that runs ``supervisor`` as a child (restarts re-run the same object)."""
    return ChildSpec(
        id=id or supervisor.name,
        start=supervisor.run,
        restart=restart,
        shutdown=math.inf,
        type="supervisor",
    )


class TreeFailed(Exception):
    """The root supervisor gave up: the whole tree is down.

    ``path`` lists the supervisors and the child the failure escalated through, root first;
    ``root_cause`` is the innermost non-supervisor error (None for repeated normal exits).
    """

    def __init__(self, root: str, error: BaseException) -> None:
        path: list[str] = []
        cause: BaseException | None = unwrap(error)
        while isinstance(cause, SupervisorError):
            if not path or path[-1] != cause.supervisor:
                path.append(cause.supervisor)
            path.append(cause.child)
            cause = None if cause.__cause__ is None else unwrap(cause.__cause__)
        self.root = root
        self.path = tuple(path) or (root,)
        self.root_cause = cause
        top = unwrap(error)
        why = "repeated normal exits" if cause is None else describe(cause)
        detail = f" ({top})" if isinstance(top, SupervisorError) else ""
        super().__init__(
            f"supervision tree {root!r} failed along {' -> '.join(self.path)}: {why}{detail}"
        )


async def run_root(
    root: AnySupervisor, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run ``root`` until cancelled; its failure (start or escalation) raises TreeFailed."""
    try:
        await root.run(task_status=task_status)
    except Exception as exc:
        failure = TreeFailed(root.name, exc)
        log.critical(
            "%s",
            failure,
            extra={"actor": root.name, "supervisor": root.name, "reason": str(failure),
                   "event": "tree_failed"},
        )
        raise failure from unwrap(exc)


def run_tree(root: AnySupervisor) -> None:
    """Run a tree as the whole program (``trio.run``).

    Ends with ``SystemExit`` carrying TreeFailed's message (exit status 1) when the root gives
    up; KeyboardInterrupt and other BaseExceptions propagate unchanged.
    """
    try:
        trio.run(run_root, root)
    except TreeFailed as exc:
        raise SystemExit(f"deviceapi: {exc}") from exc
