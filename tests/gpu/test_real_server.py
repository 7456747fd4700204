"""The server with its embedded NVML provider on a real GPU (marker ``gpu``; skipped without a
driver): a real ``device-api-server`` process registers every GPU ``nvidia-smi`` lists as
``NVMLReady=True`` and goes READY, a grpcio client reads them over the Unix socket, and SIGTERM
ends it promptly with NVML's loopback connection open (the 3.12 shutdown hang of issue 12 showed
here as 8.1 s), in both bridges."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
import trio
from _gpu import DRIVER_ROOT

from deviceapi.nvml_actor import NvmlUnavailable, PynvmlBackend
from deviceapi.proto.device.v1alpha1 import gpu_pb2 as pb

pytestmark = pytest.mark.gpu


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _physical_gpus() -> set[str]:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        pytest.skip("nvidia-smi is not on PATH")
    out = subprocess.run([smi, "-L"], check=True, capture_output=True, text=True).stdout
    return set(re.findall(r"\(UUID: (GPU-[0-9a-fA-F-]+)\)", out))


def _http(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except OSError:
        return 0, ""


@pytest.mark.parametrize("bridge", ["guest", "trio-asyncio"])
async def test_embedded_provider_registers_every_gpu_and_stops_promptly(
        tmp_path: Path, bridge: str) -> None:
    try:
        nvml = PynvmlBackend(DRIVER_ROOT)
        nvml.init()
        nvml.shutdown()
    except NvmlUnavailable as exc:
        pytest.skip(f"no usable NVIDIA driver: {exc}")
    gpus = _physical_gpus()
    sock = str(tmp_path / "device.sock")
    health, metrics = _free_port(), _free_port()
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "deviceapi", "--enable-nvml-provider",
         "--nvml-driver-root", DRIVER_ROOT, "--unix-socket", sock, "--grpc-address", "",
         "--health-port", str(health), "--metrics-port", str(metrics), "--bridge", bridge,
         "--min-gpus", str(len(gpus)), "--shutdown-delay", "0", "--log-format", "text"],
        env={**os.environ, "DEVICE_API_BRIDGE": bridge}, stderr=subprocess.PIPE)
    try:
        t0 = trio.current_time()
        with trio.fail_after(30):
            # another process: nothing to subscribe to
            while (await trio.to_thread.run_sync(_http, health, "/readyz"))[0] != 200:  # noqa: ASYNC110
                await trio.sleep(0.05)
        ready_after = trio.current_time() - t0

        def list_gpus() -> pb.ListGpusResponse:
            with grpc.insecure_channel(f"unix:{sock}") as channel:
                call = channel.unary_unary(
                    "/nvidia.device.v1alpha1.GpuService/ListGpus",
                    request_serializer=pb.ListGpusRequest.SerializeToString,
                    response_deserializer=pb.ListGpusResponse.FromString)
                return call(pb.ListGpusRequest(), timeout=10)  # type: ignore[no-any-return]

        listed = (await trio.to_thread.run_sync(list_gpus)).gpu_list.items
        _, text = await trio.to_thread.run_sync(_http, metrics, "/metrics")
        t1 = trio.current_time()
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            code = await proc.wait()
        stopped_after = trio.current_time() - t1
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.stderr is not None
    stderr = (await proc.stderr.receive_some(1 << 20) or b"").decode()
    print(f"bridge={bridge} gpus={len(gpus)} ready={ready_after:.2f}s stop={stopped_after:.2f}s")
    names = {gpu.metadata.name for gpu in listed}
    assert gpus <= names or any(name.startswith("MIG-") for name in names)
    for gpu in listed:
        ready = {c.type: c for c in gpu.status.conditions}["NVMLReady"]
        assert ready.status == "True" and ready.reason == "Initialized"
    assert "device_api_server_nvml_provider_enabled 1.0" in text
    assert code == 0, stderr
    assert stopped_after < 1.5, f"SIGTERM to exit took {stopped_after:.2f}s"
