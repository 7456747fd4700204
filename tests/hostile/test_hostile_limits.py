"""Every bound at its limit and one past it, end to end over the Unix socket.

GPUs, conditions per GPU, string lengths, object size, request message size, watchers,
subscribe rate, and concurrent streams per connection: at the limit the request is served, one
past it the client gets the documented status and message (docs/VALIDATION.md), nothing is
stored, the refusal is counted in ``requests_rejected_total{reason}``, and the server goes on
serving.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from _hostile import GPU_SERVICE, RawH2, grpc_frame
from google.protobuf.timestamp_pb2 import Timestamp
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from h2.errors import ErrorCodes

from deviceapi._app import Runtime
from deviceapi.actors import _store as ops
from deviceapi.client import DeviceApiClient
from deviceapi.proto.device.v1alpha1 import gpu_pb2 as pb
from deviceapi.testing.objects import GPU_A, gpu_name, make_gpu
from deviceapi.testing.runtime import (
    make_test_config,
    open_client,
    open_test_runtime,
    run_aio,
    wait_until,
)

MiB = 1024 * 1024


def rejected(rt: Runtime, reason: str) -> float:
    value = rt.metrics.registry.get_sample_value(
        "device_api_server_requests_rejected_total", {"reason": reason})
    return value or 0.0


async def status_of(call: Callable[[], Any]) -> tuple[Status, str]:
    """Run an asyncio client call; its status code and message."""

    async def go() -> tuple[Status, str]:
        try:
            await call()
        except GRPCError as exc:
            return exc.status, exc.message or ""
        return Status.OK, ""

    result: tuple[Status, str] = await run_aio(go)
    return result


async def names_in(client: DeviceApiClient) -> list[str]:
    listing = await run_aio(client.list)
    return [g.metadata.name for g in listing.items]


# -- GPUs ------------------------------------------------------------------------------------


async def test_max_gpus_at_limit_and_one_past(tmp_path: Path) -> None:
    config = make_test_config(tmp_path, min_gpus=0, max_gpus=3)
    async with open_test_runtime(config) as rt, open_client(rt) as client:
        with trio.fail_after(20):
            for i in range(3):
                assert await status_of(lambda i=i: client.create(make_gpu(gpu_name(i)))) == (
                    Status.OK, "")
            message = "the cache already holds the maximum of 3 GPUs"
            assert await status_of(lambda: client.create(make_gpu(gpu_name(3)))) == (
                Status.RESOURCE_EXHAUSTED, message)
            assert await status_of(lambda: client.register_gpu(name=gpu_name(4))) == (
                Status.RESOURCE_EXHAUSTED, message)
            # At the limit, re-creating an existing GPU is still idempotent, not refused.
            assert await status_of(lambda: client.create(make_gpu(gpu_name(0)))) == (
                Status.OK, "")
            assert await names_in(client) == [gpu_name(i) for i in range(3)]
            assert rejected(rt, "max_gpus") == 2
            await run_aio(client.delete, gpu_name(1))
            assert await status_of(lambda: client.create(make_gpu(gpu_name(3)))) == (
                Status.OK, "")


# -- conditions ------------------------------------------------------------------------------


def conditions(n: int) -> pb.GpuStatus:
    return pb.GpuStatus(conditions=[pb.Condition(type=f"T{i}", status="True")
                                    for i in range(n)])


async def test_conditions_32_and_33(tmp_path: Path) -> None:
    async with open_test_runtime(make_test_config(tmp_path, min_gpus=0)) as rt, \
            open_client(rt, provider_id="p") as client:
        too_many = "33 conditions exceed the limit of 32"
        with trio.fail_after(20):
            gpu = make_gpu(GPU_A)
            gpu.status.CopyFrom(conditions(32))
            assert await status_of(lambda: client.create(gpu)) == (Status.OK, "")
            over = make_gpu(gpu_name(1))
            over.status.CopyFrom(conditions(33))
            assert await status_of(lambda: client.create(over)) == (
                Status.INVALID_ARGUMENT, too_many)
            assert await status_of(lambda: client.update_status(GPU_A, conditions(33))) == (
                Status.INVALID_ARGUMENT, too_many)
            assert await status_of(lambda: client.register_gpu(
                name=gpu_name(2), status=conditions(33))) == (Status.INVALID_ARGUMENT, too_many)
            # Upserting an existing type at 32 is fine; a 33rd type is not.
            assert await status_of(lambda: client.update_condition(
                name=GPU_A, condition=pb.Condition(type="T31", status="False"))) == (
                Status.OK, "")
            assert await status_of(lambda: client.update_condition(
                name=GPU_A, condition=pb.Condition(type="T32", status="False"))) == (
                Status.INVALID_ARGUMENT, too_many)
            assert await names_in(client) == [GPU_A]
            stored = await run_aio(client.get, GPU_A)
            assert len(stored.status.conditions) == 32
            assert rejected(rt, "invalid_argument") == 4


# -- string fields ---------------------------------------------------------------------------

NAME_128 = "GPU-" + "a" * 124


def _created(gpu: pb.Gpu) -> Callable[[DeviceApiClient], Any]:
    return lambda c: c.create(gpu)


def _condition(field: str) -> Callable[[str], Callable[[DeviceApiClient], Any]]:
    def build(value: str) -> Callable[[DeviceApiClient], Any]:
        condition = pb.Condition(type="Ready", status="True")
        setattr(condition, field, value)
        gpu = make_gpu(GPU_A)
        gpu.status.conditions.append(condition)
        return _created(gpu)
    return build


def _name(value: str) -> Callable[[DeviceApiClient], Any]:
    return _created(make_gpu(value))


def _uuid(value: str) -> Callable[[DeviceApiClient], Any]:
    gpu = make_gpu(GPU_A)
    gpu.spec.uuid = value
    return _created(gpu)


def _action(value: str) -> Callable[[DeviceApiClient], Any]:
    gpu = make_gpu(GPU_A)
    gpu.status.recommended_action = value
    return _created(gpu)


def _namespace(value: str) -> Callable[[DeviceApiClient], Any]:
    gpu = make_gpu(GPU_A)
    gpu.metadata.namespace = value
    return _created(gpu)


def _namespace_update(value: str) -> Callable[[DeviceApiClient], Any]:
    async def update(c: DeviceApiClient) -> None:
        await c.register_gpu(name=GPU_B)
        gpu = make_gpu(GPU_B)
        gpu.metadata.namespace = value
        await c.update(gpu)
    return update


def _provider(value: str) -> Callable[[DeviceApiClient], Any]:
    return lambda c: c.register_gpu(name=GPU_A, provider_id=value)


def _provider_header(value: str) -> Callable[[DeviceApiClient], Any]:
    return lambda c: c.gpus.CreateGpu(pb.CreateGpuRequest(gpu=make_gpu(GPU_A)),
                                      metadata={"x-provider-id": value})


GPU_B = gpu_name(11)

#: field → (limit, request builder, the message one past the limit, filler character).
FIELDS: dict[str, tuple[int, Callable[[str], Callable[[DeviceApiClient], Any]], str, str]] = {
    "name": (128, _name, "metadata.name is longer than 128 characters", "a"),
    "spec.uuid": (128, _uuid, "spec.uuid is longer than 128 characters", "a"),
    "condition type": (128, _condition("type"),
                       "condition type must be at most 128 characters without control "
                       "characters", "T"),
    "reason": (256, _condition("reason"),
               "condition 'Ready': reason exceeds 256 chars", "r"),
    "message": (4096, _condition("message"),
                "condition 'Ready': message exceeds 4096 chars", "m"),
    "message (2-byte characters)": (4096, _condition("message"),
                                    "condition 'Ready': message exceeds 4096 chars", "é"),
    "recommended_action": (4096, _action, "recommended_action exceeds 4096 chars", "a"),
    "namespace (create)": (253, _namespace, "metadata.namespace exceeds 253 characters", "n"),
    "namespace (update)": (253, _namespace_update,
                           "metadata.namespace exceeds 253 characters", "n"),
    "provider_id": (253, _provider,
                    "provider id must be at most 253 printable characters", "p"),
    "x-provider-id header": (253, _provider_header,
                             "provider id must be at most 253 printable characters", "p"),
}


def _value(field: str, n: int, char: str) -> str:
    if field in {"name", "spec.uuid"}:
        return "GPU-" + char * (n - 4)
    return char * n


@pytest.mark.parametrize("field", sorted(FIELDS))
async def test_string_field_at_limit_and_one_past(tmp_path: Path, field: str) -> None:
    limit, build, message, char = FIELDS[field]
    async with open_test_runtime(make_test_config(tmp_path, min_gpus=0)) as rt, \
            open_client(rt) as client:
        with trio.fail_after(20):
            over = build(_value(field, limit + 1, char))
            assert await status_of(lambda: over(client)) == (Status.INVALID_ARGUMENT, message)
            before = rt.core.store.state.rv
            assert rt.core.store.state.gpus.keys() <= {GPU_B}  # nothing stored by the refusal
            at = build(_value(field, limit, char))
            assert await status_of(lambda: at(client)) == (Status.OK, "")
            assert rt.core.store.state.rv > before


# -- object size -----------------------------------------------------------------------------

STAMP = Timestamp(seconds=1_700_000_000, nanos=1)


def gpu_of_size(name: str, size: int, rv: int) -> pb.Gpu:
    """A GPU that the server stores (at version ``rv``) as exactly ``size`` bytes: its
    conditions carry their own transition times, which the server keeps as they are."""

    def build(message_length: int) -> pb.Gpu:
        gpu = make_gpu(name)
        for i, length in enumerate(divmod_lengths(message_length)):
            gpu.status.conditions.add(type=f"T{i}", status="True", message="m" * length,
                                      last_transition_time=STAMP)
        return gpu

    def stored(gpu: pb.Gpu) -> int:
        copy = pb.Gpu()
        copy.CopyFrom(gpu)
        copy.metadata.resource_version = str(rv)
        copy.resource_version = rv
        return copy.ByteSize()

    total = size - 2000
    while stored(build(total)) < size:
        total += 1
    gpu = build(total)
    assert stored(gpu) == size, "no message length gives exactly that size"
    return gpu


def divmod_lengths(total: int) -> list[int]:
    full, rest = divmod(total, 4096)
    return [4096] * full + ([rest] if rest else [])


async def test_object_size_at_limit_and_one_past(tmp_path: Path) -> None:
    limit = 65536
    async with open_test_runtime(make_test_config(tmp_path, min_gpus=0)) as rt, \
            open_client(rt) as client:
        first = rt.core.store.version_base + 1  # the version the next write gets
        with trio.fail_after(20):
            over = gpu_of_size(gpu_name(1), limit + 1, rv=first)
            assert await status_of(lambda: client.create(over)) == (
                Status.INVALID_ARGUMENT, f"gpu object is {limit + 1} bytes, over the limit of "
                                         f"{limit}")
            at = gpu_of_size(gpu_name(2), limit, rv=first)
            assert await status_of(lambda: client.create(at)) == (Status.OK, "")
            stored = await run_aio(client.get, gpu_name(2))
            assert stored.ByteSize() == limit
            # An update that would grow it by one byte is refused, and changes nothing.
            grown = pb.GpuStatus()
            grown.CopyFrom(at.status)
            grown.conditions[-1].message += "m"
            assert await status_of(lambda: client.update_status(gpu_name(2), grown)) == (
                Status.INVALID_ARGUMENT, f"gpu object is {limit + 1} bytes, over the limit of "
                                         f"{limit}")
            assert (await run_aio(client.get, gpu_name(2))).resource_version == first


# -- request message size --------------------------------------------------------------------


def create_request_of_size(size: int) -> pb.CreateGpuRequest:
    n = size - 64
    while True:
        request = pb.CreateGpuRequest(gpu=pb.Gpu(metadata=pb.ObjectMeta(
            name=GPU_A, namespace="x" * n)))
        if request.ByteSize() >= size:
            assert request.ByteSize() == size
            return request
        n += 1


async def test_request_message_of_4_mib_is_read_and_one_byte_more_is_refused(
    tmp_path: Path,
) -> None:
    """Exactly 4 MiB is received, decoded and validated (its 4 MiB namespace is then
    refused by the 253-character rule); 4 MiB + 1 is refused by size, before decoding."""
    async with open_test_runtime(make_test_config(tmp_path, min_gpus=0)) as rt, \
            open_client(rt) as client:
        with trio.fail_after(60):
            at = create_request_of_size(4 * MiB)
            assert await status_of(lambda: client.gpus.CreateGpu(at)) == (
                Status.INVALID_ARGUMENT, "metadata.namespace exceeds 253 characters")
            over = create_request_of_size(4 * MiB + 1)
            assert await status_of(lambda: client.gpus.CreateGpu(over)) == (
                Status.RESOURCE_EXHAUSTED,
                f"request message of {4 * MiB + 1} bytes exceeds the limit of {4 * MiB}")
            assert rejected(rt, "max_message_bytes") == 1
            assert await names_in(client) == []


# -- watchers --------------------------------------------------------------------------------


class Watches:
    """Open watch streams held from asyncio tasks, to close one at a time."""

    def __init__(self, client: DeviceApiClient) -> None:
        self.client = client
        self.tasks: list[asyncio.Task[None]] = []

    async def open(self) -> tuple[Status, str]:
        """Open one more; returns its status once it has its first event (or its error)."""
        loop = asyncio.get_running_loop()
        first: asyncio.Future[tuple[Status, str]] = loop.create_future()

        async def hold() -> None:
            try:
                async with self.client.gpus.WatchGpus.open() as stream:
                    await stream.send_message(pb.WatchGpusRequest(), end=True)
                    await stream.recv_message()
                    first.set_result((Status.OK, ""))
                    await asyncio.Event().wait()  # until cancelled
            except GRPCError as exc:
                if not first.done():
                    first.set_result((exc.status, exc.message or ""))

        self.tasks.append(asyncio.ensure_future(hold()))
        return await first

    async def close_one(self) -> None:
        task = self.tasks.pop(0)
        task.cancel()
        await asyncio.wait({task})

    async def close_all(self) -> None:
        while self.tasks:
            await self.close_one()


async def test_max_watchers_at_limit_and_one_past(tmp_path: Path) -> None:
    config = make_test_config(tmp_path, min_gpus=0, max_watchers=4)
    async with open_test_runtime(config) as rt, open_client(rt) as client:
        await rt.core.store.write(ops.CreateGpu(make_gpu(GPU_A)))
        watches = Watches(client)
        with trio.fail_after(20):
            for _ in range(4):
                assert await run_aio(watches.open) == (Status.OK, "")
            assert await run_aio(watches.open) == (
                Status.RESOURCE_EXHAUSTED, "too many watchers (limit 4)")
            assert rt.core.hub.statistics().active == 4
            await run_aio(watches.close_one)
            await wait_until(lambda: rt.core.hub.statistics().active == 3)
            assert await run_aio(watches.open) == (Status.OK, "")
            await run_aio(watches.close_all)
            await wait_until(lambda: rt.core.hub.statistics().active == 0)
        assert rejected(rt, "max_watchers") == 1


async def test_subscribe_rate_burst_then_refused(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """Time stands still (mock clock): the burst of 20 passes, the 21st is refused; a tenth of
    a second later one more token is there (10/s). (The clock jumps only after 5 s of real
    idleness, so that a hang still ends in ``fail_after``.)"""
    mock_clock.autojump_threshold = 5.0
    async with open_test_runtime(make_test_config(tmp_path, min_gpus=0)) as rt, \
            open_client(rt) as client:
        await rt.core.store.write(ops.CreateGpu(make_gpu(GPU_A)))
        watches = Watches(client)
        refused = (Status.RESOURCE_EXHAUSTED,
                   "watch subscribe rate exceeded (10/s, burst 20); retry later")
        with trio.fail_after(20):
            for _ in range(20):
                assert await run_aio(watches.open) == (Status.OK, "")
                await run_aio(watches.close_one)
            assert await run_aio(watches.open) == refused
            mock_clock.jump(0.1)
            assert await run_aio(watches.open) == (Status.OK, "")
            assert await run_aio(watches.open) == refused
            await run_aio(watches.close_all)
        assert rejected(rt, "subscribe_rate") == 2


# -- concurrent streams per connection -------------------------------------------------------

GET = GPU_SERVICE + "GetGpu"
LIST = GPU_SERVICE + "ListGpus"


@pytest.mark.parametrize("limit", [4, 100], ids=["limit-4", "default-100"])
@pytest.mark.parametrize("acknowledged", [False, True],
                         ids=["before-settings-ack", "after-settings-ack"])
async def test_concurrent_streams_at_limit_and_one_past(
    tmp_path: Path, limit: int, acknowledged: bool
) -> None:
    """``limit`` calls in flight on one connection are served; the next stream is refused with
    RST_STREAM(REFUSED_STREAM) — whether or not the client has acknowledged the server's
    SETTINGS yet — while the connection and its other calls carry on."""
    overrides = {"max_concurrent_streams": limit} if limit != 100 else {}  # 100: the default
    config = make_test_config(tmp_path, min_gpus=0, **overrides)
    async with open_test_runtime(config) as rt, \
            RawH2.open(rt.listeners.unix_socket) as raw, \
            RawH2.open(rt.listeners.unix_socket) as other:
        with trio.fail_after(30):
            if acknowledged:
                await raw.wait_settings()
                assert raw.conn.remote_settings.max_concurrent_streams == limit
                assert (await raw.call(LIST, grpc_frame(b""))).grpc_status is Status.OK
                raw.ignore_stream_limit()
            # Headers only: each handler waits for its request message, holding its stream.
            streams = [raw.start(GET) for _ in range(limit + 1)]
            await raw.flush()
            extra = raw.responses[streams[-1]]
            while extra.reset is None:
                await raw.pump()
                assert not raw.closed
            assert extra.reset == ErrorCodes.REFUSED_STREAM
            await wait_until(lambda: rt.grpc.in_flight == limit)
            assert not any(raw.responses[s].done for s in streams[:-1])
            # Another connection has its own budget.
            assert (await other.call(LIST, grpc_frame(b""))).grpc_status is Status.OK
            # The held calls complete normally; then the connection takes new streams again.
            body = grpc_frame(pb.GetGpuRequest(name=GPU_A).SerializeToString())
            for sid in streams[:-1]:
                raw.send(sid, body, end_stream=True)
            await raw.flush()
            for sid in streams[:-1]:
                assert (await raw.response(sid)).grpc_status is Status.NOT_FOUND
            assert (await raw.call(LIST, grpc_frame(b""))).grpc_status is Status.OK
            assert not raw.closed and raw.goaway is None
        assert rejected(rt, "max_concurrent_streams") == 1


async def test_a_well_behaved_client_queues_past_the_stream_limit(tmp_path: Path) -> None:
    """grpclib honours SETTINGS_MAX_CONCURRENT_STREAMS: the (limit+1)-th watch on one channel
    waits for a free stream instead of being refused."""
    config = make_test_config(tmp_path, min_gpus=0, max_concurrent_streams=3)
    async with open_test_runtime(config) as rt, open_client(rt) as client:
        await rt.core.store.write(ops.CreateGpu(make_gpu(GPU_A)))
        await run_aio(client.list)  # the channel has the server's SETTINGS from here on
        watches = Watches(client)

        async def scenario() -> None:
            for _ in range(3):
                assert await watches.open() == (Status.OK, "")
            fourth = asyncio.ensure_future(watches.open())
            await asyncio.sleep(0)
            assert not fourth.done()
            assert rt.core.hub.statistics().subscribed_total == 3  # not even sent yet
            await watches.close_one()
            assert await fourth == (Status.OK, "")
            await watches.close_all()

        with trio.fail_after(20):
            await run_aio(scenario)
            await wait_until(lambda: rt.core.hub.statistics().active == 0)
        assert rejected(rt, "max_concurrent_streams") == 0



async def test_a_stream_limit_past_32_bits_means_unlimited(tmp_path: Path) -> None:
    """--max-concurrent-streams is a 32-bit HTTP/2 setting: a larger value (which the flag
    parser accepts) used to crash the whole server at the first connection."""
    config = make_test_config(tmp_path, min_gpus=0, max_concurrent_streams=2**33)
    async with open_test_runtime(config) as rt, RawH2.open(rt.listeners.unix_socket) as raw:
        with trio.fail_after(10):
            assert (await raw.call(LIST, grpc_frame(b""))).grpc_status is Status.OK
            assert raw.conn.remote_settings.max_concurrent_streams == 2**31 - 1
