"""The NVMLReady verdicts: what the poller asserts per GPU, and how it reaches the server.

A module of its own because these verdicts outlive the code that reaches them. The
:class:`HealthLedger` is owned by whoever owns the poller's lifetime and handed to every
incarnation, so a restarted poller neither forgets an unhealthy GPU nor restarts its quiet
period; discovery, the event loop and recovery all read or replace its records.

Only the NVMLReady condition is ever written (``update_condition`` upserts by type), and only
when what it says changes: one XID 79 is exactly one update. :class:`ConditionWriter` keeps that
promise for one incarnation: it remembers what it last sent and sends a record only when its
visible part differs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import types
from collections.abc import Mapping, Sequence
from typing import Literal

import trio

from deviceapi.proto.device.v1alpha1 import gpu_pb2

from ._api import ProviderApi

log = logging.getLogger("deviceapi.nvml")

CONDITION_TYPE = "NVMLReady"
REASON_INITIALIZED = "Initialized"
REASON_XID_CRITICAL = "XidCritical"
REASON_GPU_LOST = "GPULost"
REASON_RECOVERED = "Recovered"

_MAX_MESSAGE = 1024

Status = Literal["True", "False"]


def clip(text: str) -> str:
    """``text`` cut to the longest condition message we send."""
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


@dataclasses.dataclass(frozen=True, slots=True)
class GpuHealth:
    """What the poller asserts about one GPU. A new record replaces the old on every change, so
    "the record is still the same object" means "nothing happened meanwhile"."""

    status: Status
    reason: str
    message: str
    last_fault: float | None = None
    """Trio time of the last critical event or loss."""
    not_before: float = -math.inf
    """While False: the earliest trio time for the next recovery probe."""

    def condition(self) -> gpu_pb2.Condition:
        return gpu_pb2.Condition(
            type=CONDITION_TYPE, status=self.status, reason=self.reason, message=self.message
        )

    def visible(self) -> tuple[str, str, str]:
        return (self.status, self.reason, self.message)


class HealthLedger:
    """The NVMLReady state the poller asserts per GPU UUID.

    Owned by whoever owns the poller's lifetime and handed to each incarnation, so a restarted
    poller neither forgets an unhealthy GPU nor restarts its quiet period. Not thread-safe: use
    it from the trio thread only.
    """

    def __init__(self) -> None:
        self._entries: dict[str, GpuHealth] = {}

    def get(self, uuid: str) -> GpuHealth | None:
        return self._entries.get(uuid)

    def set(self, uuid: str, health: GpuHealth) -> None:
        self._entries[uuid] = health

    def snapshot(self) -> Mapping[str, GpuHealth]:
        return types.MappingProxyType(dict(self._entries))


class ConditionWriter:
    """Sends the ledger's verdicts to the server for one incarnation, each only when it changed.

    ``lock`` orders the event loop's and recovery's writes: hold it across "decide from the
    ledger, then flush", so a recovery never overwrites a fault that arrived while it probed.
    ``counts["condition_updates"]`` counts every update sent (the poller's statistics).
    """

    def __init__(
        self, api: ProviderApi, provider_id: str, ledger: HealthLedger, counts: dict[str, int]
    ) -> None:
        self.ledger = ledger
        self.lock = trio.Lock()
        self._api = api
        self._provider_id = provider_id
        self._counts = counts
        self._sent: dict[str, tuple[str, str, str]] = {}

    def note_sent(self, uuid: str, health: GpuHealth) -> None:
        """The server now holds ``health`` for ``uuid`` (it was registered or updated with it)."""
        self._sent[uuid] = health.visible()

    async def flush_locked(self, uuids: Sequence[str]) -> None:
        """Send the ledger's condition for each of ``uuids`` whose visible state changed."""
        for uuid in uuids:
            health = self.ledger.get(uuid)
            if health is None or self._sent.get(uuid) == health.visible():
                continue
            version = await self._api.update_condition(
                name=uuid, provider_id=self._provider_id, condition=health.condition()
            )
            self._sent[uuid] = health.visible()
            self._counts["condition_updates"] += 1
            log.debug("%s: NVMLReady=%s %s (rv %d)", uuid, health.status, health.reason, version)
