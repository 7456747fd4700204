"""The core's push-style counter hooks (metrics plug in at build; defaults do nothing)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable


def _noop(_: str) -> None:
    return None


def _noop_count(_: str, n: int) -> None:
    return None


@dataclasses.dataclass(frozen=True, slots=True)
class Observer:
    """Handed to :meth:`Core.build` complete: nothing patches it afterwards."""

    on_update: Callable[[str], None] = _noop
    on_evict: Callable[[str], None] = _noop
    on_heartbeat_timeout: Callable[[str], None] = _noop
    on_reject: Callable[[str], None] = _noop
    on_watch_event: Callable[[str, int], None] = _noop_count
    #: SPEC §7.2 ingest: (outcome, events) — see ``ServerMetrics.count_ingest``.
    on_ingest: Callable[[str, int], None] = _noop_count
