"""The NVML event loop and XID dispatch: from an NVML event to an unhealthy verdict.

A module of its own because it is the poller's one long-running conversation with the driver,
with rules of its own about time and about which devices an event concerns:

- ``event_set_wait`` runs in slices of ``wait_slice_ms`` (500 ms; the SPEC's 5000 ms wait is ten
  slices) in a worker thread that is abandoned on cancellation, so shutdown returns at once (the
  poller then waits, bounded, until the abandoned wait has returned before freeing the event
  set). After a wait that ended early without an event the loop sleeps the rest of the slice on
  trio's clock (this paces the fake backend in virtual time and any error loop).
- Critical XID → NVMLReady False "XidCritical" (message: the XID and its description); other
  non-ignored XIDs are logged and counted; an event without a device concerns every GPU; GPU
  lost → every GPU False "GPULost".
- MIG (:func:`event_targets`): an event's GPU/compute instance ids select the MIG device; an
  event without ids, or with ids matching none of our devices, concerns every MIG device of
  that GPU (the safe side).
- ``max_consecutive_wait_errors`` wait errors in a row (other than timeouts and GPU lost) crash
  the loop, and so the incarnation: the supervisor restarts the poller.

Marking unhealthy writes the ledger first, wakes recovery (the new fault starts its quiet
period), then sends what changed.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

import trio

from deviceapi._config import XidSet

from ._backend import (
    EventKind,
    EventSetHandle,
    NvmlBackend,
    NvmlError,
    NvmlEvent,
    NvmlGpuLost,
    NvmlTimeout,
)
from ._threads import NvmlCalls
from .discovery import GpuDevice, Inventory
from .ledger import REASON_GPU_LOST, REASON_XID_CRITICAL, ConditionWriter, GpuHealth, clip
from .xids import XidClass, classify, describe

log = logging.getLogger("deviceapi.nvml")


def event_targets(event: NvmlEvent, inventory: Inventory) -> list[GpuDevice]:
    """The registered devices an event concerns (see the module docstring)."""
    if event.gpu_uuid is None:
        return list(inventory.devices.values())
    devices = inventory.by_gpu.get(event.gpu_uuid)
    if devices is None:
        device = inventory.devices.get(event.gpu_uuid)
        return [device] if device is not None else []
    if not devices[0].is_mig or event.gpu_instance_id is None:
        return list(devices)
    gi, ci = event.gpu_instance_id, event.compute_instance_id
    matches = [
        d
        for d in devices
        if d.gpu_instance_id == gi and (ci is None or d.compute_instance_id == ci)
    ]
    return matches or list(devices)


@dataclasses.dataclass(eq=False, slots=True)
class EventMonitor:
    """The event loop of one incarnation; start it with ``await nursery.start(monitor.run, es)``.

    ``counts``: the poller's counters, updated in place. ``on_fault``: called after every new
    fault is in the ledger (recovery's wakeup). ``on_error``: told the last wait error, for
    ``statistics().last_error``.
    """

    backend: NvmlBackend
    call: NvmlCalls
    inventory: Inventory
    writer: ConditionWriter
    _: dataclasses.KW_ONLY
    ignored_xids: XidSet
    critical_xids: XidSet
    recovery_quiet_period: float
    wait_slice_ms: int
    call_timeout: float
    max_consecutive_wait_errors: int
    counts: dict[str, int]
    on_fault: Callable[[], None]
    on_error: Callable[[str], None]
    running: bool = dataclasses.field(default=False, init=False)
    """The loop is running; metric nvml_health_monitor_running."""

    async def run(
        self,
        event_set: EventSetHandle,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Wait for events until cancelled (or until too many wait errors in a row)."""
        slice_ms = self.wait_slice_ms
        slice_s = slice_ms / 1000
        wait_limit = slice_s + self.call_timeout
        errors_in_a_row = 0
        self.running = True
        task_status.started()
        try:
            while True:
                begun = trio.current_time()
                try:
                    event = await self.call(
                        self.backend.event_set_wait, event_set, slice_ms, limit=wait_limit
                    )
                except NvmlTimeout:
                    errors_in_a_row = 0
                except NvmlGpuLost as exc:
                    errors_in_a_row = 0
                    self.counts["gpu_lost"] += 1
                    log.error("NVML reports a GPU lost (%s): marking every GPU unhealthy", exc)
                    await self.mark_unhealthy(
                        list(self.inventory.devices.values()),
                        REASON_GPU_LOST,
                        clip(f"GPU is lost: {exc}"),
                    )
                except NvmlError as exc:
                    errors_in_a_row += 1
                    self.counts["wait_errors"] += 1
                    self.on_error(f"event wait: {exc}")
                    log.warning("NVML event wait failed (%d in a row): %s", errors_in_a_row, exc)
                    if errors_in_a_row >= self.max_consecutive_wait_errors:
                        raise
                else:
                    errors_in_a_row = 0
                    await self._handle_event(event)
                    continue
                remaining = slice_s - (trio.current_time() - begun)
                if remaining > 0:
                    await trio.sleep(remaining)
        finally:
            self.running = False

    async def _handle_event(self, event: NvmlEvent) -> None:
        if event.kind is not EventKind.XID or event.xid is None:
            self.counts["other_events"] += 1
            log.info(
                "NVML event %#x (%s) on %s",
                event.event_type,
                event.kind.value,
                event.gpu_uuid or "no device",
            )
            return
        xid = event.xid
        verdict = classify(xid, self.ignored_xids, self.critical_xids)
        where = event.gpu_uuid or "no device (all GPUs)"
        if verdict is XidClass.IGNORED:
            self.counts["xid_ignored"] += 1
            log.debug("%s on %s: ignored", describe(xid), where)
            return
        targets = event_targets(event, self.inventory)
        if not targets:
            self.counts["unmatched_events"] += 1
            log.info("%s on %s, a GPU we do not register: ignored", describe(xid), where)
            return
        if verdict is XidClass.LOGGED:
            self.counts["xid_logged"] += 1
            log.warning("%s on %s: logged, NVMLReady unchanged", describe(xid), where)
            return
        self.counts["xid_critical"] += 1
        log.error(
            "%s on %s: critical, marking %d device(s) unhealthy",
            describe(xid),
            where,
            len(targets),
        )
        await self.mark_unhealthy(targets, REASON_XID_CRITICAL, clip(describe(xid)))

    async def mark_unhealthy(self, devices: Sequence[GpuDevice], reason: str, message: str) -> None:
        """``devices`` False for ``reason``, each with a fresh quiet period from now."""
        now = trio.current_time()
        not_before = now + self.recovery_quiet_period
        for device in devices:
            self.writer.ledger.set(
                device.uuid,
                GpuHealth("False", reason, message, last_fault=now, not_before=not_before),
            )
        self.on_fault()
        async with self.writer.lock:
            await self.writer.flush_locked([d.uuid for d in devices])
