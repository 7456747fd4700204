"""The real backend's logic that needs no GPU: library lookup, error mapping, conversions.

pynvml's functions are replaced with ``monkeypatch`` (restored after each test), so these run
anywhere; the same code against a real driver is exercised in ``tests/gpu``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from pathlib import Path
from typing import Any

import pynvml
import pytest

from deviceapi.providers.nvml import (
    DeviceHandle,
    EventKind,
    EventSetHandle,
    NvmlError,
    NvmlGpuLost,
    NvmlNotFound,
    NvmlNotSupported,
    NvmlTimeout,
    NvmlUnavailable,
    PynvmlBackend,
    find_library,
)
from deviceapi.providers.nvml._pynvml import LIBRARY_DIRS, map_error


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_find_library_prefers_the_first_directory(tmp_path: Path) -> None:
    assert find_library(tmp_path) is None
    assert find_library(None) is None
    last = _touch(tmp_path / "lib" / "libnvidia-ml.so.1")
    assert find_library(tmp_path) == last
    middle = _touch(tmp_path / "usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1")
    assert find_library(str(tmp_path)) == middle
    first = _touch(tmp_path / "usr/lib64/libnvidia-ml.so.1")
    assert find_library(tmp_path) == first
    assert LIBRARY_DIRS[0] == "usr/lib64" and LIBRARY_DIRS[-1] == "lib"


def test_the_library_under_the_driver_root_is_handed_to_pynvml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    library = _touch(tmp_path / "usr/lib64/libnvidia-ml.so.1")
    loaded: list[str] = []
    sentinel = object()

    def fake_cdll(name: str) -> object:
        loaded.append(name)
        return sentinel

    monkeypatch.setattr(pynvml, "nvmlLib", None)
    monkeypatch.setattr(ctypes, "CDLL", fake_cdll)
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
    backend = PynvmlBackend(str(tmp_path))
    backend.init()
    assert loaded == [str(library)]
    assert pynvml.nvmlLib is sentinel
    assert backend.library_path == library
    # already loaded: left alone
    other = PynvmlBackend(str(tmp_path))
    other.init()
    assert loaded == [str(library)] and other.library_path is None


def test_an_unloadable_library_falls_back_to_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _touch(tmp_path / "lib64/libnvidia-ml.so.1")

    def broken_cdll(name: str) -> object:
        raise OSError("invalid ELF header")

    monkeypatch.setattr(pynvml, "nvmlLib", None)
    monkeypatch.setattr(ctypes, "CDLL", broken_cdll)
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
    backend = PynvmlBackend(str(tmp_path))
    backend.init()
    assert pynvml.nvmlLib is None and backend.library_path is None


@pytest.mark.skipif(
    ctypes.util.find_library("nvidia-ml") is not None, reason="an NVIDIA driver is installed"
)
def test_init_without_a_driver_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(NvmlUnavailable, match="nvmlInit failed") as info:
        PynvmlBackend(str(tmp_path)).init()
    assert info.value.code == pynvml.NVML_ERROR_LIBRARY_NOT_FOUND


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (pynvml.NVML_ERROR_TIMEOUT, NvmlTimeout),
        (pynvml.NVML_ERROR_GPU_IS_LOST, NvmlGpuLost),
        (pynvml.NVML_ERROR_NOT_SUPPORTED, NvmlNotSupported),
        (pynvml.NVML_ERROR_NOT_FOUND, NvmlNotFound),
        (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, NvmlUnavailable),
        (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, NvmlUnavailable),
        (pynvml.NVML_ERROR_UNKNOWN, NvmlError),
        (pynvml.NVML_ERROR_NO_PERMISSION, NvmlError),
    ],
)
def test_error_mapping(code: int, expected: type[NvmlError]) -> None:
    error = map_error(pynvml.NVMLError(code))
    assert type(error) is expected
    assert error.code == code
    assert str(error)


def _event(device: Any, event_type: int, data: int, gi: int, ci: int) -> Any:
    event = pynvml.c_nvmlEventData_t()
    event.device = device
    event.eventType = event_type
    event.eventData = data
    event.gpuInstanceId = gi
    event.computeInstanceId = ci
    return event


def test_event_conversion(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = PynvmlBackend(None)
    events = [
        _event(
            pynvml.c_nvmlDevice_t(), pynvml.nvmlEventTypeXidCriticalError, 79, 2**32 - 1, 2**32 - 1
        ),
        _event(
            ctypes.cast(ctypes.c_void_p(0x1000), pynvml.c_nvmlDevice_t),
            pynvml.nvmlEventTypeXidCriticalError,
            48,
            3,
            0,
        ),
        _event(
            pynvml.c_nvmlDevice_t(), pynvml.nvmlEventTypeDoubleBitEccError, 0, 2**32 - 1, 2**32 - 1
        ),
    ]
    monkeypatch.setattr(pynvml, "nvmlEventSetWait_v2", lambda es, ms: events.pop(0))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetUUID", lambda device: "GPU-abc")
    event_set = EventSetHandle(object())

    no_device = backend.event_set_wait(event_set, 500)
    assert (no_device.kind, no_device.xid, no_device.gpu_uuid) == (EventKind.XID, 79, None)
    assert (no_device.gpu_instance_id, no_device.compute_instance_id) == (None, None)

    mig = backend.event_set_wait(event_set, 500)
    assert (mig.kind, mig.xid, mig.gpu_uuid) == (EventKind.XID, 48, "GPU-abc")
    assert (mig.gpu_instance_id, mig.compute_instance_id) == (3, 0)

    ecc = backend.event_set_wait(event_set, 500)
    assert (ecc.kind, ecc.xid) == (EventKind.DOUBLE_BIT_ECC, None)


def test_calls_map_errors_and_convert(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = PynvmlBackend(None)
    handle = DeviceHandle(object())

    def lost(*args: object) -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)

    def timeout(*args: object) -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetName", lost)
    monkeypatch.setattr(pynvml, "nvmlEventSetWait_v2", timeout)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMigMode", lambda h: [1, 0])
    monkeypatch.setattr(pynvml, "nvmlDeviceGetRetiredPagesPendingStatus", lambda h: 1)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetRemappedRows", lambda h: (1, 2, 0, 1))
    with pytest.raises(NvmlGpuLost):
        backend.device_name(handle)
    with pytest.raises(NvmlTimeout):
        backend.event_set_wait(EventSetHandle(object()), 10)
    mode = backend.device_mig_mode(handle)
    assert (mode.current, mode.pending) == (True, False)
    assert backend.device_retired_pages_pending(handle) is True
    rows = backend.device_remapped_rows(handle)
    assert (rows.correctable, rows.uncorrectable, rows.pending, rows.failure) == (1, 2, False, True)
