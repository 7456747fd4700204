"""The NVML provider end to end (SPEC §5): the poller over the fake NVML backend, talking to a
real in-process server over its Unix socket through the public provider API (TrioProviderClient,
the code path of the embedded provider and of the sidecar); the sidecar's restart loop across a
server restart; the embedded provider and the sidecar process on this machine, without a driver.

Virtual time: ``mock_clock`` with ``autojump_threshold = 0.1`` (real socket I/O must not let the
clock jump). NVML calls run inline, so virtual time moves only through the poller's and the
server's own timers. To show that something did *not* happen, a test lets a bounded window of
virtual time pass after the poller has provably consumed the event (its counters say so), and
checks that the server's resource version did not move.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
from _nvml_helpers import (
    G0,
    G1,
    G2,
    OPTIONS,
    PRODUCTS,
    PROVIDER,
    UnixProxy,
    condition,
    driver_present,
    fake_gpus,
    open_poller,
    open_setup,
    rv,
    summary,
    visible,
    wait_until,
    watching,
)
from grpclib.exceptions import GRPCError, StreamTerminatedError
from prometheus_client.parser import text_string_to_metric_families

from deviceapi import _bridge
from deviceapi._app import Runtime
from deviceapi._config import Config
from deviceapi.client import DeviceApiClient
from deviceapi.client.trio_client import TrioProviderClient
from deviceapi.proto.device.v1alpha1 import gpu_pb2 as pb
from deviceapi.providers.nvml import (
    CONDITION_TYPE,
    FakeNvml,
    NvmlPoller,
    PollerOptions,
    ProviderApi,
)
from deviceapi.providers.nvml.service import run_nvml_provider
from deviceapi.testing import FaultInjector
from deviceapi.testing.runtime import make_test_config, open_client, open_test_runtime, run_aio

ALL = (G0, G1, G2)
XID_79 = "XID 79"
#: A bounded window of virtual time in which nothing more may happen (four wait slices).
QUIET_WINDOW = 2.0

no_driver = pytest.mark.skipif(driver_present(), reason="an NVIDIA driver is present here")


def clock(mock_clock: trio.testing.MockClock) -> None:
    mock_clock.autojump_threshold = 0.1  # jump only when truly idle: real socket I/O is not


async def list_gpus(client: DeviceApiClient) -> list[pb.Gpu]:
    return list((await run_aio(client.list)).items)


# ---- 1. enumeration ------------------------------------------------------------------------


async def test_enumeration_registers_every_gpu_ready(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    clock(mock_clock)
    fake = FakeNvml(fake_gpus())
    async with open_setup(tmp_path, fake) as (rt, client, poller):
        gpus = await list_gpus(client)  # what `device-api list` shows
        assert [g.metadata.name for g in gpus] == list(ALL)
        for gpu, (product, mib) in zip(gpus, PRODUCTS, strict=True):
            assert gpu.spec.uuid == gpu.metadata.name
            ready = [c for c in gpu.status.conditions if c.type == CONDITION_TYPE]
            assert len(ready) == 1
            assert (ready[0].status, ready[0].reason) == ("True", "Initialized")
            assert product in ready[0].message
            assert f"{mib} MiB" in ready[0].message
            assert rt.core.store.state.owners[gpu.metadata.name] == PROVIDER
        stats = poller.statistics()
        assert (stats.enabled, stats.gpus, stats.monitored_gpus) == (True, 3, 3)
        assert rv(rt) == rt.core.store.version_base + 3  # one ADDED each, no extra writes


# ---- 2, 3. one critical XID, one ignored XID -----------------------------------------------


async def test_xid_79_marks_only_that_gpu_and_a_watcher_sees_one_modified(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    clock(mock_clock)
    fake = FakeNvml(fake_gpus())
    async with open_setup(tmp_path, fake) as (rt, client, poller):
        before = rv(rt)
        async with watching(client, before) as events:
            fake.inject_xid(79, 1)
            await wait_until(lambda: len(events) >= 1)
            # the same XID again changes nothing the server would see
            fake.inject_xid(79, 1)
            await wait_until(lambda: poller.statistics().xid_critical == 2)
            await trio.sleep(QUIET_WINDOW)
            assert summary(events) == [("MODIFIED", G1, "False", "XidCritical")]
        assert rv(rt) == before + 1
        ready = condition(rt, G1)
        assert ready is not None and XID_79 in ready.message
        assert visible(rt, G0) == visible(rt, G2) == ("True", "Initialized")


async def test_xid_13_changes_nothing(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    clock(mock_clock)
    fake = FakeNvml(fake_gpus())
    async with open_setup(tmp_path, fake) as (rt, client, poller):
        before = rv(rt)
        async with watching(client, before) as events:
            fake.inject_xid(13, 0)
            fake.inject_xid(13, None)
            await wait_until(lambda: poller.statistics().xid_ignored == 2)
            await trio.sleep(QUIET_WINDOW)
            assert events == []
        assert rv(rt) == before
        assert all(visible(rt, g) == ("True", "Initialized") for g in ALL)


# ---- 4. no device, GPU lost ----------------------------------------------------------------


async def test_event_without_a_device_hits_every_gpu(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    clock(mock_clock)
    fake = FakeNvml(fake_gpus())
    async with open_setup(tmp_path, fake) as (rt, client, poller):
        before = rv(rt)
        async with watching(client, before) as events:
            fake.inject_xid(79, None)
            await wait_until(lambda: len(events) >= 3)
            assert poller.statistics().condition_updates == 3
            await trio.sleep(QUIET_WINDOW)
            assert sorted(summary(events)) == [
                ("MODIFIED", g, "False", "XidCritical") for g in ALL
            ]
        assert rv(rt) == before + 3


async def test_gpu_lost_marks_every_gpu(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    clock(mock_clock)
    fake = FakeNvml(fake_gpus())
    async with open_setup(tmp_path, fake) as (rt, client, poller):
        async with watching(client, rv(rt)) as events:
            fake.lose_gpu(2)
            await wait_until(lambda: len(events) >= 3)
            assert poller.statistics().gpu_lost == 1
            await trio.sleep(QUIET_WINDOW)
            assert sorted(summary(events)) == [
                ("MODIFIED", g, "False", "GPULost") for g in ALL
            ]
        assert all(visible(rt, g) == ("False", "GPULost") for g in ALL)


# ---- 5. other providers' conditions --------------------------------------------------------


def dcgm(state: str) -> pb.Condition:
    return pb.Condition(type="DCGMHealthy", status=state, reason=f"Dcgm{state}",
                        message=f"dcgm says {state}")


async def test_other_providers_condition_survives_and_is_survived(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """dcgm registers G0 first (the poller then finds it present and upserts its condition),
    writes its own condition on G1, and the two providers' updates never erase each other's."""
    clock(mock_clock)
    fake = FakeNvml(fake_gpus(2))
    options = dataclasses.replace(OPTIONS, recovery_quiet_period=1.0)
    config = make_test_config(tmp_path)
    async with open_test_runtime(config) as rt, open_client(rt, provider_id="dcgm") as client:

        def both(name: str) -> tuple[tuple[str, str] | None, tuple[str, str] | None]:
            return visible(rt, name), visible(rt, name, "DCGMHealthy")

        await run_aio(client.register_gpu, name=G0,
                      status=pb.GpuStatus(conditions=[dcgm("True")]))
        async with open_poller(rt, fake, options) as poller:
            assert both(G0) == (("True", "Initialized"), ("True", "DcgmTrue"))
            await run_aio(client.update_condition, name=G1, condition=dcgm("True"))
            assert both(G1) == (("True", "Initialized"), ("True", "DcgmTrue"))

            fake.inject_xid(79, None)  # an NVML update on both
            await wait_until(lambda: visible(rt, G0) == visible(rt, G1) == ("False", "XidCritical"))
            assert both(G0)[1] == both(G1)[1] == ("True", "DcgmTrue")

            for name in (G0, G1):  # the other provider's update on both
                await run_aio(client.update_condition, name=name, condition=dcgm("False"))
                assert both(name) == (("False", "XidCritical"), ("False", "DcgmFalse"))

            # NVML's recovery (another NVML update) keeps dcgm's False
            await wait_until(lambda: visible(rt, G0) == visible(rt, G1) == ("True", "Recovered"))
            assert both(G0)[1] == both(G1)[1] == ("False", "DcgmFalse")
        # a restarted poller re-registers and re-asserts its condition (one more NVML update)
        async with open_poller(rt, fake, options, ledger=poller.ledger) as again:
            assert again.statistics().condition_updates == 2
            for name in (G0, G1):
                assert both(name) == (("True", "Recovered"), ("False", "DcgmFalse"))
                gpu = rt.core.store.state.gpus[name]
                assert sorted(c.type for c in gpu.status.conditions) == [
                    "DCGMHealthy", CONDITION_TYPE]


# ---- 6. recovery ---------------------------------------------------------------------------


async def test_recovery_after_the_quiet_period_and_not_before(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    clock(mock_clock)
    quiet = 1.5
    fake = FakeNvml(fake_gpus(2))
    options = dataclasses.replace(OPTIONS, recovery_quiet_period=quiet)
    async with open_setup(tmp_path, fake, options) as (rt, client, poller), \
            watching(client, rv(rt)) as events:
        fake.inject_xid(79, 0)
        await wait_until(lambda: visible(rt, G0) == ("False", "XidCritical"))
        fault = poller.ledger.get(G0)
        assert fault is not None and fault.last_fault is not None
        faulted = fault.last_fault  # when the poller handled the XID
        await trio.sleep_until(faulted + quiet - 0.1)
        assert visible(rt, G0) == ("False", "XidCritical")  # not before
        await wait_until(lambda: visible(rt, G0) == ("True", "Recovered"), step=0.05)
        assert quiet <= trio.current_time() - faulted <= quiet + 0.5
        ready = condition(rt, G0)
        assert ready is not None and XID_79 in ready.message
        assert summary(events) == [
            ("MODIFIED", G0, "False", "XidCritical"),
            ("MODIFIED", G0, "True", "Recovered"),
        ]
        assert visible(rt, G1) == ("True", "Initialized")


async def test_no_recovery_while_nvml_reports_the_gpu_unhealthy(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    clock(mock_clock)
    quiet = 1.0
    fake = FakeNvml(fake_gpus(1))
    options = dataclasses.replace(OPTIONS, recovery_quiet_period=quiet)
    async with open_setup(tmp_path, fake, options) as (rt, _client, poller):
        fake.set_retired_pages_pending(0, True)
        fake.inject_xid(79, 0)
        await wait_until(lambda: visible(rt, G0) == ("False", "XidCritical"))
        await trio.sleep(2.5 * quiet)  # two probes, both unhealthy
        assert visible(rt, G0) == ("False", "XidCritical")
        assert fake.calls["device_retired_pages_pending"] >= 2
        assert poller.statistics().recoveries == 0
        fake.set_retired_pages_pending(0, False)
        await wait_until(lambda: visible(rt, G0) == ("True", "Recovered"),
                         timeout=2 * quiet + 1)


# ---- 7. heartbeats -------------------------------------------------------------------------


async def test_heartbeats_reach_the_server(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    clock(mock_clock)
    timeout = 1.5
    config = make_test_config(tmp_path, heartbeat_timeout=timeout)
    options = dataclasses.replace(OPTIONS, heartbeat_interval=timeout / 3)
    async with open_test_runtime(config) as rt:
        sessions = rt.core.sessions
        async with open_poller(rt, FakeNvml(fake_gpus(2)), options) as poller:
            await trio.sleep(2 * timeout)
            stats = sessions.statistics()
            assert (stats.active, stats.masked, stats.heartbeat_timeouts) == (1, 0, 0)
            assert sessions.next_deadline() is not None  # it has heartbeated
            assert poller.statistics().heartbeats >= 5
            assert visible(rt, G0, "Ready") is None  # never masked
        # the poller is gone: its heartbeats stop, so its GPUs are masked (what they prevented)
        await wait_until(lambda: sessions.statistics().masked == 1, timeout=2 * timeout)
        assert sessions.statistics().heartbeat_timeouts == 1
        for name in (G0, G1):
            assert visible(rt, name, "Ready") == ("Unknown", "ProviderHeartbeatTimeout")


# ---- 8. the sidecar's service loop across a server restart ---------------------------------

@asynccontextmanager
async def provider_through_proxy(
    tmp_path: Path, config: Config, options: PollerOptions
) -> AsyncIterator[tuple[FakeNvml, UnixProxy, list[NvmlPoller]]]:
    """The sidecar's service loop (run_nvml_provider, its own asyncio loop, outliving servers)
    over a fake with 2 GPUs, reaching the server at ``config.unix_socket`` through a proxy."""
    assert config.unix_socket is not None
    proxy = UnixProxy(str(tmp_path / "proxy.sock"), config.unix_socket)
    fake = FakeNvml(fake_gpus(2))
    pollers: list[NvmlPoller] = []

    async def connect() -> ProviderApi:
        return await TrioProviderClient.connect(unix_socket=proxy.listen_path)

    async with _bridge.open_loop(), trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        await nursery.start(functools.partial(
            run_nvml_provider, lambda: fake, connect, options, on_poller=pollers.append))
        yield fake, proxy, pollers
        nursery.cancel_scope.cancel()
    assert fake.live_event_sets == 0 and not fake.initialised  # every incarnation cleaned up


@asynccontextmanager
async def server(config: Config, proxy: UnixProxy) -> AsyncIterator[Runtime]:
    """An in-process server that, when the block ends, dies as a process would: the provider's
    connections end at once."""
    async with open_test_runtime(config) as rt:
        proxy.down = False
        try:
            yield rt
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await proxy.server_died()


def all_there(rt: Runtime) -> bool:
    return all(visible(rt, g) is not None for g in (G0, G1))


async def first_server_with_g0_unhealthy(config: Config, fake: FakeNvml, proxy: UnixProxy,
                                         pollers: list[NvmlPoller]) -> int:
    """Server #1 gets the GPUs, G0 turns unhealthy, then server #1 dies (connections end);
    returns the proxy's refusals before it died."""
    async with server(config, proxy) as first:
        await wait_until(lambda: all_there(first))
        options = pollers[0].options
        fake.inject_xid(79, 0)  # seen at the poller's next wait slice
        await wait_until(lambda: visible(first, G0) == ("False", "XidCritical"),
                         step=max(0.25, options.wait_slice_ms / 4000))
        assert visible(first, G1) == ("True", "Initialized")
        assert len(pollers) == 1
        # right after a heartbeat, so the next one is a whole interval away
        heartbeats = pollers[0].statistics().heartbeats
        await wait_until(lambda: pollers[0].statistics().heartbeats > heartbeats,
                         step=options.heartbeat_interval / 10)
        return proxy.refused


