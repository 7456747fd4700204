"""The fake backend itself: it must behave like NVML where the poller relies on it."""

from __future__ import annotations

import pytest

from deviceapi.providers.nvml import (
    FakeNvml,
    NvmlBackend,
    NvmlError,
    NvmlGpuLost,
    NvmlNotFound,
    NvmlTimeout,
    PynvmlBackend,
    make_gpus,
)
from deviceapi.providers.nvml._backend import EVENT_TYPE_XID_CRITICAL


def test_both_backends_satisfy_the_protocol() -> None:
    backends: list[NvmlBackend] = [FakeNvml(1), PynvmlBackend(None)]
    assert len(backends) == 2


def test_scripted_faults_and_events() -> None:
    fake = FakeNvml(make_gpus(2, mig_devices=1))
    with pytest.raises(NvmlError, match="Uninitialized"):
        fake.device_count()
    fake.init()
    gpu0 = fake.device_handle_by_index(0)
    assert fake.device_mig_mode(gpu0).current
    mig = fake.mig_device_handle_by_index(gpu0, 0)
    assert (fake.mig_gpu_instance_id(mig), fake.mig_compute_instance_id(mig)) == (1, 0)
    with pytest.raises(NvmlNotFound):
        fake.mig_device_handle_by_index(gpu0, 1)

    fake.fail("device_name", NvmlError("boom", code=999), gpu=0, times=2)
    for _ in range(2):
        with pytest.raises(NvmlError, match="boom"):
            fake.device_name(gpu0)
    assert fake.device_name(gpu0) == "NVIDIA H100 80GB HBM3"
    with pytest.raises(ValueError, match="not an NVML call"):
        fake.fail("inject_xid", NvmlError("x"))

    event_set = fake.event_set_create()
    with pytest.raises(NvmlTimeout):
        fake.event_set_wait(event_set, 5000)  # returns at once: never sleeps
    fake.inject_xid(79, 0)  # not registered yet: lost, as with NVML
    assert fake.dropped_events == 1
    fake.device_register_events(gpu0, EVENT_TYPE_XID_CRITICAL, event_set)
    fake.inject_xid(79, 0, gpu_instance_id=1, compute_instance_id=0)
    fake.inject_xid(43)
    fake.inject_xid(48, 1)  # GPU 1 not registered in this set
    first, second = fake.event_set_wait(event_set, 0), fake.event_set_wait(event_set, 0)
    assert (first.xid, first.gpu_uuid, first.gpu_instance_id) == (79, fake.gpus[0].uuid, 1)
    assert (second.xid, second.gpu_uuid) == (43, None)
    with pytest.raises(NvmlTimeout):
        fake.event_set_wait(event_set, 0)

    fake.lose_gpu(0)
    with pytest.raises(NvmlGpuLost):
        fake.event_set_wait(event_set, 0)
    with pytest.raises(NvmlGpuLost):
        fake.device_memory_info(gpu0)
    fake.restore_gpu(0)
    assert fake.device_memory_info(gpu0).total == 80 * 1024**3
    fake.event_set_free(event_set)
    fake.shutdown()
    assert not fake.initialised and fake.live_event_sets == 0
