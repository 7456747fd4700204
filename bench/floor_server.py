"""The floors: a minimal grpclib GpuService with trivial handlers, on a Unix socket.

``python -m bench.floor_server --socket PATH --listing FILE --mode MODE``

- ``ListGpus`` answers with the bytes in FILE (a ListGpusResponse serialized once, up front);
- ``GetGpu`` looks the name up in a dict and sends ``GetGpuResponse(gpu=...)`` (the message is
  serialized per call, as the real server does);
- the fan-out floor: ``WatchGpus`` streams live events only, and ProviderService's
  ``UpdateGpuCondition`` applies the condition to a copy of the GPU, serializes one
  ``WatchGpusResponse`` and queues those bytes to every stream (one sender task per stream,
  as any server needs so that one slow reader does not hold up the rest). With
  ``--coalesce`` a sender writes everything queued for its stream in one HTTP/2 write (several
  length-prefixed gRPC messages in one DATA frame) instead of one write per message.

Modes isolate where the real server's time goes:

- ``asyncio``: plain ``asyncio.run`` — the floor the targets are stated against;
- ``asyncio-metrics``: the same plus deviceapi's gRPC instrumentation wrapper (the
  ``grpc_server_*`` metrics the real server records for every call);
- ``trio-asyncio``: the same handlers on the loop the real server uses (asyncio on top of trio
  through ``trio_asyncio``), no crossing into trio;
- ``guest``: a native asyncio loop hosting trio in guest mode (ARCHITECTURE §4's fallback), no
  crossing.

Prints ``ready`` on stdout once listening; exits on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import struct
import sys
from typing import Any

from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.server import Server

from deviceapi.proto.device.v1alpha1 import gpu_pb2 as pb
from deviceapi.proto.device.v1alpha1 import provider_pb2 as ppb

from . import _gc_log
from ._common import RawMessage

SERVICE = "/nvidia.device.v1alpha1.GpuService/"
PROVIDER = "/nvidia.device.v1alpha1.ProviderService/"
MODES = ("asyncio", "asyncio-metrics", "trio-asyncio", "guest")


class FloorService:
    """GpuService's reads and a fan-out with nothing in them but the work itself."""

    def __init__(self, listing: bytes, coalesce: bool = False) -> None:
        self.listing = RawMessage(listing)
        response = pb.ListGpusResponse.FromString(listing)
        self.gpus = {gpu.metadata.name: gpu for gpu in response.gpu_list.items}
        self.rv = int(response.gpu_list.metadata.resource_version or 0)
        self.coalesce = coalesce
        self.watchers: set[asyncio.Queue[bytes]] = set()

    async def list_gpus(self, stream: Any) -> None:
        await stream.recv_message()
        await stream.send_message(self.listing)

    async def get_gpu(self, stream: Any) -> None:
        request = await stream.recv_message()
        gpu = self.gpus.get(request.name)
        if gpu is None:
            raise GRPCError(Status.NOT_FOUND, "not found")
        await stream.send_message(pb.GetGpuResponse(gpu=gpu))

    async def watch_gpus(self, stream: Any) -> None:
        await stream.recv_message()
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.watchers.add(queue)
        try:
            await stream.send_initial_metadata()
            while True:
                batch = [await queue.get()]
                while not queue.empty():
                    batch.append(queue.get_nowait())
                if self.coalesce:
                    await stream._stream.send_data(b"".join(
                        struct.pack(">?I", False, len(data)) + data for data in batch))
                else:
                    for data in batch:
                        await stream.send_message(RawMessage(data))
        finally:
            self.watchers.discard(queue)

    async def update_condition(self, stream: Any) -> None:
        request = await stream.recv_message()
        current = self.gpus.get(request.name)
        if current is None:
            raise GRPCError(Status.NOT_FOUND, "not found")
        gpu = pb.Gpu()
        gpu.CopyFrom(current)
        for condition in gpu.status.conditions:
            if condition.type == request.condition.type:
                condition.CopyFrom(request.condition)
                break
        else:
            gpu.status.conditions.append(request.condition)
        self.rv += 1
        gpu.resource_version = self.rv
        gpu.metadata.resource_version = str(self.rv)
        self.gpus[request.name] = gpu
        data = pb.WatchGpusResponse(type="MODIFIED", object=gpu).SerializeToString()
        for queue in self.watchers:
            queue.put_nowait(data)
        await stream.send_message(ppb.ProviderUpdateGpuConditionResponse(resource_version=self.rv))

    def __mapping__(self) -> dict[str, Handler]:
        return {
            SERVICE + "WatchGpus": Handler(self.watch_gpus, Cardinality.UNARY_STREAM,
                                           pb.WatchGpusRequest, RawMessage),
            PROVIDER + "UpdateGpuCondition": Handler(
                self.update_condition, Cardinality.UNARY_UNARY,
                ppb.ProviderUpdateGpuConditionRequest, ppb.ProviderUpdateGpuConditionResponse),
            SERVICE + "ListGpus": Handler(self.list_gpus, Cardinality.UNARY_UNARY,
                                          pb.ListGpusRequest, RawMessage),
            SERVICE + "GetGpu": Handler(self.get_gpu, Cardinality.UNARY_UNARY,
                                        pb.GetGpuRequest, pb.GetGpuResponse),
        }


