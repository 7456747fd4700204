"""Wire compatibility through an independent client: grpcio, with stubs generated from our .proto.

Nobody here wrote grpcio's HTTP/2 stack, framing or stubs, so a server that only works with our
grpclib client fails here. The stubs are generated at test time (``grpc_tools.protoc``
``--python_out --grpc_python_out``, exactly what a Python user of the reference server runs) into
a temporary directory and imported from there, so they never come from our package.

What is shared is only the message classes: protobuf keeps one copy of
``device/v1alpha1/gpu.proto`` per process (the generated file is byte-identical to the committed
one, which tests/unit/test_proto_stubs.py checks), so both sides encode with the same
descriptors — as any two programs built from the same .proto do.

grpcio is blocking: every call runs in a worker thread (``trio.to_thread.run_sync``) while the
server runs in the test's trio loop. Every call carries a grpc deadline, so no thread outlives a
failing test by more than that.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.resources
import socket as stdlib_socket
import sys
import types
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import trio
from _sockets import open_sockets, wait_sockets_closed
from grpc_tools import protoc
from grpclib.health.v1 import health_pb2

from deviceapi._app import Runtime
from deviceapi.testing.runtime import make_test_config, open_test_runtime, wait_until

T = TypeVar("T")
Code = grpc.StatusCode

GPU_A = "GPU-0a000000-0000-4000-8000-000000000001"
GPU_B = "GPU-0b000000-0000-4000-8000-000000000002"
GPU_C = "GPU-0c000000-0000-4000-8000-000000000003"

PROTO_ROOT = Path(__file__).resolve().parents[2] / "src" / "deviceapi" / "proto"
PROTOS = ("device/v1alpha1/gpu.proto", "device/v1alpha1/provider.proto")
#: grpc deadline of every call (seconds): a wedged call fails the test instead of hanging it.
DEADLINE = 10.0
WAITING = "server initializing, waiting for GPU providers"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
GPU_SERVICE = "nvidia.device.v1alpha1.GpuService"
PROVIDER_SERVICE = "nvidia.device.v1alpha1.ProviderService"

# ---- stubs generated from our .proto files ------------------------------------------------------


def generate_grpcio_stubs(out: Path, protos: Sequence[str] = PROTOS,
                          package: str = "device") -> types.SimpleNamespace:
    """Run protoc with grpcio's plugin into ``out`` and import the result from there.

    The generated code imports itself as the top-level package ``package`` (the .proto paths
    are ``<package>/v1alpha1/*.proto``); ``out`` is on ``sys.path`` only while importing and the
    ``package`` modules are dropped from ``sys.modules`` afterwards, so nothing else can pick
    them up by accident (``deviceapi`` is a different name and is never shadowed).
    """
    include = importlib.resources.files("grpc_tools") / "_proto"
    code = protoc.main([
        "protoc", f"-I{PROTO_ROOT}", f"-I{include}",
        f"--python_out={out}", f"--grpc_python_out={out}", *protos,
    ])
    assert code == 0, f"protoc failed with {code}"
    assert package not in sys.modules, f"a module named {package!r} is already imported"
    stems = [Path(p).stem for p in protos]
    sys.path.insert(0, str(out))
    try:
        modules = {
            name: importlib.import_module(f"{package}.v1alpha1.{name}")
            for stem in stems for name in (f"{stem}_pb2", f"{stem}_pb2_grpc")
        }
    finally:
        sys.path.remove(str(out))
        for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
            del sys.modules[name]
    for module in modules.values():
        assert Path(module.__file__ or "").is_relative_to(out), module.__file__
    return types.SimpleNamespace(**modules)


@pytest.fixture(scope="module")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> types.SimpleNamespace:
    return generate_grpcio_stubs(tmp_path_factory.mktemp("grpcio-stubs"))


# ---- a grpcio connection, driven from trio ------------------------------------------------------


def health_stub(channel: grpc.Channel) -> Any:
    """grpc.health.v1.Health/Check on ``channel`` (grpcio ships no health stub)."""
    return channel.unary_unary(
        HEALTH_CHECK,
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )


class Grpcio:
    """One grpcio channel to the server's Unix socket; calls run in worker threads."""

    def __init__(self, stubs: types.SimpleNamespace, channel: grpc.Channel,
                 runtime: Runtime) -> None:
        self.stubs = stubs
        self.runtime = runtime
        self.pb = stubs.gpu_pb2
        self.ppb = stubs.provider_pb2
        self.channel = channel
        self.gpus = stubs.gpu_pb2_grpc.GpuServiceStub(channel)
        self.providers = stubs.provider_pb2_grpc.ProviderServiceStub(channel)
        self._health = health_stub(channel)

    async def call(self, method: Callable[..., T], request: Any, **kwargs: Any) -> T:
        """A unary call in a worker thread, with a deadline."""
        return await trio.to_thread.run_sync(
            functools.partial(method, request, timeout=DEADLINE, **kwargs))

    async def fails(self, code: grpc.StatusCode, method: Callable[..., Any],
                    request: Any, **kwargs: Any) -> str:
        """Assert the call fails with ``code``; return its one-line message."""
        with pytest.raises(grpc.RpcError) as info:
            await self.call(method, request, **kwargs)
        error: Any = info.value
        assert error.code() == code, f"{error.code()}: {error.details()}"
        message: str = error.details() or ""
        assert "\n" not in message and "Traceback" not in message, message
        return message

    async def health(self, service: str) -> int:
        reply = await self.call(self._health, health_pb2.HealthCheckRequest(service=service))
        status: int = reply.status
        return status

    def gpu(self, name: str, *conditions: tuple[str, str], rv: int = 0) -> Any:
        pb = self.pb
        return pb.Gpu(
            metadata=pb.ObjectMeta(name=name),
            spec=pb.GpuSpec(uuid=name),
            status=pb.GpuStatus(conditions=[pb.Condition(type=t, status=s)
                                            for t, s in conditions]),
            resource_version=rv,
        )

    def status(self, *conditions: tuple[str, str], **fields: str) -> Any:
        return self.pb.GpuStatus(
            conditions=[self.pb.Condition(type=t, status=s, **fields) for t, s in conditions])

    async def create(self, gpu: Any, **kwargs: Any) -> Any:
        return await self.call(self.gpus.CreateGpu, self.pb.CreateGpuRequest(gpu=gpu), **kwargs)

    async def names(self) -> list[str]:
        reply = await self.call(self.gpus.ListGpus, self.pb.ListGpusRequest())
        return [g.metadata.name for g in reply.gpu_list.items]

    @asynccontextmanager
    async def another_channel(self, options: Sequence[tuple[str, Any]] = ()
                              ) -> AsyncIterator[Grpcio]:
        """A second, independent connection (its own HTTP/2 settings) to the same server.

        Its sockets are waited for by the first channel's exit (``server_and_client``)."""
        async with grpcio_channel(self.runtime, options, wait_closed=False) as channel:
            yield Grpcio(self.stubs, channel, self.runtime)


@asynccontextmanager
async def grpcio_channel(runtime: Runtime, options: Sequence[tuple[str, Any]] = (), *,
                         wait_closed: bool = True) -> AsyncIterator[grpc.Channel]:
    """A grpcio channel to ``runtime``'s Unix socket, closed on exit.

    grpcio closes its connection from its own threads; on the way out this waits (bounded)
    until both ends of every connection opened since it was created are closed, so that the
    test ends with no socket of its own left open.
    """
    socket = runtime.listeners.unix_socket
    assert socket is not None
    before = open_sockets()
    channel = grpc.insecure_channel("unix://" + socket, options=list(options))
    try:
        yield channel
    finally:
        channel.close()
        if wait_closed:
            await wait_sockets_closed(before)


@asynccontextmanager
async def server_and_client(stubs: types.SimpleNamespace, tmp_path: Path,
                            **overrides: Any) -> AsyncIterator[Grpcio]:
    """A server in this trio run (READY at once unless ``min_gpus`` says otherwise) and a
    grpcio client connected to its Unix socket. Versions start at 0 so the expectations read
    1, 2, 3 (the wall-clock base of SPEC §2 is tested in test_restarts.py)."""
    overrides.setdefault("min_gpus", 0)
    async with open_test_runtime(make_test_config(tmp_path, **overrides),
                                 version_base=0) as rt, \
            grpcio_channel(rt) as channel:
        yield Grpcio(stubs, channel, rt)


class Watch:
    """A WatchGpus stream read from a worker thread, one event (or error) at a time."""

    def __init__(self, client: Grpcio, resource_version: str = "") -> None:
        pb = client.pb
        request = pb.WatchGpusRequest(opts=pb.ListOptions(resource_version=resource_version))
        self.call = client.gpus.WatchGpus(request, timeout=DEADLINE)
        self._events: Iterator[Any] = iter(self.call)

    async def event(self) -> Any:
        """The next event; None when the stream ended with OK."""
        return await trio.to_thread.run_sync(next, self._events, None)

    async def next(self) -> tuple[str, str, int]:
        event = await self.event()
        assert event is not None, "the stream ended with OK"
        return event.type, event.object.metadata.name, event.object.resource_version

    async def take(self, count: int) -> list[tuple[str, str, int]]:
        return [await self.next() for _ in range(count)]

    async def fails(self, code: grpc.StatusCode) -> str:
        with pytest.raises(grpc.RpcError) as info:
            await self.next()
        error: Any = info.value
        assert error.code() == code, f"{error.code()}: {error.details()}"
        return error.details() or ""

    def cancel(self) -> None:
        self.call.cancel()


# ---- GpuService ----------------------------------------------------------------------------------


async def test_gpu_service_every_rpc(stubs: types.SimpleNamespace, tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with server_and_client(stubs, tmp_path) as c:
            pb = c.pb
            reply = await c.create(c.gpu(GPU_B, ("Ready", "True")),
                                   metadata=(("x-provider-id", "grpcio-test"),))
            assert reply.created
            created = reply.gpu
            assert created.resource_version == 1 and created.metadata.resource_version == "1"
            assert created.spec.uuid == GPU_B
            assert created.status.conditions[0].HasField("last_transition_time")

            # idempotent: the existing object, unchanged, created=false
            again = await c.create(c.gpu(GPU_B, ("Ready", "False")))
            assert not again.created and again.gpu == created

            await c.create(c.gpu(GPU_C))
            await c.create(c.gpu(GPU_A))
            listing = (await c.call(c.gpus.ListGpus, pb.ListGpusRequest())).gpu_list
            assert [g.metadata.name for g in listing.items] == [GPU_A, GPU_B, GPU_C]
            assert listing.metadata.resource_version == "3"

            got = await c.call(c.gpus.GetGpu, pb.GetGpuRequest(name=GPU_B))
            assert got.gpu == created

            # UpdateGpu replaces spec and status; the expected version in resource_version ...
            update = c.gpu(GPU_B, ("Ready", "False"), rv=1)
            update.status.recommended_action = "drain"
            updated = (await c.call(c.gpus.UpdateGpu, pb.UpdateGpuRequest(gpu=update))).gpu
            assert updated.resource_version == 4 and updated.metadata.resource_version == "4"
            assert [(x.type, x.status) for x in updated.status.conditions] == [("Ready", "False")]
            assert updated.status.recommended_action == "drain"
            # ... or in metadata.resource_version (a decimal string); 0 / "" is unconditional
            update = c.gpu(GPU_B, ("Ready", "True"))
            update.metadata.resource_version = "4"
            assert (await c.call(c.gpus.UpdateGpu, pb.UpdateGpuRequest(gpu=update))
                    ).gpu.resource_version == 5
            update = c.gpu(GPU_B, ("Ready", "True"))
            assert (await c.call(c.gpus.UpdateGpu, pb.UpdateGpuRequest(gpu=update))
                    ).gpu.resource_version == 6

            # UpdateGpuStatus replaces the status only, guarded by field 3
            status = c.status(("Ready", "Unknown"), reason="Probing")
            after = (await c.call(c.gpus.UpdateGpuStatus, pb.UpdateGpuStatusRequest(
                name=GPU_B, status=status, resource_version=6))).gpu
            assert after.resource_version == 7 and after.spec.uuid == GPU_B
            assert [(x.type, x.status, x.reason) for x in after.status.conditions] == [
                ("Ready", "Unknown", "Probing")]
            assert not after.status.recommended_action

            # DeleteGpu answers Empty and bumps the version too
            empty = await c.call(c.gpus.DeleteGpu, pb.DeleteGpuRequest(name=GPU_B))
            assert empty.ByteSize() == 0
            await c.fails(Code.NOT_FOUND, c.gpus.GetGpu, pb.GetGpuRequest(name=GPU_B))
            listing = (await c.call(c.gpus.ListGpus, pb.ListGpusRequest())).gpu_list
            assert [g.metadata.name for g in listing.items] == [GPU_A, GPU_C]
            assert listing.metadata.resource_version == "8"


async def test_gpu_service_error_codes(stubs: types.SimpleNamespace, tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with server_and_client(stubs, tmp_path) as c:
            pb = c.pb
            await c.create(c.gpu(GPU_A, ("Ready", "True")))
            rpc = c.gpus

            # conflict → ABORTED (both places UpdateGpu takes the version from, and field 3)
            message = await c.fails(Code.ABORTED, rpc.UpdateGpu,
                                    pb.UpdateGpuRequest(gpu=c.gpu(GPU_A, rv=99)))
            assert "99" in message
            stale = c.gpu(GPU_A)
            stale.metadata.resource_version = "42"
            await c.fails(Code.ABORTED, rpc.UpdateGpu, pb.UpdateGpuRequest(gpu=stale))
            await c.fails(Code.ABORTED, rpc.UpdateGpuStatus, pb.UpdateGpuStatusRequest(
                name=GPU_A, status=c.status(), resource_version=42))

            # a non-numeric string version → INVALID_ARGUMENT
            for text in ("abc", "1.5", "-1", " 1"):
                bad = c.gpu(GPU_A)
                bad.metadata.resource_version = text
                await c.fails(Code.INVALID_ARGUMENT, rpc.UpdateGpu, pb.UpdateGpuRequest(gpu=bad))

            # missing object → NOT_FOUND
            await c.fails(Code.NOT_FOUND, rpc.GetGpu, pb.GetGpuRequest(name=GPU_C))
            await c.fails(Code.NOT_FOUND, rpc.UpdateGpu, pb.UpdateGpuRequest(gpu=c.gpu(GPU_C)))
            await c.fails(Code.NOT_FOUND, rpc.UpdateGpuStatus,
                          pb.UpdateGpuStatusRequest(name=GPU_C, status=c.status()))
            await c.fails(Code.NOT_FOUND, rpc.DeleteGpu, pb.DeleteGpuRequest(name=GPU_C))

            # empty name / missing gpu / missing status / condition without type
            await c.fails(Code.INVALID_ARGUMENT, rpc.GetGpu, pb.GetGpuRequest())
            await c.fails(Code.INVALID_ARGUMENT, rpc.DeleteGpu, pb.DeleteGpuRequest())
            await c.fails(Code.INVALID_ARGUMENT, rpc.UpdateGpuStatus,
                          pb.UpdateGpuStatusRequest(status=c.status()))
            await c.fails(Code.INVALID_ARGUMENT, rpc.CreateGpu, pb.CreateGpuRequest(gpu=pb.Gpu()))
            await c.fails(Code.INVALID_ARGUMENT, rpc.CreateGpu, pb.CreateGpuRequest())
            await c.fails(Code.INVALID_ARGUMENT, rpc.UpdateGpu, pb.UpdateGpuRequest())
            await c.fails(Code.INVALID_ARGUMENT, rpc.UpdateGpuStatus,
                          pb.UpdateGpuStatusRequest(name=GPU_A))
            await c.fails(Code.INVALID_ARGUMENT, rpc.CreateGpu,
                          pb.CreateGpuRequest(gpu=c.gpu(GPU_B, ("", "True"))))
            await c.fails(Code.INVALID_ARGUMENT, rpc.UpdateGpuStatus, pb.UpdateGpuStatusRequest(
                name=GPU_A, status=c.status(("", "True"))))

            # nothing was stored by any rejected call
            listing = (await c.call(rpc.ListGpus, pb.ListGpusRequest())).gpu_list
            assert [g.metadata.name for g in listing.items] == [GPU_A]
            assert listing.metadata.resource_version == "1"


async def test_concurrent_conditional_writes_one_wins(stubs: types.SimpleNamespace,
                                                       tmp_path: Path) -> None:
    """Optimistic concurrency under real concurrency: 16 UpdateGpuStatus calls in flight at
    once, on two connections, all expecting version 1: exactly one wins, the rest are ABORTED;
    a read on the other connection sees the winner (read-your-writes)."""
    with trio.fail_after(20):
        async with server_and_client(stubs, tmp_path) as c, c.another_channel() as other:
            pb = c.pb
            await c.create(c.gpu(GPU_A, ("Ready", "True")))
            futures = [
                client.gpus.UpdateGpuStatus.future(pb.UpdateGpuStatusRequest(
                    name=GPU_A, status=c.status((f"Writer{i}", "True")), resource_version=1),
                    timeout=DEADLINE)
                for i in range(8) for client in (c, other)
            ]

            def outcomes() -> list[Any]:
                return [f.exception() or f.result() for f in futures]

            results = await trio.to_thread.run_sync(outcomes)
            winners = [r.gpu for r in results if not isinstance(r, grpc.RpcError)]
            losers = [r for r in results if isinstance(r, grpc.RpcError)]
            assert len(winners) == 1 and winners[0].resource_version == 2
            assert {r.code() for r in losers} == {Code.ABORTED}
            seen = (await other.call(other.gpus.GetGpu, pb.GetGpuRequest(name=GPU_A))).gpu
            assert seen == winners[0]


async def test_validation_rules_at_their_edges(stubs: types.SimpleNamespace,
                                               tmp_path: Path) -> None:
    """SPEC §2 validation and §4 bounds: the limit passes, limit + 1 is INVALID_ARGUMENT."""
    with trio.fail_after(20):
        async with server_and_client(stubs, tmp_path, max_gpus=4) as c:
            pb = c.pb
            rpc = c.gpus
            invalid = Code.INVALID_ARGUMENT

            # names: GPU-/MIG- then hex digits and dashes, at most 128 characters
            longest = "GPU-" + "a" * 124
            mig = "MIG-0a1b2c3d-4e5f-6789-abcd-ef0123456789"
            for name in (longest, mig):
                assert (await c.create(c.gpu(name))).created
            for name in ("GPU-" + "a" * 125, "gpu-abc", "GPU-xyz", "GPU-", "MIG",
                         "/etc/passwd", "GPU-ab/../cd"):
                await c.fails(invalid, rpc.CreateGpu, pb.CreateGpuRequest(gpu=c.gpu(name)))

            def update(*conditions: Any) -> Any:
                return pb.UpdateGpuStatusRequest(
                    name=mig, status=pb.GpuStatus(conditions=list(conditions)))

            cond = pb.Condition
            # the edge values pass ...
            await c.call(rpc.UpdateGpuStatus, update(cond(type="T" * 128, status="True")))
            await c.call(rpc.UpdateGpuStatus, update(cond(type="Ready", status="Unknown",
                                                          reason="r" * 256, message="m" * 4096)))
            await c.call(rpc.UpdateGpuStatus, update(*(
                cond(type=f"C{i}", status="False") for i in range(32))))
            # ... and one past each edge does not
            rejected = [
                cond(type="T" * 129, status="True"),
                cond(type="Ready\n", status="True"),
                cond(type="Re\x00dy", status="True"),
                cond(type="Ready", status="true"),
                cond(type="Ready", status=""),
                cond(type="Ready", status="True", reason="r" * 257),
                cond(type="Ready", status="True", message="m" * 4097),
            ]
            for condition in rejected:
                await c.fails(invalid, rpc.UpdateGpuStatus, update(condition))
            await c.fails(invalid, rpc.UpdateGpuStatus, update(*(
                cond(type=f"C{i}", status="False") for i in range(33))))
            await c.fails(invalid, rpc.UpdateGpuStatus, update(
                cond(type="A", status="True"), cond(type="A", status="True")))
            # an object over 64 KiB (each condition alone is valid)
            message = await c.fails(invalid, rpc.UpdateGpuStatus, update(*(
                cond(type=f"C{i}", status="True", message="m" * 4096) for i in range(17))))
            assert "65536" in message
            # a request message over 4 MiB never reaches the cache
            huge = pb.UpdateGpuStatusRequest(name=mig, status=pb.GpuStatus(
                recommended_action="x" * (4 * 1024 * 1024 + 1)))
            await c.fails(Code.RESOURCE_EXHAUSTED, rpc.UpdateGpuStatus, huge)

            # max GPUs (4 here): the 5th create is RESOURCE_EXHAUSTED, a re-create still answers
            for name in (GPU_A, GPU_B):
                await c.create(c.gpu(name))
            await c.fails(Code.RESOURCE_EXHAUSTED, rpc.CreateGpu,
                          pb.CreateGpuRequest(gpu=c.gpu(GPU_C)))
            assert not (await c.create(c.gpu(GPU_A))).created
            assert await c.names() == sorted([GPU_A, GPU_B, longest, mig])


# ---- WatchGpus -----------------------------------------------------------------------------------


async def test_watch_snapshot_then_live_events(stubs: types.SimpleNamespace,
                                               tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with server_and_client(stubs, tmp_path) as c:
            pb = c.pb
            for name in (GPU_C, GPU_A):
                await c.create(c.gpu(name, ("Ready", "True")))
            watch = Watch(c)
            try:
                # one ADDED per existing GPU (in version order), then live events
                assert await watch.take(2) == [("ADDED", GPU_C, 1), ("ADDED", GPU_A, 2)]
                await c.call(c.gpus.UpdateGpuStatus, pb.UpdateGpuStatusRequest(
                    name=GPU_A, status=c.status(("Ready", "False"))))
                await c.create(c.gpu(GPU_B))
                await c.call(c.gpus.DeleteGpu, pb.DeleteGpuRequest(name=GPU_C))
                assert await watch.take(3) == [
                    ("MODIFIED", GPU_A, 3), ("ADDED", GPU_B, 4), ("DELETED", GPU_C, 5)]
            finally:
                watch.cancel()
            # the cancelled watcher is gone: a fresh one sees the current state only
            again = Watch(c)
            try:
                assert await again.take(2) == [("ADDED", GPU_A, 3), ("ADDED", GPU_B, 4)]
            finally:
                again.cancel()


async def test_watch_deleted_event_carries_last_state(stubs: types.SimpleNamespace,
                                                      tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with server_and_client(stubs, tmp_path) as c:
            pb = c.pb
            await c.create(c.gpu(GPU_A, ("Ready", "False")))
            watch = Watch(c, resource_version="1")
            try:
                await c.call(c.gpus.DeleteGpu, pb.DeleteGpuRequest(name=GPU_A))
                event = await watch.event()
            finally:
                watch.cancel()
            assert event.type == "DELETED"
            assert event.object.resource_version == 2
            assert event.object.metadata.resource_version == "2"
            assert [(x.type, x.status) for x in event.object.status.conditions] == [
                ("Ready", "False")]


async def test_watch_resume_and_out_of_range(stubs: types.SimpleNamespace,
                                             tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with server_and_client(stubs, tmp_path, watch_history=4) as c:
            pb = c.pb
            await c.create(c.gpu(GPU_A))
            listing = (await c.call(c.gpus.ListGpus, pb.ListGpusRequest())).gpu_list
            # a GPU created between List and Watch(from the list's version) is not missed
            await c.create(c.gpu(GPU_B))
            watch = Watch(c, resource_version=listing.metadata.resource_version)
            try:
                assert await watch.next() == ("ADDED", GPU_B, 2)
                await c.create(c.gpu(GPU_C))
                assert await watch.next() == ("ADDED", GPU_C, 3)
            finally:
                watch.cancel()
            for _ in range(4):
                await c.call(c.gpus.UpdateGpuStatus,
                             pb.UpdateGpuStatusRequest(name=GPU_A, status=c.status()))
            # history holds versions 4..7: resuming from 3 still works, from 1 does not
            resumed = Watch(c, resource_version="3")
            try:
                assert [e[2] for e in await resumed.take(4)] == [4, 5, 6, 7]
            finally:
                resumed.cancel()
            too_old = Watch(c, resource_version="1")
            try:
                message = await too_old.fails(Code.OUT_OF_RANGE)
            finally:
                too_old.cancel()
            assert "relist" in message
            bad = Watch(c, resource_version="abc")
            try:
                await bad.fails(Code.INVALID_ARGUMENT)
            finally:
                bad.cancel()


async def test_watch_max_watchers(stubs: types.SimpleNamespace, tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with server_and_client(stubs, tmp_path, max_watchers=1) as c:
            await c.create(c.gpu(GPU_A))
            first = Watch(c)
            try:
                assert await first.next() == ("ADDED", GPU_A, 1)
                second = Watch(c)
                try:
                    await second.fails(Code.RESOURCE_EXHAUSTED)
                finally:
                    second.cancel()
            finally:
                first.cancel()


# ---- ProviderService -----------------------------------------------------------------------------


async def test_provider_service_every_rpc(stubs: types.SimpleNamespace, tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with server_and_client(stubs, tmp_path) as c:
            pb, ppb, rpc = c.pb, c.ppb, c.providers
            ready = pb.Condition(type="NVMLReady", status="True", reason="Initialized")
            register = ppb.ProviderRegisterGpuRequest(
                name=GPU_A, spec=pb.GpuSpec(uuid=GPU_A), provider_id="nvml",
                initial_status=pb.GpuStatus(conditions=[ready]))
            reply = await c.call(rpc.RegisterGpu, register)
            assert reply.created and reply.resource_version == 1
            reply = await c.call(rpc.RegisterGpu, register)  # idempotent
            assert not reply.created and reply.resource_version == 1

            # UpdateGpuCondition upserts by type and keeps other providers' conditions
            dcgm = pb.Condition(type="DCGMHealthy", status="True")
            rv = (await c.call(rpc.UpdateGpuCondition, ppb.ProviderUpdateGpuConditionRequest(
                name=GPU_A, condition=dcgm, provider_id="dcgm"))).resource_version
            assert rv == 2
            gpu = (await c.call(c.gpus.GetGpu, pb.GetGpuRequest(name=GPU_A))).gpu
            first = {x.type: x for x in gpu.status.conditions}
            assert set(first) == {"NVMLReady", "DCGMHealthy"}

            # same status: last_transition_time kept; new status: set by the server
            same = pb.Condition(type="NVMLReady", status="True", reason="StillFine")
            await c.call(rpc.UpdateGpuCondition, ppb.ProviderUpdateGpuConditionRequest(
                name=GPU_A, condition=same, provider_id="nvml"))
            gpu = (await c.call(c.gpus.GetGpu, pb.GetGpuRequest(name=GPU_A))).gpu
            kept = {x.type: x for x in gpu.status.conditions}
            assert kept["NVMLReady"].reason == "StillFine"
            assert kept["NVMLReady"].last_transition_time == first["NVMLReady"].last_transition_time
            assert kept["DCGMHealthy"] == first["DCGMHealthy"]
            flipped = pb.Condition(type="NVMLReady", status="False", reason="XidCritical")
            flipped.last_transition_time.FromSeconds(1)  # ignored: the server owns it
            rv = (await c.call(rpc.UpdateGpuCondition, ppb.ProviderUpdateGpuConditionRequest(
                name=GPU_A, condition=flipped, provider_id="nvml"))).resource_version
            assert rv == 4
            gpu = (await c.call(c.gpus.GetGpu, pb.GetGpuRequest(name=GPU_A))).gpu
            now = {x.type: x for x in gpu.status.conditions}
            assert now["NVMLReady"].status == "False"
            assert now["NVMLReady"].last_transition_time.seconds != 1
            assert (now["NVMLReady"].last_transition_time.ToNanoseconds()
                    >= first["NVMLReady"].last_transition_time.ToNanoseconds())

            # UpdateGpuStatus replaces the whole status
            rv = (await c.call(rpc.UpdateGpuStatus, ppb.ProviderUpdateGpuStatusRequest(
                name=GPU_A, status=c.status(("NVMLReady", "True")), provider_id="nvml"))
                  ).resource_version
            assert rv == 5
            gpu = (await c.call(c.gpus.GetGpu, pb.GetGpuRequest(name=GPU_A))).gpu
            assert [(x.type, x.status) for x in gpu.status.conditions] == [("NVMLReady", "True")]

            # Heartbeat is implemented (the reference answered UNIMPLEMENTED)
            beat = await c.call(rpc.Heartbeat, ppb.HeartbeatRequest(
                provider_id="nvml", gpu_names=[GPU_A]))
            assert beat.acknowledged
            await c.fails(Code.INVALID_ARGUMENT, rpc.Heartbeat,
                          ppb.HeartbeatRequest(gpu_names=[GPU_A]))
            await c.fails(Code.INVALID_ARGUMENT, rpc.Heartbeat,
                          ppb.HeartbeatRequest(provider_id="nvml", gpu_names=["nope"]))

            # errors
            await c.fails(Code.INVALID_ARGUMENT, rpc.RegisterGpu,
                          ppb.ProviderRegisterGpuRequest(name="", provider_id="nvml"))
            await c.fails(Code.INVALID_ARGUMENT, rpc.RegisterGpu,
                          ppb.ProviderRegisterGpuRequest(name="not-a-gpu"))
            await c.fails(Code.INVALID_ARGUMENT, rpc.UpdateGpuCondition,
                          ppb.ProviderUpdateGpuConditionRequest(name=GPU_A))
            await c.fails(Code.INVALID_ARGUMENT, rpc.UpdateGpuCondition,
                          ppb.ProviderUpdateGpuConditionRequest(
                              name=GPU_A, condition=pb.Condition(status="True")))
            await c.fails(Code.INVALID_ARGUMENT, rpc.UpdateGpuStatus,
                          ppb.ProviderUpdateGpuStatusRequest(name=GPU_A))
            await c.fails(Code.NOT_FOUND, rpc.UpdateGpuCondition,
                          ppb.ProviderUpdateGpuConditionRequest(name=GPU_B, condition=ready))
            await c.fails(Code.NOT_FOUND, rpc.UpdateGpuStatus,
                          ppb.ProviderUpdateGpuStatusRequest(name=GPU_B, status=c.status()))

            # UnregisterGpu: deleted, then deleted=false (not an error)
            assert (await c.call(rpc.UnregisterGpu,
                                 ppb.ProviderUnregisterGpuRequest(name=GPU_A))).deleted
            assert not (await c.call(rpc.UnregisterGpu,
                                     ppb.ProviderUnregisterGpuRequest(name=GPU_A))).deleted
            assert await c.names() == []


# ---- health and the readiness gate ---------------------------------------------------------------


async def test_health_follows_readiness(stubs: types.SimpleNamespace, tmp_path: Path) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    with trio.fail_after(20):
        async with server_and_client(stubs, tmp_path, min_gpus=2,
                                     provider_timeout=3600.0) as c:
            pb, ppb = c.pb, c.ppb
            assert await c.health("") == not_serving
            assert await c.health(GPU_SERVICE) == not_serving
            assert await c.health(PROVIDER_SERVICE) == serving  # providers can wait for it
            await c.fails(Code.NOT_FOUND, c._health,
                          health_pb2.HealthCheckRequest(service="no.such.Service"))

            # consumer reads wait for the gate; provider writes always pass
            for method, request in ((c.gpus.ListGpus, pb.ListGpusRequest()),
                                    (c.gpus.GetGpu, pb.GetGpuRequest(name=GPU_A))):
                assert await c.fails(Code.UNAVAILABLE, method, request) == WAITING
            watch = Watch(c)
            try:
                assert await watch.fails(Code.UNAVAILABLE) == WAITING
            finally:
                watch.cancel()
            assert (await c.call(c.providers.RegisterGpu, ppb.ProviderRegisterGpuRequest(
                name=GPU_A, provider_id="p"))).created
            assert await c.health(GPU_SERVICE) == not_serving  # 1 of min-gpus 2

            assert (await c.create(c.gpu(GPU_B))).created
            assert await c.health("") == serving
            assert await c.health(GPU_SERVICE) == serving
            assert await c.names() == [GPU_A, GPU_B]


async def test_health_watch_stream(stubs: types.SimpleNamespace, tmp_path: Path) -> None:
    """grpc.health.v1.Health/Watch: a consumer can wait for readiness without polling."""
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    with trio.fail_after(20):
        async with server_and_client(stubs, tmp_path, min_gpus=1,
                                     provider_timeout=3600.0) as c:
            watch = c.channel.unary_stream(
                "/grpc.health.v1.Health/Watch",
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )(health_pb2.HealthCheckRequest(service=GPU_SERVICE), timeout=DEADLINE)
            try:
                updates = iter(watch)
                assert (await trio.to_thread.run_sync(next, updates)).status == not_serving
                await c.create(c.gpu(GPU_A))
                assert (await trio.to_thread.run_sync(next, updates)).status == serving
            finally:
                watch.cancel()


# ---- provider sessions over the wire -------------------------------------------------------------


async def test_provider_header_and_heartbeat_timeout(stubs: types.SimpleNamespace,
                                                     tmp_path: Path) -> None:
    """The ``x-provider-id`` header of a GpuService write makes the GPU that provider's; when
    the provider's heartbeat is overdue its GPUs (only) turn Ready=Unknown, and come back."""
    with trio.fail_after(20):
        async with server_and_client(stubs, tmp_path, heartbeat_timeout=0.2) as c:
            pb, ppb = c.pb, c.ppb
            await c.create(c.gpu(GPU_A, ("Ready", "True")), metadata=(("x-provider-id", "p1"),))
            await c.call(c.providers.RegisterGpu, ppb.ProviderRegisterGpuRequest(
                name=GPU_B, provider_id="p2",
                initial_status=c.status(("Ready", "True"))))
            watch = Watch(c, resource_version="2")  # every change from now on, in order
            try:
                await c.call(c.providers.Heartbeat, ppb.HeartbeatRequest(provider_id="p1"))
                assert c.runtime.core.store.state.owners[GPU_A] == "p1"

                def ready(gpu: Any) -> tuple[str, str]:
                    (cond,) = [x for x in gpu.status.conditions if x.type == "Ready"]
                    return cond.status, cond.reason

                masked = await watch.event()  # the heartbeat monitor acts after 0.2 s
                assert (masked.type, masked.object.metadata.name) == ("MODIFIED", GPU_A)
                assert ready(masked.object) == ("Unknown", "ProviderHeartbeatTimeout")
                got = await c.call(c.gpus.GetGpu, pb.GetGpuRequest(name=GPU_B))
                assert ready(got.gpu) == ("True", "")  # p2 never heartbeats: never timed out

                beat = await c.call(c.providers.Heartbeat,
                                    ppb.HeartbeatRequest(provider_id="p1"))
                assert beat.acknowledged
                restored = await watch.event()
                assert (restored.type, restored.object.metadata.name) == ("MODIFIED", GPU_A)
                assert ready(restored.object) == ("True", "")  # what p1 wrote
            finally:
                watch.cancel()


# ---- transport-level behaviour -------------------------------------------------------------------


async def test_unknown_method_and_malformed_request(stubs: types.SimpleNamespace,
                                                    tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with server_and_client(stubs, tmp_path) as c:
            raw = c.channel.unary_unary(f"/{GPU_SERVICE}/NoSuchRpc")
            await c.fails(Code.UNIMPLEMENTED, raw, b"")
            garbage = c.channel.unary_unary(f"/{GPU_SERVICE}/GetGpu")
            await c.fails(Code.INVALID_ARGUMENT, garbage, b"\xff\xff\xff\xff")
            # unknown fields are skipped, as protobuf promises (newer clients, older server)
            extra = c.pb.GetGpuRequest(name=GPU_A).SerializeToString() + b"\xa0\x06\x01"
            await c.fails(Code.NOT_FOUND, garbage, extra)


async def test_compressed_requests_are_refused(stubs: types.SimpleNamespace,
                                              tmp_path: Path) -> None:
    """Message compression is not supported: a compressed request is UNIMPLEMENTED (as
    docs/API.md says), and uncompressed calls on the same channel keep working."""
    with trio.fail_after(20):
        async with server_and_client(stubs, tmp_path) as c:
            pb = c.pb
            await c.create(c.gpu(GPU_A))
            request = pb.UpdateGpuStatusRequest(name=GPU_A, status=c.status(
                ("Ready", "True"), message="m" * 3000))  # large enough for grpcio to compress
            message = await c.fails(Code.UNIMPLEMENTED, c.gpus.UpdateGpuStatus, request,
                                    compression=grpc.Compression.Gzip)
            assert message == "compressed messages are not supported"
            assert (await c.call(c.gpus.UpdateGpuStatus, request)).gpu.resource_version == 2


async def test_stalled_watcher_is_evicted_and_resumes(stubs: types.SimpleNamespace,
                                                      tmp_path: Path) -> None:
    """A grpcio watcher that stops reading is evicted with RESOURCE_EXHAUSTED naming the last
    version it received, while another watcher receives every event; resuming from the named
    version continues without a gap."""
    with trio.fail_after(20):
        async with server_and_client(stubs, tmp_path, watch_queue=4) as c:
            pb = c.pb
            await c.create(c.gpu(GPU_A))
            # A small HTTP/2 window so that the stalled client's buffers fill up quickly.
            small_window = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 16384)]
            async with c.another_channel(small_window) as slow:
                stalled = Watch(slow)
                reader = Watch(c)
                try:
                    assert await stalled.next() == ("ADDED", GPU_A, 1)
                    assert await reader.next() == ("ADDED", GPU_A, 1)
                    big = c.status(*((f"C{i}", "True") for i in range(10)), message="m" * 4000)
                    for i in range(40):
                        await c.call(c.gpus.UpdateGpuStatus, pb.UpdateGpuStatusRequest(
                            name=GPU_A, status=big if i % 2 else c.status()))
                        assert await reader.next() == ("MODIFIED", GPU_A, i + 2)
                    received: list[int] = []
                    with pytest.raises(grpc.RpcError) as info:
                        while True:
                            received.append((await stalled.next())[2])
                finally:
                    stalled.cancel()
                    reader.cancel()
            error: Any = info.value
            assert error.code() == Code.RESOURCE_EXHAUSTED, error.details()
            assert received == list(range(2, 2 + len(received)))  # no hole
            last = received[-1] if received else 1
            assert f"resource version {last};" in error.details()
            assert f"opts.resource_version={last}" in error.details()
            resumed = Watch(c, resource_version=str(last))
            try:
                assert [e[2] for e in await resumed.take(41 - last)] == list(range(last + 1, 42))
            finally:
                resumed.cancel()


async def test_watch_limits_and_cancel_frees_the_slot(stubs: types.SimpleNamespace,
                                                      tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with server_and_client(stubs, tmp_path, max_watchers=2, subscribe_burst=3,
                                     subscribe_rate=0.001) as c:
            hub = c.runtime.core.hub
            await c.create(c.gpu(GPU_A))
            first, second = Watch(c), Watch(c)
            try:
                assert await first.next() == ("ADDED", GPU_A, 1)
                assert await second.next() == ("ADDED", GPU_A, 1)
                third = Watch(c)
                try:
                    assert "too many watchers" in await third.fails(Code.RESOURCE_EXHAUSTED)
                finally:
                    third.cancel()
                first.cancel()
                await wait_until(lambda: hub.statistics().active == 1)  # it hears the cancel
                fourth = Watch(c)  # the 3rd token of the burst
                try:
                    assert await fourth.next() == ("ADDED", GPU_A, 1)
                finally:
                    fourth.cancel()
                await wait_until(lambda: hub.statistics().active == 1)
                fifth = Watch(c)  # slot free, but no token left
                try:
                    assert "rate" in await fifth.fails(Code.RESOURCE_EXHAUSTED)
                finally:
                    fifth.cancel()
            finally:
                first.cancel()
                second.cancel()


# ---- shutdown ------------------------------------------------------------------------------------


async def test_shutdown_ends_watch_streams_with_ok(stubs: types.SimpleNamespace,
                                                   tmp_path: Path) -> None:
    """SIGTERM's sequence as a client sees it: health NOT_SERVING first (while calls are still
    served during the shutdown delay), then open watch streams end with status OK."""
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    before = open_sockets()
    channel: grpc.Channel | None = None
    try:
        with trio.fail_after(20):
            # the delay must outlast one grpcio Check from a worker thread on a busy machine
            config = make_test_config(tmp_path, min_gpus=0, shutdown_delay=0.5)
            async with open_test_runtime(config) as rt:
                assert rt.listeners.unix_socket is not None
                channel = grpc.insecure_channel("unix://" + rt.listeners.unix_socket)
                c = Grpcio(stubs, channel, rt)
                await c.create(c.gpu(GPU_A))
                watch = Watch(c)
                assert (await watch.next())[:2] == ("ADDED", GPU_A)
                assert await c.health(GPU_SERVICE) == serving
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(rt.shutdown)
                    await wait_until(lambda: not rt.core.gate.serving)
                    assert await c.health(GPU_SERVICE) == not_serving
                    assert await c.names() == [GPU_A]  # still served during the delay
                    await trio.sleep_forever()  # until shutdown completes and cancels us
            # the stream ended (with its trailers) before the server closed
            assert await watch.event() is None
            assert watch.call.code() == Code.OK
    finally:
        if channel is not None:
            channel.close()
        await wait_sockets_closed(before)


async def test_shutdown_closes_client_connections(tmp_path: Path) -> None:
    """After a completed shutdown, a connected client sees its connection closed.

    A raw HTTP/2 client (preface + empty SETTINGS) is enough: it is what any gRPC client holds
    between calls. A correct server sends GOAWAY and closes; here the socket stays open.
    """
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    client = stdlib_socket.socket(stdlib_socket.AF_UNIX)
    try:
        with trio.fail_after(20):
            config = make_test_config(tmp_path, min_gpus=0)
            async with open_test_runtime(config) as rt:
                assert rt.listeners.unix_socket is not None
                await trio.to_thread.run_sync(client.connect, rt.listeners.unix_socket)
                client.sendall(preface)
                client.settimeout(5)
                assert await trio.to_thread.run_sync(client.recv, 65536)  # server SETTINGS
                await rt.shutdown()
        client.setblocking(False)
        received = b""
        closed = False
        with contextlib.suppress(BlockingIOError):
            while chunk := client.recv(65536):
                received += chunk
            closed = True
        assert closed, f"connection still open after shutdown; received {received!r}"
    finally:
        client.close()
