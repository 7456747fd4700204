"""The poller's lifecycle (``poller.py``): start-up and registration, heartbeats, statistics,
NVML unavailable, crashes and shutdown, adopting a verdict left in the server; against the fake
backend in virtual time (see ``_poller_helpers.py``). With real threads: ``test_poller_threads``.
"""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing
from _poller_helpers import G0, G1, G2, QUIET, MakePoller, is_status, ready

from deviceapi._config import XidSet, parse_config
from deviceapi.proto.device.v1alpha1 import gpu_pb2
from deviceapi.providers.nvml import FakeNvml, NvmlUnavailable, PollerOptions
from deviceapi.providers.nvml._fake import without_driver
from deviceapi.providers.nvml.testing import RecordingProviderApi
from deviceapi.providers.nvml.testing import open_running as running


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
