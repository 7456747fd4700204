"""GpuService: thin handlers: decode, one call into the core, encode (SPEC sections 1 to 3)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import math
import traceback
from collections.abc import Callable
from typing import Any, cast

from google.protobuf.empty_pb2 import Empty
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from .._bridge import Bridge
from .._errors import InvalidArgument, NotFound
from ..cache import _store as store_ops
from ..cache._store import State
from ..cache.port import CorePort
from ..cache.watcher import Delivery, StreamEnd, Subscription
from ..proto.device.v1alpha1 import gpu_grpc
from ..proto.device.v1alpha1 import gpu_pb2 as pb
from ._calls import read_barrier, write, writer_of
from ._codec import PreEncoded
from ._flow import StreamWriter, frame
from ._limits import recv_request
from ._status import rpc_errors

SERVICE = "nvidia.device.v1alpha1.GpuService"
#: Events a watch stream takes per wake-up before checking for new ones.
WATCH_BATCH = 64
#: The longest a live event waits for a watcher that has not yet read what it was sent before
#: (see _Pump.flush): two and a half intervals of a 100/s stream of updates, so that a reader
#: that is behind gets several events per frame, and short against how far behind it already
#: is (docs/BENCHMARKS.md: 12 ms gathered too little to help).
LAGGING_HOLD_S = 0.025
_TIMER_SLACK_S = 0.001
#: ListGpus answers being written at once (each holds a copy of the whole list).
LIST_SENDERS = 4
#: Seconds an evicted stream's message already on its way may take to finish.
FINISH_GRACE = 5.0


class Face:
    """What every wire API's GpuService face shares: the core, error mapping, the consumer-read
    preamble (readiness gate, read-your-writes) and bounded sending of list answers."""

    service_name = SERVICE

    def __init__(self, port: CorePort, bridge: Bridge, max_receive: int) -> None:
        self.port = port
        self.bridge = bridge
        self._limit = max_receive
        self._list_cache: tuple[int, bytes] = (-1, b"")
        self._list_senders = asyncio.Semaphore(LIST_SENDERS)
        self._flusher: _Flusher | None = None

    def watch_flusher(self) -> _Flusher:
        """This face's flusher (made on the first watch, on the handlers' loop)."""
        if self._flusher is None:
            self._flusher = _Flusher(asyncio.get_running_loop(),
                                     self.port.observer.on_watch_event, self.port.now)
        return self._flusher

    def fanout_statistics(self) -> FanoutStatistics:
        """How live watch events were written (all zero before the first watch)."""
        if self._flusher is None:
            return FanoutStatistics(0, 0, 0, 0)
        return self._flusher.statistics()

    def _errors(self, method: str) -> contextlib.AbstractContextManager[None]:
        return rpc_errors(f"{self.service_name}/{method}", self.port.observer.on_reject)

    async def _read_request(self, stream: Stream[Any, Any]) -> Any:
        """A consumer read's request, once the gate is open (SPEC §4)."""
        request = await recv_request(stream, self._limit)
        self.port.check_read()
        return request

    async def _send_list(self, stream: Stream[Any, Any], data: bytes) -> None:
        """Send a serialized list answer.

        grpclib copies the whole answer into a frame buffer per call: with every informer
        relisting at once that is hundreds of megabytes, so only a few go out at a time, and a
        client that does not read its answer loses its slot after the slow-consumer timeout
        (the same policy and sweep as a watch that stopped reading).
        """
        async with self._list_senders, asyncio.timeout(None) as deadline:
            loop = asyncio.get_running_loop()
            slow_consumers = self.port.slow_consumers
            # Cut off by the core's slow-consumer sweep, on the core's clock, like a watch.
            token = slow_consumers.begin(lambda: deadline.reschedule(loop.time()))
            try:
                await stream.send_message(PreEncoded(data))
            finally:
                slow_consumers.finish(token)


