"""SPEC §7.1: the merged upstream API (``nvidia.nvsentinel.v1alpha1.GpuService``) on its own socket.

A real server (the in-process test runtime) and real grpcio clients with stubs generated at test
time from our .proto files: one on the ``--nvsentinel-api-socket`` speaking the upstream API, one
on the main socket speaking SPEC §1, so every test can check that both see one store (same
objects, same versions).
"""

from __future__ import annotations

import json
import os
import stat
import types
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio
from _sockets import open_sockets, wait_sockets_closed
from grpclib.health.v1 import health_pb2
from test_grpcio_client import Grpcio, generate_grpcio_stubs, health_stub
from test_grpcurl import find_grpcurl

from deviceapi._app import Runtime
from deviceapi.testing.runtime import make_test_config, open_test_runtime, wait_until

Code = grpc.StatusCode

SERVICE = "nvidia.nvsentinel.v1alpha1.GpuService"
GPU_A = "GPU-0a000000-0000-4000-8000-000000000001"
GPU_B = "GPU-0b000000-0000-4000-8000-000000000002"
GPU_C = "GPU-0c000000-0000-4000-8000-000000000003"
DEADLINE = 10.0
WAITING = "server initializing, waiting for GPU providers"


@pytest.fixture(scope="module")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> types.SimpleNamespace:
    upstream = generate_grpcio_stubs(tmp_path_factory.mktemp("nvsentinel-stubs"),
                                     ("nvsentinel/v1alpha1/gpu.proto",), "nvsentinel")
    v1 = generate_grpcio_stubs(tmp_path_factory.mktemp("v1-stubs"),
                               ("device/v1alpha1/gpu.proto",), "device")
    return types.SimpleNamespace(pb=upstream.gpu_pb2, grpc=upstream.gpu_pb2_grpc,
                                 v1=v1.gpu_pb2, v1_grpc=v1.gpu_pb2_grpc)


class Clients(Grpcio):
    """A grpcio client on each socket; calls run in worker threads with a deadline (``call``,
    ``fails`` and ``health`` are §1's test client's, here on the upstream socket)."""

    def __init__(self, stubs: types.SimpleNamespace, upstream: grpc.Channel,
                 v1: grpc.Channel, runtime: Runtime) -> None:
        self.pb = stubs.pb
        self.v1pb = stubs.v1
        self.rt = runtime
        self.gpus = stubs.grpc.GpuServiceStub(upstream)
        self.v1 = stubs.v1_grpc.GpuServiceStub(v1)
        self._health = health_stub(upstream)

    def gpu(self, name: str, *conditions: tuple[str, str],  # type: ignore[override]
            uuid: str | None = None, namespace: str = "", version: str = "") -> Any:
        pb = self.pb
        return pb.Gpu(
            metadata=pb.ObjectMeta(name=name, namespace=namespace, resource_version=version),
            spec=pb.GpuSpec(uuid=name if uuid is None else uuid),
            status=pb.GpuStatus(conditions=[pb.Condition(type=t, status=s)
                                            for t, s in conditions]))

    async def create(self, gpu: Any) -> Any:
        return await self.call(self.gpus.CreateGpu, self.pb.CreateGpuRequest(gpu=gpu))

    async def get(self, name: str, namespace: str = "") -> Any:
        return (await self.call(self.gpus.GetGpu,
                                self.pb.GetGpuRequest(name=name, namespace=namespace))).gpu

    async def list(self, namespace: str = "") -> Any:
        return (await self.call(self.gpus.ListGpus,
                                self.pb.ListGpusRequest(namespace=namespace))).gpu_list

    async def v1_get(self, name: str) -> Any:
        return (await self.call(self.v1.GetGpu, self.v1pb.GetGpuRequest(name=name))).gpu

    def watch(self, version: str = "", namespace: str = "") -> Watch:
        request = self.pb.WatchGpusRequest(
            namespace=namespace, opts=self.pb.ListOptions(resource_version=version))
        return Watch(self.gpus.WatchGpus(request, timeout=DEADLINE))


