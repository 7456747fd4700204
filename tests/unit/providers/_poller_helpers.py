"""What the virtual-time poller tests share (``test_poller``, ``test_discovery``,
``test_events``, ``test_recovery``, ``test_ledger``; their fixtures are in ``conftest.py``).

The poller runs against the fake backend in virtual time (``autojump_clock``). NVML calls run
inline (the fake never blocks), so the only thing that moves the clock is the poller's own
``trio.sleep`` calls, and every run is deterministic. To show that something did *not* happen
without sleeping, tests queue a sentinel event after it (a critical XID on another GPU) and wait
for the sentinel's update: the fake delivers events in order.
"""

from __future__ import annotations

from collections.abc import Callable

from deviceapi.proto.device.v1alpha1 import gpu_pb2
from deviceapi.providers.nvml import CONDITION_TYPE, FakeNvml, NvmlPoller, PollerOptions
from deviceapi.providers.nvml._fake import gpu_uuid
from deviceapi.providers.nvml.testing import RecordingProviderApi

#: Options for virtual-time tests: short, round numbers.
OPTIONS = PollerOptions(
    provider_id="nvml-test",
    recovery_quiet_period=60.0,
    heartbeat_interval=10.0,
    wait_slice_ms=500,
)
QUIET = OPTIONS.recovery_quiet_period


MakePoller = Callable[..., NvmlPoller]


G0, G1, G2 = gpu_uuid(0), gpu_uuid(1), gpu_uuid(2)


def ready(api: RecordingProviderApi, name: str) -> gpu_pb2.Condition:
    condition = api.condition(name, CONDITION_TYPE)
    assert condition is not None, f"{name} has no {CONDITION_TYPE} condition"
    return condition


def is_status(api: RecordingProviderApi, name: str, status: str) -> Callable[[], bool]:
    return lambda: (c := api.condition(name, CONDITION_TYPE)) is not None and c.status == status


async def sentinel(fake: FakeNvml, api: RecordingProviderApi, gpu: int) -> None:
    """Queue a critical XID on ``gpu`` and wait until it is applied: everything queued before
    it has been handled."""
    before = len(api.updates(gpu_uuid(gpu)))
    fake.inject_xid(79, gpu)
    await api.wait_until(lambda: len(api.updates(gpu_uuid(gpu))) > before)
