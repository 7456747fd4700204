"""Builders and harnesses shared by the core unit tests (pure store, CacheOwner, hub, gate)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager

import trio
from google.protobuf.timestamp_pb2 import Timestamp

from deviceapi.actors import Mailbox
from deviceapi.actors._actor import FaultHook
from deviceapi.actors._store import (
    Command,
    Event,
    Limits,
    RegisterGpu,
    Result,
    State,
    UpdateCondition,
    apply,
)
from deviceapi.actors.cache_owner import CacheOwner, CacheStore, Write
from deviceapi.actors.watcher import WatchHub
from deviceapi.proto.device.v1alpha1.gpu_pb2 import Condition, Gpu, GpuSpec, GpuStatus, ObjectMeta

READY = "Ready"
HEARTBEAT_TIMEOUT_REASON = "ProviderHeartbeatTimeout"


def ts(seconds: int) -> Timestamp:
    return Timestamp(seconds=seconds)


def cond(type_: str, status: str = "True", reason: str = "", message: str = "",
         ltt: int | None = None) -> Condition:
    condition = Condition(type=type_, status=status, reason=reason, message=message)
    if ltt is not None:
        condition.last_transition_time.CopyFrom(ts(ltt))
    return condition


def status(*conditions: Condition, action: str = "") -> GpuStatus:
    return GpuStatus(conditions=list(conditions), recommended_action=action)


def gpu(name: str, *conditions: Condition, uuid: str = "", namespace: str = "",
        rv: int = 0, meta_rv: str = "", action: str = "") -> Gpu:
    return Gpu(
        metadata=ObjectMeta(name=name, namespace=namespace, resource_version=meta_rv),
        spec=GpuSpec(uuid=uuid),
        status=status(*conditions, action=action),
        resource_version=rv,
    )


def conditions_of(g: Gpu) -> list[tuple[str, str, str, str]]:
    return [(c.type, c.status, c.reason, c.message) for c in g.status.conditions]


def ready_of(g: Gpu) -> Condition | None:
    return next((c for c in g.status.conditions if c.type == READY), None)


def fingerprint(state: State) -> tuple[object, ...]:
    """Everything observable in a state, by value (detects any in-place mutation)."""
    return (
        state.rv,
        tuple(sorted((n, g.SerializeToString(deterministic=True)) for n, g in state.gpus.items())),
        tuple(sorted(state.owners.items())),
        tuple(sorted(
            (n, c.SerializeToString(deterministic=True) if c is not None else None)
            for n, c in state.masked.items()
        )),
        tuple(sorted((n, i.uid, i.generation, i.created.SerializeToString())
                     for n, i in state.info.items())),
    )


class Applier:
    """Drive ``apply`` by hand with an advancing fake clock (seconds 1000, 1001, ...)."""

    def __init__(self, limits: Limits | None = None, state: State | None = None) -> None:
        self.limits = limits or Limits()
        self.state = state or State()
        self.clock = 1000
        self.events: list[Event] = []

    def now(self) -> Timestamp:
        return ts(self.clock)

    def __call__(self, command: Command) -> tuple[Result, list[Event]]:
        self.clock += 1
        self.state, result, events = apply(self.state, command, self.limits, self.now())
        self.events.extend(events)
        return result, events

    def register(self, name: str, *conditions: Condition, provider: str = "") -> Result:
        return self(RegisterGpu(name, GpuSpec(), status(*conditions), provider))[0]

    def condition(self, name: str, condition: Condition, provider: str = "") -> Result:
        return self(UpdateCondition(name, condition, provider))[0]


def make_store(limits: Limits | None = None, *, history: int = 1024, queue: int = 64,
               clock: Callable[[], Timestamp] | None = None) -> CacheStore:
    counter = iter(range(10_000, 10**9))

    def fake_clock() -> Timestamp:
        return ts(next(counter))

    return CacheStore(limits or Limits(), history, Mailbox[Write](queue),
                      clock=clock or fake_clock)


def make_hub(store: CacheStore, *, max_watchers: int = 64, queue_size: int = 256,
             rate: float = 1000.0, burst: int = 1000) -> WatchHub:
    """A hub wired to ``store`` the way Core.build does it (must run inside trio)."""
    hub = WatchHub(read_state=lambda: store.state, events_after=store.events_after,
                   max_watchers=max_watchers, queue_size=queue_size, subscribe_rate=rate,
                   subscribe_burst=burst)
    store.add_listener(hub)
    return hub


@asynccontextmanager
async def running_owner(store: CacheStore, faults: FaultHook | None = None
                        ) -> AsyncIterator[CacheOwner]:
    """One CacheOwner incarnation over ``store``, cancelled when the block ends."""
    async with trio.open_nursery() as nursery:
        owner = CacheOwner(store, faults=faults)
        await nursery.start(owner.run)
        yield owner
        nursery.cancel_scope.cancel()


def rvs(events: Iterable[Event]) -> list[int]:
    return [e.rv for e in events]
