"""The trio face of :class:`DeviceApiClient` for in-process providers (simulator, NVML poller).

Each call crosses the bridge once. It implements the NVML poller's ``ProviderApi`` protocol, so
the embedded provider and the sidecar talk to the server through the same public API.
"""

from __future__ import annotations

from collections.abc import Sequence

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from .. import _bridge
from .._bridge import Bridge
from ..proto.device.v1alpha1 import gpu_pb2 as pb
from ._client import PROVIDER_SERVICE, DeviceApiClient


class HeartbeatRejected(Exception):
    """The server answered a heartbeat with acknowledged=False: it lost some of our GPUs
    (restarted, or they were deleted). A provider restarts and registers them again."""


class TrioProviderClient:
    """Provider calls from trio code, over a real gRPC connection."""

    def __init__(self, client: DeviceApiClient, bridge: Bridge) -> None:
        self.client = client
        self._bridge = bridge

    @classmethod
    async def connect(cls, *, unix_socket: str | None = None, address: str | None = None,
                      timeout: float | None = 30.0,
                      bridge: Bridge | None = None) -> TrioProviderClient:
        """Build the connection inside the asyncio loop (grpclib binds to the running loop).

        ``bridge``: the run's (the runner passes its handle; default: the current run's)."""
        bridge = bridge or _bridge.current()

        async def make() -> DeviceApiClient:
            return DeviceApiClient(unix_socket=unix_socket, address=address, timeout=timeout)

        return cls(await bridge.aio_as_trio(make)(), bridge)

    async def wait_serving(self) -> None:
        await self._bridge.aio_as_trio(self.client.wait_serving)(PROVIDER_SERVICE)

    async def register_gpu(self, *, name: str, provider_id: str,
                           condition: pb.Condition) -> bool:
        status = pb.GpuStatus(conditions=[condition])
        created, _ = await self._bridge.aio_as_trio(self.client.register_gpu)(
            name=name, provider_id=provider_id, status=status)
        return bool(created)

    async def get_condition(self, *, name: str, type_: str) -> pb.Condition | None:
        try:
            gpu = await self._bridge.aio_as_trio(self.client.get)(name)
        except GRPCError as exc:
            if exc.status is Status.NOT_FOUND:
                return None
            raise
        return next((c for c in gpu.status.conditions if c.type == type_), None)

    async def update_condition(self, *, name: str, provider_id: str,
                               condition: pb.Condition) -> int:
        rv = await self._bridge.aio_as_trio(self.client.update_condition)(
            name=name, provider_id=provider_id, condition=condition)
        return int(rv)

    async def heartbeat(self, *, provider_id: str, gpu_names: Sequence[str]) -> None:
        """Raises :class:`HeartbeatRejected` when the server lacks some of ``gpu_names``."""
        acknowledged = await self._bridge.aio_as_trio(self.client.heartbeat)(
            provider_id=provider_id, gpu_names=list(gpu_names))
        if not acknowledged:
            raise HeartbeatRejected(
                f"the server does not hold every GPU of provider {provider_id!r}; re-register")

    def close(self) -> None:
        self.client.close()
