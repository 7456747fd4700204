"""Discovery: which devices the poller registers, and which GPUs it can watch for XIDs.

A module of its own because it is the one part of the poller that turns NVML's view of the
machine into ours, once per incarnation, and it has rules of its own that the event loop and
recovery then rely on:

- one worker-thread call per GPU (:func:`query_gpu`); a GPU whose queries fail (or hang past
  ``call_timeout``) is skipped, the others go on; a second GPU with a UUID already seen is
  skipped too;
- a GPU with MIG on and MIG devices contributes its MIG devices (name = MIG UUID) instead of
  itself; one failing MIG device is skipped; MIG on without MIG devices registers the GPU;
- with ``health_check``, one event set, and XID-critical events registered on each physical GPU
  that supports them (:func:`open_events`); a GPU that does not is registered but not monitored.

What it found lives in an :class:`Inventory`, fresh for every incarnation.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

from ._backend import (
    EVENT_TYPE_XID_CRITICAL,
    DeviceHandle,
    EventSetHandle,
    NvmlBackend,
    NvmlError,
    NvmlNotFound,
    NvmlNotSupported,
)
from ._threads import NvmlCalls

log = logging.getLogger("deviceapi.nvml")

MiB = 1024 * 1024


@dataclasses.dataclass(frozen=True, slots=True)
class GpuDevice:
    """One device the poller registers: a whole GPU, or a MIG device of one."""

    uuid: str
    product: str
    memory_total: int
    index: int
    """NVML index of the physical GPU."""
    pci_bus_id: str
    handle: DeviceHandle
    gpu_handle: DeviceHandle
    """The physical GPU's handle (the same as ``handle`` unless this is a MIG device)."""
    gpu_uuid: str
    """The physical GPU's UUID (``uuid`` unless this is a MIG device)."""
    gpu_instance_id: int | None = None
    compute_instance_id: int | None = None

    @property
    def is_mig(self) -> bool:
        return self.uuid != self.gpu_uuid

    def summary(self) -> str:
        """``"NVIDIA H100 80GB HBM3 (81559 MiB)"``: the Initialized condition's message."""
        return f"{self.product} ({self.memory_total // MiB} MiB)"


@dataclasses.dataclass(frozen=True, slots=True)
class PhysicalGpu:
    """One GPU as NVML enumerates it, with the devices it contributes (itself or its MIGs)."""

    uuid: str
    index: int
    handle: DeviceHandle
    devices: tuple[GpuDevice, ...]


@dataclasses.dataclass(slots=True)
class Inventory:
    """What one incarnation found: filled during enumeration, read by everything after it (and
    by ``statistics()`` at any time, hence mutable and filled in place)."""

    devices: dict[str, GpuDevice] = dataclasses.field(default_factory=dict)
    """Registered devices by UUID."""
    by_gpu: dict[str, tuple[GpuDevice, ...]] = dataclasses.field(default_factory=dict)
    """The devices of each physical GPU, by the GPU's UUID."""
    skipped: int = 0
    monitored: int = 0
    """Physical GPUs with XID events registered."""


# ---- blocking helpers (run in a worker thread) -------------------------------------------------


def query_gpu(backend: NvmlBackend, index: int) -> PhysicalGpu:
    """Everything we need about GPU ``index``; raises NvmlError if a required query fails."""
    handle = backend.device_handle_by_index(index)
    uuid = backend.device_uuid(handle)
    product = backend.device_name(handle)
    memory = backend.device_memory_info(handle)
    try:
        pci_bus_id = backend.device_pci_bus_id(handle)
    except NvmlError as exc:
        log.debug("GPU %d (%s): no PCI bus id (%s)", index, uuid, exc)
        pci_bus_id = ""
    whole = GpuDevice(
        uuid=uuid,
        product=product,
        memory_total=memory.total,
        index=index,
        pci_bus_id=pci_bus_id,
        handle=handle,
        gpu_handle=handle,
        gpu_uuid=uuid,
    )
    try:
        mig_on = backend.device_mig_mode(handle).current
    except NvmlNotSupported:
        mig_on = False
    if not mig_on:
        return PhysicalGpu(uuid, index, handle, (whole,))
    migs: list[GpuDevice] = []
    for slot in range(backend.device_max_mig_device_count(handle)):
        try:
            mig = backend.mig_device_handle_by_index(handle, slot)
        except NvmlNotFound:
            continue
        try:
            migs.append(
                GpuDevice(
                    uuid=backend.device_uuid(mig),
                    product=backend.device_name(mig),
                    memory_total=backend.device_memory_info(mig).total,
                    index=index,
                    pci_bus_id=pci_bus_id,
                    handle=mig,
                    gpu_handle=handle,
                    gpu_uuid=uuid,
                    gpu_instance_id=backend.mig_gpu_instance_id(mig),
                    compute_instance_id=backend.mig_compute_instance_id(mig),
                )
            )
        except NvmlError as exc:
            log.warning("GPU %d (%s): skipping MIG device %d: %s", index, uuid, slot, exc)
    if not migs:
        log.info("GPU %d (%s): MIG is on but has no MIG devices; registering the GPU", index, uuid)
        return PhysicalGpu(uuid, index, handle, (whole,))
    return PhysicalGpu(uuid, index, handle, tuple(migs))


def register_xid_events(backend: NvmlBackend, gpu: PhysicalGpu, event_set: EventSetHandle) -> bool:
    """Register XID-critical events for ``gpu``; False if it does not support them."""
    supported = backend.device_supported_event_types(gpu.handle)
    if not supported & EVENT_TYPE_XID_CRITICAL:
        return False
    backend.device_register_events(gpu.handle, EVENT_TYPE_XID_CRITICAL, event_set)
    return True


# ---- from the trio thread ----------------------------------------------------------------------


async def enumerate_gpus(
    call: NvmlCalls, backend: NvmlBackend, inventory: Inventory
) -> list[PhysicalGpu]:
    """Query every GPU into ``inventory``, skipping (and counting) those that fail."""
    count = await call(backend.device_count)
    found: list[PhysicalGpu] = []
    for index in range(count):
        try:
            gpu = await call(query_gpu, backend, index)
        except NvmlError as exc:
            inventory.skipped += 1
            log.warning("skipping GPU %d: %s", index, exc)
            continue
        if gpu.uuid in inventory.by_gpu:
            log.warning("skipping GPU %d: duplicate UUID %s", index, gpu.uuid)
            inventory.skipped += 1
            continue
        found.append(gpu)
        inventory.by_gpu[gpu.uuid] = gpu.devices
        for device in gpu.devices:
            inventory.devices[device.uuid] = device
    log.info(
        "NVML: %d GPUs, %d devices to register, %d skipped",
        len(found),
        len(inventory.devices),
        inventory.skipped,
    )
    return found


async def open_events(
    call: NvmlCalls, backend: NvmlBackend, gpus: Sequence[PhysicalGpu], inventory: Inventory
) -> EventSetHandle | None:
    """An event set with XID events registered on every GPU of ``gpus`` that supports them
    (counted in ``inventory.monitored``); None, health monitor off, if none can be created."""
    try:
        event_set = await call(backend.event_set_create)
    except NvmlError as exc:
        log.warning("NVML health monitor off: cannot create an event set: %s", exc)
        return None
    for gpu in gpus:
        try:
            ok = await call(register_xid_events, backend, gpu, event_set)
        except NvmlError as exc:
            log.warning("GPU %s: XID events not monitored: %s", gpu.uuid, exc)
            continue
        if ok:
            inventory.monitored += 1
        else:
            log.warning("GPU %s: XID events not supported; not monitored", gpu.uuid)
    return event_set