class Watch:
    """A WatchGpus stream read from a worker thread, one event at a time."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self._events: Iterator[Any] = iter(call)

    async def event(self) -> Any:
        return await trio.to_thread.run_sync(next, self._events, None)

    async def next(self) -> tuple[str, str, str]:
        event = await self.event()
        assert event is not None, "the stream ended with OK"
        return event.type, event.object.metadata.name, event.object.metadata.resource_version

    async def fails(self, code: grpc.StatusCode) -> str:
        with pytest.raises(grpc.RpcError) as info:
            await self.next()
        error: Any = info.value
        assert error.code() == code, f"{error.code()}: {error.details()}"
        return error.details() or ""


@asynccontextmanager
async def serve(stubs: types.SimpleNamespace, tmp_path: Path, **overrides: Any
                ) -> AsyncIterator[Clients]:
    """A server with both sockets (READY at once unless ``min_gpus`` says otherwise) and a
    client on each; on exit, every client connection is closed at both ends."""
    overrides.setdefault("min_gpus", 0)
    upstream_socket = str(tmp_path / "nvidia-device-api" / "device-api.sock")
    config = make_test_config(tmp_path, nvsentinel_api_socket=upstream_socket, **overrides)
    async with open_test_runtime(config) as rt:
        assert rt.listeners.nvsentinel_socket == upstream_socket
        assert rt.listeners.unix_socket is not None
        before = open_sockets()
        upstream = grpc.insecure_channel("unix://" + upstream_socket)
        v1 = grpc.insecure_channel("unix://" + rt.listeners.unix_socket)
        try:
            yield Clients(stubs, upstream, v1, rt)
        finally:
            upstream.close()
            v1.close()
            await wait_sockets_closed(before)


def conditions(gpu: Any) -> list[tuple[str, str]]:
    return [(c.type, c.status) for c in gpu.status.conditions]


# ---- objects: create, read, one store ------------------------------------------------------------


async def test_create_sets_server_metadata_and_both_apis_see_one_object(
        stubs: types.SimpleNamespace, tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with serve(stubs, tmp_path) as c:
            created = await c.create(c.gpu(GPU_B, ("Ready", "True")))
            meta = created.metadata
            assert meta.name == GPU_B and meta.namespace == "default"
            assert str(uuid.UUID(meta.uid)) == meta.uid  # random, server-set
            assert meta.generation == 1
            assert meta.creation_timestamp.seconds > 0
            assert conditions(created) == [("Ready", "True")]
            assert created.status.conditions[0].HasField("last_transition_time")

            # §1 sees the same object at the same version (and the namespace written)
            v1 = await c.v1_get(GPU_B)
            assert v1.metadata.resource_version == meta.resource_version
            assert v1.resource_version == int(meta.resource_version)
            assert v1.metadata.namespace == "default" and conditions(v1) == conditions(created)

            # an existing name is ALREADY_EXISTS here (§1's CreateGpu stays idempotent)
            await c.fails(Code.ALREADY_EXISTS, c.gpus.CreateGpu,
                          c.pb.CreateGpuRequest(gpu=c.gpu(GPU_B)))
            again = await c.call(c.v1.CreateGpu, c.v1pb.CreateGpuRequest(
                gpu=c.v1pb.Gpu(metadata=c.v1pb.ObjectMeta(name=GPU_B))))
            assert not again.created

            # a client-supplied uid or generation is not taken; spec.uuid need not be the name
            other = c.gpu(GPU_A, uuid=GPU_C)
            other.metadata.uid = "mine"
            other.metadata.generation = 7
            made = await c.create(other)
            assert made.metadata.uid not in ("mine", meta.uid) and made.metadata.generation == 1
            assert made.spec.uuid == GPU_C

            # a GPU a §1 provider made shows the server metadata too, in "default"
            await c.call(c.v1.CreateGpu, c.v1pb.CreateGpuRequest(
                gpu=c.v1pb.Gpu(metadata=c.v1pb.ObjectMeta(name=GPU_C))))
            listing = await c.list()
            assert [g.metadata.name for g in listing.items] == [GPU_A, GPU_B, GPU_C]
            assert listing.metadata.resource_version == str(c.rt.core.store.state.rv)
            third = listing.items[2]
            assert third.metadata.namespace == "default" and third.metadata.generation == 1
            assert uuid.UUID(third.metadata.uid) and third.spec.uuid == GPU_C
            assert await c.get(GPU_B) == created

            # bad input: nothing stored, the right code, one line
            for bad in (c.gpu("gpu-lowercase"), c.gpu(GPU_C + "x", uuid="not-a-uuid"),
                        c.gpu("GPU-0d", ("", "True")), c.gpu("GPU-0d", ("Ready", "Maybe"))):
                await c.fails(Code.INVALID_ARGUMENT, c.gpus.CreateGpu,
                              c.pb.CreateGpuRequest(gpu=bad))
            await c.fails(Code.INVALID_ARGUMENT, c.gpus.CreateGpu, c.pb.CreateGpuRequest())
            await c.fails(Code.INVALID_ARGUMENT, c.gpus.GetGpu, c.pb.GetGpuRequest())
            await c.fails(Code.NOT_FOUND, c.gpus.GetGpu, c.pb.GetGpuRequest(name="GPU-0d"))
            assert len((await c.list()).items) == 3


async def test_limits_are_the_stores(stubs: types.SimpleNamespace, tmp_path: Path) -> None:
    """One store, one set of bounds: GPUs made through either API count against --max-gpus."""
    with trio.fail_after(20):
        async with serve(stubs, tmp_path, max_gpus=2) as c:
            await c.create(c.gpu(GPU_A))
            await c.call(c.v1.CreateGpu, c.v1pb.CreateGpuRequest(
                gpu=c.v1pb.Gpu(metadata=c.v1pb.ObjectMeta(name=GPU_B))))
            message = await c.fails(Code.RESOURCE_EXHAUSTED, c.gpus.CreateGpu,
                                    c.pb.CreateGpuRequest(gpu=c.gpu(GPU_C)))
            assert "maximum of 2" in message


# ---- writes: spec-only update, status update, versions -----------------------------------------


async def test_update_changes_spec_only_and_counts_generations(
        stubs: types.SimpleNamespace, tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with serve(stubs, tmp_path) as c:
            created = await c.create(c.gpu(GPU_A, ("Ready", "True")))
            uid = created.metadata.uid

            # the status in an UpdateGpu is ignored; a new spec bumps the generation
            change = c.gpu(GPU_A, ("Ready", "False"), uuid=GPU_B,
                           version=created.metadata.resource_version)
            updated = await c.call(c.gpus.UpdateGpu, c.pb.UpdateGpuRequest(gpu=change))
            assert updated.spec.uuid == GPU_B and conditions(updated) == [("Ready", "True")]
            assert updated.metadata.generation == 2 and updated.metadata.uid == uid
            assert updated.metadata.creation_timestamp == created.metadata.creation_timestamp
            assert int(updated.metadata.resource_version) > int(created.metadata.resource_version)

            # the same spec again: a write (new version), not a new generation
            same = await c.call(c.gpus.UpdateGpu, c.pb.UpdateGpuRequest(
                gpu=c.gpu(GPU_A, uuid=GPU_B)))
            assert same.metadata.generation == 2
            assert int(same.metadata.resource_version) > int(updated.metadata.resource_version)

            # uid and namespace are immutable; the uid may be echoed back
            echo = c.gpu(GPU_A, uuid=GPU_A)
            echo.metadata.uid = uid
            echo.metadata.namespace = "default"
            assert (await c.call(c.gpus.UpdateGpu, c.pb.UpdateGpuRequest(gpu=echo))
                    ).metadata.generation == 3
            moved = c.gpu(GPU_A, namespace="team-a")
            assert "immutable" in await c.fails(Code.INVALID_ARGUMENT, c.gpus.UpdateGpu,
                                                c.pb.UpdateGpuRequest(gpu=moved))
            renamed = c.gpu(GPU_A)
            renamed.metadata.uid = str(uuid.uuid4())
            assert "immutable" in await c.fails(Code.INVALID_ARGUMENT, c.gpus.UpdateGpu,
                                                c.pb.UpdateGpuRequest(gpu=renamed))
            await c.fails(Code.INVALID_ARGUMENT, c.gpus.UpdateGpu,
                          c.pb.UpdateGpuRequest(gpu=c.gpu(GPU_A, uuid="GPU-zz")))
            await c.fails(Code.NOT_FOUND, c.gpus.UpdateGpu,
                          c.pb.UpdateGpuRequest(gpu=c.gpu(GPU_C)))
            await c.fails(Code.INVALID_ARGUMENT, c.gpus.UpdateGpu, c.pb.UpdateGpuRequest())

            # a §1 UpdateGpu that changes the spec moves the generation seen here too
            v1 = await c.v1_get(GPU_A)
            v1.spec.uuid = GPU_C
            await c.call(c.v1.UpdateGpu, c.v1pb.UpdateGpuRequest(gpu=v1))
            assert (await c.get(GPU_A)).metadata.generation == 4


async def test_update_status_replaces_status_with_the_expected_version(
        stubs: types.SimpleNamespace, tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with serve(stubs, tmp_path) as c:
            created = await c.create(c.gpu(GPU_A, ("Ready", "True"), uuid=GPU_B))
            version = created.metadata.resource_version
            request = c.gpu(GPU_A, ("Ready", "False"), ("Xid", "True"), uuid="ignored",
                            version=version)
            request.status.recommended_action = "drain"
            after = await c.call(c.gpus.UpdateGpuStatus,
                                 c.pb.UpdateGpuStatusRequest(gpu=request))
            assert conditions(after) == [("Ready", "False"), ("Xid", "True")]
            assert after.status.recommended_action == "drain"
            assert after.spec.uuid == GPU_B and after.metadata.generation == 1  # spec untouched
            assert (await c.v1_get(GPU_A)).resource_version == int(after.metadata.resource_version)

            # a stale version is ABORTED; "" is unconditional; a non-number is INVALID_ARGUMENT
            stale = c.gpu(GPU_A, ("Ready", "True"), version=version)
            assert version in await c.fails(Code.ABORTED, c.gpus.UpdateGpuStatus,
                                            c.pb.UpdateGpuStatusRequest(gpu=stale))
            await c.fails(Code.ABORTED, c.gpus.UpdateGpu, c.pb.UpdateGpuRequest(
                gpu=c.gpu(GPU_A, version=version)))
            for text in ("abc", "-1", "1.5"):
                await c.fails(Code.INVALID_ARGUMENT, c.gpus.UpdateGpuStatus,
                              c.pb.UpdateGpuStatusRequest(gpu=c.gpu(GPU_A, version=text)))
            free = await c.call(c.gpus.UpdateGpuStatus, c.pb.UpdateGpuStatusRequest(
                gpu=c.gpu(GPU_A, ("Ready", "True"))))
            assert conditions(free) == [("Ready", "True")]
            assert not free.status.recommended_action

            await c.fails(Code.NOT_FOUND, c.gpus.UpdateGpuStatus,
                          c.pb.UpdateGpuStatusRequest(gpu=c.gpu(GPU_C)))
            await c.fails(Code.INVALID_ARGUMENT, c.gpus.UpdateGpuStatus,
                          c.pb.UpdateGpuStatusRequest(gpu=c.gpu(GPU_A, ("Ready", "Maybe"))))
            await c.fails(Code.INVALID_ARGUMENT, c.gpus.UpdateGpuStatus,
                          c.pb.UpdateGpuStatusRequest(gpu=c.gpu(GPU_A, namespace="team-a")))

            # delete: Empty, then NOT_FOUND everywhere
            await c.call(c.gpus.DeleteGpu, c.pb.DeleteGpuRequest(name=GPU_A))
            await c.fails(Code.NOT_FOUND, c.gpus.GetGpu, c.pb.GetGpuRequest(name=GPU_A))
            await c.fails(Code.NOT_FOUND, c.v1.GetGpu, c.v1pb.GetGpuRequest(name=GPU_A))
            await c.fails(Code.NOT_FOUND, c.gpus.DeleteGpu, c.pb.DeleteGpuRequest(name=GPU_A))


async def test_every_list_shows_each_gpu_as_get_does_after_every_kind_of_write(
        stubs: types.SimpleNamespace, tmp_path: Path) -> None:
    """Lists are built from each GPU's upstream form kept per GPU version: after a status
    write, a spec write (new generation), a §1 write, a delete and a re-create under the same
    name (new uid), each listing, all namespaces or one, equals GetGpu of every GPU, so no
    GPU's stale form is ever served."""

    async def check(namespace: str = "") -> list[str]:
        listing = await c.list(namespace)
        assert listing.metadata.resource_version == str(c.rt.core.store.state.rv)
        assert list(listing.items) == [await c.get(g.metadata.name, g.metadata.namespace)
                                       for g in listing.items]
        return [g.metadata.name for g in listing.items]

    with trio.fail_after(20):
        async with serve(stubs, tmp_path) as c:
            assert await check() == []
            a = await c.create(c.gpu(GPU_A, ("Ready", "True")))
            await c.create(c.gpu(GPU_B, namespace="team-a"))
            assert await check() == [GPU_A, GPU_B]
            assert await check("team-a") == [GPU_B]
            await c.call(c.gpus.UpdateGpuStatus, c.pb.UpdateGpuStatusRequest(
                gpu=c.gpu(GPU_A, ("Ready", "False"), version=a.metadata.resource_version)))
            assert await check() == [GPU_A, GPU_B]
            await c.call(c.gpus.UpdateGpu, c.pb.UpdateGpuRequest(gpu=c.gpu(GPU_A, uuid=GPU_C)))
            assert await check() == [GPU_A, GPU_B]
            assert (await c.list()).items[0].metadata.generation == 2
            await c.call(c.v1.UpdateGpuStatus, c.v1pb.UpdateGpuStatusRequest(
                name=GPU_B, status=c.v1pb.GpuStatus(conditions=[
                    c.v1pb.Condition(type="Ready", status="Unknown")])))
            assert await check("team-a") == [GPU_B]
            assert conditions((await c.list()).items[1]) == [("Ready", "Unknown")]
            await c.call(c.gpus.DeleteGpu, c.pb.DeleteGpuRequest(name=GPU_A))
            assert await check() == [GPU_B]
            again = await c.create(c.gpu(GPU_A))
            assert again.metadata.uid != a.metadata.uid
            assert await check() == [GPU_A, GPU_B]
            assert (await c.list()).items[0].metadata.uid == again.metadata.uid


