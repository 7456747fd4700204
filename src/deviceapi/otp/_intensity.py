"""Restart intensity: how many restarts a supervisor allows within a sliding window.

OTP's rule: a supervisor that needs more than ``intensity`` restarts within ``period``
seconds gives up, stops its children and fails, so its own supervisor can try a bigger reset
(escalation). Time is passed in (trio's clock in production, any float in tests), so the
window follows ``autojump_clock`` in tests and never the wall clock.
"""

from __future__ import annotations

import collections
import dataclasses


@dataclasses.dataclass(frozen=True, slots=True)
class Intensity:
    """At most ``restarts`` restarts within any ``period`` seconds (OTP default: 1 in 5 s)."""

    restarts: int = 1
    period: float = 5.0

    def __post_init__(self) -> None:
        if self.restarts < 0:
            raise ValueError("restart intensity must be >= 0")
        if not self.period > 0:
            raise ValueError("restart period must be > 0 seconds")

    def __str__(self) -> str:
        return f"{self.restarts} restart(s) in {self.period:g} s"


class RestartWindow:
    """The restarts of one supervisor incarnation that still fall inside the window.

    A restart exactly ``period`` seconds old still counts (as in OTP). Holds at most
    ``restarts + 1`` timestamps, so memory stays bounded however often it is fed.
    """

    __slots__ = ("_stamps", "intensity")

    def __init__(self, intensity: Intensity) -> None:
        self.intensity = intensity
        self._stamps: collections.deque[float] = collections.deque(
            maxlen=intensity.restarts + 1
        )

    def allow(self, now: float) -> bool:
        """Record a restart at ``now``; False when it exceeds the intensity (escalate)."""
        self._stamps.append(now)
        while self._stamps and now - self._stamps[0] > self.intensity.period:
            self._stamps.popleft()
        return len(self._stamps) <= self.intensity.restarts
