"""The merged upstream API (``nvidia.nvsentinel.v1alpha1.GpuService``, SPEC §7.1): a face.

It owns no state. Every call is one call into the same core as SPEC §1's GpuService (same
objects, resource versions, readiness gate, limits, watch hub), with messages translated at the
edge. The two packages' ``GpuSpec``, ``GpuStatus`` and ``Condition`` are the same on the wire, so
they cross as bytes; the ``ObjectMeta`` fields §1 lacks (uid, generation, creation timestamp)
come from the store's :class:`~deviceapi.cache._store.ObjectInfo`.

Where that server's semantics differ from §1's, this face keeps them: CreateGpu of an existing
name is ALREADY_EXISTS; UpdateGpu changes the spec only; the expected version is
``metadata.resource_version``; an empty namespace is "default" on writes and every namespace on
reads; a watch without a version starts now (no snapshot). Beyond upstream, a watch with
``opts.resource_version`` resumes as SPEC §3 (upstream answered OUT_OF_RANGE).
"""

from __future__ import annotations

import collections
from typing import Any

from google.protobuf.empty_pb2 import Empty
from grpclib.server import Stream

from .._bridge import Bridge
from .._errors import InvalidArgument, NotFound
from ..cache import _store as store_ops
from ..cache._store import DEFAULT_NAMESPACE, Event, ObjectInfo, Result, State, in_namespace
from ..cache.port import CorePort
from ..cache.watcher import Delivery
from ..proto.device.v1alpha1 import gpu_pb2 as v1
from ..proto.nvsentinel.v1alpha1 import gpu_grpc
from ..proto.nvsentinel.v1alpha1 import gpu_pb2 as pb
from ._calls import read_barrier, write, writer_of
from ._limits import recv_request
from .gpu_service import Face, serve_watch

SERVICE = "nvidia.nvsentinel.v1alpha1.GpuService"
#: Watch events kept in this face's encoding, shared by its streams (as the hub shares §1's).
ENCODED_EVENTS = 2048


def to_upstream(gpu: v1.Gpu, info: ObjectInfo | None) -> pb.Gpu:
    """The store's object as the merged upstream server shows it."""
    out = pb.Gpu.FromString(gpu.SerializeToString())
    out.DiscardUnknownFields()  # §1's Gpu.resource_version (field 4) has no place here
    meta = out.metadata
    meta.namespace = meta.namespace or DEFAULT_NAMESPACE
    if info is not None:
        meta.uid = info.uid
        meta.generation = info.generation
        meta.creation_timestamp.CopyFrom(info.created)
    return out


def _head(number: int, size: int) -> bytes:
    """The key and length of a length-delimited protobuf field (a message, a repeated item)
    of ``size`` bytes: what goes before its serialized form."""
    head = bytearray([number << 3 | 2])
    while size > 0x7F:
        head.append(size & 0x7F | 0x80)
        size >>= 7
    head.append(size)
    return bytes(head)


def _spec(gpu: pb.Gpu) -> v1.GpuSpec:
    return v1.GpuSpec(uuid=gpu.spec.uuid)


def _status(gpu: pb.Gpu) -> v1.GpuStatus:
    return v1.GpuStatus.FromString(gpu.status.SerializeToString())


def _answer(result: Result) -> pb.Gpu:
    assert result.gpu is not None, "a create or update answers the stored object"
    return to_upstream(result.gpu, result.info)


