"""A ListGpus answer nobody reads (HTTP/2 window 0) holds a sending slot only until the
slow-consumer timeout — the same policy, clock and sweep that evict a watch that stopped
reading — and then everyone else lists again."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import trio
from _hostile import GPU_SERVICE, RawH2, grpc_frame
from grpclib.const import Status
from h2.settings import SettingCodes

from deviceapi.testing.runtime import make_test_config, open_test_runtime
from deviceapi.transport.gpu_service import LIST_SENDERS

LIST = GPU_SERVICE + "ListGpus"
TIMEOUT = 2.0


async def test_unread_list_answers_are_cut_at_the_slow_consumer_timeout(tmp_path: Path) -> None:
    config = make_test_config(tmp_path, min_gpus=0, slow_subscriber_timeout=TIMEOUT)
    async with open_test_runtime(config) as rt, AsyncExitStack() as stack:
        policy = rt.core.slow_consumers
        path = rt.listeners.unix_socket
        assert path is not None
        stuck: list[tuple[RawH2, int]] = []
        for _ in range(LIST_SENDERS):  # every slot taken by a client that reads nothing
            raw = await stack.enter_async_context(RawH2.open(path))
            raw.conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 0})
            sid = raw.start(LIST)
            raw.send(sid, grpc_frame(b""), end_stream=True)
            await raw.flush()
            stuck.append((raw, sid))
        with trio.fail_after(5):
            while policy.sends_in_progress < LIST_SENDERS:
                for raw, _ in stuck:
                    with trio.move_on_after(0.01):
                        await raw.pump()
        began = trio.current_time()
        bystander = await stack.enter_async_context(RawH2.open(path))
        answered: list[float] = []

        async def list_once() -> None:
            response = await bystander.call(LIST, grpc_frame(b""))
            assert response.grpc_status is Status.OK
            answered.append(trio.current_time() - began)

        with trio.fail_after(TIMEOUT + 5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(list_once)
                await trio.sleep(TIMEOUT * 0.75)
                assert policy.sends_cut == 0 and answered == []  # not before the timeout
                for raw, sid in stuck:  # each stuck stream is ended by the server
                    while not raw.responses[sid].done:
                        await raw.pump()
                    assert raw.responses[sid].grpc_status is not Status.OK
        assert policy.sends_cut == LIST_SENDERS
        assert TIMEOUT <= answered[0] <= TIMEOUT + 2.5  # cut within a sweep, then served
