"""GpuService: thin handlers: decode, one call into the core, encode (SPEC sections 1 to 3)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
from collections.abc import Callable
from typing import Any, cast

import trio
from google.protobuf.empty_pb2 import Empty
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from .._errors import InvalidArgument, NotFound
from ..cache import _store as store_ops
from ..cache._store import State
from ..cache.core import Core
from ..cache.watcher import Delivery, StreamEnd, Subscription
from ..proto.device.v1alpha1 import gpu_grpc
from ..proto.device.v1alpha1 import gpu_pb2 as pb
from ._calls import read_barrier, write, writer_of
from ._codec import PreEncoded
from ._flow import StreamWriter
from ._limits import recv_request
from ._status import rpc_errors

SERVICE = "nvidia.device.v1alpha1.GpuService"
#: Events a watch stream takes per wake-up before checking for new ones.
WATCH_BATCH = 64
#: ListGpus answers being written at once (each holds a copy of the whole list).
LIST_SENDERS = 4
#: Seconds an evicted stream's message already on its way may take to finish.
FINISH_GRACE = 5.0


class Face:
    """What every wire API's GpuService face shares: the core, error mapping, the consumer-read
    preamble (readiness gate, read-your-writes) and bounded sending of list answers."""

    service_name = SERVICE

    def __init__(self, core: Core) -> None:
        self.core = core
        self._limit = core.config.max_receive_message_bytes
        self._list_cache: tuple[int, bytes] = (-1, b"")
        self._list_senders = asyncio.Semaphore(LIST_SENDERS)

    def _errors(self, method: str) -> contextlib.AbstractContextManager[None]:
        return rpc_errors(f"{self.service_name}/{method}", self.core.observer.on_reject)

    async def _read_request(self, stream: Stream[Any, Any]) -> Any:
        """A consumer read's request, once the gate is open (SPEC §4)."""
        request = await recv_request(stream, self._limit)
        self.core.gate.check_read()
        return request

    async def _send_list(self, stream: Stream[Any, Any], data: bytes) -> None:
        """Send a serialized list answer.

        grpclib copies the whole answer into a frame buffer per call: with every informer
        relisting at once that is hundreds of megabytes, so only a few go out at a time, and a
        client that does not read its answer loses its slot after the slow-subscriber timeout.
        """
        async with self._list_senders, asyncio.timeout(self.core.config.slow_subscriber_timeout):
            await stream.send_message(PreEncoded(data))


class GpuService(Face, gpu_grpc.GpuServiceBase):
    # -- reads -------------------------------------------------------------------------------

    async def GetGpu(self, stream: Stream[pb.GetGpuRequest, pb.GetGpuResponse]) -> None:
        with self._errors("GetGpu"):
            request = await self._read_request(stream)
            store_ops.validate_name(request.name)
            await read_barrier(self.core)
            gpu = self.core.store.state.gpus.get(request.name)
            if gpu is None:
                raise NotFound(f"gpu {request.name!r} not found")
        await stream.send_message(pb.GetGpuResponse(gpu=gpu))

    async def ListGpus(self, stream: Stream[pb.ListGpusRequest, pb.ListGpusResponse]) -> None:
        with self._errors("ListGpus"):
            await self._read_request(stream)
            await read_barrier(self.core)
            data = self._list_response(self.core.store.state)
        await self._send_list(stream, data)

    def _list_response(self, state: State) -> bytes:
        """The serialized ListGpusResponse of ``state``, built once per resource version: a
        relist storm (every informer after a restart) costs one serialization, not one each."""
        cached_rv, cached = self._list_cache
        if cached_rv != state.rv or not cached:
            items = [state.gpus[name] for name in sorted(state.gpus)]
            cached = pb.ListGpusResponse(gpu_list=pb.GpuList(
                metadata=pb.ListMeta(resource_version=str(state.rv)), items=items,
            )).SerializeToString()
            self._list_cache = (state.rv, cached)
        return cached

    async def WatchGpus(self, stream: Stream[pb.WatchGpusRequest, pb.WatchGpusResponse]) -> None:
        hub = self.core.hub
        with self._errors("WatchGpus"):
            request = await self._read_request(stream)
            from_rv = store_ops.parse_version(request.opts.resource_version,
                                              "opts.resource_version")
            subscription = hub.subscribe(from_rv)
        await serve_watch(self.core, stream, subscription, _as_sent)

    # -- writes ------------------------------------------------------------------------------

    async def CreateGpu(self, stream: Stream[pb.CreateGpuRequest, pb.CreateGpuResponse]) -> None:
        with self._errors("CreateGpu"):
            request = await recv_request(stream, self._limit)
            if not request.HasField("gpu"):
                raise InvalidArgument("gpu is required")
            provider = self._provider(stream)
            result = await write(self.core, store_ops.CreateGpu(request.gpu, provider))
        await stream.send_message(pb.CreateGpuResponse(gpu=result.gpu, created=result.created))

    async def UpdateGpu(self, stream: Stream[pb.UpdateGpuRequest, pb.UpdateGpuResponse]) -> None:
        with self._errors("UpdateGpu"):
            request = await recv_request(stream, self._limit)
            if not request.HasField("gpu"):
                raise InvalidArgument("gpu is required")
            provider = self._provider(stream)
            result = await write(self.core, store_ops.UpdateGpu(request.gpu, provider))
        await stream.send_message(pb.UpdateGpuResponse(gpu=result.gpu))

    async def UpdateGpuStatus(
        self, stream: Stream[pb.UpdateGpuStatusRequest, pb.UpdateGpuStatusResponse]
    ) -> None:
        with self._errors("UpdateGpuStatus"):
            request = await recv_request(stream, self._limit)
            if not request.name:
                raise InvalidArgument("name is required")
            if not request.HasField("status"):
                raise InvalidArgument("status is required")
            provider = self._provider(stream)
            result = await write(self.core, store_ops.UpdateGpuStatus(
                request.name, request.status, request.resource_version, provider))
        await stream.send_message(pb.UpdateGpuStatusResponse(gpu=result.gpu))

    async def DeleteGpu(self, stream: Stream[pb.DeleteGpuRequest, Empty]) -> None:
        with self._errors("DeleteGpu"):
            request = await recv_request(stream, self._limit)
            await write(self.core, store_ops.DeleteGpu(request.name))
        await stream.send_message(Empty())

    def _provider(self, stream: Stream[Any, Any]) -> str:
        return writer_of(self.core, stream)


