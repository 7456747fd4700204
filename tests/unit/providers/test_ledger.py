"""The ledger (``ledger.py``): verdicts survive a restart with their quiet period, and only the
NVMLReady condition is ever written. Against the fake backend in virtual time (see
``_poller_helpers.py``).
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from _poller_helpers import G0, G1, QUIET, MakePoller, is_status, ready

from deviceapi.proto.device.v1alpha1 import gpu_pb2
from deviceapi.providers.nvml import FakeNvml
from deviceapi.providers.nvml.ledger import HealthLedger
from deviceapi.providers.nvml.testing import RecordingProviderApi
from deviceapi.providers.nvml.testing import open_running as running


async def test_restart_keeps_health_and_quiet_period(
    autojump_clock: trio.testing.MockClock, api: RecordingProviderApi, make_poller: MakePoller
) -> None:
    fake = FakeNvml(2)
    ledger = HealthLedger()
    with trio.fail_after(1000):
        async with running(make_poller(fake, ledger=ledger)):
            fake.inject_xid(79, 0)
            await api.wait_until(is_status(api, G0, "False"))
            fault_at = trio.current_time()
        await trio.sleep(QUIET / 2)
        async with running(make_poller(fake, ledger=ledger)):
            # re-registered idempotently, and its own last word re-asserted
            assert len(api.registrations()) == 4
            reasserted = api.updates(G0)[-1]
            assert reasserted.condition is not None and reasserted.condition.status == "False"
            await api.wait_until(is_status(api, G0, "True"))
            assert api.updates(G0)[-1].time == pytest.approx(fault_at + QUIET)


async def test_other_conditions_are_never_touched(
    autojump_clock: trio.testing.MockClock, api: RecordingProviderApi, make_poller: MakePoller
) -> None:
    fake = FakeNvml(2)
    others = [
        gpu_pb2.Condition(type="Ready", status="False", reason="DCGM", message="from dcgm"),
        gpu_pb2.Condition(type="SidecarHealthy", status="True", reason="OK", message="x"),
    ]
    for gpu in (G0, G1):
        for condition in others:
            api.seed(gpu, condition)
    with trio.fail_after(1000):
        async with running(make_poller(fake)):
            fake.inject_xid(79, 0)
            fake.inject_xid(31)
            fake.lose_gpu(1)
            await api.wait_until(is_status(api, G1, "False"))
            fake.restore_gpu(1)
            await api.wait_until(lambda: all(ready(api, g).status == "True" for g in (G0, G1)))
    # both GPUs existed already: the poller re-asserted its own condition at registration
    assert {c.name for c in api.registrations()} == {G0, G1}
    assert all(c.condition is not None and c.condition.type == "NVMLReady" for c in api.updates())
    for gpu in (G0, G1):
        assert [c.type for c in api.gpus[gpu]] == ["Ready", "SidecarHealthy", "NVMLReady"]
        assert list(api.gpus[gpu])[:2] == others