class GpuService(Face, gpu_grpc.GpuServiceBase):
    # -- reads -------------------------------------------------------------------------------

    async def GetGpu(self, stream: Stream[pb.GetGpuRequest, pb.GetGpuResponse]) -> None:
        with self._errors("GetGpu"):
            request = await self._read_request(stream)
            store_ops.validate_name(request.name)
            await read_barrier(self.bridge, self.port)
            gpu = self.port.read().gpus.get(request.name)
            if gpu is None:
                raise NotFound(f"gpu {request.name!r} not found")
        await stream.send_message(pb.GetGpuResponse(gpu=gpu))

    async def ListGpus(self, stream: Stream[pb.ListGpusRequest, pb.ListGpusResponse]) -> None:
        with self._errors("ListGpus"):
            await self._read_request(stream)
            await read_barrier(self.bridge, self.port)
            data = self._list_response(self.port.read())
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
        with self._errors("WatchGpus"):
            request = await self._read_request(stream)
            from_rv = store_ops.parse_version(request.opts.resource_version,
                                              "opts.resource_version")
            subscription = self.port.subscribe(from_rv)
        await serve_watch(self.port, stream, subscription, _as_sent, self.watch_flusher())

    # -- writes ------------------------------------------------------------------------------

    async def CreateGpu(self, stream: Stream[pb.CreateGpuRequest, pb.CreateGpuResponse]) -> None:
        with self._errors("CreateGpu"):
            request = await recv_request(stream, self._limit)
            if not request.HasField("gpu"):
                raise InvalidArgument("gpu is required")
            provider = self._provider(stream)
            result = await write(self.bridge, self.port, store_ops.CreateGpu(request.gpu, provider))
        await stream.send_message(pb.CreateGpuResponse(gpu=result.gpu, created=result.created))

    async def UpdateGpu(self, stream: Stream[pb.UpdateGpuRequest, pb.UpdateGpuResponse]) -> None:
        with self._errors("UpdateGpu"):
            request = await recv_request(stream, self._limit)
            if not request.HasField("gpu"):
                raise InvalidArgument("gpu is required")
            provider = self._provider(stream)
            result = await write(self.bridge, self.port, store_ops.UpdateGpu(request.gpu, provider))
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
            result = await write(self.bridge, self.port, store_ops.UpdateGpuStatus(
                request.name, request.status, request.resource_version, provider))
        await stream.send_message(pb.UpdateGpuStatusResponse(gpu=result.gpu))

    async def DeleteGpu(self, stream: Stream[pb.DeleteGpuRequest, Empty]) -> None:
        with self._errors("DeleteGpu"):
            request = await recv_request(stream, self._limit)
            await write(self.bridge, self.port, store_ops.DeleteGpu(request.name))
        await stream.send_message(Empty())

    def _provider(self, stream: Stream[Any, Any]) -> str:
        return writer_of(self.port, stream)


def _as_sent(delivery: Delivery) -> bytes:
    """SPEC §1 streams send the hub's shared encoding as is."""
    return delivery.data


async def serve_watch(port: CorePort, stream: Stream[Any, Any], subscription: Subscription,
                      encode: Callable[[Delivery], bytes | None], flusher: _Flusher) -> None:
    """Pump ``subscription`` into ``stream`` until it ends, then end the stream as SPEC §3 says:
    OK on server shutdown once every committed event is sent, RESOURCE_EXHAUSTED on eviction,
    UNAVAILABLE otherwise (both naming the version to resume from; at shutdown, a stream not
    drained in time). Every wire API's watch ends this way; ``encode`` is its face
    (None: this stream does not show that event, e.g. another namespace)."""
    try:
        end = await _pump(port, stream, subscription, flusher, port.observer.on_watch_event,
                          min(FINISH_GRACE, port.slow_consumers.timeout), encode)
    finally:
        port.unsubscribe(subscription)
    if end.kind == "closed":
        return  # server shutdown, every committed event delivered: the stream ends OK
    status = Status.RESOURCE_EXHAUSTED if end.kind == "evicted" else Status.UNAVAILABLE
    raise GRPCError(status, end.message())


@dataclasses.dataclass(frozen=True, slots=True)
class FanoutStatistics:
    """How live watch events left: written at once by the flusher, or by the streams' tasks."""

    #: Flusher callbacks run (each writes everything committed since the previous one).
    flushes: int
    #: Events the flusher wrote (one per event per stream).
    written: int
    #: Times a stream could not take its events whole and its task took over.
    handed_over: int
    #: Times the flusher left a stream's events queued because its client had not yet read
    #: what it was sent before.
    held: int


