"""Error hygiene: a client never sees a traceback or an internal detail, and every refused
request is counted in ``device_api_server_requests_rejected_total{reason}`` (scraped from the
real /metrics endpoint)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from _hostile import GPU_SERVICE, RawH2, assert_clean_message, grpc_frame, sample, scrape
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from h2.errors import ErrorCodes

from deviceapi.client import DeviceApiClient
from deviceapi.proto.device.v1alpha1 import gpu_pb2 as pb
from deviceapi.testing import FaultInjector
from deviceapi.testing.objects import GPU_A, GPU_B, make_gpu
from deviceapi.testing.runtime import (
    make_test_config,
    open_client,
    open_test_runtime,
    run_aio,
    wait_until,
)

SECRET = "secret detail: /etc/device-api/token at 0xdeadbeef"
REJECTED = "device_api_server_requests_rejected_total"


async def status_of(call: Callable[[], Any]) -> tuple[Status, str]:
    async def go() -> tuple[Status, str]:
        try:
            await call()
        except GRPCError as exc:
            return exc.status, exc.message or ""
        return Status.OK, ""

    result: tuple[Status, str] = await run_aio(go)
    return result


async def test_an_internal_error_carries_no_detail(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An unexpected exception inside a handler: the client gets INTERNAL "internal error";
    the traceback, with the detail, goes to the server log only."""
    async with open_test_runtime(make_test_config(tmp_path, min_gpus=0)) as rt, \
            open_client(rt, provider_id="nvml") as client:

        def broken(provider: str) -> None:
            raise RuntimeError(SECRET)

        rt.core.sessions.touch = broken  # type: ignore[method-assign]
        with trio.fail_after(10), caplog.at_level(logging.ERROR, logger="deviceapi.grpc"):
            code, message = await status_of(lambda: client.create(make_gpu(GPU_A)))
        assert (code, message) == (Status.INTERNAL, "internal error")
        logged = [r for r in caplog.records if r.getMessage() == "internal error"]
        assert logged and logged[0].exc_info is not None
        assert SECRET in str(logged[0].exc_info[1])
        assert rt.core.store.state.gpus == {}
        text = await scrape(rt.http_ports.metrics)
        assert sample(text, REJECTED, reason="internal") == 1


async def test_a_cache_owner_crash_answers_unavailable_without_detail(tmp_path: Path) -> None:
    faults = FaultInjector()
    config = make_test_config(tmp_path, min_gpus=0)
    async with open_test_runtime(config, faults=faults) as rt, open_client(rt) as client:
        faults.crash("cache_owner", after=0, error=RuntimeError(SECRET))
        with trio.fail_after(10):
            code, message = await status_of(lambda: client.create(make_gpu(GPU_A)))
            assert (code, message) == (Status.UNAVAILABLE, "the cache is restarting; retry")
            await wait_until(lambda: not faults.pending("cache_owner"))
            assert await status_of(lambda: client.create(make_gpu(GPU_A))) == (Status.OK, "")
        text = await scrape(rt.http_ports.metrics)
        assert sample(text, REJECTED, reason="actor_restart") == 1


async def test_a_call_refused_while_draining_is_counted(tmp_path: Path) -> None:
    async with open_test_runtime(make_test_config(tmp_path, min_gpus=0)) as rt, \
            open_client(rt) as client:
        with trio.fail_after(10):
            await run_aio(client.list)  # the connection is open before the drain starts
            rt.grpc.stop_accepting()
            assert await status_of(client.list) == (Status.UNAVAILABLE, "server shutting down")
        text = await scrape(rt.http_ports.metrics)
        assert sample(text, REJECTED, reason="unavailable") == 1


async def _first(events: AsyncIterator[pb.WatchGpusResponse]) -> None:
    async for _ in events:
        return


