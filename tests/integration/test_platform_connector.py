"""SPEC §7.2 end to end: NVSentinel-monitor-shaped grpcio clients on ``--platform-connector-socket``
while a §1 client (our grpclib client, on the main socket) sees the resulting conditions.

The monitor side is what NVIDIA's gpu-health-monitor runs: grpcio, stubs generated at test time
by ``grpc_tools.protoc --grpc_python_out`` from our ``datamodels/health_event.proto`` (the
messages are the committed ``datamodels`` classes: protobuf keeps one copy of a file per
process), events with entities ``GPU`` (DCGM index) + ``PCI`` + ``GPU_UUID`` and one errorCode,
and node-level ``GpuDcgmConnectivityFailure`` events with no entity. Calls run in worker threads
with a deadline, so a wedged call fails the test instead of hanging it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.resources
import logging
import os
import stat
import sys
import types
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio
from _sockets import open_sockets, wait_sockets_closed
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_tools import protoc
from grpclib.health.v1 import health_pb2

from deviceapi._app import Runtime
from deviceapi.client import DeviceApiClient
from deviceapi.proto.datamodels import health_event_pb2 as pb
from deviceapi.proto.device.v1alpha1 import gpu_pb2
from deviceapi.testing.runtime import (
    make_test_config,
    open_client,
    open_test_runtime,
    run_aio,
    wait_until,
)

PROTO_ROOT = Path(__file__).resolve().parents[2] / "src" / "deviceapi" / "proto"
DEADLINE = 10.0
GPUS = ("GPU-0a000000-0000-4000-8000-000000000001", "GPU-0b000000-0000-4000-8000-000000000002",
        "GPU-0c000000-0000-4000-8000-000000000003")
A, B, C = GPUS
STRANGER = "GPU-0f000000-0000-4000-8000-00000000000f"
EVENTS_METRIC = "device_api_server_platform_connector_events_total"


@pytest.fixture(scope="module")
def stub_module(tmp_path_factory: pytest.TempPathFactory) -> types.ModuleType:
    """grpcio's generated ``health_event_pb2_grpc``, as a monitor builds it."""
    out = tmp_path_factory.mktemp("datamodels-grpcio")
    include = importlib.resources.files("grpc_tools") / "_proto"
    code = protoc.main(["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out}",
                        f"--grpc_python_out={out}", "datamodels/health_event.proto"])
    assert code == 0
    assert "datamodels" not in sys.modules
    sys.path.insert(0, str(out))
    try:
        module = importlib.import_module("datamodels.health_event_pb2_grpc")
    finally:
        sys.path.remove(str(out))
        for name in [n for n in sys.modules if n == "datamodels" or n.startswith("datamodels.")]:
            del sys.modules[name]
    return module


class Monitor:
    """A gpu-health-monitor-shaped client: one grpcio channel to the platform-connector socket."""

    def __init__(self, stubs: types.ModuleType, channel: grpc.Channel) -> None:
        self.stub = stubs.PlatformConnectorStub(channel)
        self._health = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString)

    async def send(self, *events: pb.HealthEvent, key: str = "") -> None:
        metadata = [("idempotency-key", key)] if key else None
        request = pb.HealthEvents(version=1, events=events)
        await trio.to_thread.run_sync(functools.partial(
            self.stub.HealthEventOccurredV1, request, timeout=DEADLINE, metadata=metadata))

    async def refused(self, code: grpc.StatusCode, *events: pb.HealthEvent) -> str:
        with pytest.raises(grpc.RpcError) as info:
            await self.send(*events)
        error: Any = info.value
        assert error.code() == code, f"{error.code()}: {error.details()}"
        message: str = error.details()
        assert "\n" not in message
        return message

    async def health(self, service: str) -> int:
        reply = await trio.to_thread.run_sync(functools.partial(
            self._health, health_pb2.HealthCheckRequest(service=service), timeout=DEADLINE))
        status: int = reply.status
        return status


def stamp(seconds: int) -> Timestamp:
    return Timestamp(seconds=seconds)


