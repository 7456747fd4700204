"""A watch that ends with its client leaves none of the server's objects in reference cycles.

A cancelled call's error holds its traceback, the traceback every frame of the handler, and
the frames the stream, the subscription and the pump: before, each watcher that went away left
its whole stream state for a full collection to find (at 32 conditions and 256 watchers a
re-sync left ~43,000 cyclic objects and full collections of 150-414 ms). Refcounting now frees
it when the call ends; what grpclib's own request handler keeps in a cycle is not ours."""

from __future__ import annotations

import asyncio
import collections
import gc
from pathlib import Path

import trio

from deviceapi.client import DeviceApiClient
from deviceapi.testing.runtime import make_test_config, open_test_runtime, run_aio, wait_until

WATCHERS = 8
#: Our types that must never be left to the cycle collector by a watch's end.
OURS = ("Subscription", "_Pump", "StreamWriter", "Delivery", "StreamEnd")


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

        with trio.fail_after(30):
            await run_aio(watch_and_leave)  # warm: first-call caches are not garbage
            await wait_until(lambda: not rt.core.hub.statistics().active)
            gc.collect()
            gc.set_debug(gc.DEBUG_SAVEALL)
            try:
                await run_aio(watch_and_leave)
                await wait_until(lambda: not rt.core.hub.statistics().active)
                gc.collect()
                left = collections.Counter(
                    type(o).__name__ for o in gc.garbage
                    if type(o).__module__.startswith("deviceapi."))
            finally:
                gc.set_debug(0)
                gc.garbage.clear()
        assert rt.core.hub.statistics().subscribed_total == 2 * WATCHERS
        assert {name: n for name, n in left.items() if name in OURS} == {}
