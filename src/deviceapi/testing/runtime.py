"""``open_test_runtime``: a whole server on a private Unix socket, for tests (ours and users').

It runs inside the caller's trio run, so virtual time (pytest-trio's ``mock_clock`` /
``autojump_clock``) drives every server timer (under trio-asyncio, pytest-trio's default; in a
guest run, ``pytest --bridge guest``, asyncio's timers keep real time). Client code is asyncio
(grpclib); run it with :func:`run_aio`, which crosses the bridge once.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeVar

import trio

from .. import _bridge
from .._app import Runtime, open_runtime
from .._config import Config
from ..client import DeviceApiClient
from ..otp import FaultHook
from ..providers.nvml import NvmlBackend

T = TypeVar("T")


def make_test_config(socket_dir: str | os.PathLike[str] | None = None, **overrides: Any) -> Config:
    """Defaults for tests: a private socket, no TCP, no shutdown delay, READY at 1 GPU."""
    directory = os.fspath(socket_dir) if socket_dir is not None else tempfile.mkdtemp()
    base = Config(
        unix_socket=os.path.join(directory, "device-api", "device.sock"),
        grpc_address="",
        shutdown_delay=0.0,
        shutdown_timeout=5.0,
        health_port=0,  # any free port; the runtime reports the bound ones (http_ports)
        metrics_port=0,
    )
    return dataclasses.replace(base, **overrides)


@asynccontextmanager
async def open_test_runtime(
    config: Config | None = None,
    *,
    faults: FaultHook | None = None,
    nvml_backend: Callable[[], NvmlBackend] | None = None,
    version_base: int | None = None,
) -> AsyncIterator[Runtime]:
    """Start a server for a test; it is torn down (forcibly) when the block ends.

    ``nvml_backend``: with ``enable_nvml_provider=True``, the NVML the embedded provider uses
    (e.g. ``lambda: fake`` for a :class:`deviceapi.providers.nvml.FakeNvml`). ``version_base``:
    where resource versions start (default: from the wall clock, as the server does; 0 lets
    a test that is not about restarts write its expected versions as 1, 2, 3...)."""
    async with open_runtime(config or make_test_config(), faults=faults,
                            nvml_backend=nvml_backend, version_base=version_base) as rt:
        yield rt


def open_aio_loop() -> AbstractAsyncContextManager[Any]:
    """The asyncio-on-trio loop, for tests that drive a server in another process."""
    return _bridge.open_loop()


async def run_trio(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """From asyncio test code, await a trio async function (e.g. an Event's wait)."""
    result: T = await _bridge.trio_as_aio(fn)(*args)
    return result


async def run_aio(fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
    """Run an asyncio coroutine function (e.g. client code) from trio."""
    result: T = await _bridge.aio_as_trio(fn)(*args, **kwargs)
    return result


async def run_client_scenario(
    config: Config,
    scenario: Callable[[DeviceApiClient], Awaitable[T]],
    *,
    provider_id: str = "",
) -> T:
    """Start a server, connect a client, run the asyncio ``scenario(client)``, tear down."""
    async with open_test_runtime(config) as runtime, open_client(
        runtime, provider_id=provider_id
    ) as client:
        return await run_aio(scenario, client)


@asynccontextmanager
async def open_client(runtime: Runtime, *, provider_id: str = "",
                      timeout: float | None = 30.0) -> AsyncIterator[DeviceApiClient]:
    """A DeviceApiClient connected to ``runtime``'s socket (use its methods through run_aio)."""

    async def make() -> DeviceApiClient:
        return DeviceApiClient(unix_socket=runtime.listeners.unix_socket,
                               provider_id=provider_id, timeout=timeout)

    client: DeviceApiClient = await runtime.bridge.aio_as_trio(make)()
    try:
        yield client
    finally:
        client.close()


async def wait_until(predicate: Callable[[], bool], *, poll: float = 0.005) -> None:
    """Wait for a condition the test cannot subscribe to (counts, another process's state).

    It checks at ``poll``-second intervals on trio's clock; bound it with ``trio.fail_after``.
    """
    while not predicate():  # noqa: ASYNC110 - the sanctioned poller for unsubscribable state
        await trio.sleep(poll)
