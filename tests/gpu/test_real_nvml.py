"""The NVML provider against a real driver and GPU (marker ``gpu``; skipped without a driver).

Run on a GPU machine with ``pytest tests/gpu -q``. They use the real backend with worker threads
and the real clock.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator

import pytest
import trio
from _gpu import DRIVER_ROOT

from deviceapi.nvml_actor import (
    NvmlPoller,
    NvmlTimeout,
    NvmlUnavailable,
    PollerOptions,
    PynvmlBackend,
)
from deviceapi.nvml_actor._backend import EVENT_TYPE_XID_CRITICAL
from deviceapi.nvml_actor.testing import RecordingProviderApi, open_running

pytestmark = pytest.mark.gpu


@pytest.fixture
def backend() -> Iterator[PynvmlBackend]:
    """An initialised real backend, or skip when NVML cannot start here."""
    nvml = PynvmlBackend(DRIVER_ROOT)
    try:
        nvml.init()
    except NvmlUnavailable as exc:
        pytest.skip(f"no usable NVIDIA driver: {exc}")
    try:
        yield nvml
    finally:
        nvml.shutdown()


def nvidia_smi_devices() -> dict[str, str]:
    """UUID → name from ``nvidia-smi -L`` (GPUs and MIG devices)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        pytest.skip("nvidia-smi is not on PATH")
    out = subprocess.run([smi, "-L"], check=True, capture_output=True, text=True).stdout
    devices: dict[str, str] = {}
    for line in out.splitlines():
        gpu = re.match(r"^GPU \d+: (.+) \(UUID: (GPU-[0-9a-fA-F-]+)\)$", line.strip())
        if gpu:
            devices[gpu.group(2)] = gpu.group(1)
            continue
        mig = re.match(r"^MIG (\S+)\s+Device\s+\d+: \(UUID: (MIG-[0-9a-fA-F-]+)\)$", line.strip())
        if mig:
            devices[mig.group(2)] = mig.group(1)
    assert devices, f"could not parse nvidia-smi -L:\n{out}"
    return devices


async def test_enumeration_matches_nvidia_smi(backend: PynvmlBackend) -> None:
    smi = nvidia_smi_devices()
    api = RecordingProviderApi()
    poller = NvmlPoller(PynvmlBackend(DRIVER_ROOT), api, PollerOptions(wait_slice_ms=200))
    with trio.fail_after(30):
        async with open_running(poller):
            registered = {c.name for c in api.registrations()}
            devices = poller.devices()
            for uuid in registered:
                assert uuid in smi, f"{uuid} is not listed by nvidia-smi -L"
                device = devices[uuid]
                if not device.is_mig:
                    assert device.product == smi[uuid]
                else:  # nvidia-smi names the MIG profile, NVML the product and profile
                    assert smi[uuid] in device.product
            # every GPU nvidia-smi lists is registered, or its MIG devices are
            physical = {d.gpu_uuid for d in devices.values()}
            for uuid in smi:
                assert uuid in (physical if uuid.startswith("GPU-") else registered)
            assert poller.statistics().skipped_gpus == 0


def test_event_registration_succeeds(backend: PynvmlBackend) -> None:
    event_set = backend.event_set_create()
    try:
        for index in range(backend.device_count()):
            handle = backend.device_handle_by_index(index)
            supported = backend.device_supported_event_types(handle)
            assert supported & EVENT_TYPE_XID_CRITICAL
            backend.device_register_events(handle, EVENT_TYPE_XID_CRITICAL, event_set)
        with pytest.raises(NvmlTimeout):
            backend.event_set_wait(event_set, 100)
    finally:
        backend.event_set_free(event_set)


async def test_the_wait_loop_stops_within_one_second(backend: PynvmlBackend) -> None:
    api = RecordingProviderApi()
    poller = NvmlPoller(PynvmlBackend(DRIVER_ROOT), api)  # default 500 ms slices
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(poller.run)
            stats = poller.statistics()
            assert stats.monitor_running and stats.monitored_gpus >= 1
            await trio.sleep(1.2)  # not waiting for anything: stop in the middle of a slice
            stopped_at = trio.current_time()
            nursery.cancel_scope.cancel()
        elapsed = trio.current_time() - stopped_at
    assert elapsed < 1.0
    stats = poller.statistics()
    assert stats.calls_in_flight == 0 and not stats.monitor_running
