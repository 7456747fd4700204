"""A protobuf codec that also sends messages serialized in advance.

Some answers are the same bytes for many callers (ListGpus at one resource version, when every
informer relists after a restart): they are serialized once and handed to grpclib as
:class:`PreEncoded`, which this codec writes as is.
"""

from __future__ import annotations

from typing import Any

from grpclib.encoding.proto import ProtoCodec


class PreEncoded:
    """A message that is already serialized."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class Codec(ProtoCodec):
    def encode(self, message: Any, message_type: Any) -> bytes:
        if isinstance(message, PreEncoded):
            return message.data
        return super().encode(message, message_type)
