"""Recovery: when an unhealthy GPU turns healthy again.

A module of its own because it is the only way back to True, and it keeps its own clock: a False
GPU whose last fault is at least ``recovery_quiet_period`` old (trio clock) is probed
(:func:`probe_health`: memory info readable, no retired pages pending, no row remapping pending
or failed; checks a device does not support are skipped) and turns True "Recovered" if healthy;
else it is probed again one quiet period later (at least a second). A fault that arrives while a
probe runs wins: its own quiet period applies.

The quiet period lives in the ledger (``GpuHealth.not_before``), not in this loop, so a restarted
poller keeps it.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import trio

from ._backend import NvmlBackend, NvmlError, NvmlNotSupported
from ._threads import NvmlCalls
from .discovery import GpuDevice, Inventory
from .ledger import REASON_RECOVERED, ConditionWriter, GpuHealth, clip

log = logging.getLogger("deviceapi.nvml")


def probe_health(backend: NvmlBackend, device: GpuDevice) -> str | None:
    """None if NVML reports ``device`` healthy, else why not. Unsupported checks are skipped."""
    try:
        backend.device_memory_info(device.handle)
    except NvmlError as exc:
        return f"memory info unreadable: {exc}"
    try:
        if backend.device_retired_pages_pending(device.gpu_handle):
            return "page retirement pending"
    except NvmlNotSupported:
        pass
    except NvmlError as exc:
        return f"retired pages unreadable: {exc}"
    try:
        rows = backend.device_remapped_rows(device.gpu_handle)
    except NvmlNotSupported:
        return None
    except NvmlError as exc:
        return f"remapped rows unreadable: {exc}"
    if rows.failure:
        return "row remapping failed"
    if rows.pending:
        return "row remapping pending"
    return None


@dataclasses.dataclass(eq=False, slots=True)
class Recovery:
    """The recovery loop of one incarnation; run it with ``nursery.start_soon(recovery.run)``.

    ``wake()`` after a new fault is in the ledger: the loop sleeps until the earliest
    ``not_before`` it knows, and a new fault may come due sooner. ``counts["recoveries"]``
    counts the GPUs it turned True.
    """

    backend: NvmlBackend
    call: NvmlCalls
    inventory: Inventory
    writer: ConditionWriter
    _: dataclasses.KW_ONLY
    recovery_quiet_period: float
    counts: dict[str, int]
    _wakeup: trio.Event = dataclasses.field(default_factory=trio.Event, init=False)

    def wake(self) -> None:
        """Look at the ledger again now."""
        self._wakeup.set()

    async def run(self) -> None:
        """Probe every False device that is due, sleep until the next is due; until cancelled."""
        while True:
            self._wakeup = wakeup = trio.Event()
            now = trio.current_time()
            due: list[tuple[GpuDevice, GpuHealth]] = []
            next_at = math.inf
            for device in self.inventory.devices.values():
                health = self.writer.ledger.get(device.uuid)
                if health is None or health.status == "True":
                    continue
                if health.not_before <= now:
                    due.append((device, health))
                else:
                    next_at = min(next_at, health.not_before)
            for device, health in due:
                await self._try_recover(device, health)
            if due:
                continue
            with trio.move_on_at(next_at):
                await wakeup.wait()

    async def _try_recover(self, device: GpuDevice, health: GpuHealth) -> None:
        try:
            problem = await self.call(probe_health, self.backend, device)
        except NvmlError as exc:
            problem = str(exc)
        async with self.writer.lock:
            if self.writer.ledger.get(device.uuid) is not health:
                return  # a new fault arrived while probing; its own quiet period applies
            quiet = self.recovery_quiet_period
            if problem is not None:
                log.info(
                    "%s still unhealthy (%s); next check in %g s",
                    device.uuid,
                    problem,
                    max(quiet, 1.0),
                )
                self.writer.ledger.set(
                    device.uuid,
                    dataclasses.replace(health, not_before=trio.current_time() + max(quiet, 1.0)),
                )
                return
            self.writer.ledger.set(
                device.uuid,
                GpuHealth(
                    "True",
                    REASON_RECOVERED,
                    clip(
                        f"{device.summary()}: no critical events for {quiet:g} s and NVML "
                        f"reports it healthy (was {health.reason}: {health.message})"
                    ),
                    last_fault=health.last_fault,
                ),
            )
            self.counts["recoveries"] += 1
            log.info("%s recovered after %s", device.uuid, health.reason)
            await self.writer.flush_locked([device.uuid])
