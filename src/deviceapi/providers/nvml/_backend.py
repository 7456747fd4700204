"""The NVML calls the poller uses, as a small Protocol with our own types.

Two backends implement it: :mod:`._pynvml` (the real one, on ``nvidia-ml-py``) and :mod:`._fake`
(scripted GPUs for tests and ``--simulate``). No pynvml type crosses this boundary: handles are
opaque tokens only the backend that made them reads, results are frozen records, and every NVML
failure is one of the exceptions below.

Every method may block (they are C calls into the driver): the poller calls them from a worker
thread, never from the trio thread (see ``_threads.py``). Implementations must be thread-safe for
calls from different threads, one at a time per event set.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Protocol

#: NVML's event type bit for XID critical errors (``nvmlEventTypeXidCriticalError``).
EVENT_TYPE_XID_CRITICAL = 0x0000000000000008
#: ``nvmlEventTypeDoubleBitEccError``: counted, never acted on (XID 48 accompanies it).
EVENT_TYPE_DOUBLE_BIT_ECC = 0x0000000000000002


class NvmlError(Exception):
    """An NVML call failed. ``code`` is NVML's return code when there is one."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class NvmlUnavailable(NvmlError):
    """NVML cannot be used at all here: no library, no driver, or ``nvmlInit`` failed."""


class NvmlTimeout(NvmlError):
    """An event wait ended without an event (NVML_ERROR_TIMEOUT); the normal idle outcome."""


class NvmlGpuLost(NvmlError):
    """The GPU has fallen off the bus or is otherwise inaccessible (NVML_ERROR_GPU_IS_LOST)."""


class NvmlNotSupported(NvmlError):
    """This device does not support the query (NVML_ERROR_NOT_SUPPORTED); not a fault."""


class NvmlNotFound(NvmlError):
    """The object asked for does not exist (NVML_ERROR_NOT_FOUND), e.g. an empty MIG slot."""


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class DeviceHandle:
    """An opaque device (GPU or MIG device) handle; only its backend reads ``token``."""

    token: object


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class EventSetHandle:
    """An opaque NVML event set; only its backend reads ``token``."""

    token: object


@dataclasses.dataclass(frozen=True, slots=True)
class MemoryInfo:
    """Frame-buffer memory in bytes."""

    total: int
    free: int
    used: int


@dataclasses.dataclass(frozen=True, slots=True)
class MigMode:
    """MIG mode of a GPU: the current one and the one pending the next reset."""

    current: bool
    pending: bool


@dataclasses.dataclass(frozen=True, slots=True)
class RemappedRows:
    """Row-remapping counters (``nvmlDeviceGetRemappedRows``)."""

    correctable: int
    uncorrectable: int
    pending: bool
    failure: bool


class EventKind(enum.Enum):
    """What an event is about. Only XID events change conditions."""

    XID = "xid"
    DOUBLE_BIT_ECC = "double_bit_ecc"
    OTHER = "other"


@dataclasses.dataclass(frozen=True, slots=True)
class NvmlEvent:
    """One event from an event set.

    ``gpu_uuid`` is the UUID of the GPU the event names (for a MIG-enabled GPU, the parent GPU),
    or None when the event names no device or its UUID could not be read: it then concerns every
    GPU. ``gpu_instance_id`` / ``compute_instance_id`` are None when NVML gives none (0xFFFFFFFF).
    ``xid`` is set for ``EventKind.XID``; ``event_type`` is NVML's raw type bit.
    """

    kind: EventKind
    gpu_uuid: str | None
    xid: int | None = None
    gpu_instance_id: int | None = None
    compute_instance_id: int | None = None
    event_type: int = EVENT_TYPE_XID_CRITICAL


class NvmlBackend(Protocol):
    """The NVML calls we use. Every method may block and may raise :class:`NvmlError`."""

    def init(self) -> None:
        """Load the library and ``nvmlInit``; raise :class:`NvmlUnavailable` if impossible."""

    def shutdown(self) -> None:
        """``nvmlShutdown``; pairs with one successful ``init``."""

    def device_count(self) -> int: ...

    def device_handle_by_index(self, index: int) -> DeviceHandle: ...

    def device_uuid(self, device: DeviceHandle) -> str: ...

    def device_name(self, device: DeviceHandle) -> str: ...

    def device_memory_info(self, device: DeviceHandle) -> MemoryInfo: ...

    def device_pci_bus_id(self, device: DeviceHandle) -> str: ...

    def device_mig_mode(self, device: DeviceHandle) -> MigMode:
        """Raises :class:`NvmlNotSupported` on GPUs without MIG."""

    def device_max_mig_device_count(self, device: DeviceHandle) -> int: ...

    def mig_device_handle_by_index(self, device: DeviceHandle, index: int) -> DeviceHandle:
        """Raises :class:`NvmlNotFound` for an empty MIG slot."""

    def mig_gpu_instance_id(self, mig_device: DeviceHandle) -> int: ...

    def mig_compute_instance_id(self, mig_device: DeviceHandle) -> int: ...

    def device_supported_event_types(self, device: DeviceHandle) -> int:
        """A bit mask of ``EVENT_TYPE_*`` values."""

    def event_set_create(self) -> EventSetHandle: ...

    def device_register_events(
        self, device: DeviceHandle, event_types: int, event_set: EventSetHandle
    ) -> None: ...

    def event_set_wait(self, event_set: EventSetHandle, timeout_ms: int) -> NvmlEvent:
        """Wait up to ``timeout_ms`` for one event; raise :class:`NvmlTimeout` when none came."""

    def event_set_free(self, event_set: EventSetHandle) -> None: ...

    def device_retired_pages_pending(self, device: DeviceHandle) -> bool:
        """True when retired pages await a reboot or reset to take effect."""

    def device_remapped_rows(self, device: DeviceHandle) -> RemappedRows: ...
