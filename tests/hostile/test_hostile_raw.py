"""Raw HTTP/2 frames no gRPC library would send, over the Unix socket.

A hypothesis fuzz sends every unary RPC (and gRPC health) garbage protobuf bytes, mutated valid
messages, truncated messages (the prefix says N, fewer bytes follow, then END_STREAM), lying
length prefixes, the compressed flag, declared lengths past 4 MiB, split into random DATA
frames, all on one connection: each answer is the status the server's receive rules give
(checked against a local reading of the same bytes and the model of ``_model.py``), in one
clean line; the connection and the server keep serving; state changes only by valid writes.

Then protocol-level abuse, case by case: wrong or missing headers, malformed requests, unknown
frame types, oversized header blocks, a declared length past the limit refused before the body
is sent, and a client that floods the server with PINGs without reading the answers.
"""

from __future__ import annotations

import collections
import itertools
import struct
from pathlib import Path

import hypothesis.strategies as st
import pytest
import trio
from _hostile import (
    GPU_SERVICE,
    RawH2,
    assert_clean_message,
    grpc_frame,
    grpc_headers,
    rss_kib,
)
from _model import GPU, INVALID, OK, REQUESTS, Limits, Model, Outcome, expect
from google.protobuf.message import DecodeError, Message
from grpclib.const import Status
from grpclib.health.v1.health_pb2 import HealthCheckRequest
from h2.errors import ErrorCodes
from hyperframe.frame import PingFrame
from hypothesis import HealthCheck, given, settings

from deviceapi.proto.device.v1alpha1 import gpu_pb2 as pb
from deviceapi.proto.device.v1alpha1 import provider_pb2 as ppb
from deviceapi.testing.objects import gpu_name, make_gpu
from deviceapi.testing.runtime import make_test_config, open_test_runtime

EXAMPLES = 600
LIMIT = 4 * 1024 * 1024
LIMITS = Limits(max_gpus=8)
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
SERVING_NAMES = {"", "nvidia.device.v1alpha1.GpuService", "nvidia.device.v1alpha1.ProviderService"}

#: Every unary method (WatchGpus keeps its stream open: the client fuzz covers it).
PATHS = [*sorted(p for p in REQUESTS if not p.endswith("/WatchGpus")), HEALTH_CHECK]

_NAMES = [gpu_name(i) for i in range(3)]
_STATUS = pb.GpuStatus(conditions=[pb.Condition(type="Ready", status="True", reason="ok")])
#: Valid requests to mutate, per method.
SAMPLES: dict[str, list[Message]] = {
    GPU + "GetGpu": [pb.GetGpuRequest(name=n) for n in _NAMES],
    GPU + "ListGpus": [pb.ListGpusRequest(opts=pb.ListOptions(resource_version="1"))],
    GPU + "CreateGpu": [pb.CreateGpuRequest(gpu=make_gpu(n, ("Ready", "True"))) for n in _NAMES],
    GPU + "UpdateGpu": [pb.UpdateGpuRequest(gpu=make_gpu(n, ("Ready", "False"))) for n in _NAMES],
    GPU + "UpdateGpuStatus": [pb.UpdateGpuStatusRequest(name=n, status=_STATUS) for n in _NAMES],
    GPU + "DeleteGpu": [pb.DeleteGpuRequest(name=n) for n in _NAMES],
    "/nvidia.device.v1alpha1.ProviderService/RegisterGpu": [
        ppb.ProviderRegisterGpuRequest(name=n, spec=pb.GpuSpec(uuid=n), provider_id="nvml",
                                       initial_status=_STATUS) for n in _NAMES],
    "/nvidia.device.v1alpha1.ProviderService/UnregisterGpu": [
        ppb.ProviderUnregisterGpuRequest(name=n) for n in _NAMES],
    "/nvidia.device.v1alpha1.ProviderService/UpdateGpuStatus": [
        ppb.ProviderUpdateGpuStatusRequest(name=n, status=_STATUS, provider_id="nvml")
        for n in _NAMES],
    "/nvidia.device.v1alpha1.ProviderService/UpdateGpuCondition": [
        ppb.ProviderUpdateGpuConditionRequest(
            name=n, condition=pb.Condition(type="XID", status="False", message="79"),
            provider_id="dcgm") for n in _NAMES],
    "/nvidia.device.v1alpha1.ProviderService/Heartbeat": [
        ppb.HeartbeatRequest(provider_id="nvml", gpu_names=_NAMES)],
    HEALTH_CHECK: [HealthCheckRequest(service=s) for s in sorted(SERVING_NAMES)]
    + [HealthCheckRequest(service="nope")],
}


