"""One slow-consumer policy for every answer the server streams out (SPEC §3, §5).

A consumer that leaves data unaccepted for ``timeout`` seconds is cut off, so one stalled
client never holds memory or a sending slot for everyone else. Two kinds of consumer exist:
watch subscriptions (their progress is tracked by the hub, which asks :meth:`stalled`) and
one-shot list answers (tracked here from :meth:`begin` to :meth:`finish`). Both are judged on
the same clock — the core's, virtual in tests — by the same sweep: the watch janitor
(:func:`run_slow_consumer_janitor`), so the promise lives in one place.

A tracked send is cut off through the callback it registered: a plain synchronous function,
so this module knows nothing of the loop the send runs on (the transport hands in a callback
that expires its own asyncio timeout).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Protocol

import trio


class _StalledSweep(Protocol):
    """The hub's half of a sweep: evict the subscriptions this policy finds stalled."""

    def evict_stalled(self, policy: SlowConsumerPolicy) -> int: ...


class SlowConsumerPolicy:
    """``timeout`` seconds on ``clock`` without accepting data: the consumer is cut off."""

    def __init__(self, timeout: float, clock: Callable[[], float]) -> None:
        if timeout <= 0:
            raise ValueError(f"slow-consumer timeout must be positive, got {timeout!r}")
        self.timeout = timeout
        self.clock = clock
        self._sends: dict[int, tuple[float, Callable[[], None]]] = {}
        self._ids = itertools.count(1)
        self.sends_cut = 0

    @property
    def sweep_interval(self) -> float:
        """How often a sweep runs: a cut-off comes at most a quarter timeout (≤ 1 s) late."""
        return min(1.0, self.timeout / 4)

    def stalled(self, since: float, now: float | None = None) -> bool:
        """Has a consumer that last made progress at ``since`` been stalled too long?"""
        return (self.clock() if now is None else now) - since >= self.timeout

    def begin(self, cut_off: Callable[[], None]) -> int:
        """Track a one-shot send (a list answer); ``cut_off`` ends it if it stalls."""
        token = next(self._ids)
        self._sends[token] = (self.clock(), cut_off)
        return token

    def finish(self, token: int) -> None:
        """The send is over (sent, failed or cut off)."""
        self._sends.pop(token, None)

    @property
    def sends_in_progress(self) -> int:
        return len(self._sends)

    def cut_stalled_sends(self) -> int:
        """Cut off every tracked send that has taken the whole timeout; returns how many."""
        now = self.clock()
        stalled = [token for token, (began, _) in self._sends.items()
                   if self.stalled(began, now)]
        for token in stalled:
            _, cut_off = self._sends.pop(token)
            self.sends_cut += 1
            cut_off()
        return len(stalled)


async def run_slow_consumer_janitor(
    policy: SlowConsumerPolicy,
    hub: _StalledSweep,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Sweep the watch subscriptions and the list sends every ``policy.sweep_interval``.

    Holds no state (the hub and the policy do): a restart loses nothing.
    """
    task_status.started()
    while True:
        await trio.sleep(policy.sweep_interval)
        hub.evict_stalled(policy)
        policy.cut_stalled_sends()
