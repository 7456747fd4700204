"""The watch fan-out's two ways out (``transport/gpu_service.py``): live events to idle
streams are written from one host-loop callback per commit batch (the flusher); a stream that
cannot take them whole right now (HTTP/2 flow control) is handed to its own task, which waits.
Either way every watcher gets every event once, in version order (SPEC §3)."""

from __future__ import annotations

import trio
import trio.testing
from _gpus import GPU_A, gpu
from grpclib.client import Channel
from grpclib.config import Configuration

from deviceapi import _bridge
from deviceapi.cache import _store as ops
from deviceapi.client import DeviceApiClient
from deviceapi.proto.device.v1alpha1 import gpu_grpc
from deviceapi.proto.device.v1alpha1 import gpu_pb2 as pb
from deviceapi.testing.runtime import (
    make_test_config,
    open_client,
    open_test_runtime,
    run_aio,
    wait_until,
)


def status(message: str) -> pb.GpuStatus:
    return pb.GpuStatus(conditions=[pb.Condition(type="Ready", status="True", message=message)])


async def test_live_events_to_idle_watchers_go_out_from_the_flusher(tmp_path: object) -> None:
    """Eight synced watchers, thirty writes: every watcher has every version in order, every
    live event was written by the flusher (none by a stream's task), at most one flush per
    commit."""
    updates, watchers = 30, 8
    config = make_test_config(tmp_path)
    async with open_test_runtime(config) as rt, open_client(rt) as writer:
        await rt.core.store.write(ops.CreateGpu(gpu(GPU_A)))
        socket = rt.listeners.unix_socket
        assert socket is not None
        service = rt.grpc.gpu_service
        assert service is not None
        results: list[list[int]] = [[] for _ in range(watchers)]

        async def watcher(received: list[int]) -> None:
            async with DeviceApiClient(unix_socket=socket) as c:
                async for event in c.watch():
                    received.append(event.object.resource_version)
                    if len(received) == updates + 1:
                        return

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for received in results:
                    nursery.start_soon(run_aio, watcher, received)
                await wait_until(lambda: all(len(r) == 1 for r in results))  # snapshots in
                before = service.fanout_statistics()
                for i in range(updates):
                    await run_aio(writer.update_status, GPU_A, status(str(i)))

        first = results[0][0]  # the snapshot's version (versions start from a wall-clock base)
        assert results == [list(range(first, first + updates + 1))] * watchers
        after = service.fanout_statistics()
        assert after.written - before.written == updates * watchers
        assert after.handed_over == 0
        assert 1 <= after.flushes - before.flushes <= updates


async def test_a_paused_reader_is_handed_to_its_task_and_misses_nothing(
    tmp_path: object, mock_clock: trio.testing.MockClock
) -> None:
    """A watcher with a 64 KiB window stops reading while 2 KB events keep coming: the flusher
    cannot write them whole and hands the stream to its task, which waits for the window. When
    the client reads again it gets every version, in order, no eviction; a watcher that kept
    reading got them all from the flusher meanwhile."""
    mock_clock.autojump_threshold = 0.1  # virtual time only when truly idle (real I/O is not)
    updates = 60
    big = "x" * 2000
    config = make_test_config(tmp_path, slow_subscriber_timeout=300.0)
    async with open_test_runtime(config) as rt, open_client(rt) as writer:
        await rt.core.store.write(ops.CreateGpu(gpu(GPU_A)))
        socket = rt.listeners.unix_socket
        assert socket is not None
        service = rt.grpc.gpu_service
        assert service is not None
        reading = trio.Event()
        paused: list[int] = []
        steady: list[int] = []

        async def paused_reader() -> None:
            channel = Channel(path=socket, config=Configuration(
                http2_connection_window_size=65535, http2_stream_window_size=65535))
            try:
                async with gpu_grpc.GpuServiceStub(channel).WatchGpus.open() as stream:
                    await stream.send_message(pb.WatchGpusRequest(), end=True)
                    await stream.recv_initial_metadata()
                    first = await stream.recv_message()
                    assert first is not None
                    paused.append(first.object.resource_version)
                    await _bridge.trio_as_aio(reading.wait)()
                    async for event in stream:
                        paused.append(event.object.resource_version)
                        if len(paused) == updates + 1:
                            await stream.cancel()
                            return
            finally:
                channel.close()

        async def steady_reader() -> None:
            async with DeviceApiClient(unix_socket=socket) as c:
                async for event in c.watch():
                    steady.append(event.object.resource_version)
                    if len(steady) == updates + 1:
                        return

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_aio, paused_reader)
                nursery.start_soon(run_aio, steady_reader)
                await wait_until(lambda: len(paused) == 1 and len(steady) == 1)
                for i in range(updates):
                    await run_aio(writer.update_status, GPU_A, status(f"{i}{big}"))
                await wait_until(lambda: len(steady) == updates + 1)
                assert service.fanout_statistics().handed_over >= 1
                reading.set()

        expected = list(range(steady[0], steady[0] + updates + 1))
        assert steady == expected
        assert paused == expected
        assert rt.core.hub.statistics().evictions == {}