def gpu_event(index: int, check: str, *, code: str = "", healthy: bool = False,
              action: int = pb.NONE, at: int = 1_700_000_000, uuid: str | None = None,
              with_uuid: bool = True, **fields: Any) -> pb.HealthEvent:
    """As gpu-health-monitor builds it: GPU index + PCI + GPU_UUID, isFatal iff an action."""
    entities = [pb.Entity(entityType="GPU", entityValue=str(index)),
                pb.Entity(entityType="PCI", entityValue=f"0000:{0x17 + index:02x}:00.0")]
    if with_uuid:
        entities.append(pb.Entity(entityType="GPU_UUID", entityValue=uuid or GPUS[index]))
    return pb.HealthEvent(
        version=1, agent="gpu-health-monitor", componentClass="GPU", checkName=check,
        isFatal=not healthy and action != pb.NONE, isHealthy=healthy,
        message=f"GPU {check} watch reported no errors" if healthy else f"{code} on GPU {index}",
        recommendedAction=action, errorCode=[code] if code else [], entitiesImpacted=entities,
        generatedTimestamp=stamp(at), nodeName="node-1", metadata={"chassis_serial": "1234"},
        **fields)


def dcgm_unreachable(*, healthy: bool = False, at: int = 1_700_000_500) -> pb.HealthEvent:
    """The monitor's node-level event when DCGM cannot be reached (no entity at all)."""
    return pb.HealthEvent(
        version=1, agent="gpu-health-monitor", componentClass="GPU",
        checkName="GpuDcgmConnectivityFailure", isFatal=not healthy, isHealthy=healthy,
        message="DCGM connectivity reported no errors" if healthy else "Failed to connect to DCGM",
        recommendedAction=pb.NONE if healthy else pb.CONTACT_SUPPORT,
        errorCode=[] if healthy else ["GPU_DCGM_CONNECTIVITY_ERROR"],
        generatedTimestamp=stamp(at), nodeName="node-1")


@asynccontextmanager
async def serving(tmp_path: Path, stubs: types.ModuleType, **overrides: Any,
                  ) -> AsyncIterator[tuple[Runtime, Monitor, DeviceApiClient]]:
    """A server holding three GPUs (registered by an NVML-like provider), a monitor on the
    platform-connector socket and a §1 client on the main socket."""
    overrides.setdefault("min_gpus", 0)
    config = make_test_config(tmp_path, platform_connector_socket=str(
        tmp_path / "nvsentinel" / "platform-connector.sock"), **overrides)
    async with open_test_runtime(config) as runtime, \
            open_client(runtime, provider_id="nvml") as client:
        for name in GPUS:
            await run_aio(client.create, gpu_pb2.Gpu(
                metadata=gpu_pb2.ObjectMeta(name=name), spec=gpu_pb2.GpuSpec(uuid=name),
                status=gpu_pb2.GpuStatus(conditions=[
                    gpu_pb2.Condition(type="NVMLReady", status="True", reason="Initialized")])))
        before = open_sockets()
        channel = grpc.insecure_channel(f"unix://{config.platform_connector_socket}")
        try:
            yield runtime, Monitor(stubs, channel), client
        finally:
            channel.close()
            await wait_sockets_closed(before)


async def condition(client: DeviceApiClient, name: str, check: str) -> gpu_pb2.Condition | None:
    gpu = await run_aio(client.get, name)
    return next((c for c in gpu.status.conditions if c.type == check), None)


async def action(client: DeviceApiClient, name: str) -> str:
    gpu = await run_aio(client.get, name)
    value: str = gpu.status.recommended_action
    return value


def counted(runtime: Runtime, outcome: str) -> float:
    value = runtime.metrics.registry.get_sample_value(EVENTS_METRIC, {"outcome": outcome})
    return value or 0.0


# ---- one test per event kind ---------------------------------------------------------------------