#: One run of a batch framed for one write: the bytes (whole gRPC messages), how many of the
#: batch's events it covers (including ones the stream does not show) and, by event type, how
#: many it shows.
_Chunk = tuple[bytes, int, tuple[tuple[str, int], ...]]


def _chunks(batch: list[Delivery], encode: Callable[[Delivery], bytes | None],
            limit: int) -> list[_Chunk]:
    """``batch`` framed into runs of at most ``limit`` bytes (a larger message alone)."""
    chunks: list[_Chunk] = []
    parts: list[bytes] = []
    shown: collections.Counter[str] = collections.Counter()
    size = count = 0
    for delivery in batch:
        payload = encode(delivery)
        if payload is None:
            count += 1
            continue
        framed = len(payload) + 5
        if parts and size + framed > limit:
            chunks.append((b"".join(parts), count, tuple(shown.items())))
            parts, shown, size, count = [], collections.Counter(), 0, 0
        parts.append(frame(payload))
        size += framed
        count += 1
        shown[delivery.event.type] += 1
    if count:
        chunks.append((b"".join(parts), count, tuple(shown.items())))
    return chunks


class _Flusher:
    """Writes what the hub just queued to every idle watch stream, in one host-loop callback.

    The hub tells this flusher once per commit (a hub listener, not a call per stream), while
    it has streams. Waking one sender task per stream for each event would cost a task step per
    watcher per event; instead one callback, scheduled at the first commit after a flush, writes
    to every stream whose sender is parked (``StreamWriter.write_framed``): every event committed
    in the meantime goes out in the same write, and streams at the same place in the hub's log
    share one framing of it. A stream that cannot take its events whole right now (flow control,
    paused transport) gets its sender task woken, which waits as before. One per face (each
    face's streams).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 on_events: Callable[[str, int], None], now: Callable[[], float]) -> None:
        self._loop = loop
        #: The core's clock, which the janitor's stall deadlines use.
        self.now = now
        self._on_events = on_events
        #: Streams whose sender is parked: the flusher writes for them.
        self._idle: dict[_Pump, None] = {}
        self._port: CorePort | None = None
        self._streams = 0
        self._scheduled = False
        #: Events written in the current flush, by type (the pumps add to it).
        self.counts: collections.Counter[str] = collections.Counter()
        self._written: collections.Counter[str] = collections.Counter()
        self.flushes = 0
        self.handed_over = 0
        self.held = 0
        #: The flush that writes what a pass held back, once the hold is over.
        self._release: asyncio.TimerHandle | None = None

    def statistics(self) -> FanoutStatistics:
        return FanoutStatistics(self.flushes, sum(self._written.values()), self.handed_over,
                                self.held)

    def attach(self, port: CorePort) -> None:
        """A stream starts: listen to the hub while this face has any."""
        if self._streams == 0:
            self._port = port
            port.watch_listen(self._on_commit)
        self._streams += 1

    def detach(self, pump: _Pump) -> None:
        self._idle.pop(pump, None)
        self._streams -= 1
        if self._streams == 0 and self._port is not None:
            self._port.watch_unlisten(self._on_commit)
            self._port = None
            if self._release is not None:
                self._release.cancel()
                self._release = None

    def park(self, pump: _Pump) -> None:
        self._idle[pump] = None

    def unpark(self, pump: _Pump) -> None:
        self._idle.pop(pump, None)

    def _on_commit(self) -> None:
        """Called by the hub, synchronously, after a commit queued events."""
        if self._idle and not self._scheduled:
            self._scheduled = True
            # Two hops: the writers' handlers, resumed by the same commit, answer first (an
            # acknowledgement must not wait for hundreds of watch writes; with writes in a
            # closed loop it would also shrink the next batch, so less is coalesced).
            self._loop.call_soon(self._loop.call_soon, self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        self.flushes += 1
        self._write()

    def _released(self) -> None:
        self._release = None
        self._write()

    def _write(self) -> None:
        now = self.now()  # the janitor's stall clock
        framed: dict[tuple[int, int, int, object, int], tuple[list[Delivery], list[_Chunk]]] = {}
        release = math.inf
        for pump in list(self._idle):
            until = pump.flush(now, framed)
            if until is not None:
                self.held += 1
                release = min(release, until)
        if release < math.inf and (self._release is None or self._release.when() > release):
            if self._release is not None:
                self._release.cancel()
            self._release = self._loop.call_at(release, self._released)
        counts, self.counts = self.counts, collections.Counter()
        self._written.update(counts)
        for event_type, n in counts.items():
            self._on_events(event_type, n)


class _Pump:
    """One watch stream's sending side: the flusher writes while it can, a task when not.

    The sender task sends the initial backlog and anything the flusher could not write; when
    it has nothing left it parks (``idle``) and new events are the flusher's to write. An
    event ``encode`` leaves out counts as delivered in its turn, so the version to resume from
    stays exact.
    """

    def __init__(self, stream: Stream[Any, Any], subscription: Subscription,
                 flusher: _Flusher, on_events: Callable[[str, int], None],
                 encode: Callable[[Delivery], bytes | None]) -> None:
        self.subscription = subscription
        self.writer = StreamWriter(stream)
        self.loop = asyncio.get_running_loop()
        self.ended: asyncio.Future[StreamEnd] = self.loop.create_future()
        self._flusher = flusher
        self._on_events = on_events
        self._encode = encode
        self._wakeup: asyncio.Future[None] | None = None
        #: Events taken from the subscription that the flusher could not write.
        self._carry: list[Delivery] = []
        #: When the flusher first left this stream's events queued for its client to catch up
        #: (host loop time); None while it is not holding any.
        self._held_since: float | None = None

    @property
    def idle(self) -> bool:
        return self._wakeup is not None and not self._wakeup.done()

    def on_end(self) -> None:
        """Called by the hub, synchronously, when the subscription ends."""
        end = self.subscription.end
        if end is not None and not self.ended.done():
            self.ended.set_result(end)

    def _hand_over(self, carry: list[Delivery]) -> None:
        """The sender task takes over (and waits until the stream can take more)."""
        self._flusher.handed_over += 1
        self._carry = carry
        self._flusher.unpark(self)
        assert self._wakeup is not None
        self._wakeup.set_result(None)

    def flush(self, now: float,
              framed: dict[tuple[int, int, int, object, int],
                           tuple[list[Delivery], list[_Chunk]]]) -> float | None:
        """Write what is queued, now, if the stream is idle and can take it whole. When it is
        left queued because the client is behind: the host-loop time by which it must go.

        A client that has not yet read what it was sent before (bytes of this connection still
        in its socket) gains nothing from a frame per event: it will read them together, and
        it pays per frame (a gRPC client parses and dispatches each DATA frame: ~10 µs in
        grpclib). So its events stay queued, looked at again at each flush, until it has read
        what it had, for at most ``LAGGING_HOLD_S``, and then go out in one frame. A client
        that keeps up has nothing unread and gets each event at once.

        ``framed``: this flush's framings, shared by the streams at the same place in the log
        (the key pins its batch, so the ids in it name those events for the whole flush)."""
        subscription = self.subscription
        if not self.idle or subscription.end is not None:
            return None
        writer = self.writer
        if not writer.can_write_now():
            if subscription.pending:
                self._hand_over([])
            return None
        until = self._hold_until(writer)
        if until is not None:
            return until
        limit = writer.frame_limit
        encode = self._encode
        counts = self._flusher.counts
        while batch := subscription.take(WATCH_BATCH):
            key = (id(batch[0]), id(batch[-1]), len(batch), encode, limit)
            known = framed.get(key)
            if known is None:
                known = framed[key] = (batch, _chunks(batch, encode, limit))
            done = 0
            for data, count, shown in known[1]:
                if data and not writer.write_framed(data):
                    self._hand_over(batch[done:])
                    return None
                subscription.delivered_batch(
                    batch if count == len(batch) else batch[done:done + count], now)
                done += count
                for event_type, n in shown:
                    counts[event_type] += n
        return None

    def _hold_until(self, writer: StreamWriter) -> float | None:
        """When this stream's queued events must go, if they are to wait (see :meth:`flush`)."""
        if not self.subscription.pending:
            return None
        now = self.loop.time()
        since = self._held_since
        # Held long enough (a timer may fire up to a clock tick early: that counts as on time),
        # or the client has read everything: write.
        if ((since is not None and now >= since + LAGGING_HOLD_S - _TIMER_SLACK_S)
                or not writer.client_has_unread()):
            self._held_since = None
            return None
        if since is None:
            since = self._held_since = now
        return since + LAGGING_HOLD_S

    async def send_loop(self) -> None:
        subscription = self.subscription
        await self.writer.start()
        while subscription.end is None:
            batch, self._carry = self._carry or subscription.take(WATCH_BATCH), []
            if not batch:
                self._wakeup = self.loop.create_future()
                self._flusher.park(self)
                try:
                    await self._wakeup
                finally:
                    self._wakeup = None
                    self._flusher.unpark(self)
                continue
            payloads = [self._encode(d) for d in batch]
            sent = 0
            shown: collections.Counter[str] = collections.Counter()
            while sent < len(batch) and subscription.end is None:
                now = self._flusher.now()  # the janitor's stall clock
                while sent < len(batch) and payloads[sent] is None:
                    subscription.delivered(batch[sent], now)
                    sent += 1
                run = list(itertools.takewhile(lambda p: p is not None, payloads[sent:]))
                if not run:
                    continue
                count = await self.writer.write_some(cast(list[bytes], run))
                now = self._flusher.now()
                for delivery in batch[sent:sent + count]:
                    subscription.delivered(delivery, now)
                    shown[delivery.event.type] += 1
                sent += count
            for event_type, n in shown.items():
                self._on_events(event_type, n)
            if subscription.pending:
                await asyncio.sleep(0)  # one stream's backlog must not hold up the others