# -- strategies ------------------------------------------------------------------------------


@st.composite
def mutated(draw: st.DrawFn, path: str) -> bytes:
    data = bytearray(draw(st.sampled_from(SAMPLES[path])).SerializeToString())
    for _ in range(draw(st.integers(0, 4))):  # none: valid writes build up state to abuse
        at = draw(st.integers(0, len(data)))
        match draw(st.sampled_from(["flip", "delete", "insert", "truncate"])):
            case "flip" if data:
                data[at % len(data)] = draw(st.integers(0, 255))
            case "delete":
                del data[at:at + draw(st.integers(1, 8))]
            case "insert":
                data[at:at] = draw(st.binary(min_size=1, max_size=8))
            case _:
                del data[at:]
    return bytes(data)


@st.composite
def bodies(draw: st.DrawFn, path: str) -> tuple[str, bytes, bytes]:
    """(framing, payload, the DATA the client sends)."""
    payload = draw(st.one_of(st.binary(max_size=200), mutated(path), mutated(path)))
    framing = draw(st.sampled_from(
        ["exact", "exact", "exact", "short", "extra", "compressed", "fragment", "empty",
         "oversize"]))
    match framing:
        case "exact":
            data = grpc_frame(payload)
        case "short":  # declares more than it sends, then END_STREAM
            data = grpc_frame(payload, length=len(payload) + draw(st.integers(1, 1000)))
        case "extra":  # declares less than it sends: the rest is not part of the message
            data = grpc_frame(payload + draw(st.binary(min_size=1, max_size=50)),
                              length=len(payload))
        case "compressed":
            flag = draw(st.integers(1, 255))
            data = bytes([flag]) + grpc_frame(payload)[1:]
        case "fragment":  # part of the 5-byte prefix only
            data = grpc_frame(payload)[:draw(st.integers(1, 4))]
        case "empty":
            data = b""
        case _:
            data = grpc_frame(payload, length=draw(st.integers(LIMIT + 1, 2**32 - 1)))
    return framing, payload, data


