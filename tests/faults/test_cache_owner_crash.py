"""Kill the CacheOwner mid-load: no acknowledged write is lost, and open watch streams go on
without a gap (the restarted owner continues from the last committed version)."""

from __future__ import annotations

from pathlib import Path

import trio
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from deviceapi.actors import _store as ops
from deviceapi.client import DeviceApiClient
from deviceapi.proto.device.v1alpha1 import gpu_pb2 as pb
from deviceapi.testing import FaultInjector
from deviceapi.testing.objects import gpu_name
from deviceapi.testing.runtime import (
    make_test_config,
    open_client,
    open_test_runtime,
    run_aio,
    wait_until,
)

GPUS = 4
WRITES_PER_GPU = 60
CRASHES = 5


async def test_cache_owner_crashes_lose_no_acknowledged_write_and_open_no_gap(
    tmp_path: Path,
) -> None:
    faults = FaultInjector()
    config = make_test_config(tmp_path, min_gpus=GPUS)
    async with open_test_runtime(config, faults=faults) as rt, \
            open_client(rt, provider_id="load") as client:
        names = [gpu_name(i) for i in range(GPUS)]
        for name in names:
            await rt.core.store.write(ops.RegisterGpu(name, pb.GpuSpec(uuid=name),
                                                      pb.GpuStatus(), "load"))
        acked: dict[str, str] = {}
        retries = 0
        streams: list[list[tuple[str, int]]] = [[] for _ in range(3)]
        total_events = GPUS + GPUS * WRITES_PER_GPU

        async def watch(into: list[tuple[str, int]]) -> None:
            async with DeviceApiClient(unix_socket=rt.listeners.unix_socket) as c:
                async for event in c.watch():
                    into.append((event.type, event.object.resource_version))
                    if len(into) == total_events:
                        return

        async def writer(name: str) -> None:
            nonlocal retries
            for i in range(WRITES_PER_GPU):
                value = f"write {i}"
                while True:
                    try:
                        await client.update_condition(
                            name=name, condition=pb.Condition(type="Load", status="True",
                                                              message=value))
                    except GRPCError as exc:
                        assert exc.status == Status.UNAVAILABLE, exc.message
                        retries += 1
                        continue
                    acked[name] = value
                    break

        async def inject() -> None:
            for _ in range(CRASHES):
                faults.crash("cache_owner", after=7)
                await wait_until(lambda: not faults.pending("cache_owner"), poll=0.001)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for into in streams:
                    nursery.start_soon(run_aio, watch, into)
                await wait_until(lambda: rt.core.hub.statistics().active == len(streams))
                nursery.start_soon(inject)
                async with trio.open_nursery() as writers:
                    for name in names:
                        writers.start_soon(run_aio, writer, name)

        assert [i.fault for i in faults.history()] == ["crash"] * CRASHES
        assert all(i.fired_at is not None for i in faults.history())
        assert retries == CRASHES  # each crash failed exactly the one write in hand
        state = rt.core.store.state
        base = rt.core.store.version_base
        assert state.rv == base + total_events
        for name in names:
            (condition,) = state.gpus[name].status.conditions
            assert condition.message == acked[name] == f"write {WRITES_PER_GPU - 1}"
        for events in streams:
            live = [rv for kind, rv in events[GPUS:]]
            assert [kind for kind, _ in events[:GPUS]] == ["ADDED"] * GPUS
            assert live == list(range(base + GPUS + 1, base + total_events + 1))  # no gap
        scraped = rt.metrics.registry.get_sample_value(
            "device_api_server_actor_restarts_total", {"actor": "cache_owner"})
        assert scraped == CRASHES
