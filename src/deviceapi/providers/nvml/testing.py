"""An in-memory :class:`~._api.ProviderApi` that records every call, for tests and demos.

It models just enough of the server: GPUs by name with a list of conditions, RegisterGpu that
is idempotent (``created=False`` for an existing name, state untouched), UpdateGpuCondition that
upserts by type and keeps the others, one resource-version counter, and heartbeats. Tests wait on
it with :meth:`RecordingProviderApi.wait_until` (a condition, never a sleep).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Literal

import trio

from deviceapi.proto.device.v1alpha1 import gpu_pb2

if TYPE_CHECKING:
    from .poller import NvmlPoller


@asynccontextmanager
async def open_running(poller: NvmlPoller) -> AsyncIterator[trio.Nursery]:
    """Start ``poller`` (entered once it has registered its GPUs); cancel it on exit."""
    async with trio.open_nursery() as nursery:
        await nursery.start(poller.run)
        yield nursery
        nursery.cancel_scope.cancel()


CallKind = Literal["wait_serving", "register_gpu", "get_condition", "update_condition",
                   "heartbeat"]


@dataclasses.dataclass(frozen=True, slots=True)
class RecordedCall:
    kind: CallKind
    name: str = ""
    provider_id: str = ""
    condition: gpu_pb2.Condition | None = None
    gpu_names: tuple[str, ...] = ()
    time: float = 0.0
    """Trio time of the call."""


class RecordingProviderApi:
    """Records calls and keeps per-GPU conditions; see the module docstring."""

    def __init__(self) -> None:
        self.calls: list[RecordedCall] = []
        self.gpus: dict[str, list[gpu_pb2.Condition]] = {}
        self.resource_version = 0
        self.serving = trio.Event()
        self.serving.set()
        self._changed = trio.Event()
        self._failures: dict[CallKind, list[BaseException]] = {}

    # ---- scripting ---------------------------------------------------------------------

    def fail_next(self, kind: CallKind, error: BaseException) -> None:
        """Make the next ``kind`` call raise ``error``."""
        self._failures.setdefault(kind, []).append(error)

    def seed(self, name: str, condition: gpu_pb2.Condition) -> None:
        """Put another provider's ``condition`` on GPU ``name`` (created if needed)."""
        self._upsert(name, condition)

    # ---- observation -------------------------------------------------------------------

    def condition(self, name: str, type_: str) -> gpu_pb2.Condition | None:
        for condition in self.gpus.get(name, []):
            if condition.type == type_:
                return condition
        return None

    def updates(self, name: str | None = None) -> list[RecordedCall]:
        return [
            c
            for c in self.calls
            if c.kind == "update_condition" and (name is None or c.name == name)
        ]

    def registrations(self) -> list[RecordedCall]:
        return [c for c in self.calls if c.kind == "register_gpu"]

    def heartbeats(self) -> list[RecordedCall]:
        return [c for c in self.calls if c.kind == "heartbeat"]

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds (checked after every call)."""
        while not predicate():
            await self._changed.wait()

    # ---- ProviderApi -------------------------------------------------------------------

    def _record(self, call: RecordedCall) -> None:
        failures = self._failures.get(call.kind)
        if failures:
            raise failures.pop(0)
        self.calls.append(call)
        self._changed.set()
        self._changed = trio.Event()

    def _upsert(self, name: str, condition: gpu_pb2.Condition) -> None:
        conditions = self.gpus.setdefault(name, [])
        copy = gpu_pb2.Condition()
        copy.CopyFrom(condition)
        for i, existing in enumerate(conditions):
            if existing.type == condition.type:
                conditions[i] = copy
                break
        else:
            conditions.append(copy)
        self.resource_version += 1

    async def wait_serving(self) -> None:
        await self.serving.wait()
        self._record(RecordedCall("wait_serving", time=trio.current_time()))

    async def register_gpu(
        self, *, name: str, provider_id: str, condition: gpu_pb2.Condition
    ) -> bool:
        await trio.lowlevel.checkpoint()
        self._record(
            RecordedCall("register_gpu", name, provider_id, condition, time=trio.current_time())
        )
        if name in self.gpus:
            return False
        self._upsert(name, condition)
        return True

    async def get_condition(self, *, name: str, type_: str) -> gpu_pb2.Condition | None:
        await trio.lowlevel.checkpoint()
        self._record(RecordedCall("get_condition", name, time=trio.current_time()))
        return self.condition(name, type_)

    async def update_condition(
        self, *, name: str, provider_id: str, condition: gpu_pb2.Condition
    ) -> int:
        await trio.lowlevel.checkpoint()
        self._record(
            RecordedCall("update_condition", name, provider_id, condition, time=trio.current_time())
        )
        if name not in self.gpus:
            raise KeyError(f"no GPU named {name!r}")
        self._upsert(name, condition)
        return self.resource_version

    async def heartbeat(self, *, provider_id: str, gpu_names: Sequence[str]) -> None:
        await trio.lowlevel.checkpoint()
        self._record(
            RecordedCall(
                "heartbeat",
                provider_id=provider_id,
                gpu_names=tuple(gpu_names),
                time=trio.current_time(),
            )
        )