async def test_namespaces_default_on_writes_and_all_on_reads(
        stubs: types.SimpleNamespace, tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with serve(stubs, tmp_path) as c:
            await c.create(c.gpu(GPU_A))
            await c.create(c.gpu(GPU_B, namespace="team-a"))
            assert [g.metadata.namespace for g in (await c.list()).items] == ["default", "team-a"]
            assert [g.metadata.name for g in (await c.list("team-a")).items] == [GPU_B]
            assert [g.metadata.name for g in (await c.list("default")).items] == [GPU_A]
            assert (await c.list("nobody")).items == []
            assert (await c.get(GPU_B, "team-a")).metadata.name == GPU_B
            assert (await c.get(GPU_B)).metadata.namespace == "team-a"
            await c.fails(Code.NOT_FOUND, c.gpus.GetGpu,
                          c.pb.GetGpuRequest(name=GPU_B, namespace="default"))
            await c.fails(Code.NOT_FOUND, c.gpus.DeleteGpu,
                          c.pb.DeleteGpuRequest(name=GPU_B, namespace="default"))
            await c.call(c.gpus.DeleteGpu, c.pb.DeleteGpuRequest(name=GPU_B, namespace="team-a"))
            assert [g.metadata.name for g in (await c.list()).items] == [GPU_A]


# ---- watch -------------------------------------------------------------------------------------


async def test_watch_starts_now_and_resumes_from_a_version(
        stubs: types.SimpleNamespace, tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with serve(stubs, tmp_path, watch_history=4) as c:
            hub = c.rt.core.hub
            first = await c.create(c.gpu(GPU_A))

            # no version: no snapshot, only what happens after the call
            now = c.watch()
            await wait_until(lambda: hub.statistics().active == 1)
            second = await c.create(c.gpu(GPU_B, namespace="team-a"))
            assert await now.next() == ("ADDED", GPU_B, second.metadata.resource_version)

            # a version: every event after it, then live (List-then-Watch misses nothing)
            resumed = c.watch(first.metadata.resource_version)
            assert await resumed.next() == ("ADDED", GPU_B, second.metadata.resource_version)
            # a namespace filter on a watch
            scoped = c.watch(first.metadata.resource_version, namespace="default")
            await wait_until(lambda: hub.statistics().active == 3)
            status = await c.call(c.gpus.UpdateGpuStatus, c.pb.UpdateGpuStatusRequest(
                gpu=c.gpu(GPU_A, ("Ready", "True"))))
            event = ("MODIFIED", GPU_A, status.metadata.resource_version)
            assert await now.next() == event
            assert await resumed.next() == event
            assert await scoped.next() == event  # GPU_B (team-a) was left out

            # eviction names the last delivered version; resuming from it misses nothing
            ids = hub.subscription_ids()
            assert hub.end(ids[0], "evicted", "queue_full")
            message = await now.fails(Code.RESOURCE_EXHAUSTED)
            assert f"resource version {status.metadata.resource_version}" in message
            deleted = c.rt.core.store.state.rv + 1
            await c.call(c.v1.DeleteGpu, c.v1pb.DeleteGpuRequest(name=GPU_B))
            again = c.watch(status.metadata.resource_version)
            assert await again.next() == ("DELETED", GPU_B, str(deleted))

            # too old for the history (4 events) → OUT_OF_RANGE; not a number → INVALID_ARGUMENT
            for name in ("GPU-01", "GPU-02", "GPU-03", "GPU-04"):
                await c.create(c.gpu(name))
            old = c.watch(first.metadata.resource_version)
            assert "too old" in await old.fails(Code.OUT_OF_RANGE)
            assert "opts.resource_version" in await c.watch("x").fails(Code.INVALID_ARGUMENT)
            for stream in (resumed, scoped, again):
                stream.call.cancel()
            await wait_until(lambda: hub.statistics().active == 0)


async def test_watch_objects_carry_upstream_metadata(
        stubs: types.SimpleNamespace, tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with serve(stubs, tmp_path) as c:
            watch = c.watch()
            await wait_until(lambda: c.rt.core.hub.statistics().active == 1)
            created = await c.create(c.gpu(GPU_A, ("Ready", "True")))
            event = await watch.event()
            assert event.type == "ADDED" and event.object == created
            await c.call(c.gpus.UpdateGpu, c.pb.UpdateGpuRequest(gpu=c.gpu(GPU_A, uuid=GPU_B)))
            event = await watch.event()
            assert event.type == "MODIFIED" and event.object.metadata.generation == 2
            assert event.object.metadata.uid == created.metadata.uid
            await c.call(c.gpus.DeleteGpu, c.pb.DeleteGpuRequest(name=GPU_A))
            event = await watch.event()
            assert event.type == "DELETED" and event.object.metadata.uid == created.metadata.uid
            watch.call.cancel()


# ---- readiness, health, reflection, metrics, shutdown -------------------------------------------


async def test_readiness_gate_health_reflection_and_metrics(
        stubs: types.SimpleNamespace, tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with serve(stubs, tmp_path, min_gpus=1) as c:
            serving = health_pb2.HealthCheckResponse.SERVING
            assert await c.health(SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
            for method, request in ((c.gpus.ListGpus, c.pb.ListGpusRequest()),
                                    (c.gpus.GetGpu, c.pb.GetGpuRequest(name=GPU_A))):
                assert await c.fails(Code.UNAVAILABLE, method, request) == WAITING
            assert await c.watch().fails(Code.UNAVAILABLE) == WAITING
            await c.create(c.gpu(GPU_A))  # writes pass, and open the gate
            assert await c.health(SERVICE) == serving
            assert await c.health("") == serving
            assert len((await c.list()).items) == 1

            handled = c.rt.metrics.registry.get_sample_value(
                "grpc_server_handled_total",
                {"grpc_type": "unary", "grpc_service": SERVICE, "grpc_method": "ListGpus",
                 "grpc_code": "UNAVAILABLE"})
            assert handled == 1
            assert c.rt.metrics.registry.get_sample_value(
                "grpc_server_handled_total",
                {"grpc_type": "unary", "grpc_service": SERVICE, "grpc_method": "CreateGpu",
                 "grpc_code": "OK"}) == 1

            binary = find_grpcurl()
            if binary is not None:
                socket = c.rt.listeners.nvsentinel_socket
                assert socket is not None
                listed = await trio.run_process(
                    [binary, "-plaintext", "-unix", "-max-time", "20", socket, "list"],
                    capture_stdout=True, capture_stderr=True)
                assert SERVICE in listed.stdout.decode().split()
                got = await trio.run_process(
                    [binary, "-plaintext", "-unix", "-max-time", "20", "-d",
                     json.dumps({"name": GPU_A}), socket, f"{SERVICE}/GetGpu"],
                    capture_stdout=True, capture_stderr=True)
                assert json.loads(got.stdout)["gpu"]["metadata"]["generation"] == "1"


async def test_shutdown_ends_watches_with_ok_and_removes_the_socket(
        stubs: types.SimpleNamespace, tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with serve(stubs, tmp_path) as c:
            socket = c.rt.listeners.nvsentinel_socket
            assert socket is not None
            mode = os.stat(socket).st_mode
            assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660
            watch = c.watch()
            await wait_until(lambda: c.rt.core.hub.statistics().active == 1)
            created = await c.create(c.gpu(GPU_A))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(c.rt.shutdown)
                assert await watch.next() == ("ADDED", GPU_A, created.metadata.resource_version)
                assert await watch.event() is None  # OK, after every committed event
            assert not await trio.Path(socket).exists()


# ---- the "done when": a Go-SDK-shaped client ---------------------------------------------


async def test_go_sdk_shaped_client_end_to_end(stubs: types.SimpleNamespace,
                                              tmp_path: Path) -> None:
    """What the upstream client-go does, in order: list, watch from the list's version,
    create (ALREADY_EXISTS → get), update status with the version (ABORTED → re-get, retry),
    while a §1 client on the other socket sees the same state and versions."""
    with trio.fail_after(30):
        async with serve(stubs, tmp_path) as c:
            await c.call(c.v1.CreateGpu, c.v1pb.CreateGpuRequest(gpu=c.v1pb.Gpu(
                metadata=c.v1pb.ObjectMeta(name=GPU_A))))  # a provider on §1 got there first

            listing = await c.list()
            assert [g.metadata.name for g in listing.items] == [GPU_A]
            informer = c.watch(listing.metadata.resource_version)

            async def ensure(name: str) -> Any:
                try:
                    return await c.create(c.gpu(name))
                except grpc.RpcError as error:
                    assert error.code() == Code.ALREADY_EXISTS
                    return await c.get(name)

            gpu_a = await ensure(GPU_A)
            gpu_b = await ensure(GPU_B)
            assert await informer.next() == ("ADDED", GPU_B, gpu_b.metadata.resource_version)

            async def set_status(name: str, cond: tuple[str, str], current: Any) -> Any:
                for _ in range(3):
                    request = c.pb.Gpu()
                    request.CopyFrom(current)
                    del request.status.conditions[:]
                    request.status.conditions.add(type=cond[0], status=cond[1])
                    try:
                        return await c.call(c.gpus.UpdateGpuStatus,
                                            c.pb.UpdateGpuStatusRequest(gpu=request))
                    except grpc.RpcError as error:
                        assert error.code() == Code.ABORTED
                        current = await c.get(name)
                raise AssertionError("no progress after 3 conflicts")

            # someone else (on §1) writes in between: the first try is ABORTED, the retry wins
            await c.call(c.v1.UpdateGpuStatus, c.v1pb.UpdateGpuStatusRequest(
                name=GPU_A, status=c.v1pb.GpuStatus(conditions=[
                    c.v1pb.Condition(type="Ready", status="Unknown")])))
            written = await set_status(GPU_A, ("Ready", "False"), gpu_a)
            assert conditions(written) == [("Ready", "False")]

            seen = [await informer.next(), await informer.next()]
            assert seen[-1] == ("MODIFIED", GPU_A, written.metadata.resource_version)

            v1 = await c.v1_get(GPU_A)
            assert v1.resource_version == int(written.metadata.resource_version)
            assert conditions(v1) == [("Ready", "False")]
            v1_list = (await c.call(c.v1.ListGpus, c.v1pb.ListGpusRequest())).gpu_list
            up_list = await c.list()
            assert v1_list.metadata.resource_version == up_list.metadata.resource_version
            assert [(g.metadata.name, g.metadata.resource_version) for g in v1_list.items] == [
                (g.metadata.name, g.metadata.resource_version) for g in up_list.items]
            informer.call.cancel()
