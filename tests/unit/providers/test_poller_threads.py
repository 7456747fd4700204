"""The poller with real worker threads and waits that really block (real clock, short).

These check what virtual time cannot: a stop while a worker thread is inside
``event_set_wait`` returns within a second and leaves no thread inside NVML, a hung driver call
cannot hold shutdown hostage, and a hung enumeration call skips only its GPU.
"""

from __future__ import annotations

import logging

import pytest
import trio

from deviceapi.providers.nvml import FakeNvml, NvmlPoller, PollerOptions
from deviceapi.providers.nvml._fake import gpu_uuid
from deviceapi.providers.nvml.testing import RecordingProviderApi, open_running


async def test_stop_during_a_blocking_wait_is_prompt_and_the_thread_finishes() -> None:
    fake = FakeNvml(2, blocking_waits=True)
    api = RecordingProviderApi()
    poller = NvmlPoller(fake, api, PollerOptions(wait_slice_ms=500))
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(poller.run)
            # an event wakes a blocked wait at once
            fake.inject_xid(79, 1)
            await api.wait_until(lambda: len(api.updates(gpu_uuid(1))) == 1)
            # now stop while a worker thread is blocked inside the wait
            assert await trio.to_thread.run_sync(fake.wait_until_waiting, 1, 2.0)
            stopped_at = trio.current_time()
            nursery.cancel_scope.cancel()
        elapsed = trio.current_time() - stopped_at
    assert elapsed < 1.0
    assert fake.waits_in_progress == 0
    assert fake.live_event_sets == 0 and not fake.initialised
    assert poller.statistics().calls_in_flight == 0


async def test_a_hung_wait_cannot_hold_shutdown_hostage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeNvml(1, blocking_waits=True)
    api = RecordingProviderApi()
    poller = NvmlPoller(fake, api, PollerOptions(wait_slice_ms=100))
    poller.terminate_timeout = 0.2
    try:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                await nursery.start(poller.run)
                fake.hang("event_set_wait")
                assert await trio.to_thread.run_sync(fake.wait_until_hanging, 1, 2.0)
                stopped_at = trio.current_time()
                nursery.cancel_scope.cancel()
            elapsed = trio.current_time() - stopped_at
        assert elapsed < 1.0
        # the event set was not freed under the hung thread, and NVML was left initialised
        assert fake.live_event_sets == 1 and fake.initialised
        assert poller.statistics().calls_in_flight == 1
        assert "still running" in caplog.text
    finally:
        fake.release()
    with trio.fail_after(5):
        await trio.to_thread.run_sync(poller._call.tracker.wait_idle_blocking, 5.0)
    assert poller.statistics().calls_in_flight == 0


async def test_a_hung_enumeration_call_skips_only_that_gpu(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="deviceapi.nvml")
    fake = FakeNvml(3)
    fake.hang("device_name", gpu=1)
    api = RecordingProviderApi()
    poller = NvmlPoller(fake, api, PollerOptions(call_timeout=0.2, wait_slice_ms=100))
    try:
        with trio.fail_after(5):
            async with open_running(poller):
                assert [c.name for c in api.registrations()] == [gpu_uuid(0), gpu_uuid(2)]
                assert poller.statistics().skipped_gpus == 1
                assert "did not return within 0.2 s" in caplog.text
                fake.release()
    finally:
        fake.release()
    assert poller.statistics().calls_in_flight == 0
    assert not fake.initialised