async def test_fatal_event_marks_the_named_gpu_and_sets_its_action(
        tmp_path: Path, stub_module: types.ModuleType) -> None:
    with trio.fail_after(30):
        async with serving(tmp_path, stub_module) as (runtime, monitor, client):
            await monitor.send(gpu_event(1, "GpuMemWatch", code="DCGM_FR_VOLATILE_DBE_DETECTED",
                                         action=pb.COMPONENT_RESET, at=1_700_000_123))
            # acknowledged → committed: a read that starts now sees it (no waiting)
            found = await condition(client, B, "GpuMemWatch")
            assert found is not None
            assert (found.status, found.reason, found.message) == (
                "False", "DCGM_FR_VOLATILE_DBE_DETECTED", "DCGM_FR_VOLATILE_DBE_DETECTED on GPU 1")
            assert found.last_transition_time.seconds == 1_700_000_123
            assert await action(client, B) == "COMPONENT_RESET"
            assert await condition(client, A, "GpuMemWatch") is None
            assert (counted(runtime, "received"), counted(runtime, "applied")) == (1, 1)


async def test_non_fatal_event_is_a_warning(tmp_path: Path, stub_module: types.ModuleType,
                                            ) -> None:
    with trio.fail_after(30):
        async with serving(tmp_path, stub_module) as (_, monitor, client):
            await monitor.send(gpu_event(0, "GpuThermalWatch",
                                         code="DCGM_FR_CLOCK_THROTTLE_THERMAL"))
            found = await condition(client, A, "GpuThermalWatch")
            assert found is not None
            assert (found.status, found.reason) == ("True", "DCGM_FR_CLOCK_THROTTLE_THERMAL")
            assert await action(client, A) == ""


async def test_healthy_event_recovers_and_clears_the_action(
        tmp_path: Path, stub_module: types.ModuleType) -> None:
    with trio.fail_after(30):
        async with serving(tmp_path, stub_module) as (_, monitor, client):
            await monitor.send(gpu_event(2, "GpuPcieWatch", code="DCGM_FR_PCI_REPLAY_RATE",
                                         action=pb.RESTART_VM))
            assert await action(client, C) == "RESTART_VM"
            await monitor.send(gpu_event(2, "GpuPcieWatch", healthy=True, at=1_700_000_900))
            found = await condition(client, C, "GpuPcieWatch")
            assert found is not None
            assert (found.status, found.reason, found.last_transition_time.seconds) == (
                "True", "Healthy", 1_700_000_900)
            assert await action(client, C) == ""


async def test_node_level_dcgm_outage_turns_the_check_unknown_on_every_gpu(
        tmp_path: Path, stub_module: types.ModuleType) -> None:
    with trio.fail_after(30):
        async with serving(tmp_path, stub_module) as (runtime, monitor, client):
            await monitor.send(dcgm_unreachable())
            for name in GPUS:
                found = await condition(client, name, "GpuDcgmConnectivityFailure")
                assert found is not None
                assert (found.status, found.reason) == ("Unknown", "GPU_DCGM_CONNECTIVITY_ERROR")
                assert await action(client, name) == ""  # node-level never sets it
            metrics = runtime.metrics.registry
            runtime.metrics.refresh()
            assert metrics.get_sample_value("device_api_server_cache_gpus_unknown") == 3
            await monitor.send(dcgm_unreachable(healthy=True))
            for name in GPUS:
                found = await condition(client, name, "GpuDcgmConnectivityFailure")
                assert found is not None and (found.status, found.reason) == ("True", "Healthy")


async def test_store_only_is_counted_not_applied(tmp_path: Path, stub_module: types.ModuleType,
                                                 ) -> None:
    with trio.fail_after(30):
        async with serving(tmp_path, stub_module) as (runtime, monitor, client):
            rv = runtime.core.store.state.rv
            await monitor.send(gpu_event(0, "GpuMemWatch", code="X", action=pb.RESTART_BM,
                                         processingStrategy=pb.STORE_ONLY))
            assert runtime.core.store.state.rv == rv
            assert await condition(client, A, "GpuMemWatch") is None
            assert counted(runtime, "store_only") == 1


