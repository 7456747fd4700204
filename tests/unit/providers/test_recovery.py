"""Recovery (``recovery.py``): a GPU turns True only a quiet period after its last fault and only
when NVML's health probe passes; else it is probed again a quiet period later. Against the fake
backend in virtual time (see ``_poller_helpers.py``).
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from _poller_helpers import G0, G1, QUIET, MakePoller, is_status, ready

from deviceapi.providers.nvml import FakeNvml, RemappedRows
from deviceapi.providers.nvml.testing import RecordingProviderApi
from deviceapi.providers.nvml.testing import open_running as running


async def test_recovery_after_the_quiet_period_and_not_before(
    autojump_clock: trio.testing.MockClock, api: RecordingProviderApi, make_poller: MakePoller
) -> None:
    fake = FakeNvml(2)
    poller = make_poller(fake)
    with trio.fail_after(1000):
        async with running(poller):
            fake.inject_xid(79, 0)
            await api.wait_until(is_status(api, G0, "False"))
            fault_at = api.updates(G0)[-1].time
            fake.set_retired_pages_pending(0, True)
            # a second critical XID half-way through restarts the quiet period
            await trio.sleep(QUIET / 2)
            fake.inject_xid(63, 0)
            await api.wait_until(lambda: ready(api, G0).message.startswith("XID 63"))
            fault_at = api.updates(G0)[-1].time
            # first probe at fault + quiet finds retirement pending; the next one, a quiet
            # period later, finds it healthy
            await trio.sleep(QUIET + 1)
            assert ready(api, G0).status == "False"
            fake.set_retired_pages_pending(0, False)
            await api.wait_until(is_status(api, G0, "True"))
            recovered = api.updates(G0)[-1]
            assert recovered.time == pytest.approx(fault_at + 2 * QUIET)
            assert recovered.condition is not None
            assert recovered.condition.reason == "Recovered"
            assert "was XidCritical: XID 63" in recovered.condition.message
            stats = poller.statistics()
            assert (stats.recoveries, stats.unhealthy_gpus) == (1, 0)
            assert api.updates(G1) == []


async def test_remapping_failure_blocks_recovery(
    autojump_clock: trio.testing.MockClock, api: RecordingProviderApi, make_poller: MakePoller
) -> None:
    fake = FakeNvml(1)
    with trio.fail_after(1000):
        async with running(make_poller(fake)):
            fake.set_remapped_rows(0, RemappedRows(0, 1, pending=False, failure=True))
            fake.inject_xid(64, 0)
            await api.wait_until(is_status(api, G0, "False"))
            fault_at = trio.current_time()
            await trio.sleep(4.5 * QUIET)
            assert len(api.updates(G0)) == 1
            fake.set_remapped_rows(0, RemappedRows(0, 1, pending=False, failure=False))
            await api.wait_until(is_status(api, G0, "True"))
            assert api.updates(G0)[-1].time == pytest.approx(fault_at + 5 * QUIET)