def check_second_server(second: Runtime) -> None:
    assert visible(second, G0) == ("False", "XidCritical")  # the HealthLedger
    ready = condition(second, G0)
    assert ready is not None and XID_79 in ready.message
    assert visible(second, G1) == ("True", "Initialized")
    assert second.core.store.state.owners[G0] == PROVIDER


async def test_sidecar_survives_a_server_restart(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """run_nvml_provider (the sidecar's loop) keeps going while server #1 stops and, after the
    provider has noticed, server #2 starts on the same socket: the GPUs re-appear, and G0,
    unhealthy before, stays so."""
    clock(mock_clock)
    config = make_test_config(tmp_path)
    options = dataclasses.replace(OPTIONS, heartbeat_interval=1.0)
    async with provider_through_proxy(tmp_path, config, options) as (fake, proxy, pollers):
        await first_server_with_g0_unhealthy(config, fake, proxy, pollers)
        proxy.down = False  # server #1's socket is gone: connections fail all the same
        # its next call fails: the service starts a new poller, which waits for a server
        await wait_until(lambda: len(pollers) == 2, timeout=options.heartbeat_interval + 3)
        async with server(config, proxy) as second:
            await wait_until(lambda: all_there(second), timeout=5)
            check_second_server(second)
            assert len(pollers) == 2  # restarted by the service, not by the test


async def test_sidecar_reregisters_when_the_server_is_back_before_its_next_call(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """Server #2 is up before the provider's next call (a heartbeat interval after its last)."""
    clock(mock_clock)
    config = make_test_config(tmp_path)
    # long slices and heartbeats: few virtual-time deadlines, so a long window stays cheap
    options = dataclasses.replace(OPTIONS, heartbeat_interval=5.0, wait_slice_ms=5000)
    async with provider_through_proxy(tmp_path, config, options) as (fake, proxy, pollers):
        refused = await first_server_with_g0_unhealthy(config, fake, proxy, pollers)
        async with server(config, proxy) as second:
            assert proxy.refused == refused  # no call fell into the restart's gap
            # the provider's next heartbeat reaches server #2 ...
            await wait_until(lambda: second.core.sessions.statistics().active == 1,
                             timeout=options.heartbeat_interval + 1, step=1.0)
            # ... and its GPUs should come back
            await wait_until(lambda: all_there(second), timeout=3.0, step=0.5)
            check_second_server(second)


async def test_a_stopped_server_drops_its_clients_connections(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """What lets the sidecar notice a server restart at once (as when the server's process
    dies): a call on its connection to the stopped server fails promptly."""
    clock(mock_clock)
    config = make_test_config(tmp_path)
    async with _bridge.open_loop():
        api = await TrioProviderClient.connect(unix_socket=config.unix_socket, timeout=30.0)
        try:
            serving, answered = trio.Event(), trio.Event()

            async def first_call() -> None:  # spawned out here: runs in the client's loop
                await serving.wait()
                await api.heartbeat(provider_id="p", gpu_names=[])
                answered.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(first_call)
                async with open_test_runtime(config):
                    serving.set()
                    await answered.wait()
            with trio.fail_after(2.0), pytest.raises(
                (ConnectionError, OSError, StreamTerminatedError, GRPCError)
            ):
                await api.heartbeat(provider_id="p", gpu_names=[])
        finally:
            api.close()


# ---- 9, 10. no driver on this machine: embedded and sidecar --------------------------------


async def http_get(port: int, path: str) -> tuple[int, str]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := await stream.receive_some():
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def metric(text: str, name: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return sample.value
    return None


def unavailable_logged(records: list[logging.LogRecord]) -> bool:
    return any(r.name == "deviceapi.nvml" and r.levelno == logging.WARNING
               and r.getMessage().startswith("NVML unavailable") for r in records)


@no_driver
async def test_embedded_provider_without_a_driver_keeps_the_server_serving(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="deviceapi")
    config = make_test_config(tmp_path, enable_nvml_provider=True,
                              nvml_driver_root=str(tmp_path / "no-driver"))
    async with open_test_runtime(config) as rt, open_client(rt, provider_id="other") as client:
        await wait_until(lambda: unavailable_logged(caplog.records), timeout=10)
        lines = [r for r in caplog.records if r.getMessage().startswith("NVML unavailable")]
        assert len(lines) == 1
        assert "the server keeps serving" in lines[0].getMessage()
        # retried through the providers supervisor (backoff 1 s, then 2 s...): each retry is
        # a counted restart of the nvml child
        await wait_until(lambda: (rt.metrics.registry.get_sample_value(
            "device_api_server_actor_restarts_total", {"actor": "nvml"}) or 0) >= 2, timeout=10)
        status, text = await http_get(rt.http_ports.metrics, "/metrics")
        assert status == 200
        assert metric(text, "device_api_server_nvml_provider_enabled") == 0
        assert metric(text, "device_api_server_nvml_gpu_count") == 0
        assert metric(text, "device_api_server_nvml_health_monitor_running") == 0
        # the server keeps serving: another provider registers, a consumer lists
        assert await run_aio(client.serving, "nvidia.device.v1alpha1.ProviderService")
        await run_aio(client.register_gpu, name=G0)
        assert [g.metadata.name for g in await list_gpus(client)] == [G0]
        assert (await http_get(rt.http_ports.health, "/readyz"))[0] == 200


def sidecar_script() -> str:
    script = Path(sys.executable).parent / "device-api-nvml-provider"
    found = str(script) if script.exists() else shutil.which("device-api-nvml-provider")
    assert found, "the device-api-nvml-provider console script is not installed"
    return found


async def test_sidecar_cli_help() -> None:
    result = await trio.run_process([sidecar_script(), "--help"], capture_stdout=True,
                                    capture_stderr=True)
    out = result.stdout.decode()
    assert out.startswith("usage: device-api-nvml-provider")
    for flag in ("--unix-socket", "--address", "--provider-id", "--nvml-driver-root",
                 "--nvml-health-check", "--nvml-ignored-xids", "--nvml-critical-xids",
                 "--nvml-recovery-quiet-period", "--heartbeat-interval"):
        assert flag in out


@no_driver
async def test_sidecar_process_without_a_driver_logs_and_stops_on_sigterm(
    tmp_path: Path
) -> None:
    async with open_test_runtime(make_test_config(tmp_path)) as rt:
        socket = rt.listeners.unix_socket
        assert socket is not None
        command = [sidecar_script(), "--unix-socket", socket, "--log-format", "text",
                   "--nvml-driver-root", str(tmp_path / "no-driver"), "--provider-id", "nvml-x"]
        process = await trio.lowlevel.open_process(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        output = b""
        try:
            assert process.stdout is not None
            with trio.fail_after(30):  # a cold interpreter start on a loaded machine
                while b"NVML unavailable" not in output:
                    chunk = await process.stdout.receive_some()
                    assert chunk, f"the sidecar exited early: {output.decode()}"
                    output += chunk
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(5):
                async for chunk in process.stdout:
                    output += chunk
                code = await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            if process.stdout is not None:
                await process.stdout.aclose()
        text = output.decode()
        assert code == 0, text
        lines = [line for line in text.splitlines() if "NVML unavailable" in line]
        assert len(lines) == 1, text
        assert "WARNING deviceapi.nvml" in lines[0]
        assert "NVML provider stopped" in text
        assert "Traceback" not in text
        assert rt.core.store.state.gpus == {}  # it never registered anything


# ---- 11. restarts never clear a fatal verdict ----------------------------------------------


async def test_embedded_provider_crash_keeps_an_unhealthy_gpu_unhealthy(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """The supervisor restarts a crashed embedded NVML provider; the GPU that threw XID 79
    stays NVMLReady=False through the restart (its ledger outlives the child)."""
    clock(mock_clock)
    fake = FakeNvml(fake_gpus())
    faults = FaultInjector()
    config = make_test_config(tmp_path, enable_nvml_provider=True, min_gpus=3)
    with trio.fail_after(120):
        async with open_test_runtime(config, faults=faults, nvml_backend=lambda: fake) as rt:
            await rt.core.gate.wait_ready()
            fake.inject_xid(79, 0)
            await wait_until(lambda: visible(rt, G0) == ("False", "XidCritical"))
            events_before = rv(rt)
            faults.crash("nvml")
            await wait_until(lambda: len(rt.nvml_pollers) == 2
                             and rt.nvml_pollers[-1].statistics().monitor_running)
            assert visible(rt, G0) == ("False", "XidCritical")
            assert [visible(rt, g) for g in (G1, G2)] == [("True", "Initialized")] * 2
            restarts = rt.metrics.registry.get_sample_value(
                "device_api_server_actor_restarts_total", {"actor": "nvml"})
            assert restarts == 1
            # the restarted poller re-asserted its own verdicts (no status changed)
            assert rv(rt) - events_before <= 3


async def test_new_provider_process_adopts_the_unhealthy_verdict_it_finds(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """A sidecar process that restarts has no ledger: reading the server (GetGpu over the real
    socket) it keeps the GPU its predecessor marked unhealthy unhealthy for a quiet period."""
    clock(mock_clock)
    fake = FakeNvml(fake_gpus())
    options = dataclasses.replace(OPTIONS, recovery_quiet_period=5.0)
    async with open_test_runtime(make_test_config(tmp_path)) as rt:
        with trio.fail_after(60):
            async with open_poller(rt, fake, options):
                fake.inject_xid(79, 0)
                await wait_until(lambda: visible(rt, G0) == ("False", "XidCritical"))
        restarted_at = trio.current_time()
        with trio.fail_after(options.recovery_quiet_period * 3):
            async with open_poller(rt, fake, options) as poller:  # a fresh ledger
                assert visible(rt, G0) == ("False", "XidCritical")
                assert poller.statistics().unhealthy_gpus == 1
                await wait_until(lambda: visible(rt, G0) == ("True", "Recovered"),
                                 timeout=options.recovery_quiet_period * 2)
                assert trio.current_time() - restarted_at >= options.recovery_quiet_period
