"""WatchGpus over a real socket: snapshot then live, List-then-Watch, resume, OUT_OF_RANGE,
eviction of a stalled watcher while others keep receiving, and cancel freeing the watcher."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing
from _gpus import GPU_A, GPU_B, GPU_C, gpu, gpu_name
from grpclib.client import Channel
from grpclib.config import Configuration
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from deviceapi.actors import _store as ops
from deviceapi.client import DeviceApiClient
from deviceapi.proto.device.v1alpha1 import gpu_grpc
from deviceapi.proto.device.v1alpha1 import gpu_pb2 as pb
from deviceapi.testing.runtime import (
    make_test_config,
    open_client,
    open_test_runtime,
    run_aio,
    run_client_scenario,
    run_trio,
    wait_until,
)


def status(state: str, message: str = "") -> pb.GpuStatus:
    return pb.GpuStatus(conditions=[pb.Condition(type="Ready", status=state, message=message)])


async def take(events: AsyncIterator[pb.WatchGpusResponse], n: int) -> list[pb.WatchGpusResponse]:
    out = []
    async for event in events:
        out.append(event)
        if len(out) == n:
            break
    return out


async def test_snapshot_then_live_in_version_order(tmp_path: object) -> None:
    async def scenario(c: DeviceApiClient) -> None:
        created, _ = await c.create(gpu(GPU_B, ("Ready", "True")))
        base = created.resource_version - 1
        await c.create(gpu(GPU_A, ("Ready", "True")))
        stream = c.watch()
        first = await take(stream, 2)
        assert [(e.type, e.object.metadata.name) for e in first] == [  # in version order
            ("ADDED", GPU_B), ("ADDED", GPU_A)]
        await c.update_status(GPU_A, status("False"))
        await c.create(gpu(GPU_C))
        await c.delete(GPU_B)
        live = await take(stream, 3)
        await stream.aclose()
        assert [(e.type, e.object.metadata.name) for e in live] == [
            ("MODIFIED", GPU_A), ("ADDED", GPU_C), ("DELETED", GPU_B)]
        assert [e.object.resource_version - base for e in live] == [3, 4, 5]
        assert live[2].object.status.conditions[0].status == "True"  # last state

    await run_client_scenario(make_test_config(tmp_path), scenario)


async def test_list_then_watch_from_list_version_misses_nothing(tmp_path: object) -> None:
    async def scenario(c: DeviceApiClient) -> None:
        await c.create(gpu(GPU_A))
        listing = await c.list()
        await c.create(gpu(GPU_B))  # created between the List and the Watch
        stream = c.watch(int(listing.metadata.resource_version))
        events = await take(stream, 1)
        await stream.aclose()
        assert [(e.type, e.object.metadata.name) for e in events] == [("ADDED", GPU_B)]

    await run_client_scenario(make_test_config(tmp_path), scenario)


async def test_resume_and_out_of_range(tmp_path: object) -> None:
    async def scenario(c: DeviceApiClient) -> None:
        created, _ = await c.create(gpu(GPU_A))
        base = created.resource_version - 1
        for i in range(10):
            await c.update_status(GPU_A, status("True", f"update {i}"))
        stream = c.watch(base + 5)
        events = await take(stream, 6)
        await stream.aclose()
        assert [e.object.resource_version - base for e in events] == [6, 7, 8, 9, 10, 11]
        assert events[0].object.status.conditions[0].message == "update 4"
        with pytest.raises(GRPCError) as too_old:
            await take(c.watch(base + 1), 1)  # history holds 8 events: 4..11
        assert too_old.value.status == Status.OUT_OF_RANGE
        assert "relist" in (too_old.value.message or "")
        with pytest.raises(GRPCError) as future:
            await take(c.watch(base + 999), 1)
        assert future.value.status == Status.OUT_OF_RANGE

    await run_client_scenario(make_test_config(tmp_path, watch_history=8), scenario)


async def test_reads_unavailable_before_ready_but_writes_pass(tmp_path: object) -> None:
    async def scenario(c: DeviceApiClient) -> None:
        for call in (c.list(), c.get(GPU_A), take(c.watch(), 1)):
            with pytest.raises(GRPCError) as info:
                await call
            assert info.value.status == Status.UNAVAILABLE
            assert info.value.message == "server initializing, waiting for GPU providers"
        assert not await c.serving()
        await c.create(gpu(GPU_A))  # 1 of 2
        assert not await c.serving()
        await c.register_gpu(name=GPU_B, provider_id="p")  # 2 of 2: READY
        assert await c.serving()
        assert [g.metadata.name for g in (await c.list()).items] == [GPU_A, GPU_B]

    await run_client_scenario(make_test_config(tmp_path, min_gpus=2), scenario)


async def test_cancel_frees_the_watcher(tmp_path: object) -> None:
    async with open_test_runtime(make_test_config(tmp_path)) as rt, open_client(rt) as client:
        await rt.core.store.write(ops.CreateGpu(gpu(GPU_A)))

        async def watch_one() -> None:
            await take(client.watch(), 1)

        with trio.fail_after(10):
            await run_aio(watch_one)
            await wait_until(lambda: rt.core.hub.statistics().active == 0)
        assert rt.core.hub.statistics().active == 0


async def test_stalled_watcher_is_evicted_while_ten_others_get_every_event(
    tmp_path: object, mock_clock: trio.testing.MockClock
) -> None:
    """A client that stops reading fills its HTTP/2 window, then its queue, and is evicted with
    RESOURCE_EXHAUSTED naming the version to resume from; ten watchers that keep reading
    receive every event, in order, and none is evicted."""
    mock_clock.autojump_threshold = 0.1  # virtual time only when truly idle (real I/O is not)
    updates = 120
    big = "x" * 2000  # each event ~2 KB so a 64 KiB window fills after ~30 events
    config = make_test_config(tmp_path, watch_queue=16, slow_subscriber_timeout=30.0)
    async with open_test_runtime(config) as rt, open_client(rt) as writer:
        await rt.core.store.write(ops.CreateGpu(gpu(GPU_A)))
        socket = rt.listeners.unix_socket
        assert socket is not None

        async def watcher(received: list[int]) -> None:
            async with DeviceApiClient(unix_socket=socket) as c:
                async for event in c.watch():
                    received.append(event.object.resource_version)
                    if len(received) == updates + 1:
                        return

        async def stalled() -> tuple[list[int], GRPCError | None]:
            channel = Channel(path=socket, config=Configuration(
                http2_connection_window_size=65535, http2_stream_window_size=65535))
            stub = gpu_grpc.GpuServiceStub(channel)
            got: list[int] = []
            try:
                async with stub.WatchGpus.open() as stream:
                    await stream.send_message(pb.WatchGpusRequest(), end=True)
                    await stream.recv_initial_metadata()
                    # not reading: the server must not wait on us
                    await run_trio(wait_until,
                                   lambda: "queue_full" in rt.core.hub.statistics().evictions)
                    async for event in stream:
                        got.append(event.object.resource_version)
            except GRPCError as exc:
                return got, exc
            finally:
                channel.close()
            return got, None

        results: list[list[int]] = [[] for _ in range(10)]
        stalled_result: list[tuple[list[int], GRPCError | None]] = []

        async def run_stalled() -> None:
            stalled_result.append(await run_aio(stalled))

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for received in results:
                    nursery.start_soon(run_aio, watcher, received)
                nursery.start_soon(run_stalled)
                await wait_until(lambda: rt.core.hub.statistics().active == 11)
                for i in range(updates):
                    await run_aio(writer.update_status, GPU_A, status("True", f"{i}{big}"))

        base = rt.core.store.version_base
        expected = list(range(base + 1, base + updates + 2))
        for received in results:
            assert received == expected
        got, error = stalled_result[0]
        assert error is not None and error.status == Status.RESOURCE_EXHAUSTED
        message = error.message or ""
        assert "queue_full" in message
        resume = int(message.split("last delivered resource version ")[1].split(";")[0])
        assert got == list(range(base + 1, resume + 1))  # a prefix with no hole
        evictions = rt.core.hub.statistics().evictions
        assert evictions == {"queue_full": 1}


async def test_watcher_that_stops_reading_is_evicted_after_the_slow_subscriber_timeout(
    tmp_path: object, mock_clock: trio.testing.MockClock
) -> None:
    mock_clock.autojump_threshold = 0.1
    big = "x" * 2000
    config = make_test_config(tmp_path, slow_subscriber_timeout=5.0)
    async with open_test_runtime(config) as rt, open_client(rt) as writer:
        await rt.core.store.write(ops.CreateGpu(gpu(GPU_A)))
        socket = rt.listeners.unix_socket
        assert socket is not None
        channel: list[Channel] = []

        async def open_stalled() -> None:
            ch = Channel(path=socket, config=Configuration(
                http2_connection_window_size=65535, http2_stream_window_size=65535))
            channel.append(ch)
            stream = gpu_grpc.GpuServiceStub(ch).WatchGpus.open()
            await stream.__aenter__()
            await stream.send_message(pb.WatchGpusRequest(), end=True)

        await run_aio(open_stalled)
        with trio.fail_after(120):
            await wait_until(lambda: rt.core.hub.statistics().active == 1)
            for i in range(60):  # fills the 64 KiB window; the queue (256) stays below full
                await run_aio(writer.update_status, GPU_A, status("True", f"{i}{big}"))
            started = trio.current_time()
            await wait_until(lambda: bool(rt.core.hub.statistics().evictions), poll=0.5)
            waited = trio.current_time() - started
        assert rt.core.hub.statistics().evictions == {"slow_subscriber": 1}
        assert 4.0 <= waited <= 7.0
        channel[0].close()


async def test_many_gpus_snapshot_exceeds_queue_without_eviction(tmp_path: object) -> None:
    """The initial snapshot is not bounded by the live queue: 300 GPUs, queue 16."""
    async with open_test_runtime(make_test_config(tmp_path, watch_queue=16)) as rt, \
            open_client(rt) as client:
        for i in range(300):
            await rt.core.store.write(ops.CreateGpu(gpu(gpu_name(i))))

        async def count() -> int:
            return len(await take(client.watch(), 300))

        assert await run_aio(count) == 300
        assert rt.core.hub.statistics().evictions == {}
