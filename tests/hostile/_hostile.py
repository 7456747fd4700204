"""Shared pieces of the hostile-input tests: a hand-driven HTTP/2 client, GPU fixtures, checks.

:class:`RawH2` speaks HTTP/2 itself (the ``h2`` library, over a trio Unix socket) so a test can
send what no gRPC library would: garbage, truncated or oversized messages, wrong headers, more
streams than the server allows. It runs in the test's trio run, beside the in-process server.
"""

from __future__ import annotations

import dataclasses
import os
import re
import struct
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import trio
from grpclib.const import Status
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from h2.settings import SettingCodes

GPU_SERVICE = "/nvidia.device.v1alpha1.GpuService/"
PROVIDER_SERVICE = "/nvidia.device.v1alpha1.ProviderService/"

#: What a client may see in a status message: one line, no traceback, no Python internals.
_LEAKS = re.compile(r"Traceback|File \"|\.py\b|line \d+|Error\(|Exception|0x[0-9a-f]{6,}|"
                    r"deviceapi\.|grpclib|asyncio|trio")


def assert_clean_message(message: str | None) -> None:
    """A status message is one short line and leaks nothing of the server's insides."""
    text = message or ""
    assert "\n" not in text and "\r" not in text, f"multi-line status message: {text!r}"
    assert not _LEAKS.search(text), f"status message leaks internals: {text!r}"


def grpc_frame(payload: bytes, *, compressed: bool = False, length: int | None = None) -> bytes:
    """A length-prefixed gRPC message; ``length`` overrides the declared length."""
    declared = len(payload) if length is None else length
    return struct.pack(">?I", compressed, declared) + payload


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


@dataclasses.dataclass
class RawResponse:
    """What came back on one stream."""

    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    data: bytearray = dataclasses.field(default_factory=bytearray)
    #: DATA frames received (a frame may carry several messages, or part of one).
    frames: int = 0
    trailers: dict[str, str] = dataclasses.field(default_factory=dict)
    reset: ErrorCodes | int | None = None
    ended: bool = False
    connection_lost: bool = False

    @property
    def done(self) -> bool:
        return self.ended or self.reset is not None or self.connection_lost

    @property
    def grpc_status(self) -> Status | None:
        """The grpc-status of the trailers (or of a trailers-only response)."""
        value = self.trailers.get("grpc-status", self.headers.get("grpc-status"))
        return None if value is None else Status(int(value))

    @property
    def grpc_message(self) -> str:
        return self.trailers.get("grpc-message", self.headers.get("grpc-message", ""))

    def messages(self) -> list[bytes]:
        """The length-prefixed messages of the response body."""
        out: list[bytes] = []
        data = bytes(self.data)
        while len(data) >= 5:
            _, length = struct.unpack(">?I", data[:5])
            out.append(data[5:5 + length])
            data = data[5 + length:]
        return out


def grpc_headers(path: str, *, content_type: str = "application/grpc",
                 extra: Sequence[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    return [(":method", "POST"), (":scheme", "http"), (":path", path),
            (":authority", "localhost"), ("content-type", content_type), ("te", "trailers"),
            *extra]


class RawH2:
    """One hand-driven HTTP/2 client connection (single task; not thread-safe)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = H2Connection(H2Configuration(
            client_side=True, header_encoding="utf-8", validate_outbound_headers=False,
            validate_inbound_headers=False))
        self.responses: dict[int, RawResponse] = {}
        self.closed = False
        self.goaway: ConnectionTerminated | None = None
        self.conn.initiate_connection()

    @classmethod
    @asynccontextmanager
    async def open(cls, path: str, *, tcp_port: int | None = None) -> AsyncIterator[RawH2]:
        """A connection to the Unix socket at ``path``, or to ``tcp_port`` on the loopback."""
        stream = (await trio.open_tcp_stream("127.0.0.1", tcp_port) if tcp_port is not None
                  else await trio.open_unix_socket(path))
        async with stream:
            raw = cls(stream)
            await raw.flush()
            yield raw

    async def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.closed:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._lost()

    def start(self, path: str, *, headers: Sequence[tuple[str, str]] | None = None,
              end_stream: bool = False) -> int:
        """Open a stream with gRPC request headers (or the given ones); returns its id."""
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, list(headers) if headers is not None else grpc_headers(path),
                               end_stream=end_stream)
        self.responses[sid] = RawResponse()
        return sid

    def send(self, sid: int, data: bytes, *, end_stream: bool = False) -> None:
        self.conn.send_data(sid, data, end_stream=end_stream)

    def end(self, sid: int) -> None:
        self.conn.end_stream(sid)

    def ignore_stream_limit(self) -> None:
        """Behave like a client that disregards the server's SETTINGS_MAX_CONCURRENT_STREAMS."""
        self.conn.remote_settings.update({SettingCodes.MAX_CONCURRENT_STREAMS: 2**31 - 1})
        self.conn.remote_settings.acknowledge()

    async def call(self, path: str, body: bytes, *, end_stream: bool = True,
                   headers: Sequence[tuple[str, str]] | None = None) -> RawResponse:
        """One request: headers, ``body`` as DATA (may be empty), END_STREAM; its response."""
        sid = self.start(path, headers=headers, end_stream=not body and end_stream)
        if body:
            self.send(sid, body, end_stream=end_stream)
        await self.flush()
        return await self.response(sid)

    async def response(self, sid: int) -> RawResponse:
        """Read until stream ``sid`` is answered in full, reset, or the connection closes."""
        response = self.responses[sid]
        while not response.done:
            await self.pump()
        return response

    async def pump(self) -> None:
        """Read once from the socket and process what came."""
        if self.closed:
            return
        try:
            data = await self.stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            self._lost()
            return
        for event in self.conn.receive_data(data):
            self._on_event(event)
        await self.flush()

    async def wait_settings(self) -> None:
        """Until the server's first SETTINGS frame has been received (and acknowledged)."""
        while SettingCodes.MAX_CONCURRENT_STREAMS not in self.conn.remote_settings:
            await self.pump()
            assert not self.closed

    def _on_event(self, event: object) -> None:
        sid = getattr(event, "stream_id", None)
        response = self.responses.get(sid) if sid is not None else None
        if isinstance(event, ResponseReceived) and response is not None:
            response.headers = _decode(event.headers)
        elif isinstance(event, TrailersReceived) and response is not None:
            response.trailers = _decode(event.headers)
        elif isinstance(event, DataReceived):
            if response is not None:
                response.data += event.data
                response.frames += 1
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, StreamEnded) and response is not None:
            response.ended = True
        elif isinstance(event, StreamReset) and response is not None:
            response.reset = event.error_code
        elif isinstance(event, ConnectionTerminated):
            self.goaway = event

    def _lost(self) -> None:
        self.closed = True
        for response in self.responses.values():
            if not response.done:
                response.connection_lost = True


def _decode(headers: object) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in headers:  # type: ignore[attr-defined]
        key = name.decode() if isinstance(name, bytes) else name
        out[key] = value.decode() if isinstance(value, bytes) else value
    return out


async def scrape(port: int) -> str:
    """GET /metrics from the runtime's metrics port (Prometheus text)."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(
            b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        chunks = []
        while chunk := await stream.receive_some(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"200", head
    return body.decode()


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_text = head.partition("{")
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', label_text))
        if metric == name and found == labels:
            return float(value)
    return 0.0