async def test_unresolvable_gpus_are_counted_and_logged_never_invented(
        tmp_path: Path, stub_module: types.ModuleType, caplog: pytest.LogCaptureFixture) -> None:
    with trio.fail_after(30):
        async with serving(tmp_path, stub_module) as (runtime, monitor, client):
            caplog.set_level(logging.WARNING, logger="deviceapi.ingest")
            await monitor.send(
                gpu_event(0, "GpuMemWatch", code="X", action=pb.RESTART_VM, with_uuid=False),
                gpu_event(3, "GpuMemWatch", code="X", action=pb.RESTART_VM, uuid=STRANGER))
            assert sorted(await run_aio(_names, client)) == sorted(GPUS)
            assert await condition(client, A, "GpuMemWatch") is None
            assert counted(runtime, "unresolved_index_or_pci") == 1
            assert counted(runtime, "unresolved_unknown_uuid") == 1
            lines = [r for r in caplog.records
                     if r.getMessage() == "health event names no GPU this server holds"]
            assert [(r.reason, r.check) for r in lines] == [  # type: ignore[attr-defined]
                ("index_or_pci_only", "GpuMemWatch"), ("unknown_uuid", "GpuMemWatch")]


async def _names(client: DeviceApiClient) -> list[str]:
    listed = await client.list()
    return [g.metadata.name for g in listed.items]


async def test_recommended_action_across_checks_and_nvsentinel_versions(
        tmp_path: Path, stub_module: types.ModuleType) -> None:
    with trio.fail_after(30):
        async with serving(tmp_path, stub_module) as (_, monitor, client):
            await monitor.send(gpu_event(0, "GpuMemWatch", code="E1", action=pb.COMPONENT_RESET))
            await monitor.send(gpu_event(0, "GpuNvlinkWatch", code="E2", action=77))  # newer enum
            assert await action(client, A) == "77"
            await monitor.send(gpu_event(0, "SyslogXid", code="79", action=pb.CUSTOM,
                                         customRecommendedAction="drain, then reseat the GPU"))
            assert await action(client, A) == "drain, then reseat the GPU"
            await monitor.send(gpu_event(0, "SyslogXid", healthy=True),
                               gpu_event(0, "GpuNvlinkWatch", healthy=True))
            assert await action(client, A) == "COMPONENT_RESET"
            await monitor.send(gpu_event(0, "GpuMemWatch", healthy=True))
            assert await action(client, A) == ""


# ---- refusals: whole batches ---------------------------------------------------------------------


async def test_bad_input_is_refused_whole_with_invalid_argument(
        tmp_path: Path, stub_module: types.ModuleType) -> None:
    with trio.fail_after(30):
        async with serving(tmp_path, stub_module) as (runtime, monitor, _):
            rv = runtime.core.store.state.rv
            message = await monitor.refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                gpu_event(0, "GpuMemWatch", code="X", action=pb.RESTART_VM),
                gpu_event(1, "Gpu\nMemWatch", code="X", action=pb.RESTART_VM))
            assert message.startswith("events[1]: condition type")
            assert "checkName is required" in await monitor.refused(
                grpc.StatusCode.INVALID_ARGUMENT, gpu_event(0, ""))
            assert runtime.core.store.state.rv == rv  # nothing of either batch applied
            assert counted(runtime, "rejected") == 3


async def test_batch_past_max_conditions_is_refused_whole(
        tmp_path: Path, stub_module: types.ModuleType) -> None:
    with trio.fail_after(30):
        async with serving(tmp_path, stub_module, max_conditions=3) as (runtime, monitor, _):
            rv = runtime.core.store.state.rv
            await monitor.refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                *(gpu_event(0, f"Check{i}", code="X", action=pb.RESTART_VM) for i in range(2)),
                *(gpu_event(1, f"Check{i}", code="X", action=pb.RESTART_VM) for i in range(3)))
            assert runtime.core.store.state.rv == rv


# ---- Done when: a monitor retrying with an idempotency key, while §1 watches ------------------


