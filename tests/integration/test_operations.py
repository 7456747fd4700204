"""Operations against a running server: /metrics values during a scenario, /readyz flips, and
heartbeat timeout + recovery seen by a watcher."""

from __future__ import annotations

import asyncio

import pytest
import trio
import trio.testing
from _gpus import GPU_A, GPU_B, GPU_C, gpu
from grpclib.exceptions import GRPCError
from prometheus_client.parser import text_string_to_metric_families

from deviceapi.actors import _store as ops
from deviceapi.client import DeviceApiClient
from deviceapi.proto.device.v1alpha1 import gpu_pb2 as pb
from deviceapi.testing.runtime import (
    make_test_config,
    open_client,
    open_test_runtime,
    run_aio,
    wait_until,
)


async def http_get(port: int, path: str) -> tuple[int, str]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                              .encode())
        data = b""
        while chunk := await stream.receive_some():
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_follow_a_scenario(tmp_path: object) -> None:
    async with open_test_runtime(make_test_config(tmp_path, watch_queue=4)) as rt, \
            open_client(rt, provider_id="p1") as client:
        port = rt.http_ports.metrics

        async def scenario(c: DeviceApiClient) -> None:
            await c.create(gpu(GPU_A, ("Ready", "True")))
            await c.create(gpu(GPU_B, ("Ready", "False")))
            await c.create(gpu(GPU_C, ("Ready", "Unknown")))
            await c.update_status(GPU_A, pb.GpuStatus(
                conditions=[pb.Condition(type="Ready", status="True", reason="again")]))
            for call in (c.get("GPU-0f"), c.update_status(GPU_A, pb.GpuStatus(), 999)):
                with pytest.raises(GRPCError):
                    await call

        await run_aio(scenario, client)
        _, text = await http_get(port, "/metrics")
        m = samples(text)
        p = "device_api_server_"
        assert value(m, p + "cache_gpus_total") == 3
        assert value(m, p + "cache_gpus_healthy") == 1
        assert value(m, p + "cache_gpus_unhealthy") == 1
        assert value(m, p + "cache_gpus_unknown") == 1
        assert value(m, p + "cache_resource_version") == rt.core.store.version_base + 4
        assert value(m, p + "cache_updates_total", operation="create") == 3
        assert value(m, p + "cache_updates_total", operation="update_status") == 1
        assert value(m, p + "provider_sessions_active") == 1
        assert value(m, p + "readiness_state", state="READY") == 1
        svc = "nvidia.device.v1alpha1.GpuService"
        handled = "grpc_server_handled_total"
        assert value(m, handled, grpc_type="unary", grpc_service=svc, grpc_method="GetGpu",
                     grpc_code="NOT_FOUND") == 1  # "GPU-0f" is a valid name that is absent
        assert value(m, handled, grpc_type="unary", grpc_service=svc,
                     grpc_method="UpdateGpuStatus", grpc_code="ABORTED") == 1
        assert value(m, handled, grpc_type="unary", grpc_service=svc, grpc_method="CreateGpu",
                     grpc_code="OK") == 3
        assert value(m, p + "requests_rejected_total", reason="aborted") == 1

        # a watch stream is active while it runs, and events are counted
        async def watch_two() -> None:
            n = 0
            async for _ in client.watch():
                n += 1
                if n == 3:
                    _, during = await _aio_http(port)
                    assert value(samples(during), p + "watch_streams_active") == 1
                    return

        await run_aio(watch_two)
        _, after = await http_get(port, "/metrics")
        assert value(samples(after), p + "watch_events_total", type="ADDED") == 3


async def _aio_http(port: int) -> tuple[int, str]:
    """The same GET from asyncio code (inside a client scenario)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


async def test_readyz_flips_at_the_gate_and_at_shutdown(tmp_path: object) -> None:
    async with open_test_runtime(make_test_config(tmp_path, min_gpus=1)) as rt:
        port = rt.http_ports.health
        status, body = await http_get(port, "/readyz")
        assert (status, body.strip()) == (503, "server initializing, waiting for GPU providers")
        assert (await http_get(port, "/healthz"))[0] == 200
        await rt.core.store.write(ops.CreateGpu(gpu(GPU_A)))
        assert (await http_get(port, "/readyz"))[0] == 200
        rt.core.gate.begin_shutdown()
        status, body = await http_get(port, "/readyz")
        assert (status, body.strip()) == (503, "server shutting down")
        assert (await http_get(port, "/livez"))[0] == 200


async def test_heartbeat_timeout_marks_unknown_and_recovery_restores(
    tmp_path: object, mock_clock: trio.testing.MockClock
) -> None:
    mock_clock.autojump_threshold = 0.1
    config = make_test_config(tmp_path, heartbeat_timeout=30.0)
    async with open_test_runtime(config) as rt, open_client(rt) as client:
        events: list[pb.WatchGpusResponse] = []

        async def setup(c: DeviceApiClient) -> None:
            ready = pb.GpuStatus(conditions=[pb.Condition(type="Ready", status="True",
                                                          reason="ProviderSaysOk")])
            await c.register_gpu(name=GPU_A, provider_id="nvml", status=ready)
            await c.register_gpu(name=GPU_B, provider_id="nvml", status=ready)
            await c.register_gpu(name=GPU_C, provider_id="dcgm", status=ready)
            await c.heartbeat(provider_id="nvml", gpu_names=[GPU_A, GPU_B])

        async def watch(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            async def collect() -> None:
                async for event in client.watch():
                    events.append(event)

            task_status.started()
            await run_aio(collect)

        await run_aio(setup, client)
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            await nursery.start(watch)
            with trio.fail_after(120):
                # 3 ADDED, then one MODIFIED per nvml GPU
                await wait_until(lambda: len(events) == 3 + 2, poll=0.5)
            elapsed = trio.current_time() - start
            assert 30.0 <= elapsed <= 32.0
            modified = events[3:]
            assert sorted(e.object.metadata.name for e in modified) == [GPU_A, GPU_B]
            for e in modified:
                ready = e.object.status.conditions[0]
                assert (ready.type, ready.status, ready.reason) == (
                    "Ready", "Unknown", "ProviderHeartbeatTimeout")
            dcgm = rt.core.store.state.gpus[GPU_C]
            assert dcgm.status.conditions[0].status == "True"  # other providers untouched

            await run_aio(client.heartbeat, provider_id="nvml", gpu_names=[])
            with trio.fail_after(10):
                await wait_until(lambda: len(events) == 7)
            restored = events[5:]
            for e in restored:
                ready = e.object.status.conditions[0]
                assert (ready.status, ready.reason) == ("True", "ProviderSaysOk")
            nursery.cancel_scope.cancel()
        assert rt.core.sessions.statistics().heartbeat_timeouts == 1
