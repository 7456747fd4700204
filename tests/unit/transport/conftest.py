"""Helpers for the operations tests: a raw HTTP/1.1 client over a real TCP socket."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable

import pytest
import trio


@dataclasses.dataclass(frozen=True)
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes


def parse_response(data: bytes) -> RawResponse:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return RawResponse(status, headers, body)


async def exchange(port: int, raw: bytes) -> RawResponse:
    """Send ``raw`` to 127.0.0.1:port and read until the server closes."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        if raw:
            await stream.send_all(raw)
        chunks = []
        while chunk := await stream.receive_some(65536):
            chunks.append(chunk)
    return parse_response(b"".join(chunks))


Get = Callable[..., Awaitable[RawResponse]]


@pytest.fixture
def http_get() -> Get:
    async def get(port: int, path: str, *, method: str = "GET", headers: str = "") -> RawResponse:
        raw = f"{method} {path} HTTP/1.1\r\nHost: test\r\n{headers}\r\n".encode()
        return await exchange(port, raw)

    return get


@pytest.fixture
def http_raw() -> Callable[[int, bytes], Awaitable[RawResponse]]:
    return exchange
