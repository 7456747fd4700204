"""Discovery (``discovery.py``): a GPU or MIG device that fails its queries is skipped and the
others are registered; a GPU without XID events is registered but not monitored. Against the
fake backend in virtual time (see ``_poller_helpers.py``).
"""

from __future__ import annotations

import trio
import trio.testing
from _poller_helpers import G0, MakePoller

from deviceapi.providers.nvml import FakeNvml, NvmlError, NvmlGpuLost, make_gpus
from deviceapi.providers.nvml._fake import gpu_uuid, mig_uuid
from deviceapi.providers.nvml.testing import RecordingProviderApi
from deviceapi.providers.nvml.testing import open_running as running


async def test_enumeration_failure_skips_only_that_gpu(
    autojump_clock: trio.testing.MockClock, api: RecordingProviderApi, make_poller: MakePoller
) -> None:
    gpus = make_gpus(4)
    gpus[3].mig = []  # MIG on without MIG devices: the GPU itself is registered
    fake = FakeNvml(gpus)
    fake.fail("device_name", NvmlError("Unknown Error", code=999), gpu=1)
    fake.fail("device_memory_info", NvmlGpuLost("GPU is lost", code=15), gpu=2, times=1)
    fake.fail("device_pci_bus_id", NvmlError("Unknown Error", code=999), gpu=0)
    poller = make_poller(fake)
    with trio.fail_after(30):
        async with running(poller):
            assert [c.name for c in api.registrations()] == [G0, gpu_uuid(3)]
            stats = poller.statistics()
            assert (stats.gpus, stats.skipped_gpus) == (2, 2)
            assert poller.devices()[G0].pci_bus_id == ""


async def test_one_failing_mig_device_is_skipped(
    autojump_clock: trio.testing.MockClock, api: RecordingProviderApi, make_poller: MakePoller
) -> None:
    fake = FakeNvml(make_gpus(1, mig_devices=2))
    fake.fail("mig_gpu_instance_id", NvmlError("Unknown Error", code=999), times=1)
    with trio.fail_after(30):
        async with running(make_poller(fake)):
            assert [c.name for c in api.registrations()] == [mig_uuid(0, 1)]


async def test_gpu_without_xid_events_is_registered_not_monitored(
    autojump_clock: trio.testing.MockClock, api: RecordingProviderApi, make_poller: MakePoller
) -> None:
    gpus = make_gpus(2)
    gpus[0].supported_events = 0
    fake = FakeNvml(gpus)
    fake.fail("device_register_events", NvmlError("Unknown Error", code=999), gpu=1)
    poller = make_poller(fake)
    with trio.fail_after(30):
        async with running(poller):
            stats = poller.statistics()
            assert (stats.gpus, stats.monitored_gpus, stats.monitor_running) == (2, 0, False)
            await api.wait_until(lambda: len(api.heartbeats()) >= 2)