@st.composite
def chunked(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` as 1 to 4 DATA frames (empty frames included)."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=3)))
    edges = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def expected(model: Model, path: str, framing: str, payload: bytes) -> Outcome:
    """What the server's receive rules make of these bytes, then what the model says."""
    match framing:
        case "empty" | "fragment" | "short":
            return Outcome(INVALID)
        case "compressed":
            return Outcome(frozenset({Status.UNIMPLEMENTED}))
        case "oversize":
            return Outcome(frozenset({Status.RESOURCE_EXHAUSTED}))
    request_type = HealthCheckRequest if path == HEALTH_CHECK else REQUESTS[path]
    try:
        request = request_type.FromString(payload)
    except DecodeError:
        return Outcome(INVALID)
    if path == HEALTH_CHECK:
        serving = request.service in SERVING_NAMES
        return Outcome(OK if serving else frozenset({Status.NOT_FOUND}))
    return expect(model, path, request)


class RawFuzzer:
    def __init__(self, raw: RawH2, base: int) -> None:
        self.raw = raw
        self.model = Model(LIMITS, base)
        self.codes: collections.Counter[tuple[str, str]] = collections.Counter()

    async def run(self, path: str, framing: str, payload: bytes, frames: list[bytes]) -> None:
        outcome = expected(self.model, path, framing, payload)
        raw = self.raw
        sid = raw.start(path, end_stream=not frames)
        for i, frame in enumerate(frames):
            raw.send(sid, frame, end_stream=i == len(frames) - 1)
        await raw.flush()
        response = await raw.response(sid)
        assert not response.connection_lost and response.reset is None, response
        code = response.grpc_status
        assert code is not None, response
        self.codes[(framing, code.name)] += 1
        assert code in outcome.codes, (path, framing, payload, response)
        if code is not Status.OK:
            assert_clean_message(response.grpc_message)
        elif outcome.commit is not None:
            outcome.commit()
        listing = await raw.call(GPU_SERVICE + "ListGpus", grpc_frame(b""))
        assert listing.grpc_status is Status.OK, listing
        self.model.check_list(pb.ListGpusResponse.FromString(listing.messages()[0]).gpu_list)


async def test_fuzz_raw_frames_on_one_connection(tmp_path: Path) -> None:
    config = make_test_config(tmp_path, min_gpus=0, max_gpus=LIMITS.max_gpus,
                              heartbeat_timeout=1e9)
    async with open_test_runtime(config) as rt, RawH2.open(rt.listeners.unix_socket) as raw:
        fuzzer = RawFuzzer(raw, rt.core.store.version_base)

        @settings(max_examples=EXAMPLES, deadline=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.large_base_example])
        @given(st.data())
        def one_stream(data: st.DataObject) -> None:
            path = data.draw(st.sampled_from(PATHS), label="path")
            framing, payload, body = data.draw(bodies(path), label="body")
            frames = data.draw(chunked(body), label="frames")
            trio.from_thread.run(fuzzer.run, path, framing, payload, frames)

        with trio.fail_after(120):
            await trio.to_thread.run_sync(one_stream)
        assert not raw.closed and raw.goaway is None
        assert rt.core.store.statistics().rv == fuzzer.model.rv
        total = sum(fuzzer.codes.values())
        print(f"\nraw-fuzzed {total} streams on one connection; model at rv {fuzzer.model.rv}")
        for (framing, code), count in sorted(fuzzer.codes.items()):
            print(f"  {framing:12} {code:20} {count}")
        assert {f for f, _ in fuzzer.codes} == {
            "exact", "short", "extra", "compressed", "fragment", "empty", "oversize"}


# -- protocol abuse, case by case --------------------------------------------------------------

LIST = GPU_SERVICE + "ListGpus"
_BASE = grpc_headers(LIST)


def _without(name: str) -> list[tuple[str, str]]:
    return [h for h in _BASE if h[0] != name]


def _replace(name: str, value: str) -> list[tuple[str, str]]:
    return [(n, value if n == name else v) for n, v in _BASE]


#: id → (request headers, body, expected HTTP status, expected grpc-status, message part).
ANSWERED: dict[str, tuple[list[tuple[str, str]], bytes, str, Status | None, str]] = {
    "wrong content-type": (_replace("content-type", "application/json"), grpc_frame(b""),
                           "415", Status.UNKNOWN, "content-type"),
    "missing content-type": (_without("content-type"), grpc_frame(b""), "415", Status.UNKNOWN,
                             "content-type"),
    "grpc+json": (_replace("content-type", "application/grpc+json"), grpc_frame(b""), "415",
                  Status.UNKNOWN, "content-type"),
    "GET": (_replace(":method", "GET"), b"", "405", None, ""),
    "no te: trailers": (_without("te"), grpc_frame(b""), "400", Status.UNKNOWN, "te"),
    "unknown method": (_replace(":path", GPU_SERVICE + "DropAll"), grpc_frame(b""), "200",
                       Status.UNIMPLEMENTED, "not found"),
    "path traversal": (_replace(":path", "/../../etc/passwd"), grpc_frame(b""), "200",
                       Status.UNIMPLEMENTED, "not found"),
    "bad grpc-timeout": ([*_BASE, ("grpc-timeout", "soon")], grpc_frame(b""), "200",
                         Status.UNKNOWN, "grpc-timeout"),
    "watch: garbage": (grpc_headers(GPU_SERVICE + "WatchGpus"), grpc_frame(b"\xff\xff"), "200",
                       Status.INVALID_ARGUMENT, "not a valid protobuf"),
    "watch: truncated": (grpc_headers(GPU_SERVICE + "WatchGpus"), grpc_frame(b"", length=9),
                         "200", Status.INVALID_ARGUMENT, "truncated"),
    "unary: two messages": (_BASE, grpc_frame(b"") * 2, "200", Status.OK, ""),
    "reflection: garbage": (grpc_headers(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
        grpc_frame(b"\xff\xff"), "200", Status.INVALID_ARGUMENT, "not a valid protobuf"),
}

#: id → request headers of a malformed request (RFC 9113 §8.1.1: reset, PROTOCOL_ERROR).
MALFORMED: dict[str, list[tuple[str, str]]] = {
    "no :method": _without(":method"),
    "no :path": _without(":path"),
    "non-ASCII header value": [*_BASE, ("x-provider-id", "prövider")],
    "non-ASCII header name": [*_BASE, ("x-prövider", "p")],
}


@pytest.mark.parametrize("case", sorted(ANSWERED))
async def test_protocol_misuse_gets_a_clean_answer(tmp_path: Path, case: str) -> None:
    headers, body, http_status, grpc_status, part = ANSWERED[case]
    async with open_test_runtime(make_test_config(tmp_path, min_gpus=0)) as rt, \
            RawH2.open(rt.listeners.unix_socket) as raw:
        with trio.fail_after(10):
            response = await raw.call(LIST, body, headers=headers)
            assert response.headers.get(":status") == http_status, response
            assert response.grpc_status == grpc_status, response
            assert part.lower() in response.grpc_message.lower()
            assert_clean_message(response.grpc_message)
            after = await raw.call(LIST, grpc_frame(b""))  # the same connection still serves
            assert after.grpc_status is Status.OK


@pytest.mark.parametrize("case", sorted(MALFORMED))
async def test_malformed_request_resets_its_stream_only(tmp_path: Path, case: str) -> None:
    async with open_test_runtime(make_test_config(tmp_path, min_gpus=0)) as rt, \
            RawH2.open(rt.listeners.unix_socket) as raw:
        with trio.fail_after(10):
            before = raw.start(LIST)  # in flight on the same connection meanwhile
            response = await raw.call(LIST, grpc_frame(b""), headers=MALFORMED[case])
            assert response.reset == ErrorCodes.PROTOCOL_ERROR, response
            raw.send(before, grpc_frame(b""), end_stream=True)
            await raw.flush()
            assert (await raw.response(before)).grpc_status is Status.OK
            assert (await raw.call(LIST, grpc_frame(b""))).grpc_status is Status.OK
            assert not raw.closed


async def test_unknown_frame_types_are_ignored(tmp_path: Path) -> None:
    """RFC 9113 §5.5: grpclib raised on h2's UnknownFrameReceived, which under trio-asyncio
    stopped the whole server."""
    async with open_test_runtime(make_test_config(tmp_path, min_gpus=0)) as rt, \
            RawH2.open(rt.listeners.unix_socket) as raw:
        with trio.fail_after(10):
            await raw.wait_settings()
            for frame_type in (0x0C, 0x10, 0x20, 0xFA):  # ORIGIN, PRIORITY_UPDATE, unassigned
                frame = struct.pack(">I", 4)[1:] + bytes([frame_type, 0]) + b"\0\0\0\0" + b"abcd"
                await raw.stream.send_all(frame)
            assert (await raw.call(LIST, grpc_frame(b""))).grpc_status is Status.OK
            assert not raw.closed


async def test_empty_data_frames_do_not_end_the_request(tmp_path: Path) -> None:
    """Empty DATA frames are legal; grpclib's stream buffer took one for the end of the
    stream and answered "missing request message" before the message arrived."""
    async with open_test_runtime(make_test_config(tmp_path, min_gpus=0)) as rt, \
            RawH2.open(rt.listeners.unix_socket) as raw:
        with trio.fail_after(10):
            body = grpc_frame(pb.GetGpuRequest(name=gpu_name(0)).SerializeToString())
            sid = raw.start(GPU_SERVICE + "GetGpu")
            for chunk in (b"", body[:3], b"", body[3:]):
                raw.send(sid, chunk)
            raw.end(sid)
            await raw.flush()
            response = await raw.response(sid)
        assert (response.grpc_status, response.grpc_message) == (
            Status.NOT_FOUND, f"gpu {gpu_name(0)!r} not found")


async def test_a_protocol_error_closes_that_connection_only(tmp_path: Path) -> None:
    """A header block past h2's limit (64 KiB) is a connection error for that client; the
    server serves everyone else."""
    async with open_test_runtime(make_test_config(tmp_path, min_gpus=0)) as rt:
        path = rt.listeners.unix_socket
        assert path is not None
        with trio.fail_after(10):
            async with RawH2.open(path) as bystander, RawH2.open(path) as raw:
                response = await raw.call(LIST, grpc_frame(b""),
                                          headers=[*_BASE, ("x-big", "x" * 100_000)])
                assert response.connection_lost or response.reset is not None
                assert (await bystander.call(LIST, grpc_frame(b""))).grpc_status is Status.OK


@pytest.mark.parametrize("path", [LIST, HEALTH_CHECK])
async def test_declared_length_past_the_limit_is_refused_before_the_body(
    tmp_path: Path, path: str
) -> None:
    """Only the 5-byte prefix is sent (no body, no END_STREAM): the answer comes at once, so
    the server did not wait to buffer the 4 MiB + 1 it was promised. Health (grpclib's own
    service) used to buffer any declared length."""
    async with open_test_runtime(make_test_config(tmp_path, min_gpus=0)) as rt, \
            RawH2.open(rt.listeners.unix_socket) as raw:
        with trio.fail_after(10):
            sid = raw.start(path)
            raw.send(sid, grpc_frame(b"", length=LIMIT + 1))
            await raw.flush()
            response = await raw.response(sid)
        assert response.grpc_status is Status.RESOURCE_EXHAUSTED
        assert response.grpc_message == (
            f"request message of {LIMIT + 1} bytes exceeds the limit of {LIMIT}")
        rejected = rt.metrics.requests_rejected.labels("max_message_bytes")._value.get()
        assert rejected == 1


async def test_streaming_a_huge_declared_message_cannot_grow_memory(tmp_path: Path) -> None:
    """A client that declares 1 GiB and keeps sending is stopped by flow control: the server
    refuses the message and never acknowledges more than its receive window."""
    async with open_test_runtime(make_test_config(tmp_path, min_gpus=0)) as rt, \
            RawH2.open(rt.listeners.unix_socket) as raw:
        before = rss_kib()
        sent = 0
        with trio.fail_after(20):
            await raw.wait_settings()
            sid = raw.start(HEALTH_CHECK)
            raw.send(sid, grpc_frame(b"", length=2**30))
            await raw.flush()
            chunk = b"\0" * 16384
            while not raw.responses[sid].done:
                window = raw.conn.local_flow_control_window(sid)
                if window >= len(chunk):
                    raw.send(sid, chunk)
                    sent += len(chunk)
                    await raw.flush()
                else:
                    await raw.pump()
        assert raw.responses[sid].grpc_status is Status.RESOURCE_EXHAUSTED
        assert sent <= 8 * 2**20
        assert rss_kib() - before < 16 * 1024


async def test_ping_flood_without_reading_is_bounded(tmp_path: Path) -> None:
    """Each PING is answered; a client that never reads the answers used to grow the server's
    write buffer without bound (1.2 MiB of memory per MiB of PINGs). Now the server stops
    reading a connection whose answers pile up."""
    async with open_test_runtime(make_test_config(tmp_path, min_gpus=0)) as rt, \
            RawH2.open(rt.listeners.unix_socket) as raw, \
            RawH2.open(rt.listeners.unix_socket) as bystander:
        ping = PingFrame(0)
        ping.opaque_data = b"12345678"
        burst = ping.serialize() * 4096
        before = rss_kib()
        sent = 0
        with trio.move_on_after(3):  # the flood: as much as the server takes in 3 s
            while True:
                await raw.stream.send_all(burst)
                sent += len(burst)
        print(f"\nPING flood: the server took {sent} bytes, RSS {rss_kib() - before:+d} KiB")
        assert sent < 4 * 2**20, f"the server kept reading: {sent} bytes of PINGs"
        assert rss_kib() - before < 8 * 1024
        with trio.fail_after(10):
            assert (await bystander.call(LIST, grpc_frame(b""))).grpc_status is Status.OK

