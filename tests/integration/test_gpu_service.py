"""GpuService over a real Unix socket through our client: every RPC and every error code."""

from __future__ import annotations

import pytest
import trio
from _gpus import GPU_A, GPU_B, GPU_C, gpu
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from deviceapi.client import DeviceApiClient
from deviceapi.proto.device.v1alpha1 import gpu_pb2 as pb
from deviceapi.testing.runtime import (
    make_test_config,
    open_client,
    open_test_runtime,
    run_aio,
    run_client_scenario,
)


async def expect_status(status: Status, call: object) -> str:
    with pytest.raises(GRPCError) as info:
        await call  # type: ignore[misc]
    assert info.value.status == status, info.value.message
    message = info.value.message or ""
    assert "\n" not in message and "Traceback" not in message
    return message


async def test_create_get_list_update_delete(tmp_path: object) -> None:
    async def scenario(c: DeviceApiClient) -> None:
        created, is_new = await c.create(gpu(GPU_B, ("Ready", "True")))
        base = created.resource_version - 1  # this incarnation's start (SPEC §2)
        assert is_new and base > 0
        assert created.metadata.resource_version == str(base + 1)
        assert created.status.conditions[0].HasField("last_transition_time")

        again, is_new = await c.create(gpu(GPU_B, ("Ready", "False")))
        assert not is_new and again == created  # idempotent: the existing object, unchanged

        await c.create(gpu(GPU_A))
        listing = await c.list()
        assert [g.metadata.name for g in listing.items] == [GPU_A, GPU_B]  # stable order
        assert listing.metadata.resource_version == str(base + 2)

        fetched = await c.get(GPU_B)
        assert fetched == created

        replaced = gpu(GPU_B, ("Ready", "False"))
        replaced.resource_version = base + 1
        updated = await c.update(replaced)
        assert updated.resource_version == base + 3
        assert [(x.type, x.status) for x in updated.status.conditions] == [("Ready", "False")]

        status = pb.GpuStatus(conditions=[pb.Condition(type="Ready", status="True")],
                              recommended_action="none")
        after = await c.update_status(GPU_B, status, resource_version=base + 3)
        assert after.resource_version == base + 4 and after.spec.uuid == GPU_B
        assert after.status.recommended_action == "none"

        await c.delete(GPU_B)
        await expect_status(Status.NOT_FOUND, c.get(GPU_B))
        listing = await c.list()
        assert [g.metadata.name for g in listing.items] == [GPU_A]
        assert listing.metadata.resource_version == str(base + 5)  # delete bumps it too

    await run_client_scenario(make_test_config(tmp_path, min_gpus=0), scenario)


async def test_error_codes(tmp_path: object) -> None:
    async def scenario(c: DeviceApiClient) -> None:
        created, _ = await c.create(gpu(GPU_A, ("Ready", "True")))
        # conflict → ABORTED
        stale = gpu(GPU_A)
        stale.resource_version = 99
        await expect_status(Status.ABORTED, c.update(stale))
        await expect_status(Status.ABORTED, c.update_status(GPU_A, pb.GpuStatus(), 42))
        # non-numeric string version → INVALID_ARGUMENT
        bad = gpu(GPU_A)
        bad.metadata.resource_version = "abc"
        await expect_status(Status.INVALID_ARGUMENT, c.update(bad))
        # missing objects → NOT_FOUND
        await expect_status(Status.NOT_FOUND, c.get(GPU_C))
        await expect_status(Status.NOT_FOUND, c.update(gpu(GPU_C)))
        await expect_status(Status.NOT_FOUND, c.update_status(GPU_C, pb.GpuStatus()))
        await expect_status(Status.NOT_FOUND, c.delete(GPU_C))
        # empty name / missing gpu / missing status / condition without type
        await expect_status(Status.INVALID_ARGUMENT, c.get(""))
        await expect_status(Status.INVALID_ARGUMENT, c.create(pb.Gpu()))
        await expect_status(Status.INVALID_ARGUMENT,
                            c.gpus.CreateGpu(pb.CreateGpuRequest()))
        await expect_status(Status.INVALID_ARGUMENT,
                            c.gpus.UpdateGpuStatus(pb.UpdateGpuStatusRequest(name=GPU_A)))
        await expect_status(Status.INVALID_ARGUMENT, c.create(gpu(GPU_B, ("", "True"))))
        await expect_status(Status.INVALID_ARGUMENT, c.create(gpu(GPU_B, ("Ready", "Yes"))))
        await expect_status(Status.INVALID_ARGUMENT, c.create(gpu("/etc/passwd")))
        # nothing was stored by any rejected call
        listing = await c.list()
        assert [g.metadata.name for g in listing.items] == [GPU_A]
        assert listing.metadata.resource_version == str(created.resource_version)

    await run_client_scenario(make_test_config(tmp_path), scenario)


async def test_reads_wait_for_queued_writes_only(tmp_path: object) -> None:
    """A Get issued while an UpdateGpuStatus is queued returns the updated state; a Get never
    waits for a write that was queued after it."""
    async with open_test_runtime(make_test_config(tmp_path)) as rt:
        store = rt.core.store
        await store.write(__import__("deviceapi.actors._store", fromlist=["x"]).CreateGpu(
            gpu(GPU_A, ("Ready", "True"))))
        async with open_client(rt) as client:
            # Hold the CacheOwner: fill its turn with a write we control by pausing it.
            from deviceapi.actors._store import UpdateGpuStatus

            status = pb.GpuStatus(conditions=[pb.Condition(type="Ready", status="False")])
            results: list[pb.Gpu] = []
            async with trio.open_nursery() as nursery:
                # queue the write and the read back to back, in this order, without yielding
                write_done = trio.Event()

                async def do_write() -> None:
                    await store.write(UpdateGpuStatus(GPU_A, status))
                    write_done.set()

                nursery.start_soon(do_write)
                await trio.testing.wait_all_tasks_blocked()
                results.append(await run_aio(client.get, GPU_A))
            assert write_done.is_set()
            assert results[0].status.conditions[0].status == "False"
