"""The event loop and XID dispatch (``events.py``): which XIDs mark which devices unhealthy
(operator lists, events without a device, GPU lost, MIG instance ids), exactly once, and how many
wait errors crash the loop. Against the fake backend in virtual time (see ``_poller_helpers.py``).
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from _poller_helpers import G0, G1, G2, QUIET, MakePoller, is_status, ready, sentinel

from deviceapi._config import XidSet
from deviceapi.providers.nvml import FakeNvml, NvmlError, PollerOptions, make_gpus
from deviceapi.providers.nvml._fake import mig_uuid
from deviceapi.providers.nvml.testing import RecordingProviderApi
from deviceapi.providers.nvml.testing import open_running as running


async def test_xid_79_marks_only_that_gpu_exactly_once(
    autojump_clock: trio.testing.MockClock, api: RecordingProviderApi, make_poller: MakePoller
) -> None:
    fake = FakeNvml(3)
    poller = make_poller(fake)
    with trio.fail_after(30):
        async with running(poller):
            fake.inject_xid(79, 1)
            await api.wait_until(is_status(api, G1, "False"))
            condition = ready(api, G1)
            assert (condition.reason, condition.message) == (
                "XidCritical",
                "XID 79: GPU has fallen off the bus",
            )
            fake.inject_xid(79, 1)  # the same fault again: nothing new to say
            await sentinel(fake, api, 2)
            assert len(api.updates(G1)) == 1
            assert api.updates(G0) == []
            assert ready(api, G0).status == "True"
            stats = poller.statistics()
            assert (stats.xid_critical, stats.unhealthy_gpus) == (3, 2)


@pytest.mark.parametrize(
    ("xid", "counter"), [(13, "xid_ignored"), (109, "xid_ignored"), (32, "xid_logged")]
)
async def test_non_critical_xid_changes_nothing(
    autojump_clock: trio.testing.MockClock,
    api: RecordingProviderApi,
    make_poller: MakePoller,
    xid: int,
    counter: str,
) -> None:
    fake = FakeNvml(2)
    poller = make_poller(fake)
    with trio.fail_after(30):
        async with running(poller):
            fake.inject_xid(xid, 0)
            fake.inject_xid(xid)
            await sentinel(fake, api, 1)
            assert api.updates(G0) == []
            assert getattr(poller.statistics(), counter) == 2


async def test_operator_lists_apply(
    autojump_clock: trio.testing.MockClock, api: RecordingProviderApi, make_poller: MakePoller
) -> None:
    options = PollerOptions(
        provider_id="nvml-test",
        ignored_xids=XidSet(frozenset({48})),
        critical_xids=XidSet(frozenset({13})),
    )
    fake = FakeNvml(3)
    with trio.fail_after(30):
        async with running(make_poller(fake, options)):
            fake.inject_xid(48, 0)
            fake.inject_xid(13, 1)
            await sentinel(fake, api, 2)
            assert api.updates(G0) == []
            assert ready(api, G1).message == "XID 13: Graphics Engine Exception"


async def test_event_without_a_device_hits_every_gpu(
    autojump_clock: trio.testing.MockClock, api: RecordingProviderApi, make_poller: MakePoller
) -> None:
    fake = FakeNvml(3)
    with trio.fail_after(30):
        async with running(make_poller(fake)):
            fake.inject_xid(94)
            await api.wait_until(lambda: len(api.updates()) == 3)
            assert {c.name for c in api.updates()} == {G0, G1, G2}
            assert all(ready(api, g).reason == "XidCritical" for g in (G0, G1, G2))


async def test_gpu_lost_marks_every_gpu_until_it_is_back(
    autojump_clock: trio.testing.MockClock, api: RecordingProviderApi, make_poller: MakePoller
) -> None:
    fake = FakeNvml(2)
    poller = make_poller(fake)
    with trio.fail_after(600):
        async with running(poller):
            fake.lose_gpu(0)
            await api.wait_until(lambda: len(api.updates()) == 2)
            lost_at = trio.current_time()
            assert all(ready(api, g).reason == "GPULost" for g in (G0, G1))
            assert poller.statistics().gpu_lost == 1
            # GPU 1 was never lost: it recovers after the quiet period; GPU 0 does not.
            await api.wait_until(is_status(api, G1, "True"))
            assert api.updates(G1)[-1].time == pytest.approx(lost_at + QUIET)
            assert ready(api, G0).status == "False"
            fake.restore_gpu(0)
            await api.wait_until(is_status(api, G0, "True"))
            assert api.updates(G0)[-1].time == pytest.approx(lost_at + 2 * QUIET)
            assert ready(api, G0).reason == "Recovered"


async def test_mig_events_map_to_the_mig_device(
    autojump_clock: trio.testing.MockClock, api: RecordingProviderApi, make_poller: MakePoller
) -> None:
    fake = FakeNvml(make_gpus(2, mig_devices=3))
    poller = make_poller(fake)
    with trio.fail_after(30):
        async with running(poller):
            names = [c.name for c in api.registrations()]
            assert names == [mig_uuid(g, s) for g in (0, 1) for s in (0, 1, 2)]
            assert ready(api, mig_uuid(0, 0)).message == (
                "NVIDIA H100 80GB HBM3 MIG 1g.10gb (10240 MiB)"
            )
            assert fake.registered_events() == {G0: 0x8, G1: 0x8}  # on the physical GPUs
            # instance ids select one MIG device (fake: slot s has GPU instance s + 1)
            fake.inject_xid(79, 0, gpu_instance_id=2, compute_instance_id=0)
            await api.wait_until(is_status(api, mig_uuid(0, 1), "False"))
            assert [c.name for c in api.updates()] == [mig_uuid(0, 1)]
            # no ids: every MIG device of that GPU (the message changes on all three), none of
            # the other GPU's
            fake.inject_xid(48, 0)
            await api.wait_until(lambda: len(api.updates()) == 4)
            assert {c.name for c in api.updates()[1:]} == {mig_uuid(0, s) for s in (0, 1, 2)}
            assert all(ready(api, mig_uuid(0, s)).message.startswith("XID 48") for s in (0, 1, 2))
            # ids matching none of our devices: the whole GPU (the safe side)
            fake.inject_xid(79, 1, gpu_instance_id=9, compute_instance_id=0)
            await api.wait_until(lambda: len(api.updates()) == 7)
            assert {c.name for c in api.updates()[4:]} == {mig_uuid(1, s) for s in (0, 1, 2)}
            stats = poller.statistics()
            assert (stats.gpus, stats.unhealthy_gpus) == (6, 6)


async def test_repeated_wait_errors_crash_a_few_do_not(
    autojump_clock: trio.testing.MockClock, api: RecordingProviderApi, make_poller: MakePoller
) -> None:
    fake = FakeNvml(2)
    poller = make_poller(fake, PollerOptions(max_consecutive_wait_errors=3))
    with trio.fail_after(30), pytest.RaisesGroup(NvmlError, flatten_subgroups=True):
        async with running(poller):
            for _ in range(2):
                fake.inject_wait_error(NvmlError("Unknown Error", code=999))
            await sentinel(fake, api, 1)
            assert poller.statistics().wait_errors == 2
            for _ in range(3):
                fake.inject_wait_error(NvmlError("Unknown Error", code=999))
            await trio.sleep_forever()
    assert poller.statistics().wait_errors == 5
