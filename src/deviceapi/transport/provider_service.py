"""ProviderService: the older provider API (SPEC §1), plus Heartbeat (SPEC §4, beyond)."""

from __future__ import annotations

import contextlib

from grpclib.server import Stream

from .._bridge import Bridge
from .._errors import InvalidArgument
from ..cache import _store as store_ops
from ..cache.port import CorePort
from ..proto.device.v1alpha1 import provider_grpc
from ..proto.device.v1alpha1 import provider_pb2 as pb
from ._calls import write
from ._limits import recv_request
from ._status import rpc_errors

SERVICE = "nvidia.device.v1alpha1.ProviderService"


class ProviderService(provider_grpc.ProviderServiceBase):
    def __init__(self, port: CorePort, bridge: Bridge, max_receive: int) -> None:
        self.port = port
        self.bridge = bridge
        self._limit = max_receive

    def _errors(self, method: str) -> contextlib.AbstractContextManager[None]:
        return rpc_errors(f"{SERVICE}/{method}", self.port.observer.on_reject)

    def _provider(self, provider: str) -> str:
        store_ops.validate_provider(provider)
        self.port.touch(provider)
        return provider

    async def RegisterGpu(
        self, stream: Stream[pb.ProviderRegisterGpuRequest, pb.ProviderRegisterGpuResponse]
    ) -> None:
        with self._errors("RegisterGpu"):
            r = await recv_request(stream, self._limit)
            result = await write(self.bridge, self.port, store_ops.RegisterGpu(
                r.name, r.spec, r.initial_status, self._provider(r.provider_id)))
        await stream.send_message(pb.ProviderRegisterGpuResponse(
            created=result.created, resource_version=result.rv))

    async def UnregisterGpu(
        self, stream: Stream[pb.ProviderUnregisterGpuRequest, pb.ProviderUnregisterGpuResponse]
    ) -> None:
        with self._errors("UnregisterGpu"):
            r = await recv_request(stream, self._limit)
            result = await write(self.bridge, self.port,
                                 store_ops.DeleteGpu(r.name, missing_ok=True))
        await stream.send_message(pb.ProviderUnregisterGpuResponse(deleted=result.deleted))

    async def UpdateGpuStatus(
        self,
        stream: Stream[pb.ProviderUpdateGpuStatusRequest, pb.ProviderUpdateGpuStatusResponse],
    ) -> None:
        with self._errors("UpdateGpuStatus"):
            r = await recv_request(stream, self._limit)
            if not r.HasField("status"):
                raise InvalidArgument("status is required")
            result = await write(self.bridge, self.port, store_ops.UpdateGpuStatus(
                r.name, r.status, 0, self._provider(r.provider_id)))
        await stream.send_message(pb.ProviderUpdateGpuStatusResponse(resource_version=result.rv))

    async def UpdateGpuCondition(
        self,
        stream: Stream[pb.ProviderUpdateGpuConditionRequest,
                       pb.ProviderUpdateGpuConditionResponse],
    ) -> None:
        with self._errors("UpdateGpuCondition"):
            r = await recv_request(stream, self._limit)
            if not r.HasField("condition"):
                raise InvalidArgument("condition is required")
            result = await write(self.bridge, self.port, store_ops.UpdateCondition(
                r.name, r.condition, self._provider(r.provider_id)))
        await stream.send_message(
            pb.ProviderUpdateGpuConditionResponse(resource_version=result.rv))

    async def Heartbeat(self, stream: Stream[pb.HeartbeatRequest, pb.HeartbeatResponse]) -> None:
        with self._errors("Heartbeat"):
            r = await recv_request(stream, self._limit)
            if not r.provider_id:
                raise InvalidArgument("provider_id is required")
            provider = self._provider(r.provider_id)
            names = tuple(r.gpu_names)
            for name in names:
                store_ops.validate_name(name, "gpu_names")
            if names:
                await write(self.bridge, self.port, store_ops.ClaimGpus(provider, names))
            unmask = self.port.heartbeat(provider)
            if unmask is not None:
                await write(self.bridge, self.port, unmask)
            # acknowledged=False tells a provider that this server lacks GPUs it named (it
            # restarted, or someone deleted them): the provider should register them again.
            known = self.port.read().gpus
            acknowledged = all(name in known for name in names)
        await stream.send_message(pb.HeartbeatResponse(acknowledged=acknowledged))

