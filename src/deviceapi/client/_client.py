"""An asyncio client of the Device API over grpclib (Unix socket or TCP).

Use it from asyncio directly, or from trio through :class:`TrioClient`, which crosses the
bridge once per call. Errors surface as ``grpclib.exceptions.GRPCError`` with the server's
status and message.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

from ..proto.device.v1alpha1 import gpu_grpc, provider_grpc
from ..proto.device.v1alpha1 import gpu_pb2 as pb
from ..proto.device.v1alpha1 import provider_pb2 as ppb

DEFAULT_SOCKET = "/var/run/device-api/device.sock"
GPU_SERVICE = "nvidia.device.v1alpha1.GpuService"
PROVIDER_SERVICE = "nvidia.device.v1alpha1.ProviderService"


class DeviceApiClient:
    """One HTTP/2 connection to a server; cheap to keep, close it when done."""

    def __init__(self, *, unix_socket: str | None = None, address: str | None = None,
                 provider_id: str = "", timeout: float | None = 30.0) -> None:
        if address:
            host, _, port = address.rpartition(":")
            self._channel = Channel(host or "127.0.0.1", int(port))
        else:
            self._channel = Channel(path=unix_socket or DEFAULT_SOCKET)
        self.provider_id = provider_id
        self.timeout = timeout
        self.gpus = gpu_grpc.GpuServiceStub(self._channel)
        self.providers = provider_grpc.ProviderServiceStub(self._channel)
        self.health = HealthStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    async def __aenter__(self) -> DeviceApiClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def _write_metadata(self) -> dict[str, str] | None:
        return {"x-provider-id": self.provider_id} if self.provider_id else None

    # -- GpuService --------------------------------------------------------------------------

    async def get(self, name: str) -> pb.Gpu:
        reply = await self.gpus.GetGpu(pb.GetGpuRequest(name=name), timeout=self.timeout)
        return reply.gpu

    async def list(self) -> pb.GpuList:
        reply = await self.gpus.ListGpus(pb.ListGpusRequest(), timeout=self.timeout)
        return reply.gpu_list

    async def watch(self, resource_version: int = 0) -> AsyncIterator[pb.WatchGpusResponse]:
        """Yield events until the server ends the stream (OK) or raise its error status."""
        opts = pb.ListOptions(resource_version=str(resource_version) if resource_version else "")
        async with self.gpus.WatchGpus.open() as stream:
            await stream.send_message(pb.WatchGpusRequest(opts=opts), end=True)
            async for event in stream:
                yield event

    async def create(self, gpu: pb.Gpu) -> tuple[pb.Gpu, bool]:
        reply = await self.gpus.CreateGpu(pb.CreateGpuRequest(gpu=gpu), timeout=self.timeout,
                                          metadata=self._write_metadata())
        return reply.gpu, reply.created

    async def update(self, gpu: pb.Gpu) -> pb.Gpu:
        reply = await self.gpus.UpdateGpu(pb.UpdateGpuRequest(gpu=gpu), timeout=self.timeout,
                                          metadata=self._write_metadata())
        return reply.gpu

    async def update_status(self, name: str, status: pb.GpuStatus,
                            resource_version: int = 0) -> pb.Gpu:
        reply = await self.gpus.UpdateGpuStatus(
            pb.UpdateGpuStatusRequest(name=name, status=status,
                                      resource_version=resource_version),
            timeout=self.timeout, metadata=self._write_metadata())
        return reply.gpu

    async def delete(self, name: str) -> None:
        await self.gpus.DeleteGpu(pb.DeleteGpuRequest(name=name), timeout=self.timeout,
                                  metadata=self._write_metadata())

    # -- ProviderService ---------------------------------------------------------------------

    async def register_gpu(self, *, name: str, provider_id: str | None = None,
                           status: pb.GpuStatus | None = None) -> tuple[bool, int]:
        reply = await self.providers.RegisterGpu(ppb.ProviderRegisterGpuRequest(
            name=name, spec=pb.GpuSpec(uuid=name), provider_id=self._pid(provider_id),
            initial_status=status), timeout=self.timeout)
        return reply.created, reply.resource_version

    async def unregister_gpu(self, name: str) -> bool:
        reply = await self.providers.UnregisterGpu(ppb.ProviderUnregisterGpuRequest(name=name),
                                                   timeout=self.timeout)
        return reply.deleted

    async def provider_update_status(self, *, name: str, status: pb.GpuStatus,
                                     provider_id: str | None = None) -> int:
        reply = await self.providers.UpdateGpuStatus(ppb.ProviderUpdateGpuStatusRequest(
            name=name, status=status, provider_id=self._pid(provider_id)), timeout=self.timeout)
        return reply.resource_version

    async def update_condition(self, *, name: str, condition: pb.Condition,
                               provider_id: str | None = None) -> int:
        reply = await self.providers.UpdateGpuCondition(ppb.ProviderUpdateGpuConditionRequest(
            name=name, condition=condition, provider_id=self._pid(provider_id)),
            timeout=self.timeout)
        return reply.resource_version

    async def heartbeat(self, *, gpu_names: Sequence[str] = (),
                        provider_id: str | None = None) -> bool:
        reply = await self.providers.Heartbeat(ppb.HeartbeatRequest(
            provider_id=self._pid(provider_id), gpu_names=list(gpu_names)), timeout=self.timeout)
        return reply.acknowledged

    def _pid(self, provider_id: str | None) -> str:
        return self.provider_id if provider_id is None else provider_id

    # -- health ------------------------------------------------------------------------------

    async def serving(self, service: str = GPU_SERVICE) -> bool:
        reply = await self.health.Check(HealthCheckRequest(service=service),
                                        timeout=self.timeout)
        return reply.status == HealthCheckResponse.SERVING

    async def wait_serving(self, service: str = GPU_SERVICE, *, interval: float = 0.5,
                           timeout: float | None = None) -> None:
        """Poll gRPC health until ``service`` is SERVING, riding out connection errors.

        Consumers wait for GpuService (READY); providers for ProviderService (listening)."""
        async with asyncio.timeout(timeout):
            while True:
                try:
                    if await self.serving(service):
                        return
                except (ConnectionError, OSError, StreamTerminatedError, GRPCError):
                    pass
                await asyncio.sleep(interval)


def is_retryable(error: BaseException) -> bool:
    """Whether a watch or call may be retried after ``error`` (resume or relist)."""
    if isinstance(error, GRPCError):
        return error.status in {Status.UNAVAILABLE, Status.RESOURCE_EXHAUSTED,
                                Status.OUT_OF_RANGE, Status.ABORTED, Status.DEADLINE_EXCEEDED}
    if isinstance(error, AttributeError) and "_transport" in str(error):
        return True  # grpclib's client when the connection dropped while it was being made
    return isinstance(error, (ConnectionError, OSError, StreamTerminatedError))

