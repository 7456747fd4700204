"""Calls that end — a watch whose client leaves, a unary call — leave none of the server's
objects in reference cycles.

A cancelled call's error holds its traceback, the traceback every frame of the handler, and
the frames the stream, the subscription and the pump: before, each watcher that went away left
its whole stream state for a full collection to find (at 32 conditions and 256 watchers a
re-sync left ~43,000 cyclic objects and full collections of 150-414 ms). Refcounting now frees
it when the call ends.

A client that closes its connection mid-watch (every informer that stops) also used to leave
its whole connection: grpclib keeps the stream's termination error in the stream's wrapper
and raises it through its request handler (error → traceback → handler frame → wrapper →
error), and the metrics shim on each call's stream held the stream's own bound method. ~100
objects per connection, and the full collections that found them stalled every watch."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio
from grpclib.exceptions import GRPCError

from deviceapi.client import DeviceApiClient
from deviceapi.testing.runtime import make_test_config, open_test_runtime, run_aio, wait_until

WATCHERS = 8
#: Our types that must never be left to the cycle collector by a watch's end.
OURS = ("Subscription", "_Pump", "StreamWriter", "Delivery", "StreamEnd")


async def _garbage_after(rt: Any, scenario: Callable[[], Awaitable[None]]
                         ) -> collections.Counter[str]:
    """Run ``scenario`` (asyncio) twice, the first time to warm caches, and count by type what
    the second left to the cycle collector (both sides of the socket are in this process)."""
    with trio.fail_after(30):
        await run_aio(scenario)
        await wait_until(lambda: not rt.core.hub.statistics().active)
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            await run_aio(scenario)
            await wait_until(lambda: not rt.core.hub.statistics().active)
            await trio.sleep(0.05)  # the server's side of closed connections: connection_lost
            gc.collect()
            return collections.Counter(
                f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()


async def test_ended_watches_leave_no_server_state_in_cycles(tmp_path: Path) -> None:
    config = make_test_config(tmp_path, min_gpus=0, simulate=4)
    async with open_test_runtime(config) as rt:
        path = rt.listeners.unix_socket

        async def watch_and_leave() -> None:
            clients = [DeviceApiClient(unix_socket=path) for _ in range(WATCHERS)]

            async def one(client: DeviceApiClient) -> None:
                events = client.watch()
                async for _ in events:
                    break  # the snapshot's first event: then the client goes away
                await events.aclose()  # type: ignore[attr-defined]

            await asyncio.gather(*(one(c) for c in clients))
            for client in clients:
                client.close()

        garbage = await _garbage_after(rt, watch_and_leave)
        left = {name.rpartition(".")[2]: n for name, n in garbage.items()
                if name.startswith("deviceapi.")}
        assert rt.core.hub.statistics().subscribed_total == 2 * WATCHERS
        assert {name: n for name, n in left.items() if name in OURS} == {}


async def test_clients_that_close_mid_watch_leave_no_server_stream_in_cycles(
        tmp_path: Path) -> None:
    config = make_test_config(tmp_path, min_gpus=0, simulate=4)
    async with open_test_runtime(config) as rt:
        path = rt.listeners.unix_socket

        async def watch_then_close_connection() -> None:
            clients = [DeviceApiClient(unix_socket=path) for _ in range(WATCHERS)]
            first = [asyncio.Event() for _ in clients]

            async def one(client: DeviceApiClient, event: asyncio.Event) -> None:
                async for _ in client.watch():
                    event.set()

            tasks = [asyncio.ensure_future(one(c, e)) for c, e in zip(clients, first, strict=True)]
            await asyncio.gather(*(e.wait() for e in first))
            for task in tasks:  # as an informer stops: cancel the watch, close the channel
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for client in clients:
                client.close()

        left = await _garbage_after(rt, watch_then_close_connection)
    assert rt.core.hub.statistics().subscribed_total == 2 * WATCHERS
    # grpclib.server.Stream is the server's alone (the clients' objects share this process):
    # it was in both cycles, with the protocol stream, the connection and the transport.
    assert left["grpclib.server.Stream"] == 0, left.most_common(12)
    assert left["grpclib.exceptions.StreamTerminatedError"] == 0, left.most_common(12)


async def test_unary_calls_leave_no_server_stream_in_cycles(tmp_path: Path) -> None:
    config = make_test_config(tmp_path, min_gpus=0, simulate=4)
    async with open_test_runtime(config) as rt:
        path = rt.listeners.unix_socket

        async def calls() -> None:
            async with DeviceApiClient(unix_socket=path) as client:
                name = (await client.list()).items[0].metadata.name
                for _ in range(20):
                    await client.get(name)
                with contextlib.suppress(GRPCError):
                    await client.get("GPU-no-such-gpu")  # a failed call too

        left = await _garbage_after(rt, calls)
    assert left["grpclib.server.Stream"] == 0, left.most_common(12)