async def test_every_rejected_request_is_counted_by_reason(tmp_path: Path) -> None:
    """One refusal of each kind, then one scrape of /metrics: each is counted once under its
    reason, and each message is one clean line. (The subscribe bucket refills so slowly that
    it does not, within the test.)"""
    faults = FaultInjector()
    config = make_test_config(tmp_path, min_gpus=1, max_gpus=2, max_watchers=1,
                              subscribe_rate=1e-6, subscribe_burst=3, max_concurrent_streams=1)
    async with open_test_runtime(config, faults=faults) as rt, \
            open_client(rt, provider_id="nvml") as client:
        path = rt.listeners.unix_socket
        assert path is not None
        messages: list[str] = []

        async def expect(call: Callable[[], Any], code: Status) -> None:
            got, message = await status_of(call)
            assert got == code, (got, message)
            if code is not Status.OK:
                assert message
                assert_clean_message(message)
                messages.append(message)

        async def watch_once() -> None:
            async with DeviceApiClient(unix_socket=path) as c:  # its own stream budget
                await _first(c.watch())

        async def hold_watch(release: asyncio.Event) -> None:
            async with DeviceApiClient(unix_socket=path) as c, \
                    c.gpus.WatchGpus.open() as stream:
                await stream.send_message(pb.WatchGpusRequest(), end=True)
                await stream.recv_message()
                await release.wait()
                await stream.cancel()

        with trio.fail_after(30):
            await expect(client.list, Status.UNAVAILABLE)  # not READY yet
            await expect(lambda: client.create(make_gpu(GPU_A)), Status.OK)
            await expect(lambda: client.create(make_gpu(GPU_B)), Status.OK)
            await expect(lambda: client.create(make_gpu("GPU-0c")), Status.RESOURCE_EXHAUSTED)
            await expect(lambda: client.get("not/a/uuid"), Status.INVALID_ARGUMENT)
            await expect(lambda: client.delete("GPU-0d"), Status.NOT_FOUND)
            await expect(lambda: client.update_status(GPU_A, pb.GpuStatus(), 99),
                         Status.ABORTED)
            # Watches: the bucket holds 3 subscriptions, and 1 watcher may be open.
            await expect(lambda: _first(client.watch(10**6)), Status.OUT_OF_RANGE)  # token 1
            release = asyncio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_aio, hold_watch, release)  # token 2
                await wait_until(lambda: rt.core.hub.statistics().active == 1)
                await expect(watch_once, Status.RESOURCE_EXHAUSTED)  # max watchers
                release.set()
            await wait_until(lambda: rt.core.hub.statistics().active == 0)
            await expect(watch_once, Status.OK)  # token 3
            await wait_until(lambda: rt.core.hub.statistics().active == 0)
            await expect(watch_once, Status.RESOURCE_EXHAUSTED)  # subscribe rate
            faults.crash("cache_owner", after=0)
            await expect(lambda: client.create(make_gpu(GPU_A)), Status.UNAVAILABLE)
            await wait_until(lambda: not faults.pending("cache_owner"))
            async with RawH2.open(path) as raw:
                big = await raw.call(GPU_SERVICE + "ListGpus",
                                     grpc_frame(b"", length=4 * 1024 * 1024 + 1))
                assert big.grpc_status is Status.RESOURCE_EXHAUSTED
                packed = await raw.call(GPU_SERVICE + "ListGpus",
                                        grpc_frame(b"", compressed=True))
                assert packed.grpc_status is Status.UNIMPLEMENTED
                raw.ignore_stream_limit()
                held = raw.start(GPU_SERVICE + "GetGpu")
                refused = raw.start(GPU_SERVICE + "GetGpu")
                await raw.flush()
                assert (await raw.response(refused)).reset == ErrorCodes.REFUSED_STREAM
                raw.end(held)  # no request message at all
                await raw.flush()
                assert (await raw.response(held)).grpc_status is Status.INVALID_ARGUMENT
                for response in (big, packed):
                    assert_clean_message(response.grpc_message)
            text = await scrape(rt.http_ports.metrics)

        counts = {reason: sample(text, REJECTED, reason=reason) for reason in (
            "unavailable", "max_gpus", "invalid_argument", "not_found", "aborted",
            "out_of_range", "max_watchers", "subscribe_rate", "actor_restart",
            "max_message_bytes", "unimplemented", "max_concurrent_streams", "internal")}
        assert counts == {
            "unavailable": 1, "max_gpus": 1, "invalid_argument": 2, "not_found": 1,
            "aborted": 1, "out_of_range": 1, "max_watchers": 1, "subscribe_rate": 1,
            "actor_restart": 1, "max_message_bytes": 1, "unimplemented": 1,
            "max_concurrent_streams": 1, "internal": 0,
        }
        assert len(messages) == 9