class NvsentinelGpuService(Face, gpu_grpc.GpuServiceBase):
    service_name = SERVICE

    def __init__(self, port: CorePort, bridge: Bridge, max_receive: int) -> None:
        super().__init__(port, bridge, max_receive)
        self._encoded: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._items: dict[str, tuple[int, bytes]] = {}

    # -- reads -------------------------------------------------------------------------------

    async def GetGpu(self, stream: Stream[pb.GetGpuRequest, pb.GetGpuResponse]) -> None:
        with self._errors("GetGpu"):
            request = await self._read_request(stream)
            store_ops.validate_name(request.name)
            await read_barrier(self.bridge, self.port)
            state = self.port.read()
            gpu = state.gpus.get(request.name)
            if gpu is None or not in_namespace(gpu, request.namespace):
                raise NotFound(f"gpu {request.name!r} not found")
            answer = to_upstream(gpu, state.info.get(request.name))
        await stream.send_message(pb.GetGpuResponse(gpu=answer))

    async def ListGpus(self, stream: Stream[pb.ListGpusRequest, pb.ListGpusResponse]) -> None:
        with self._errors("ListGpus"):
            request = await self._read_request(stream)
            await read_barrier(self.bridge, self.port)
            data = self._list_response(self.port.read(), request.namespace)
        await self._send_list(stream, data)

    def _list_response(self, state: State, namespace: str) -> bytes:
        """The serialized answer; the all-namespaces one is built once per resource version.

        Every write changes the version, so under writes nearly every list is built anew:
        each GPU's upstream form is therefore kept serialized per GPU version, and an answer
        is those bytes joined under a new list header (only changed GPUs are translated)."""
        cached_rv, cached = self._list_cache
        if not namespace and cached_rv == state.rv and cached:
            return cached
        items = self._upstream_items(state)
        meta = pb.ListMeta(resource_version=str(state.rv)).SerializeToString()
        parts = [_head(1, len(meta)), meta]  # GpuList.metadata
        for name in sorted(state.gpus):
            if not namespace or in_namespace(state.gpus[name], namespace):
                item = items[name][1]
                parts += (_head(2, len(item)), item)  # GpuList.items
        body = b"".join(parts)
        data = _head(1, len(body)) + body  # ListGpusResponse.gpu_list
        if not namespace:
            self._list_cache = (state.rv, data)
        return data

    def _upstream_items(self, state: State) -> dict[str, tuple[int, bytes]]:
        """Every GPU of ``state`` as a serialized upstream ``Gpu``, by name (with the version it
        was made from); GPUs unchanged since the last call keep their bytes."""
        known = self._items
        items: dict[str, tuple[int, bytes]] = {}
        for name, gpu in state.gpus.items():
            item = known.get(name)
            if item is None or item[0] != gpu.resource_version:
                # The ObjectInfo (uid, generation, creation time) changes only with a write,
                # and every write gives the GPU a new version.
                item = (gpu.resource_version,
                        to_upstream(gpu, state.info.get(name)).SerializeToString())
            items[name] = item
        self._items = items
        return items

    async def WatchGpus(self, stream: Stream[pb.WatchGpusRequest, pb.WatchGpusResponse]) -> None:
        with self._errors("WatchGpus"):
            request = await self._read_request(stream)
            from_rv = store_ops.parse_version(request.opts.resource_version,
                                              "opts.resource_version")
            if not from_rv:
                # Upstream starts "now": no snapshot. Every write acknowledged before this
                # call is behind the start, everything after it is streamed.
                await read_barrier(self.bridge, self.port)
                from_rv = self.port.read().rv
            subscription = self.port.subscribe(from_rv)
        namespace = request.namespace

        def encode(delivery: Delivery) -> bytes | None:
            event = delivery.event
            if not in_namespace(event.gpu, namespace):
                return None
            return self._encode(event)

        await serve_watch(self.port, stream, subscription, encode, self.watch_flusher())

    def _encode(self, event: Event) -> bytes:
        """One event in this API's wire form, made once and shared by every stream (each event
        has its own version, so the version names it)."""
        data = self._encoded.get(event.rv)
        if data is None:
            data = pb.WatchGpusResponse(
                type=event.type, object=to_upstream(event.gpu, event.info)).SerializeToString()
            self._encoded[event.rv] = data
            if len(self._encoded) > ENCODED_EVENTS:
                self._encoded.popitem(last=False)
        return data

    # -- writes ------------------------------------------------------------------------------

    async def CreateGpu(self, stream: Stream[pb.CreateGpuRequest, pb.Gpu]) -> None:
        with self._errors("CreateGpu"):
            request = await recv_request(stream, self._limit)
            gpu = self._required_gpu(request)
            stored = v1.Gpu(
                metadata=v1.ObjectMeta(name=gpu.metadata.name,
                                       namespace=gpu.metadata.namespace or DEFAULT_NAMESPACE),
                spec=_spec(gpu), status=_status(gpu))
            result = await write(self.bridge, self.port, store_ops.CreateGpu(
                stored, writer_of(self.port, stream), exclusive=True))
            answer = _answer(result)
        await stream.send_message(answer)

    async def UpdateGpu(self, stream: Stream[pb.UpdateGpuRequest, pb.Gpu]) -> None:
        with self._errors("UpdateGpu"):
            request = await recv_request(stream, self._limit)
            gpu = self._required_gpu(request)
            meta = gpu.metadata
            result = await write(self.bridge, self.port, store_ops.UpdateSpec(
                meta.name, _spec(gpu), meta.namespace, meta.uid, _expected(gpu),
                writer_of(self.port, stream)))
            answer = _answer(result)
        await stream.send_message(answer)

    async def UpdateGpuStatus(self, stream: Stream[pb.UpdateGpuStatusRequest, pb.Gpu]) -> None:
        with self._errors("UpdateGpuStatus"):
            request = await recv_request(stream, self._limit)
            gpu = self._required_gpu(request)
            meta = gpu.metadata
            store_ops.validate_name(meta.name, "metadata.name")
            result = await write(self.bridge, self.port, store_ops.UpdateGpuStatus(
                meta.name, _status(gpu), _expected(gpu), writer_of(self.port, stream),
                identity=(meta.namespace, meta.uid)))
            answer = _answer(result)
        await stream.send_message(answer)

    async def DeleteGpu(self, stream: Stream[pb.DeleteGpuRequest, Empty]) -> None:
        with self._errors("DeleteGpu"):
            request = await recv_request(stream, self._limit)
            await write(self.bridge, self.port, store_ops.DeleteGpu(request.name,
                                                       namespace=request.namespace))
        await stream.send_message(Empty())

    @staticmethod
    def _required_gpu(request: Any) -> pb.Gpu:
        if not request.HasField("gpu"):
            raise InvalidArgument("gpu is required")
        gpu: pb.Gpu = request.gpu
        return gpu


def _expected(gpu: pb.Gpu) -> int:
    """The expected version: ``metadata.resource_version`` ("" = unconditional)."""
    return store_ops.parse_version(gpu.metadata.resource_version, "metadata.resource_version")
