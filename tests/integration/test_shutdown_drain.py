"""Shutdown drains watch streams (SPEC §3, issue 14 item 2), over a real socket.

A server process gets SIGTERM while four readers (some slow, each with a 64 KiB window) are
behind a client's 120 large updates. Before: shutdown cleared every watcher's queue and ended
the stream with OK, so a slow reader lost acknowledged writes without being told. Now a stream
gets every event committed before it ends, then OK; one that cannot be drained within
shutdown-timeout ends UNAVAILABLE naming the last version it received, never OK with a tail
missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path

import trio
from _gpus import GPU_A, gpu
from grpclib.client import Channel
from grpclib.config import Configuration
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from test_shutdown import read_stderr, start_server

from deviceapi.client import DeviceApiClient
from deviceapi.proto.device.v1alpha1 import gpu_grpc
from deviceapi.proto.device.v1alpha1 import gpu_pb2 as pb
from deviceapi.testing.runtime import (
    make_test_config,
    open_aio_loop,
    open_test_runtime,
    run_aio,
    wait_until,
)

#: Each event ~3 KB, so the 64 KiB HTTP/2 window holds ~20: the rest wait in the server queue.
BIG = "x" * 3000
WRITES = 120
SMALL_WINDOW = Configuration(http2_connection_window_size=65535,
                             http2_stream_window_size=65535)


def status(i: int) -> pb.GpuStatus:
    return pb.GpuStatus(conditions=[pb.Condition(type="Ready", status="True",
                                                 message=f"{i}{BIG}")])


class Reader:
    """One WatchGpus stream on its own connection (small window), read at a chosen pace."""

    def __init__(self, socket: str, pace: float) -> None:
        self.socket = socket
        self.pace = pace
        self.versions: list[int] = []
        self.error: GRPCError | None = None
        self.lost: StreamTerminatedError | None = None
        self.ended_ok = False
        self.opened = asyncio.Event()
        self.hurry = asyncio.Event()

    async def run(self) -> None:
        channel = Channel(path=self.socket, config=SMALL_WINDOW)
        try:
            async with gpu_grpc.GpuServiceStub(channel).WatchGpus.open() as stream:
                await stream.send_message(pb.WatchGpusRequest(), end=True)
                await stream.recv_initial_metadata()
                self.opened.set()
                async for event in stream:
                    self.versions.append(event.object.resource_version)
                    if self.pace and not self.hurry.is_set():
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self.hurry.wait(), self.pace)
            self.ended_ok = True
        except GRPCError as exc:
            self.error = exc
        except StreamTerminatedError as exc:  # the connection closed under an open stream
            self.lost = exc
        finally:
            channel.close()


async def _writes(socket: str) -> tuple[int, int]:
    """Create a GPU, then WRITES big updates; return the first and last acknowledged version."""
    async with DeviceApiClient(unix_socket=socket) as client:
        created, _ = await client.create(gpu(GPU_A))
        last = created.resource_version
        for i in range(WRITES):
            last = (await client.update_status(GPU_A, status(i))).resource_version
    return created.resource_version, last


def check_prefix(reader: Reader, first: int, upto: int) -> None:
    """The snapshot (the simulator's GPUs), then every version from ``first`` to ``upto``."""
    live = [v for v in reader.versions if v >= first]
    assert live == list(range(first, upto + 1)), (len(live), upto - first + 1)


async def test_sigterm_delivers_every_committed_event_before_ok(tmp_path: Path) -> None:
    """Readers that fell behind during a burst of writes get every acknowledged write, then
    OK, when the server is stopped right after the burst."""
    async with open_aio_loop():
        proc, socket, _ = await start_server(tmp_path, 0.0, 20.0)
        readers = [Reader(socket, pace) for pace in (0.0, 0.0, 0.05, 0.1)]
        try:
            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    for reader in readers:
                        nursery.start_soon(run_aio, reader.run)
                    await wait_until(lambda: all(r.opened.is_set() for r in readers))
                    first, last = await run_aio(_writes, socket)
                    slow = readers[-1]
                    assert len(slow.versions) < WRITES // 2  # most of it still queued
                    proc.send_signal(signal.SIGTERM)
                    for reader in readers:
                        # From now on read at once: grpclib's client drops a stream's unread
                        # data when the server closes the connection after its last stream.
                        reader.hurry.set()
                    code = await proc.wait()
            stderr = await read_stderr(proc)
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            if proc.stderr is not None:
                await proc.stderr.aclose()
    assert code == 0, stderr
    for reader in readers:
        assert reader.error is None and reader.lost is None, (
            reader.pace, reader.error, reader.lost, len(reader.versions), stderr[-3000:])
        assert reader.ended_ok
        check_prefix(reader, first, last)


async def test_a_stream_not_drained_in_time_ends_unavailable_naming_its_last_version(
    tmp_path: Path,
) -> None:
    """In process, so the test sees the moment of the deadline: the stalled reader reads what
    it was sent only then (before the connection closes, which grpclib's client would answer
    by dropping the unread data)."""
    config = make_test_config(tmp_path, min_gpus=0, shutdown_timeout=1.0,
                              slow_subscriber_timeout=60.0)
    fast, stalled = Reader("", 0.0), Reader("", 60.0)  # one event a minute
    async with open_test_runtime(config) as rt:
        socket = rt.listeners.unix_socket
        assert socket is not None
        fast.socket = stalled.socket = socket
        hub = rt.core.hub
        abort = hub.abort_draining

        def aborting(reason: str = "server shutting down before this watch was drained") -> int:
            count = abort(reason)
            stalled.hurry.set()
            return count

        hub.abort_draining = aborting  # type: ignore[method-assign]
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for reader in (fast, stalled):
                    nursery.start_soon(run_aio, reader.run)
                await wait_until(lambda: hub.statistics().active == 2)
                first, last = await run_aio(_writes, socket)
                await wait_until(lambda: len(fast.versions) == last - first + 1)
                started = trio.current_time()
                nursery.start_soon(rt.shutdown)  # it ends by cancelling this block
                await trio.sleep_forever()
    took = trio.current_time() - started
    assert took < 1.0 + 1.0
    assert fast.ended_ok
    assert fast.versions == list(range(first, last + 1))
    assert not stalled.ended_ok
    error = stalled.error
    assert error is not None and error.status == Status.UNAVAILABLE, error
    message = error.message or ""
    named = int(message.split("last delivered resource version ")[1].split(";")[0])
    assert stalled.versions == list(range(first, named + 1))  # no hole, ends where it says
    assert named < last
    assert "relist" in message