class _Mapped:
    def __init__(self, mapping: dict[str, Handler]) -> None:
        self._mapping = mapping

    def __mapping__(self) -> dict[str, Handler]:
        return self._mapping


def _servables(listing: bytes, mode: str, coalesce: bool = False) -> list[Any]:
    service = FloorService(listing, coalesce)
    if mode != "asyncio-metrics":
        return [service]
    from prometheus_client import CollectorRegistry

    from deviceapi.transport.metrics import ServerMetrics, instrument_mapping

    metrics = ServerMetrics(CollectorRegistry(), version="bench", node="bench")
    return [_Mapped(instrument_mapping(service.__mapping__(), metrics))]


async def _serve_asyncio(path: str, listing: bytes, mode: str, coalesce: bool) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server = Server(_servables(listing, mode, coalesce))
    await server.start(path=path)
    print("ready", flush=True)
    if mode == "guest":
        await _with_trio_guest(stop)
    else:
        await stop.wait()
    server.close()
    await server.wait_closed()


async def _with_trio_guest(stop: asyncio.Event) -> None:
    """Host a trio run in guest mode until ``stop``; it idles like the server's timers do."""
    import trio

    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    handles: list[tuple[trio.lowlevel.TrioToken, trio.CancelScope]] = []

    async def trio_main() -> None:
        with trio.CancelScope() as scope:
            handles.append((trio.lowlevel.current_trio_token(), scope))
            # A janitor-like timer: the real server's wakes up about once a second.
            while True:  # noqa: ASYNC110 - a periodic timer, not a wait for a condition
                await trio.sleep(1.0)

    trio.lowlevel.start_guest_run(
        trio_main,
        run_sync_soon_threadsafe=loop.call_soon_threadsafe,
        done_callback=lambda _: loop.call_soon_threadsafe(done.set_result, None),
        host_uses_signal_set_wakeup_fd=True,
    )
    await stop.wait()
    for token, scope in handles:
        token.run_sync_soon(scope.cancel)
    await done


def _serve_trio_asyncio(path: str, listing: bytes) -> None:
    import trio

    from deviceapi import _bridge

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with _bridge.open_loop():
                server = Server(_servables(listing, "trio-asyncio"))
                await _bridge.aio_as_trio(server.start)(path=path)
                print("ready", flush=True)
                async for _ in signals:
                    break
                server.close()
                await _bridge.aio_as_trio(server.wait_closed)()

    trio.run(main)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True)
    parser.add_argument("--listing", required=True, help="serialized ListGpusResponse")
    parser.add_argument("--mode", choices=MODES, default="asyncio")
    parser.add_argument("--coalesce", action="store_true",
                        help="fan-out floor: one HTTP/2 write per wake-up, not per message")
    args = parser.parse_args(argv)
    _gc_log.install()  # the bench reads this floor's full collections ($BENCH_GC_LOG)
    with open(args.listing, "rb") as f:
        listing = f.read()
    if os.path.exists(args.socket):
        os.unlink(args.socket)
    if args.mode == "trio-asyncio":
        _serve_trio_asyncio(args.socket, listing)
    else:
        asyncio.run(_serve_asyncio(args.socket, listing, args.mode, args.coalesce))
    return 0


if __name__ == "__main__":
    sys.exit(main())
