"""A simulated GPU provider: registers N GPUs, heartbeats, and can flap health on a schedule.

It is an ordinary provider: it talks to the server through the public API (any object with the
``ProviderApi`` methods — in the server, a loopback gRPC client), so ``--simulate`` exercises
exactly the path a real provider takes. Names are realistic, deterministic NVML-style UUIDs.
"""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Sequence
from typing import Protocol

import trio

from ...proto.device.v1alpha1 import gpu_pb2 as pb

log = logging.getLogger("deviceapi.sim")

PRODUCTS = ("NVIDIA H100 80GB HBM3", "NVIDIA H200 141GB HBM3e", "NVIDIA A100-SXM4-80GB")
CONDITION = "SimulatedReady"
#: Registrations in flight at once.
REGISTER_CONCURRENCY = 8


class ProviderApi(Protocol):
    async def wait_serving(self) -> None: ...
    async def register_gpu(self, *, name: str, provider_id: str,
                           condition: pb.Condition) -> bool: ...
    async def update_condition(self, *, name: str, provider_id: str,
                               condition: pb.Condition) -> int: ...
    async def heartbeat(self, *, provider_id: str, gpu_names: Sequence[str]) -> None: ...


def simulated_gpu_names(count: int, seed: int = 0) -> list[str]:
    """``count`` distinct GPU UUIDs, the same for the same seed."""
    rng = random.Random(seed)
    return [f"GPU-{uuid.UUID(int=rng.getrandbits(128), version=4)}" for _ in range(count)]


class SimulatedProvider:
    """Registers ``count`` GPUs, then heartbeats and (optionally) flaps one GPU at a time."""

    def __init__(self, api: ProviderApi, count: int, *, provider_id: str = "simulator",
                 heartbeat_interval: float = 10.0, flap_interval: float = 0.0,
                 seed: int = 0) -> None:
        self.api = api
        self.provider_id = provider_id
        self.names = simulated_gpu_names(count, seed)
        self.heartbeat_interval = heartbeat_interval
        self.flap_interval = flap_interval
        self._rng = random.Random(seed + 1)
        self.flaps = 0

    def _ready(self, name: str, healthy: bool) -> pb.Condition:
        product = PRODUCTS[hash(name) % len(PRODUCTS)]
        return pb.Condition(
            type=CONDITION,
            status="True" if healthy else "False",
            reason="Simulated" if healthy else "SimulatedFault",
            message=f"{product} (simulated)" if healthy else "simulated health flap",
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        await self.api.wait_serving()
        await self._register_all()
        await self.api.heartbeat(provider_id=self.provider_id, gpu_names=self.names)
        log.info("simulated GPUs registered", extra={"provider": self.provider_id,
                                                     "reason": f"{len(self.names)} GPUs"})
        task_status.started()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._heartbeats)
            if self.flap_interval > 0 and self.names:
                nursery.start_soon(self._flaps)

    async def _register_all(self) -> None:
        """Register every GPU with a few calls in flight (1024 one at a time took ~1.8 s)."""
        names = iter(self.names)

        async def worker() -> None:
            for name in names:  # the workers share one iterator: each name is taken once
                await self.api.register_gpu(name=name, provider_id=self.provider_id,
                                            condition=self._ready(name, True))

        async with trio.open_nursery() as nursery:
            for _ in range(REGISTER_CONCURRENCY):
                nursery.start_soon(worker)

    async def _heartbeats(self) -> None:
        while True:
            await trio.sleep(self.heartbeat_interval)
            await self.api.heartbeat(provider_id=self.provider_id, gpu_names=self.names)

    async def _flaps(self) -> None:
        while True:
            await trio.sleep(self.flap_interval)
            name = self._rng.choice(self.names)
            await self.api.update_condition(name=name, provider_id=self.provider_id,
                                            condition=self._ready(name, False))
            await trio.sleep(self.flap_interval / 2)
            await self.api.update_condition(name=name, provider_id=self.provider_id,
                                            condition=self._ready(name, True))
            self.flaps += 1
