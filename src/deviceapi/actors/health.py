"""GPU health classification (SPEC §6, §7.3), a pure function the metrics and examples share.

A condition is healthy when True, unhealthy when False — except the types listed in
``--problem-conditions`` (written in the "True means a problem" style, e.g. ``XidCritical``), for
which True is unhealthy and False healthy. Unknown (or any other status) is neither.

A GPU with any unhealthy condition → unhealthy; otherwise any condition that is not healthy, or
no conditions at all → unknown; otherwise (every condition healthy) → healthy.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Collection, Iterable
from typing import Literal

from ..proto.device.v1alpha1.gpu_pb2 import Condition, Gpu

Health = Literal["healthy", "unhealthy", "unknown"]

_NO_PROBLEMS: frozenset[str] = frozenset()


def condition_health(condition: Condition, problem_conditions: Collection[str] = _NO_PROBLEMS,
                     ) -> Health:
    """One condition's verdict, with the polarity its type is written in."""
    status = condition.status
    if status not in ("True", "False"):
        return "unknown"
    healthy = (status == "True") != (condition.type in problem_conditions)
    return "healthy" if healthy else "unhealthy"


def classify(gpu: Gpu, problem_conditions: Collection[str] = _NO_PROBLEMS) -> Health:
    verdicts = [condition_health(c, problem_conditions) for c in gpu.status.conditions]
    if "unhealthy" in verdicts:
        return "unhealthy"
    if not verdicts or "unknown" in verdicts:
        return "unknown"
    return "healthy"


@dataclasses.dataclass(frozen=True, slots=True)
class HealthCounts:
    total: int
    healthy: int
    unhealthy: int
    unknown: int


def count(gpus: Iterable[Gpu], problem_conditions: Collection[str] = _NO_PROBLEMS,
          ) -> HealthCounts:
    tally = collections.Counter(classify(g, problem_conditions) for g in gpus)
    return HealthCounts(
        total=sum(tally.values()),
        healthy=tally["healthy"],
        unhealthy=tally["unhealthy"],
        unknown=tally["unknown"],
    )
