"""GPU health classification (SPEC §6), a pure function the metrics and examples share.

Any condition False → unhealthy; otherwise any condition that is not True, or no conditions at
all → unknown; otherwise (every condition True) → healthy.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable
from typing import Literal

from ..proto.device.v1alpha1.gpu_pb2 import Gpu

Health = Literal["healthy", "unhealthy", "unknown"]


def classify(gpu: Gpu) -> Health:
    statuses = [c.status for c in gpu.status.conditions]
    if "False" in statuses:
        return "unhealthy"
    if not statuses or any(s != "True" for s in statuses):
        return "unknown"
    return "healthy"


@dataclasses.dataclass(frozen=True, slots=True)
class HealthCounts:
    total: int
    healthy: int
    unhealthy: int
    unknown: int


def count(gpus: Iterable[Gpu]) -> HealthCounts:
    tally = collections.Counter(classify(g) for g in gpus)
    return HealthCounts(
        total=sum(tally.values()),
        healthy=tally["healthy"],
        unhealthy=tally["unhealthy"],
        unknown=tally["unknown"],
    )
