"""How the NVML poller talks to the server: the public provider API, nothing else.

The server side implements :class:`ProviderApi` with the real gRPC client (ProviderService over
the loopback or the sidecar's connection), so the embedded poller and the sidecar share one code
path. Tests use :class:`deviceapi.providers.nvml.testing.RecordingProviderApi`.

Any exception a method raises propagates out of the poller's ``run`` (a crash): its supervisor
restarts it, and the restarted poller re-registers idempotently and re-asserts the conditions it
last wrote (see ``HealthLedger`` in ``ledger.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from deviceapi.proto.device.v1alpha1 import gpu_pb2


class ProviderApi(Protocol):
    """The provider calls the poller makes."""

    async def wait_serving(self) -> None:
        """Return once the server accepts provider writes (gRPC health SERVING).

        Called once per start, before registering. Note for implementers: the readiness gate
        may wait for this provider's GPUs (``--min-gpus``), so this must not wait for READY.
        """

    async def register_gpu(
        self, *, name: str, provider_id: str, condition: gpu_pb2.Condition
    ) -> bool:
        """ProviderService.RegisterGpu with ``spec.uuid = name`` and ``condition`` as the
        initial status; True if created, False if it already existed (idempotent)."""

    async def get_condition(self, *, name: str, type_: str) -> gpu_pb2.Condition | None:
        """GpuService.GetGpu: GPU ``name``'s condition of type ``type_`` (None when the GPU or
        the condition is absent). A fresh poller reads what an earlier one left behind."""

    async def update_condition(
        self, *, name: str, provider_id: str, condition: gpu_pb2.Condition
    ) -> int:
        """ProviderService.UpdateGpuCondition: upsert ``condition`` by its type, keep every
        other condition; return the new resource version."""

    async def heartbeat(self, *, provider_id: str, gpu_names: Sequence[str]) -> None:
        """ProviderService.Heartbeat for the GPUs this provider owns."""
