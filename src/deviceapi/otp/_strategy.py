"""Restart strategies as pure functions: which children to stop and which to start again.

Kept free of trio and of any running state so it can be tested exhaustively (hypothesis) and
read on its own. It follows OTP's supervisor.erl:

- whether the failed child is restarted at all depends only on its restart type and how it
  exited (permanent: always; transient: only after a crash; temporary: never). A child that is
  not restarted never disturbs its siblings;
- one_for_one restarts the failed child alone; one_for_all stops every other child and restarts
  all of them; rest_for_one stops and restarts the children started after the failed one;
- siblings stopped because of the strategy are restarted unless they are temporary: temporary
  children are dropped for good, as are temporary children that exit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Literal

from ._spec import Restart

Strategy = Literal["one_for_one", "one_for_all", "rest_for_one"]
STRATEGIES: tuple[Strategy, ...] = ("one_for_one", "one_for_all", "rest_for_one")

ExitKind = Literal["normal", "crash"]
"""normal: the child returned (or was ignored); crash: it raised."""


@dataclasses.dataclass(frozen=True, slots=True)
class RestartPlan:
    """What a supervisor does after one child exited.

    ``stop`` lists running siblings to stop, in reverse start order; ``restart`` the children to
    start again, in start order (the failed child included when it is restarted); ``remove`` the
    children the supervisor forgets (temporary ones).
    """

    stop: tuple[str, ...]
    restart: tuple[str, ...]
    remove: tuple[str, ...]


def should_restart(restart: Restart, exit: ExitKind) -> bool:
    """Whether a child of this restart type is restarted after exiting this way."""
    if restart == "permanent":
        return True
    if restart == "transient":
        return exit == "crash"
    return False


def plan_restart(
    strategy: Strategy,
    children: Sequence[str],
    restarts: Mapping[str, Restart],
    failed: str,
    exit: ExitKind,
) -> RestartPlan:
    """Decide what follows the exit of ``failed``.

    ``children`` are the supervisor's child ids in start order and ``restarts`` maps each to its
    restart type. Raises ValueError when ``failed`` is not one of ``children``.
    """
    if failed not in children:
        raise ValueError(f"{failed!r} is not a child")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}")
    failed_type = restarts[failed]
    dropped_failed = (failed,) if failed_type == "temporary" else ()
    if not should_restart(failed_type, exit):
        return RestartPlan(stop=(), restart=(), remove=dropped_failed)
    if strategy == "one_for_one":
        affected: Sequence[str] = (failed,)
    elif strategy == "one_for_all":
        affected = children
    else:
        affected = children[children.index(failed) :]
    siblings = [child for child in affected if child != failed]
    return RestartPlan(
        stop=tuple(reversed(siblings)),
        restart=tuple(c for c in affected if c == failed or restarts[c] != "temporary"),
        remove=tuple(c for c in siblings if restarts[c] == "temporary"),
    )
