"""Request limits grpclib does not enforce (its issue #195), applied at the transport seam.

grpclib reads a message's 5-byte gRPC prefix and then buffers whatever length the client
claims. :func:`recv_request` reads the prefix itself and refuses a declared length over the limit
*before* buffering a byte of the body, with RESOURCE_EXHAUSTED. Refusals are domain errors (or
GRPCError UNIMPLEMENTED for compression), so the caller's ``rpc_errors`` maps and counts them.
:func:`limit_requests` puts the same reading under the services we do not write.
It uses grpclib's protocol-level stream (``Stream._stream``) and codec: the one place we reach
below grpclib's public API.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar, cast

from grpclib.const import Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from .._errors import InvalidArgument, ResourceExhausted
from ._status import rpc_errors

Req = TypeVar("Req")


async def recv_request(stream: Stream[Req, Any], limit: int) -> Req:
    """Receive the single request message of a call, refusing one larger than ``limit``."""
    message = await recv_message(stream, limit)
    if message is None:
        raise InvalidArgument("missing request message")
    return message


async def recv_message(stream: Stream[Req, Any], limit: int) -> Req | None:
    """Receive the next request message, or None once the client has ended its side."""
    raw = stream._stream  # grpclib.protocol.Stream
    prefix = await _recv_exactly(raw, 5)
    if not prefix:
        return None
    compressed, length = struct.unpack(">?I", prefix)
    if compressed:
        raise GRPCError(Status.UNIMPLEMENTED, "compressed messages are not supported")
    if length > limit:
        raise ResourceExhausted(
            f"request message of {length} bytes exceeds the limit of {limit}",
            "max_message_bytes",
        )
    body = await _recv_exactly(raw, length)
    if len(body) != length:
        raise InvalidArgument("truncated request message")
    try:
        message = stream._codec.decode(body, stream._recv_type)
    except Exception:
        raise InvalidArgument("request is not a valid protobuf message") from None
    return cast(Req, message)


def limit_requests(mapping: Mapping[str, Handler], limit: int,
                   on_reject: Callable[[str], None]) -> dict[str, Handler]:
    """Make handlers we do not write (grpclib's health and reflection services) receive their
    requests through :func:`recv_message`: grpclib's own ``recv_message`` would buffer any
    declared length (a client could make the server hold gigabytes) and answers a malformed
    request with UNKNOWN."""

    def guard(path: str, handler: Handler) -> Handler:
        func: Callable[[Stream[Any, Any]], Awaitable[None]] = handler.func
        unary = not handler.cardinality.client_streaming

        async def guarded(stream: Stream[Any, Any]) -> None:
            async def recv() -> Any:
                with rpc_errors(path, on_reject):
                    if unary:
                        return await recv_request(stream, limit)
                    return await recv_message(stream, limit)

            stream.recv_message = recv  # type: ignore[method-assign]  # this call's stream only
            await func(stream)

        return handler._replace(func=guarded)

    return {path: guard(path, handler) for path, handler in mapping.items()}


async def _recv_exactly(raw: Any, size: int) -> bytes:
    """``size`` bytes of the request body, or b"" when it ended before any arrived.

    grpclib's buffer raises ``AssertionError`` when the stream ends part-way through ``size``
    bytes (a client declared more than it sent): that is the client's error, not ours.
    """
    try:
        data: bytes = await raw.recv_data(size)
    except AssertionError:
        raise InvalidArgument("truncated request message") from None
    return data