def _take_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _clear_failure(task: asyncio.Future[Any]) -> None:
    """Clear the frames of a finished sender's error (or cancellation): its traceback holds the
    sender's frames and so the stream's whole state, in a reference cycle with the task that
    only a full collection would free. (For a cancelled task ``result()`` hands over the
    stored CancelledError; a failure stays stored, frames cleared, for ``result()`` to raise.)"""
    if task.done():
        try:
            task.result()
        except BaseException as error:  # only its traceback is wanted here
            traceback.clear_frames(error.__traceback__)


async def _pump(
    port: CorePort,
    stream: Stream[Any, Any],
    subscription: Subscription,
    flusher: _Flusher,
    on_events: Callable[[str, int], None],
    finish_grace: float,
    encode: Callable[[Delivery], bytes | None],
) -> StreamEnd:
    """Send the subscription's events until it ends; return how it ended.

    Sending runs in its own task (and in the flusher's callback) so that an eviction can
    abandon a client that stopped reading (HTTP/2 flow control) and still end the stream with
    a status. Nothing is written until a whole group of messages can go at once (see
    _flow.py); when a large message is already on its way, the eviction lets it finish for up
    to ``finish_grace`` seconds. A send failure (client gone) propagates; cancellation (client
    cancel) cancels the sender.
    """
    pump = _Pump(stream, subscription, flusher, on_events, encode)
    subscription.on_end = pump.on_end
    pump.on_end()  # it may have ended already
    flusher.attach(port)
    sender = asyncio.ensure_future(pump.send_loop())
    # A send can fail after the stream already ended, or while this handler is being
    # cancelled (the client reset the stream): nothing is left to report then, so the failure
    # is always taken here, never left to the loop's "exception was never retrieved" (which
    # trio-asyncio re-raises into the server). ``sender.result()`` below still re-raises it.
    sender.add_done_callback(_take_failure)
    ended = pump.ended
    try:
        racers: list[asyncio.Future[Any]] = [sender, ended]
        await asyncio.wait(racers, return_when=asyncio.FIRST_COMPLETED)
        if ended.done() and pump.writer.writing:
            await asyncio.wait([sender], timeout=finish_grace)
    finally:
        subscription.on_end = None
        flusher.detach(pump)
        if not sender.done():
            sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({sender})
        _clear_failure(sender)
    if not ended.done():
        sender.result()  # the send failed: re-raise (client gone)
    return ended.result()
