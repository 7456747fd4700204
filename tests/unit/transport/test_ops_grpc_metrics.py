"""The gRPC instrumentation against a real grpclib server (trio-asyncio, Unix socket).

The codes recorded must be the ones the client receives: OK, a raised GRPCError's status
(NOT_FOUND, ABORTED), UNKNOWN for other exceptions and for a unary handler that sends nothing,
CANCELLED for a client reset, DEADLINE_EXCEEDED for an expired deadline, and the status of
trailers the handler sends itself (grpclib's Health.Check for an unknown service).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_asyncio
from grpclib.client import Channel
from grpclib.const import Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.health.service import Health
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from grpclib.server import Server, Stream
from prometheus_client import CollectorRegistry

from deviceapi.proto.device.v1alpha1 import gpu_pb2
from deviceapi.proto.device.v1alpha1.gpu_grpc import GpuServiceBase, GpuServiceStub
from deviceapi.transport.metrics import InstrumentedService, ServerMetrics, instrument_services

SERVICE = "nvidia.device.v1alpha1.GpuService"


class TinyGpuService(GpuServiceBase):
    """Each method ends in one way the instrumentation must classify."""

    def __init__(self) -> None:
        self.watch_started = asyncio.Event()

    async def GetGpu(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        assert request is not None
        if request.name != "GPU-1":
            raise GRPCError(Status.NOT_FOUND, f"{request.name} not found")
        await stream.send_message(gpu_pb2.GetGpuResponse(gpu=gpu_pb2.Gpu()))

    async def ListGpus(self, stream: Stream[Any, Any]) -> None:
        await stream.recv_message()
        await stream.send_message(gpu_pb2.ListGpusResponse())

    async def WatchGpus(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        assert request is not None
        for _ in range(2):
            await stream.send_message(gpu_pb2.WatchGpusResponse(type="ADDED"))
        if request.opts.resource_version == "hang":
            self.watch_started.set()
            await asyncio.Event().wait()  # until the client cancels or the deadline passes

    async def CreateGpu(self, stream: Stream[Any, Any]) -> None:
        await stream.recv_message()  # and "forgets" to answer: grpclib sends UNKNOWN

    async def UpdateGpu(self, stream: Stream[Any, Any]) -> None:
        await stream.recv_message()
        raise GRPCError(Status.ABORTED, "resource version mismatch")

    async def UpdateGpuStatus(self, stream: Stream[Any, Any]) -> None:
        await stream.recv_message()
        await asyncio.Event().wait()  # until the deadline passes

    async def DeleteGpu(self, stream: Stream[Any, Any]) -> None:
        await stream.recv_message()
        raise RuntimeError("bug")


class Completion:
    """Wraps the instrumented servables once more, outside, to signal when a call (and so its
    metric update) is over: tests wait on this condition, never on a sleep."""

    def __init__(self, services: list[InstrumentedService]) -> None:
        self.services = services
        self.finished: dict[str, int] = {}
        self.changed = asyncio.Event()

    def mapping_of(self, service: InstrumentedService) -> dict[str, Handler]:
        def wrap(path: str, handler: Handler) -> Handler:
            async def func(stream: Stream[Any, Any]) -> None:
                try:
                    await handler.func(stream)
                finally:
                    self.finished[path] = self.finished.get(path, 0) + 1
                    self.changed.set()

            return handler._replace(func=func)

        return {path: wrap(path, h) for path, h in service.__mapping__().items()}

    def servables(self) -> list[Any]:
        outer = self

        class Servable:
            def __init__(self, service: InstrumentedService) -> None:
                self._mapping = outer.mapping_of(service)

            def __mapping__(self) -> Mapping[str, Handler]:
                return self._mapping

        return [Servable(s) for s in self.services]

    async def wait_finished(self, method: str, count: int) -> None:
        path = f"/{SERVICE}/{method}" if "/" not in method else method
        while self.finished.get(path, 0) < count:
            self.changed.clear()
            await self.changed.wait()


@pytest.fixture
async def loop() -> AsyncIterator[Any]:
    async with trio_asyncio.open_loop() as loop:
        yield loop


def handled(m: ServerMetrics, method: str, code: str, grpc_type: str = "unary",
            service: str = SERVICE) -> float | None:
    return m.registry.get_sample_value(
        "grpc_server_handled_total",
        {"grpc_type": grpc_type, "grpc_service": service, "grpc_method": method,
         "grpc_code": code},
    )


def sample(m: ServerMetrics, name: str, method: str, grpc_type: str = "unary",
           service: str = SERVICE, **extra: str) -> float | None:
    return m.registry.get_sample_value(
        name, {"grpc_type": grpc_type, "grpc_service": service, "grpc_method": method, **extra}
    )


async def test_codes_counts_and_latency_against_a_real_server(loop: Any, tmp_path: Path) -> None:
    metrics = ServerMetrics(CollectorRegistry(), version="t", node="n")
    service = TinyGpuService()
    completion = Completion(instrument_services([service, Health()], metrics))
    socket_path = str(tmp_path / "g.sock")

    async def scenario() -> None:
        server = Server(completion.servables())
        await server.start(path=socket_path)
        channel = Channel(path=socket_path)
        try:
            stub = GpuServiceStub(channel)
            await stub.GetGpu(gpu_pb2.GetGpuRequest(name="GPU-1"))
            await stub.ListGpus(gpu_pb2.ListGpusRequest())
            for name in ("GPU-2", "GPU-3"):
                with pytest.raises(GRPCError) as not_found:
                    await stub.GetGpu(gpu_pb2.GetGpuRequest(name=name))
                assert not_found.value.status is Status.NOT_FOUND
            with pytest.raises(GRPCError) as aborted:
                await stub.UpdateGpu(gpu_pb2.UpdateGpuRequest())
            assert aborted.value.status is Status.ABORTED
            with pytest.raises(GRPCError) as unknown:
                await stub.DeleteGpu(gpu_pb2.DeleteGpuRequest(name="GPU-1"))
            assert unknown.value.status is Status.UNKNOWN
            with pytest.raises(GRPCError) as no_reply:
                await stub.CreateGpu(gpu_pb2.CreateGpuRequest())
            assert no_reply.value.status is Status.UNKNOWN
            # The server's own deadline must end the call: wait for the handler to finish
            # before the client gives up (its reset would race the deadline: CANCELLED).
            with pytest.raises((GRPCError, asyncio.TimeoutError)):
                async with stub.UpdateGpuStatus.open(timeout=0.05) as late_call:
                    await late_call.send_message(gpu_pb2.UpdateGpuStatusRequest(), end=True)
                    await completion.wait_finished("UpdateGpuStatus", 1)
                    await late_call.recv_message()

            events = await stub.WatchGpus(gpu_pb2.WatchGpusRequest())
            assert [e.type for e in events] == ["ADDED", "ADDED"]

            async with stub.WatchGpus.open() as call:
                await call.send_message(
                    gpu_pb2.WatchGpusRequest(opts=gpu_pb2.ListOptions(resource_version="hang")),
                    end=True,
                )
                await call.recv_message()
                await service.watch_started.wait()
                await call.cancel()

            health = HealthStub(channel)
            reply = await health.Check(HealthCheckRequest(service=""))
            assert reply.status == HealthCheckResponse.SERVING
            with pytest.raises(GRPCError) as unknown_service:
                await health.Check(HealthCheckRequest(service="no.such.Service"))
            assert unknown_service.value.status is Status.NOT_FOUND

            for method, count in [("GetGpu", 3), ("ListGpus", 1), ("UpdateGpu", 1),
                                  ("DeleteGpu", 1), ("CreateGpu", 1), ("UpdateGpuStatus", 1),
                                  ("WatchGpus", 2), ("/grpc.health.v1.Health/Check", 2)]:
                await completion.wait_finished(method, count)
        finally:
            channel.close()
            server.close()
            await server.wait_closed()

    with trio.fail_after(10):
        await trio_asyncio.aio_as_trio(scenario)()

    m = metrics
    assert sample(m, "grpc_server_started_total", "GetGpu") == 3
    assert handled(m, "GetGpu", "OK") == 1
    assert handled(m, "GetGpu", "NOT_FOUND") == 2
    assert handled(m, "ListGpus", "OK") == 1
    assert handled(m, "UpdateGpu", "ABORTED") == 1
    assert handled(m, "UpdateGpu", "OK") == 0
    assert handled(m, "DeleteGpu", "UNKNOWN") == 1
    assert handled(m, "CreateGpu", "UNKNOWN") == 1
    assert handled(m, "UpdateGpuStatus", "DEADLINE_EXCEEDED") == 1
    assert sample(m, "grpc_server_started_total", "WatchGpus", "server_stream") == 2
    assert handled(m, "WatchGpus", "OK", "server_stream") == 1
    assert handled(m, "WatchGpus", "CANCELLED", "server_stream") == 1
    health = "grpc.health.v1.Health"
    assert handled(m, "Check", "OK", service=health) == 1
    assert handled(m, "Check", "NOT_FOUND", service=health) == 1
    assert sample(m, "grpc_server_handling_seconds_count", "GetGpu") == 3
    assert sample(m, "grpc_server_handling_seconds_count", "WatchGpus", "server_stream") == 2
    # the 50 ms deadline: observed above 25 ms, and within the 10 s top bucket
    late = "UpdateGpuStatus"
    assert sample(m, "grpc_server_handling_seconds_bucket", late, le="0.025") == 0
    assert sample(m, "grpc_server_handling_seconds_bucket", late, le="10.0") == 1
    # every (method, code) series exists, so a first error is a visible increase from 0
    assert handled(m, "DeleteGpu", "DATA_LOSS") == 0
    assert handled(m, "Watch", "OK", "server_stream", service=health) == 0


async def test_instrumented_service_keeps_paths_and_service_name() -> None:
    metrics = ServerMetrics(CollectorRegistry(), version="t", node="n")
    service = TinyGpuService()
    instrumented = InstrumentedService(service, metrics)
    original = service.__mapping__()
    wrapped = instrumented.__mapping__()
    assert list(wrapped) == list(original)
    for path, handler in wrapped.items():
        assert handler.cardinality is original[path].cardinality
        assert handler.request_type is original[path].request_type
        assert handler.reply_type is original[path].reply_type
        assert handler.func is not original[path].func
    assert instrumented.service is service

