"""A watcher that is behind — it has not read what it was sent — gets the events queued
meanwhile in one frame instead of a frame each (``_Pump.flush``): it pays per frame and would
read them together anyway. One that keeps up gets every event at once, and the hold is
bounded: a client that reads nothing still has its events in its socket after
``LAGGING_HOLD_S``. Every event arrives once, in version order, either way (SPEC §3)."""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from _hostile import GPU_SERVICE, RawH2, RawResponse, grpc_frame

from deviceapi.cache import _store as ops
from deviceapi.client import DeviceApiClient
from deviceapi.proto.device.v1alpha1 import gpu_pb2 as pb
from deviceapi.testing.objects import GPU_A, make_gpu
from deviceapi.testing.runtime import (
    make_test_config,
    open_client,
    open_test_runtime,
    run_aio,
    wait_until,
)
from deviceapi.transport import gpu_service
from deviceapi.transport._flow import peer_has_unread
from deviceapi.transport.gpu_service import Face

UPDATES = 10


def _status(i: int) -> pb.GpuStatus:
    return pb.GpuStatus(conditions=[pb.Condition(type="Ready", status="True", message=str(i))])


def _versions(response: RawResponse) -> list[int]:
    return [pb.WatchGpusResponse.FromString(m).object.resource_version
            for m in response.messages()]


@dataclasses.dataclass
class _Watched:
    """A server with one GPU, a writer, and a hand-driven client watching it (snapshot read)."""

    service: Face
    writer: DeviceApiClient
    raw: RawH2
    response: RawResponse
    #: The response's DATA frames and the flusher's holds once the snapshot was in.
    snapshot_frames: int = 0
    snapshot_held: int = 0

    def frames(self) -> int:
        """DATA frames since the snapshot."""
        return self.response.frames - self.snapshot_frames

    def held(self) -> int:
        """Holds since the snapshot (any stream's: there is one)."""
        return self.service.fanout_statistics().held - self.snapshot_held

    async def update(self, i: int) -> None:
        await run_aio(self.writer.update_status, GPU_A, _status(i))

    async def read(self, messages: int) -> None:
        """Read until the watch has ``messages`` messages (the snapshot included)."""
        while len(self.response.messages()) < messages:
            await self.raw.pump()
            assert not self.response.done, self.response.grpc_message


@asynccontextmanager
async def _watched(tmp_path: Path, *, tcp: bool = False) -> AsyncIterator[_Watched]:
    """The watch over the server's Unix socket, or over TCP on the loopback."""
    config = make_test_config(tmp_path, grpc_address="127.0.0.1:0" if tcp else "")
    async with open_test_runtime(config) as rt, open_client(rt) as writer:
        await rt.core.store.write(ops.CreateGpu(make_gpu(GPU_A)))
        path = rt.listeners.unix_socket
        service = rt.grpc.gpu_service
        assert path is not None and service is not None
        with trio.fail_after(30):
            async with RawH2.open(path, tcp_port=rt.listeners.tcp_port if tcp else None) as raw:
                sid = raw.start(GPU_SERVICE + "WatchGpus")
                raw.send(sid, grpc_frame(pb.WatchGpusRequest().SerializeToString()),
                         end_stream=True)
                await raw.flush()
                watched = _Watched(service, writer, raw, raw.responses[sid])
                await watched.read(1)
                watched.snapshot_frames = watched.response.frames
                watched.snapshot_held = service.fanout_statistics().held
                yield watched


@pytest.fixture
def long_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hold longer than any test: a held event goes out only when the client has read."""
    monkeypatch.setattr(gpu_service, "LAGGING_HOLD_S", 600.0)


@pytest.mark.usefixtures("long_hold")
async def test_a_watcher_that_is_behind_gets_what_queued_in_one_frame(tmp_path: Path) -> None:
    """The client reads nothing while UPDATES commits go out: the first is written at once,
    the rest wait (a hold longer than the test, so timing plays no part). Once the client has
    read, the next commit's flush writes all of them, and the new one, in one frame."""
    async with _watched(tmp_path) as w:
        for i in range(UPDATES):
            await w.update(i)
        assert w.held() == UPDATES - 1
        await w.read(2)  # the first update: it was not held
        await w.update(UPDATES)  # the client has read: out they go
        await w.read(UPDATES + 2)
    versions = _versions(w.response)
    assert versions == list(range(versions[0], versions[0] + UPDATES + 2))
    assert w.frames() == 2


@pytest.mark.usefixtures("long_hold")
async def test_a_watcher_over_tcp_is_never_held(tmp_path: Path) -> None:
    """Over TCP the kernel's count of unsent data says nothing about what the client has read
    (it counts unacknowledged bytes), so nothing is held: a client that reads nothing still
    gets a frame per event."""
    async with _watched(tmp_path, tcp=True) as w:
        for i in range(UPDATES):
            await w.update(i)
        assert w.held() == 0
        await w.read(UPDATES + 1)
    assert w.frames() == UPDATES


@pytest.mark.usefixtures("long_hold")
async def test_a_watcher_that_keeps_up_gets_each_event_at_once(tmp_path: Path) -> None:
    """The client reads each event before the next commit: nothing is ever held (with a hold
    longer than the test, a held event would not arrive)."""
    async with _watched(tmp_path) as w:
        for i in range(UPDATES):
            await w.update(i)
            await w.read(i + 2)
        assert w.held() == 0
    assert w.frames() == UPDATES
    versions = _versions(w.response)
    assert versions == list(range(versions[0], versions[0] + UPDATES + 1))


async def test_a_watcher_that_reads_nothing_still_gets_its_events_after_the_hold(
    tmp_path: Path
) -> None:
    """No further commit and no read: the release timer writes what was held, so it is all in
    the client's socket by the time it reads (at most LAGGING_HOLD_S after it was held)."""
    async with _watched(tmp_path) as w:
        before = w.service.fanout_statistics()
        for i in range(UPDATES):
            await w.update(i)
        assert w.held() > 0
        await wait_until(
            lambda: w.service.fanout_statistics().written - before.written == UPDATES)
        await w.read(UPDATES + 1)
    versions = _versions(w.response)
    assert versions == list(range(versions[0], versions[0] + UPDATES + 1))


def test_the_unread_check_follows_the_reader_and_a_closed_socket_is_no_error() -> None:
    """What the hold asks of the kernel, on a real socket pair: unread until the reader takes
    it; a closed socket (a connection torn down before grpclib noticed, which a chaos run hit
    inside the flusher) answers False instead of raising."""
    writer, reader = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with writer, reader:
        assert not peer_has_unread(writer)
        writer.sendall(b"x" * 100)
        assert peer_has_unread(writer)
        assert reader.recv(4096) == b"x" * 100
        assert not peer_has_unread(writer)
        writer.sendall(b"y")
    assert writer.fileno() == -1
    assert not peer_has_unread(writer)
