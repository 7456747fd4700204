"""The real NVML backend, on ``nvidia-ml-py`` (module ``pynvml``).

Library lookup: pynvml loads ``libnvidia-ml.so.1`` itself (``CDLL("libnvidia-ml.so.1")``, the
system default search) inside ``nvmlInit`` unless its module-level ``pynvml.nvmlLib`` is already
set. So before the first ``nvmlInit`` we look for the library under the driver root (the
directories in :data:`LIBRARY_DIRS`, in that order) and, if found, load it with ctypes and hand it
to pynvml under pynvml's own ``libLoadLock``. When nothing is found there, or loading it fails,
pynvml's default lookup runs as usual. The library is loaded once per process (pynvml keeps it
for the life of the process, even across ``nvmlShutdown``).

Every pynvml error is mapped to our exceptions (see ``_backend.py``); no pynvml type escapes.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pynvml

from ._backend import (
    EVENT_TYPE_DOUBLE_BIT_ECC,
    EVENT_TYPE_XID_CRITICAL,
    DeviceHandle,
    EventKind,
    EventSetHandle,
    MemoryInfo,
    MigMode,
    NvmlError,
    NvmlEvent,
    NvmlGpuLost,
    NvmlNotFound,
    NvmlNotSupported,
    NvmlTimeout,
    NvmlUnavailable,
    RemappedRows,
)

log = logging.getLogger("deviceapi.nvml")

LIBRARY_NAME = "libnvidia-ml.so.1"
#: Where the library is looked for under the driver root, in order.
LIBRARY_DIRS: tuple[str, ...] = (
    "usr/lib64",
    "usr/lib/x86_64-linux-gnu",
    "usr/lib/aarch64-linux-gnu",
    "usr/lib",
    "lib64",
    "lib",
)
#: NVML's "no such instance" id in event data.
_INVALID_ID = 0xFFFFFFFF

_UNAVAILABLE_CODES = frozenset(
    {
        pynvml.NVML_ERROR_LIBRARY_NOT_FOUND,
        pynvml.NVML_ERROR_DRIVER_NOT_LOADED,
        pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH,
        pynvml.NVML_ERROR_UNINITIALIZED,
        pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,
    }
)


def find_library(driver_root: str | os.PathLike[str] | None) -> Path | None:
    """The first ``libnvidia-ml.so.1`` under ``driver_root`` (see LIBRARY_DIRS), or None."""
    if not driver_root:
        return None
    root = Path(driver_root)
    for directory in LIBRARY_DIRS:
        candidate = root / directory / LIBRARY_NAME
        if candidate.is_file():
            return candidate
    return None


def map_error(exc: pynvml.NVMLError) -> NvmlError:
    """Our exception for a pynvml error (by NVML return code)."""
    code: int | None = getattr(exc, "value", None)
    try:
        text = str(exc)
    except Exception:  # pynvml's __str__ may need the library it failed to load
        text = f"NVML error {code}"
    if code == pynvml.NVML_ERROR_TIMEOUT:
        return NvmlTimeout(text, code=code)
    if code == pynvml.NVML_ERROR_GPU_IS_LOST:
        return NvmlGpuLost(text, code=code)
    if code == pynvml.NVML_ERROR_NOT_SUPPORTED:
        return NvmlNotSupported(text, code=code)
    if code == pynvml.NVML_ERROR_NOT_FOUND:
        return NvmlNotFound(text, code=code)
    if code in _UNAVAILABLE_CODES:
        return NvmlUnavailable(text, code=code)
    return NvmlError(text, code=code)


@contextlib.contextmanager
def _mapped() -> Iterator[None]:
    try:
        yield
    except pynvml.NVMLError as exc:
        raise map_error(exc) from exc


def _raw(handle: DeviceHandle) -> Any:
    return handle.token


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


class PynvmlBackend:
    """:class:`~._backend.NvmlBackend` on pynvml. Each method blocks; call it from a thread."""

    def __init__(self, driver_root: str | None = "/run/nvidia/driver") -> None:
        self._driver_root = driver_root
        self.library_path: Path | None = None
        """The library file loaded from the driver root, or None (system default)."""

    def _load_library(self) -> None:
        path = find_library(self._driver_root)
        if path is None:
            log.debug(
                "no %s under driver root %s; using the system default",
                LIBRARY_NAME,
                self._driver_root,
            )
            return
        with pynvml.libLoadLock:
            if pynvml.nvmlLib is not None:
                return
            try:
                pynvml.nvmlLib = ctypes.CDLL(str(path))
            except OSError as exc:
                log.warning("cannot load %s (%s); trying the system default", path, exc)
                return
        self.library_path = path
        log.info("loaded NVML from %s", path)

    def init(self) -> None:
        self._load_library()
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            error = map_error(exc)
            raise NvmlUnavailable(f"nvmlInit failed: {error}", code=error.code) from exc

    def shutdown(self) -> None:
        with _mapped():
            pynvml.nvmlShutdown()

    def device_count(self) -> int:
        with _mapped():
            return int(pynvml.nvmlDeviceGetCount())

    def device_handle_by_index(self, index: int) -> DeviceHandle:
        with _mapped():
            return DeviceHandle(pynvml.nvmlDeviceGetHandleByIndex(index))

    def device_uuid(self, device: DeviceHandle) -> str:
        with _mapped():
            return _text(pynvml.nvmlDeviceGetUUID(_raw(device)))

    def device_name(self, device: DeviceHandle) -> str:
        with _mapped():
            return _text(pynvml.nvmlDeviceGetName(_raw(device)))

    def device_memory_info(self, device: DeviceHandle) -> MemoryInfo:
        with _mapped():
            info = pynvml.nvmlDeviceGetMemoryInfo(_raw(device))
        return MemoryInfo(total=int(info.total), free=int(info.free), used=int(info.used))

    def device_pci_bus_id(self, device: DeviceHandle) -> str:
        with _mapped():
            info = pynvml.nvmlDeviceGetPciInfo(_raw(device))
        return _text(info.busId)

    def device_mig_mode(self, device: DeviceHandle) -> MigMode:
        with _mapped():
            current, pending = pynvml.nvmlDeviceGetMigMode(_raw(device))
        enabled = pynvml.NVML_DEVICE_MIG_ENABLE
        return MigMode(current=current == enabled, pending=pending == enabled)

    def device_max_mig_device_count(self, device: DeviceHandle) -> int:
        with _mapped():
            return int(pynvml.nvmlDeviceGetMaxMigDeviceCount(_raw(device)))

    def mig_device_handle_by_index(self, device: DeviceHandle, index: int) -> DeviceHandle:
        with _mapped():
            return DeviceHandle(pynvml.nvmlDeviceGetMigDeviceHandleByIndex(_raw(device), index))

    def mig_gpu_instance_id(self, mig_device: DeviceHandle) -> int:
        with _mapped():
            return int(pynvml.nvmlDeviceGetGpuInstanceId(_raw(mig_device)))

    def mig_compute_instance_id(self, mig_device: DeviceHandle) -> int:
        with _mapped():
            return int(pynvml.nvmlDeviceGetComputeInstanceId(_raw(mig_device)))

    def device_supported_event_types(self, device: DeviceHandle) -> int:
        with _mapped():
            return int(pynvml.nvmlDeviceGetSupportedEventTypes(_raw(device)))

    def event_set_create(self) -> EventSetHandle:
        with _mapped():
            return EventSetHandle(pynvml.nvmlEventSetCreate())

    def device_register_events(
        self, device: DeviceHandle, event_types: int, event_set: EventSetHandle
    ) -> None:
        with _mapped():
            pynvml.nvmlDeviceRegisterEvents(_raw(device), event_types, event_set.token)

    def event_set_wait(self, event_set: EventSetHandle, timeout_ms: int) -> NvmlEvent:
        with _mapped():
            data = pynvml.nvmlEventSetWait_v2(event_set.token, timeout_ms)
        event_type = int(data.eventType)
        if event_type & EVENT_TYPE_XID_CRITICAL:
            kind = EventKind.XID
        elif event_type & EVENT_TYPE_DOUBLE_BIT_ECC:
            kind = EventKind.DOUBLE_BIT_ECC
        else:
            kind = EventKind.OTHER
        gi = int(data.gpuInstanceId)
        ci = int(data.computeInstanceId)
        return NvmlEvent(
            kind=kind,
            gpu_uuid=self._event_uuid(data.device),
            xid=int(data.eventData) if kind is EventKind.XID else None,
            gpu_instance_id=None if gi == _INVALID_ID else gi,
            compute_instance_id=None if ci == _INVALID_ID else ci,
            event_type=event_type,
        )

    @staticmethod
    def _event_uuid(device: Any) -> str | None:
        """The UUID of an event's device; None (= every GPU) when absent or unreadable."""
        if not device:  # a NULL device pointer
            return None
        try:
            return _text(pynvml.nvmlDeviceGetUUID(device))
        except pynvml.NVMLError as exc:
            log.warning("cannot read the UUID of an event's device (%s); applying to all", exc)
            return None

    def event_set_free(self, event_set: EventSetHandle) -> None:
        with _mapped():
            pynvml.nvmlEventSetFree(event_set.token)

    def device_retired_pages_pending(self, device: DeviceHandle) -> bool:
        with _mapped():
            state = pynvml.nvmlDeviceGetRetiredPagesPendingStatus(_raw(device))
        return bool(state == pynvml.NVML_FEATURE_ENABLED)

    def device_remapped_rows(self, device: DeviceHandle) -> RemappedRows:
        with _mapped():
            corr, unc, pending, failure = pynvml.nvmlDeviceGetRemappedRows(_raw(device))
        return RemappedRows(
            correctable=int(corr),
            uncorrectable=int(unc),
            pending=bool(pending),
            failure=bool(failure),
        )