async def test_monitor_retries_with_an_idempotency_key_while_a_section_1_watch_sees_each_change(
        tmp_path: Path, stub_module: types.ModuleType) -> None:
    with trio.fail_after(30):
        async with serving(tmp_path, stub_module) as (runtime, monitor, client):
            listed = await run_aio(client.list)
            events: list[tuple[str, str, str]] = []

            async def watch(task_status: trio.TaskStatus[None]) -> None:
                async def consume() -> None:
                    since = int(listed.metadata.resource_version)
                    async for item in client.watch(since):
                        found = [c for c in item.object.status.conditions
                                 if c.type == "GpuMemWatch"]
                        events.append((item.type, item.object.metadata.name,
                                       found[0].status if found else "-"))

                task_status.started()
                await run_aio(consume)

            async with trio.open_nursery() as nursery:
                await nursery.start(watch)
                batch = (gpu_event(0, "GpuMemWatch", code="E", action=pb.COMPONENT_RESET),
                         gpu_event(1, "GpuMemWatch", code="E", action=pb.COMPONENT_RESET))
                await monitor.send(*batch, key="batch-0001")
                await monitor.send(gpu_event(0, "GpuMemWatch", healthy=True), key="batch-0002")
                # batch-0001's ack was lost: the monitor retries it, late. Applied again, it
                # would turn A False once more.
                await monitor.send(*batch, key="batch-0001")
                await monitor.send(gpu_event(2, "GpuMemWatch", code="E", action=pb.RESTART_VM),
                                   key="batch-0003")
                await wait_until(lambda: len(events) >= 4)
                nursery.cancel_scope.cancel()
            assert events == [("MODIFIED", A, "False"), ("MODIFIED", B, "False"),
                              ("MODIFIED", A, "True"), ("MODIFIED", C, "False")]
            assert counted(runtime, "duplicate") == 2
            found = await condition(client, A, "GpuMemWatch")
            assert found is not None and found.status == "True"


# ---- the socket itself --------------------------------------------------------------------------


async def test_socket_serves_health_and_is_removed_on_shutdown(
        tmp_path: Path, stub_module: types.ModuleType) -> None:
    with trio.fail_after(30):
        async with serving(tmp_path, stub_module) as (runtime, monitor, _):
            path = runtime.config.platform_connector_socket
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
            serving_status = health_pb2.HealthCheckResponse.SERVING
            assert await monitor.health("") == serving_status
            assert await monitor.health("datamodels.PlatformConnector") == serving_status
            assert runtime.metrics.registry.get_sample_value(
                "grpc_server_handled_total",
                {"grpc_type": "unary", "grpc_service": "datamodels.PlatformConnector",
                 "grpc_method": "HealthEventOccurredV1", "grpc_code": "OK"}) == 0
            await runtime.shutdown()
        assert not await trio.Path(path).exists()


# ---- examples/nvsentinel_monitor.py ----------------------------------------------------------

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "nvsentinel_monitor.py"


async def test_example_monitor_marks_a_gpu_and_recovers_it(
        tmp_path: Path, stub_module: types.ModuleType) -> None:
    with trio.fail_after(60):
        async with serving(tmp_path, stub_module) as (runtime, _, client):
            argv = [sys.executable, str(EXAMPLE), "--socket",
                    runtime.config.platform_connector_socket, "--gpu-uuid", B, "--gpu-index", "1"]
            for extra, status in ((["--fatal"], "False"), (["--healthy"], "True")):
                result = await trio.run_process([*argv, *extra], capture_stdout=True,
                                                capture_stderr=True, check=False)
                assert result.returncode == 0, result.stderr.decode()
                assert result.stdout.decode().startswith("ok GpuMemWatch ")
                found = await condition(client, B, "GpuMemWatch")
                assert found is not None and found.status == status
            result = await trio.run_process([*argv[:4], "--gpu-uuid", "gpu-1"],
                                            capture_stdout=True, capture_stderr=True, check=False)
            # a name that is no GPU UUID resolves to nothing: counted, not an error
            assert result.returncode == 0 and counted(runtime, "unresolved_unknown_uuid") == 1
            result = await trio.run_process([*argv, "--check", "bad\tcheck"], capture_stdout=True,
                                            capture_stderr=True, check=False)
            assert result.returncode == 1
            assert result.stderr.decode().startswith("nvsentinel_monitor: INVALID_ARGUMENT: ")
