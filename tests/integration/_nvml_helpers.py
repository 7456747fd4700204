"""Helpers for the NVML provider integration tests (a plain module: unique name, no conftest).

The poller runs against :class:`FakeNvml` and talks to a real in-process server over its Unix
socket through :class:`TrioProviderClient`, exactly as the embedded provider and the sidecar do.
"""

from __future__ import annotations

import ctypes
import socket as stdlib_socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import trio
import trio.testing

from deviceapi._app import Runtime
from deviceapi.client import DeviceApiClient
from deviceapi.client.trio_client import TrioProviderClient
from deviceapi.proto.device.v1alpha1 import gpu_pb2 as pb
from deviceapi.providers.nvml import (
    CONDITION_TYPE,
    FakeGpu,
    FakeNvml,
    NvmlPoller,
    PollerOptions,
    run_inline,
)
from deviceapi.providers.nvml._fake import GiB, gpu_uuid
from deviceapi.providers.nvml.ledger import HealthLedger
from deviceapi.testing.runtime import make_test_config, open_client, open_test_runtime, run_aio

PROVIDER = "nvml-it"

#: Virtual-time options: the default 500 ms wait slice, a long quiet period (tests that need
#: recovery shorten it) and a call timeout no autojump of the mock clock can reach.
OPTIONS = PollerOptions(
    provider_id=PROVIDER,
    recovery_quiet_period=60.0,
    heartbeat_interval=10.0,
    wait_slice_ms=500,
    call_timeout=600.0,
)

#: (UUID, product, memory in MiB) of the fake GPUs: two H100s and an A100.
PRODUCTS = [
    ("NVIDIA H100 80GB HBM3", 80 * 1024),
    ("NVIDIA H100 80GB HBM3", 80 * 1024),
    ("NVIDIA A100-SXM4-40GB", 40 * 1024),
]
G0, G1, G2 = (gpu_uuid(i) for i in range(3))


def fake_gpus(count: int = 3) -> list[FakeGpu]:
    return [
        FakeGpu(
            uuid=gpu_uuid(i),
            name=PRODUCTS[i][0],
            memory_total=PRODUCTS[i][1] // 1024 * GiB,
            pci_bus_id=f"00000000:{i + 1:02x}:00.0",
        )
        for i in range(count)
    ]


def driver_present() -> bool:
    """Whether this machine can load the NVIDIA driver's NVML library."""
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


# ---- the poller ---------------------------------------------------------------------------


@asynccontextmanager
async def open_poller(
    rt: Runtime,
    fake: FakeNvml,
    options: PollerOptions = OPTIONS,
    *,
    ledger: HealthLedger | None = None,
) -> AsyncIterator[NvmlPoller]:
    """A poller over ``fake`` (NVML calls inline) connected to ``rt`` through the public API;
    entered once it has registered its GPUs, cancelled on exit."""
    socket = rt.listeners.unix_socket
    assert socket is not None
    api = await TrioProviderClient.connect(unix_socket=socket)
    try:
        poller = NvmlPoller(fake, api, options, ledger=ledger, run_blocking=run_inline)
        async with trio.open_nursery() as nursery:
            await nursery.start(poller.run)
            yield poller
            nursery.cancel_scope.cancel()
    finally:
        api.close()


@asynccontextmanager
async def open_setup(
    tmp_path: Path, fake: FakeNvml, options: PollerOptions = OPTIONS
) -> AsyncIterator[tuple[Runtime, DeviceApiClient, NvmlPoller]]:
    """A server for the test, a consumer client of it, and a running poller over ``fake``."""
    async with open_test_runtime(make_test_config(tmp_path)) as rt, open_client(rt) as client, \
            open_poller(rt, fake, options) as poller:
        yield rt, client, poller


# ---- the server's state -------------------------------------------------------------------


def condition(rt: Runtime, name: str, type_: str = CONDITION_TYPE) -> pb.Condition | None:
    gpu = rt.core.store.state.gpus.get(name)
    if gpu is None:
        return None
    return next((c for c in gpu.status.conditions if c.type == type_), None)


