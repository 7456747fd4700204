"""The client side of :mod:`bench.upstream`, one class per wire API it can drive.

The load test only needs five operations, so each API gets a small adapter with the same shape
(:class:`UpstreamApi`): create, get (returning the version to write against), list,
update_status (conditional; :class:`Aborted` when the version is stale) and close. Adapters talk
grpclib directly, with the generated stubs of their API, one HTTP/2 connection per virtual user,
the way a k6 VU holds one gRPC connection.

- ``device``: SPEC §1, ``nvidia.device.v1alpha1.GpuService`` on ``--unix-socket``;
- ``nvsentinel``: SPEC §7.1, ``nvidia.nvsentinel.v1alpha1.GpuService`` on
  ``--nvsentinel-api-socket`` — the upstream server's own API, the one its k6 test drives.

Another API is one more class of this shape and one more entry in :data:`APIS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError

from deviceapi.proto.device.v1alpha1 import gpu_grpc
from deviceapi.proto.device.v1alpha1 import gpu_pb2 as pb

from ._common import RawMessage

CALL_TIMEOUT = 30.0


class Aborted(Exception):
    """A conditional write lost the race (gRPC ABORTED): read again and retry."""


class UpstreamApi(Protocol):
    """What one virtual user calls. Every other gRPC error propagates as ``GRPCError``."""

    async def create(self, name: str, status: pb.GpuStatus) -> None: ...

    async def get(self, name: str) -> str:
        """The GPU's resource version, as the API carries it (a decimal string)."""
        ...

    async def list(self) -> int:
        """Lists every GPU; returns how many there are (the check compares it)."""
        ...

    async def update_status(self, name: str, status: pb.GpuStatus, version: str) -> None:
        """Replace the status if the GPU is still at ``version``; :class:`Aborted` if not."""
        ...

    def close(self) -> None: ...


class DeviceApi:
    """SPEC §1 (``nvidia.device.v1alpha1``): the API of ``--unix-socket``."""

    def __init__(self, socket: str) -> None:
        self._channel = Channel(path=socket)
        self._stub = gpu_grpc.GpuServiceStub(self._channel)
        # ListGpus replies are read as bytes and parsed after the clock stops: the latency is
        # the server's and the wire's, as k6 reports it, not this process's parser.
        self._list = self._channel.request
        self.list_bytes = 0

    async def create(self, name: str, status: pb.GpuStatus) -> None:
        await self._stub.CreateGpu(pb.CreateGpuRequest(gpu=pb.Gpu(
            metadata=pb.ObjectMeta(name=name), spec=pb.GpuSpec(uuid=name), status=status)),
            timeout=CALL_TIMEOUT)

    async def get(self, name: str) -> str:
        reply = await self._stub.GetGpu(pb.GetGpuRequest(name=name), timeout=CALL_TIMEOUT)
        return reply.gpu.metadata.resource_version

    async def list(self) -> int:
        async with self._list("/nvidia.device.v1alpha1.GpuService/ListGpus",
                              Cardinality.UNARY_UNARY, pb.ListGpusRequest, RawMessage,
                              timeout=CALL_TIMEOUT) as stream:
            await stream.send_message(pb.ListGpusRequest(), end=True)
            reply = await stream.recv_message()
            await stream.recv_trailing_metadata()
        assert reply is not None
        self.list_bytes = len(reply.data)
        return len(pb.ListGpusResponse.FromString(reply.data).gpu_list.items)

    async def update_status(self, name: str, status: pb.GpuStatus, version: str) -> None:
        try:
            await self._stub.UpdateGpuStatus(pb.UpdateGpuStatusRequest(
                name=name, status=status, resource_version=int(version or 0)),
                timeout=CALL_TIMEOUT)
        except GRPCError as exc:
            if exc.status is Status.ABORTED:
                raise Aborted(exc.message) from None
            raise

    def close(self) -> None:
        self._channel.close()


def _nv() -> Any:
    from deviceapi.proto.nvsentinel.v1alpha1 import gpu_pb2

    return gpu_pb2


class NvsentinelApi:
    """SPEC §7.1 (``nvidia.nvsentinel.v1alpha1``): the upstream server's own API, the one its
    k6 test drives, on ``--nvsentinel-api-socket``. Its ``GpuStatus`` and ``Condition`` have
    §1's field numbers, so a status is carried over by its bytes."""

    def __init__(self, socket: str) -> None:
        # Imported here: a build without the §7.1 face still runs --api device.
        from deviceapi.proto.nvsentinel.v1alpha1 import gpu_grpc as nv_grpc

        self._channel = Channel(path=socket)
        self._stub = nv_grpc.GpuServiceStub(self._channel)
        self._list = self._channel.request
        self.list_bytes = 0

    async def create(self, name: str, status: pb.GpuStatus) -> None:
        try:
            await self._stub.CreateGpu(_nv().CreateGpuRequest(gpu=_nv().Gpu(
                metadata=_nv().ObjectMeta(name=name), spec=_nv().GpuSpec(uuid=name),
                status=_nv().GpuStatus.FromString(status.SerializeToString()))),
                timeout=CALL_TIMEOUT)
        except GRPCError as exc:
            if exc.status is not Status.ALREADY_EXISTS:  # upstream's answer to a re-create
                raise

    async def get(self, name: str) -> str:
        reply = await self._stub.GetGpu(_nv().GetGpuRequest(name=name), timeout=CALL_TIMEOUT)
        return reply.gpu.metadata.resource_version

    async def list(self) -> int:
        async with self._list("/nvidia.nvsentinel.v1alpha1.GpuService/ListGpus",
                              Cardinality.UNARY_UNARY, _nv().ListGpusRequest, RawMessage,
                              timeout=CALL_TIMEOUT) as stream:
            await stream.send_message(_nv().ListGpusRequest(), end=True)
            reply = await stream.recv_message()
            await stream.recv_trailing_metadata()
        assert reply is not None
        self.list_bytes = len(reply.data)
        return len(_nv().ListGpusResponse.FromString(reply.data).gpu_list.items)

    async def update_status(self, name: str, status: pb.GpuStatus, version: str) -> None:
        try:
            await self._stub.UpdateGpuStatus(_nv().UpdateGpuStatusRequest(gpu=_nv().Gpu(
                metadata=_nv().ObjectMeta(name=name, resource_version=version),
                status=_nv().GpuStatus.FromString(status.SerializeToString()))),
                timeout=CALL_TIMEOUT)
        except GRPCError as exc:
            if exc.status is Status.ABORTED:
                raise Aborted(exc.message) from None
            raise

    def close(self) -> None:
        self._channel.close()


#: ``--api`` name → adapter factory (socket path → one VU's connection).
APIS: dict[str, Callable[[str], UpstreamApi]] = {
    "device": DeviceApi,
    "nvsentinel": NvsentinelApi,
}