def _as_sent(delivery: Delivery) -> bytes:
    """SPEC §1 streams send the hub's shared encoding as is."""
    return delivery.data


async def serve_watch(core: Core, stream: Stream[Any, Any], subscription: Subscription,
                      encode: Callable[[Delivery], bytes | None]) -> None:
    """Pump ``subscription`` into ``stream`` until it ends, then end the stream as SPEC §3 says:
    OK on server shutdown once every committed event is sent, RESOURCE_EXHAUSTED on eviction,
    UNAVAILABLE otherwise (both naming the version to resume from; at shutdown, a stream not
    drained in time). Every wire API's watch ends this way; ``encode`` is its face
    (None: this stream does not show that event, e.g. another namespace)."""
    try:
        end = await _pump(stream, subscription, core.observer.on_watch_event,
                          min(FINISH_GRACE, core.config.slow_subscriber_timeout), encode)
    finally:
        core.hub.unsubscribe(subscription)
    if end.kind == "closed":
        return  # server shutdown, every committed event delivered: the stream ends OK
    status = Status.RESOURCE_EXHAUSTED if end.kind == "evicted" else Status.UNAVAILABLE
    raise GRPCError(status, end.message())


async def _pump(
    stream: Stream[Any, Any],
    subscription: Subscription,
    on_events: Callable[[str, int], None],
    finish_grace: float,
    encode: Callable[[Delivery], bytes | None],
) -> StreamEnd:
    """Send the subscription's events until it ends; return how it ended.

    Sending runs in its own task so that an eviction can abandon a client that stopped reading
    (HTTP/2 flow control) and still end the stream with a status. Nothing is written until a
    whole group of messages can go at once (see _flow.py); when a large message is already on
    its way, the eviction lets it finish for up to ``finish_grace`` seconds. A send failure
    (client gone) propagates; cancellation (client cancel) cancels the sender. An event
    ``encode`` leaves out counts as delivered in its turn, so the version to resume from stays
    exact.
    """
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[StreamEnd] = loop.create_future()
    wakeup: asyncio.Future[None] | None = None
    writer = StreamWriter(stream)

    def on_change() -> None:
        if subscription.end is not None:
            if not ended.done():
                ended.set_result(subscription.end)
        elif wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    async def send_loop() -> None:
        nonlocal wakeup
        while subscription.end is None:
            batch = subscription.take(WATCH_BATCH)
            if not batch:
                wakeup = loop.create_future()
                await wakeup
                continue
            payloads = [encode(d) for d in batch]
            sent = 0
            shown: collections.Counter[str] = collections.Counter()
            while sent < len(batch) and subscription.end is None:
                now = trio.current_time()  # the janitor's stall clock
                while sent < len(batch) and payloads[sent] is None:
                    subscription.delivered(batch[sent], now)
                    sent += 1
                run = list(itertools.takewhile(lambda p: p is not None, payloads[sent:]))
                if not run:
                    continue
                count = await writer.write_some(cast(list[bytes], run))
                now = trio.current_time()
                for delivery in batch[sent:sent + count]:
                    subscription.delivered(delivery, now)
                    shown[delivery.event.type] += 1
                sent += count
            for event_type, n in shown.items():
                on_events(event_type, n)
            await asyncio.sleep(0)  # one stream's backlog must not hold up the others

    subscription.on_change = on_change
    on_change()  # it may have ended already
    sender = asyncio.ensure_future(send_loop())
    try:
        racers: list[asyncio.Future[Any]] = [sender, ended]
        await asyncio.wait(racers, return_when=asyncio.FIRST_COMPLETED)
        if ended.done() and writer.writing:
            await asyncio.wait([sender], timeout=finish_grace)
    finally:
        subscription.on_change = None
        if not sender.done():
            sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({sender})
    if not ended.done():
        sender.result()  # the send failed: re-raise (client gone)
    return ended.result()