def visible(rt: Runtime, name: str, type_: str = CONDITION_TYPE) -> tuple[str, str] | None:
    """(status, reason) of ``name``'s ``type_`` condition in the server, or None."""
    c = condition(rt, name, type_)
    return None if c is None else (c.status, c.reason)


def rv(rt: Runtime) -> int:
    return rt.core.store.state.rv


async def wait_until(
    predicate: Callable[[], bool], *, timeout: float = 10.0, step: float = 0.25
) -> None:
    """Poll ``predicate`` in ``step``s (trio's clock, virtual under mock_clock) until it holds;
    fail after ``timeout``. Steps are coarse on purpose: under autojump every idle deadline costs
    the threshold in real time."""
    with trio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 (the server's state has no event to wait on)
            await trio.sleep(step)


# ---- a watcher ----------------------------------------------------------------------------


@asynccontextmanager
async def watching(
    client: DeviceApiClient, resource_version: int
) -> AsyncIterator[list[pb.WatchGpusResponse]]:
    """Watch from ``resource_version`` (so only later changes arrive); yields the growing list
    of events; the stream is cancelled on exit."""
    events: list[pb.WatchGpusResponse] = []

    async def collect() -> None:
        async for event in client.watch(resource_version):
            events.append(event)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_aio, collect)
        yield events
        nursery.cancel_scope.cancel()


def summary(events: list[pb.WatchGpusResponse]) -> list[tuple[str, str, str, str]]:
    """(type, name, NVMLReady status, reason) of each event."""
    out = []
    for e in events:
        c = next((c for c in e.object.status.conditions if c.type == CONDITION_TYPE), None)
        out.append((e.type, e.object.metadata.name, c.status if c else "", c.reason if c else ""))
    return out


# ---- a Unix-socket proxy between a provider and the server ---------------------------------


class UnixProxy:
    """Forwards each connection on ``listen_path`` to the server on ``target_path``.

    :meth:`server_died` does to the provider what a server process's exit does: every
    connection ends, and new ones fail while ``down`` is set. A connection made while ``down``,
    or while nothing listens on the target, is closed at once (the client sees its connection
    end, as with a refused connect)."""

    def __init__(self, listen_path: str, target_path: str) -> None:
        self.listen_path = listen_path
        self.target_path = target_path
        self.down = False
        self._scopes: set[trio.CancelScope] = set()
        self.connections = 0
        self.refused = 0
        """Connections closed at once because the server was down or not listening."""

    async def server_died(self) -> None:
        """Call it while the in-process server still runs (so it closes its ends of the
        connections cleanly), then stop the server, then clear ``down``."""
        self.down = True
        for scope in self._scopes:
            scope.cancel()
        await trio.testing.wait_all_tasks_blocked()  # forwarders closed, the server read EOF
        assert not self._scopes

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
        await sock.bind(self.listen_path)
        sock.listen()
        listener = trio.SocketListener(sock)
        async with listener, trio.open_nursery() as nursery:
            task_status.started()
            while True:
                stream = await listener.accept()
                nursery.start_soon(self._forward, stream)

    async def _forward(self, down: trio.SocketStream) -> None:
        self.connections += 1
        with trio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                async with down:
                    if self.down:
                        self.refused += 1
                        return
                    try:
                        up = await trio.open_unix_socket(self.target_path)
                    except OSError:
                        self.refused += 1
                        return
                    async with up, trio.open_nursery() as pair:
                        pair.start_soon(_pump, down, up, pair.cancel_scope)
                        pair.start_soon(_pump, up, down, pair.cancel_scope)
            finally:
                self._scopes.discard(scope)


async def _pump(src: trio.SocketStream, dst: trio.SocketStream, pair: trio.CancelScope) -> None:
    """Copy ``src`` to ``dst``; when either end closes, close the pair."""
    try:
        async for chunk in src:
            await dst.send_all(chunk)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    pair.cancel()
