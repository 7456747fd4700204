"""Request limits grpclib does not enforce (its issue #195), applied at the transport seam.

grpclib reads a message's 5-byte gRPC prefix and then buffers whatever length the client
claims. :func:`recv_request` reads the prefix itself and refuses a declared length over the limit
*before* buffering a byte of the body, with RESOURCE_EXHAUSTED. It uses grpclib's protocol-level
stream (``Stream._stream``) and codec: the one place we reach below grpclib's public API.
"""

from __future__ import annotations

import struct
from typing import Any, TypeVar, cast

from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

Req = TypeVar("Req")


async def recv_request(stream: Stream[Req, Any], limit: int) -> Req:
    """Receive the single request message of a call, refusing one larger than ``limit``."""
    raw = stream._stream  # grpclib.protocol.Stream
    prefix = await raw.recv_data(5)
    if len(prefix) < 5:
        raise GRPCError(Status.INVALID_ARGUMENT, "missing request message")
    compressed, length = struct.unpack(">?I", prefix)
    if compressed:
        raise GRPCError(Status.UNIMPLEMENTED, "compressed messages are not supported")
    if length > limit:
        raise GRPCError(
            Status.RESOURCE_EXHAUSTED,
            f"request message of {length} bytes exceeds the limit of {limit}",
        )
    body = await raw.recv_data(length)
    if len(body) != length:
        raise GRPCError(Status.INVALID_ARGUMENT, "truncated request message")
    try:
        message = stream._codec.decode(body, stream._recv_type)
    except Exception:
        raise GRPCError(Status.INVALID_ARGUMENT,
                        "request is not a valid protobuf message") from None
    return cast(Req, message)
