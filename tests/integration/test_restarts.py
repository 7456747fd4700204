"""Restarts (SPEC §2, issue 14 item 1): versions never repeat across incarnations.

State is in memory, so a restarted server starts empty. Its counter used to restart at 0 too:
a client holding version 4 from before the restart could then overwrite a provider's fresh
False with a conditional write at version 4, and a watch resumed from an old version was
accepted and streamed a *different* history. Now every incarnation starts above anything an
earlier one issued, so any version from before a restart is refused.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
from _gpus import GPU_A, GPU_B, GPU_C, gpu
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from test_shutdown import free_port, wait_http

from deviceapi.actors.cache_owner import wall_clock_version_base
from deviceapi.client import DeviceApiClient
from deviceapi.client.informer import Informer
from deviceapi.proto.device.v1alpha1 import gpu_pb2 as pb
from deviceapi.testing.runtime import (
    make_test_config,
    open_aio_loop,
    open_client,
    open_test_runtime,
    run_aio,
    wait_until,
)


def status(kind: str, value: str, reason: str = "") -> pb.GpuStatus:
    return pb.GpuStatus(conditions=[pb.Condition(type=kind, status=value, reason=reason)])


def test_the_version_base_is_the_wall_clock_in_microseconds() -> None:
    before = time.time_ns() // 1000
    base = wall_clock_version_base()
    assert before <= base <= time.time_ns() // 1000
    assert base < 2**53  # exact in a double (JSON clients) until the year 2255


async def test_versions_from_before_a_restart_are_refused(tmp_path: Path) -> None:
    config = make_test_config(tmp_path, min_gpus=0)
    async with open_test_runtime(config) as first, open_client(first) as client:
        await run_aio(client.create, gpu(GPU_A, ("NVMLReady", "True")))
        for i in range(3):
            await run_aio(client.update_status, GPU_A, status("NVMLReady", "True", f"r{i}"))
        kept = (await run_aio(client.get, GPU_A)).resource_version  # what a client holds
        listed = int((await run_aio(client.list)).metadata.resource_version)
        first_versions = {kept, listed}
    # kill and restart: a new incarnation on the same socket
    async with open_test_runtime(config) as second, open_client(second) as client:
        base = second.core.store.version_base
        assert base > max(first_versions)
        # The provider re-registers GPU_A: it is now critical.
        await run_aio(client.register_gpu, name=GPU_A, provider_id="nvml",
                      status=status("NVMLReady", "False", "XidCritical"))
        # Writes until the counter passes the old versions (it used to, restarting at 0).
        for i in range(10):
            current = await run_aio(client.get, GPU_A)
            if current.resource_version > kept and second.core.store.state.rv > listed:
                break
            await run_aio(client.update_condition, name=GPU_A, provider_id="dcgm",
                          condition=pb.Condition(type="DCGM", status="True", reason=f"{i}"))
        assert current.resource_version != kept
        # A conditional write with the old version is refused: the provider's False stays.
        with pytest.raises(GRPCError) as conflict:
            await run_aio(client.update_status, GPU_A, status("NVMLReady", "True"), kept)
        assert conflict.value.status == Status.ABORTED
        after = await run_aio(client.get, GPU_A)
        assert [(c.type, c.status) for c in after.status.conditions
                if c.type == "NVMLReady"] == [("NVMLReady", "False")]

        # A watch resumed from the old list's version is refused: relist.
        async def resume_old() -> None:
            async for _ in client.watch(listed):
                pass

        with pytest.raises(GRPCError) as refused:
            await run_aio(resume_old)
        assert refused.value.status == Status.OUT_OF_RANGE
        assert "relist" in (refused.value.message or "")
        assert all(g.resource_version > base for g in second.core.store.state.gpus.values())


# -- a real process killed with SIGKILL while an informer is connected --------------------------


async def _start(sock: str) -> trio.Process:
    health = free_port()
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "deviceapi", "--unix-socket", sock, "--grpc-address", "",
         "--min-gpus", "0", "--health-port", str(health), "--metrics-port", str(free_port()),
         "--log-format", "json"],
        stderr=subprocess.DEVNULL,
    )
    with trio.fail_after(30):
        await wait_http(health, "/readyz", 200)
    return proc


async def test_an_informer_converges_after_the_server_is_killed_and_restarted(
    tmp_path: Path,
) -> None:
    """kill -9 leaves a stale socket; the restarted server replaces it, refuses the informer's
    old version, and the informer relists into exactly the new server's state."""
    sock = str(tmp_path / "run" / "device.sock")
    async with open_aio_loop():
        proc = await _start(sock)
        try:
            client = DeviceApiClient(unix_socket=sock)
            informer = Informer(DeviceApiClient(unix_socket=sock), min_backoff=0.05,
                                max_backoff=0.2)
            applied: list[int] = []
            on_update = informer.on_update

            def track(g: pb.Gpu) -> None:
                applied.append(g.resource_version)
                on_update(g)

            informer.on_update = informer.on_add = track
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_aio, informer.run)
                await run_aio(client.create, gpu(GPU_A, ("Ready", "True")))
                await run_aio(client.create, gpu(GPU_B, ("Ready", "True")))
                for i in range(5):
                    await run_aio(client.update_status, GPU_A, status("Ready", "True", f"{i}"))
                with trio.fail_after(20):
                    await wait_until(lambda: informer.cache.get(GPU_A) is not None
                                     and informer.cache[GPU_A].status.conditions[0].reason
                                     == "4")
                old = informer.resource_version
                proc.kill()  # SIGKILL: no cleanup, the socket file stays behind
                await proc.wait()
                assert await trio.Path(sock).exists()
                proc = await _start(sock)  # replaces the stale socket
                await run_aio(client.create, gpu(GPU_A, ("Ready", "False")))
                await run_aio(client.create, gpu(GPU_C, ("Ready", "True")))
                for i in range(8):  # past the informer's old version, had the counter reset
                    await run_aio(client.update_status, GPU_C, status("Ready", "True", f"{i}"))
                truth = await run_aio(client.list)
                expected = {g.metadata.name: g for g in truth.items}
                with trio.fail_after(20):
                    await wait_until(lambda: informer.cache == expected)
                nursery.cancel_scope.cancel()
            client.close()
            informer.client.close()
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            await proc.wait()
    assert int(truth.metadata.resource_version) > old
    assert GPU_B not in informer.cache  # gone with the old incarnation
    assert informer.relists >= 2
    # Every update applied after the restart is from the new history.
    new = [rv for rv in applied if rv > old]
    assert new and min(new) > old
