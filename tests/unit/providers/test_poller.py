"""The NVML poller against the fake backend, in virtual time (``autojump_clock``).

NVML calls run inline (the fake never blocks), so the only thing that moves the clock is the
poller's own ``trio.sleep`` calls, and every run is deterministic. To show that something did
*not* happen without sleeping, tests queue a sentinel event after it (a critical XID on another
GPU) and wait for the sentinel's update: the fake delivers events in order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import trio
import trio.testing

from deviceapi._config import XidSet, parse_config
from deviceapi.proto.device.v1alpha1 import gpu_pb2
from deviceapi.providers.nvml import (
    CONDITION_TYPE,
    FakeNvml,
    NvmlError,
    NvmlGpuLost,
    NvmlPoller,
    NvmlUnavailable,
    PollerOptions,
    RemappedRows,
    make_gpus,
    run_inline,
)
from deviceapi.providers.nvml._fake import gpu_uuid, mig_uuid, without_driver
from deviceapi.providers.nvml.poller import HealthLedger
from deviceapi.providers.nvml.testing import RecordingProviderApi
from deviceapi.providers.nvml.testing import open_running as running

#: Options for virtual-time tests: short, round numbers.
OPTIONS = PollerOptions(
    provider_id="nvml-test",
    recovery_quiet_period=60.0,
    heartbeat_interval=10.0,
    wait_slice_ms=500,
)
QUIET = OPTIONS.recovery_quiet_period


@pytest.fixture
def api() -> RecordingProviderApi:
    return RecordingProviderApi()


MakePoller = Callable[..., NvmlPoller]


@pytest.fixture
def make_poller(api: RecordingProviderApi) -> MakePoller:
    """A poller over the fake that runs NVML calls inline (deterministic in virtual time)."""

    def make(
        backend: FakeNvml,
        options: PollerOptions = OPTIONS,
        *,
        ledger: HealthLedger | None = None,
    ) -> NvmlPoller:
        return NvmlPoller(backend, api, options, ledger=ledger, run_blocking=run_inline)

    return make


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


async def test_registers_every_gpu_ready(
    autojump_clock: trio.testing.MockClock, api: RecordingProviderApi, make_poller: MakePoller
) -> None:
    fake = FakeNvml(3)
    poller = make_poller(fake)
    with trio.fail_after(60):
        async with running(poller):
            assert [c.kind for c in api.calls[:1]] == ["wait_serving"]
            assert [c.name for c in api.registrations()] == [G0, G1, G2]
            for call in api.registrations():
                assert call.provider_id == "nvml-test"
                assert call.condition == gpu_pb2.Condition(
                    type="NVMLReady",
                    status="True",
                    reason="Initialized",
                    message="NVIDIA H100 80GB HBM3 (81920 MiB)",
                )
            assert api.updates() == []
            stats = poller.statistics()
            assert (stats.enabled, stats.monitor_running) == (True, True)
            assert (stats.gpus, stats.monitored_gpus, stats.skipped_gpus) == (3, 3, 0)
            assert fake.registered_events() == {u: 0x8 for u in (G0, G1, G2)}
            await api.wait_until(lambda: len(api.heartbeats()) >= 3)
            beats = api.heartbeats()
            assert all(b.gpu_names == (G0, G1, G2) for b in beats)
            assert [b.time - beats[0].time for b in beats[:3]] == [0.0, 10.0, 20.0]


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


async def test_shutdown_is_prompt_and_cleans_up(
    autojump_clock: trio.testing.MockClock, api: RecordingProviderApi, make_poller: MakePoller
) -> None:
    fake = FakeNvml(2)
    poller = make_poller(fake)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(poller.run)
            assert fake.initialised and fake.live_event_sets == 1
            cancelled_at = trio.current_time()
            nursery.cancel_scope.cancel()
        assert trio.current_time() - cancelled_at < 1.0
    assert not fake.initialised
    assert fake.live_event_sets == 0
    stats = poller.statistics()
    assert (stats.monitor_running, stats.calls_in_flight) == (False, 0)


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


async def test_health_check_off_registers_and_heartbeats_only(
    autojump_clock: trio.testing.MockClock, api: RecordingProviderApi, make_poller: MakePoller
) -> None:
    fake = FakeNvml(1)
    poller = make_poller(fake, PollerOptions(health_check=False, heartbeat_interval=1.0))
    with trio.fail_after(30):
        async with running(poller):
            assert fake.live_event_sets == 0
            fake.inject_xid(79, 0)
            await api.wait_until(lambda: len(api.heartbeats()) >= 3)
            assert fake.dropped_events == 1
            assert api.updates() == []
            assert not poller.statistics().monitor_running


async def test_without_driver_raises_before_started_and_logs_once(
    autojump_clock: trio.testing.MockClock,
    api: RecordingProviderApi,
    make_poller: MakePoller,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="deviceapi.nvml")
    poller = make_poller(without_driver())
    for _ in range(3):
        with trio.fail_after(5), pytest.RaisesGroup(NvmlUnavailable):
            async with trio.open_nursery() as nursery:
                await nursery.start(poller.run)  # raises NvmlUnavailable itself, no group
    stats = poller.statistics()
    assert (stats.enabled, stats.init_failures, stats.starts) == (False, 3, 3)
    assert "NVML Shared Library Not Found" in stats.last_error
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "NVML provider is disabled" in warnings[0].getMessage()
    assert api.calls == []


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


async def test_api_failure_crashes_and_cleans_up(
    autojump_clock: trio.testing.MockClock, api: RecordingProviderApi, make_poller: MakePoller
) -> None:
    fake = FakeNvml(1)
    api.fail_next("update_condition", ConnectionError("server gone"))
    poller = make_poller(fake)
    with trio.fail_after(30), pytest.RaisesGroup(ConnectionError, flatten_subgroups=True):
        async with trio.open_nursery() as nursery:
            await nursery.start(poller.run)
            fake.inject_xid(79, 0)
    assert not fake.initialised and fake.live_event_sets == 0
    # the ledger kept what it meant to say, for the next incarnation
    health = poller.ledger.get(G0)
    assert health is not None and health.status == "False"


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


def test_options_from_config() -> None:
    config, _ = parse_config(
        [
            "--nvml-health-check=false",
            "--nvml-ignored-xids=32",
            "--nvml-critical-xids=all",
            "--nvml-recovery-quiet-period=5",
            "--heartbeat-timeout=12",
        ],
        environ={},
    )
    options = PollerOptions.from_config(config, provider_id="p")
    assert options == PollerOptions(
        provider_id="p",
        health_check=False,
        ignored_xids=XidSet(frozenset({32})),
        critical_xids=XidSet(everything=True),
        recovery_quiet_period=5.0,
        heartbeat_interval=4.0,
    )


async def test_poller_cannot_run_twice_at_once(
    autojump_clock: trio.testing.MockClock, make_poller: MakePoller
) -> None:
    poller = make_poller(FakeNvml(1))
    with trio.fail_after(5):
        async with running(poller):
            with pytest.raises(RuntimeError, match="already running"):
                await poller.run()


async def test_fresh_poller_adopts_an_unhealthy_verdict_left_in_the_server(
    autojump_clock: trio.testing.MockClock, api: RecordingProviderApi, make_poller: MakePoller
) -> None:
    """A sidecar process restart loses the ledger; the GPU its predecessor marked unhealthy
    stays unhealthy (not re-declared Initialized) until a quiet period after the restart."""
    fake = FakeNvml(2)
    with trio.fail_after(1000):
        async with running(make_poller(fake)):  # the first process
            fake.inject_xid(79, 0)
            await api.wait_until(is_status(api, G0, "False"))
        await trio.sleep(QUIET * 2)  # down for longer than a quiet period
        restarted_at = trio.current_time()
        async with running(make_poller(fake)):  # a new process: a fresh ledger
            assert ready(api, G0).status == "False"
            assert ready(api, G0).reason == "XidCritical"
            assert ready(api, G1).status == "True"
            assert not any(c.condition is not None and c.condition.status == "True"
                           for c in api.updates(G0))
            await api.wait_until(is_status(api, G0, "True"))
            assert api.updates(G0)[-1].time == pytest.approx(restarted_at + QUIET)
            assert ready(api, G0).reason == "Recovered"
