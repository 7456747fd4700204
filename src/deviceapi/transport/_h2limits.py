"""HTTP/2 connection limits and hardening that grpclib does not provide (its issue #195).

**Concurrent streams.** grpclib builds every connection's h2 state machine with h2's defaults,
so the stream limit a server advertises and enforces would be h2's built-in 100 whatever
``--max-concurrent-streams`` says. :class:`LimitedServer` is a grpclib ``Server`` whose
connections advertise the configured limit (SETTINGS_MAX_CONCURRENT_STREAMS) right after the
connection preface, and enforce it from the first frame (h2 itself would go on applying its
default until the client acknowledges our SETTINGS). Enforcement is a
*stream* error, as RFC 9113 §5.1.2 asks: a HEADERS frame that would open one stream too many is
answered with RST_STREAM(REFUSED_STREAM) — the request was not processed and may be retried —
and the connection carries on with its other streams. (h2 alone treats it as a connection
error, which would drop every call on the connection for one extra stream.)

**Hardening.** Under trio-asyncio, an exception that escapes a protocol callback reaches the
loop's exception handler, which re-raises it in the server's own task tree: one bad frame from
one client would stop the whole server (grpclib let a non-ASCII header and an unknown frame
type through that way). So, on every connection:

- a frame of an unknown type is ignored, as RFC 9113 §5.5 requires (grpclib raised
  ``NotImplementedError`` for h2's ``UnknownFrameReceived``);
- a request whose header block is not ASCII (grpclib's h2 header encoding), or that lacks
  ``:method`` or ``:path`` (grpclib's handler would fail on it and leave the stream
  unanswered), is a malformed request: its stream is reset with PROTOCOL_ERROR (RFC 9113
  §8.1.1) and grpclib never sees it;
- anything else a connection's data fails with closes that connection only, with one log line;
- an empty DATA frame that does not end the stream (legal, and meaningless) never reaches
  grpclib, whose stream buffer took it for the end of the stream and answered the request
  before its message had arrived;
- a client that sends but does not read (a PING or SETTINGS flood, each answered by the server)
  cannot grow the server's write buffer without bound: while asyncio holds the transport's
  writes paused (its buffer above the high-water mark), the connection is not read either.

This reaches below h2's public API in one place: the connection's dispatch entry for HEADERS
frames, and, for a refused stream, h2's own steps to open and reset a stream, so that its
bookkeeping (HPACK state, stream ids, flow control of DATA still in flight on the stream) stays
exactly as for any stream the server resets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Callable, Collection
from typing import Any, cast

from grpclib.protocol import H2Protocol
from grpclib.server import Server
from h2.connection import (
    AllowedStreamIDs,
    ConnectionInputs,
    H2Connection,
    _decode_headers,
)
from h2.errors import ErrorCodes
from h2.events import (
    DataReceived,
    Event,
    RequestReceived,
    StreamEnded,
    UnknownFrameReceived,
)
from h2.exceptions import TooManyStreamsError
from h2.settings import SettingCodes
from hyperframe.frame import Frame, HeadersFrame

log = logging.getLogger("deviceapi.grpc")

Refused = Callable[[], None]
EventHandler = Callable[[Any], None]

_FrameResult = tuple[list[Frame], list[Event]]
#: Pseudo-headers grpclib's request handler indexes without checking.
_REQUIRED = frozenset({":method", ":path"})
_MAX_SETTING = 2**31 - 1


def _ignore() -> None:
    return None


def _ignore_event(event: Event) -> None:
    return None


class StreamLimit:
    """Guards inbound HEADERS on one h2 connection: the stream limit and malformed requests."""

    def __init__(self, connection: H2Connection, limit: int, on_refused: Refused = _ignore
                 ) -> None:
        self.limit = limit
        self.refused = 0
        self.malformed = 0
        self._connection = connection
        self._on_refused = on_refused
        table = connection._frame_dispatch_table
        self._receive_headers: Callable[[HeadersFrame], _FrameResult] = table[HeadersFrame]
        table[HeadersFrame] = self._on_headers

    def _on_headers(self, frame: HeadersFrame) -> _FrameResult:
        connection = self._connection
        sid = frame.stream_id
        opens_stream = sid not in connection.streams
        if opens_stream and connection.open_inbound_streams >= self.limit:
            return self._refuse(frame)
        try:
            frames, events = self._receive_headers(frame)
        except TooManyStreamsError:
            # h2's own limit, still its default until the client acknowledges our SETTINGS.
            return self._refuse(frame)
        except UnicodeDecodeError:
            if not opens_stream or sid not in connection.streams:
                raise  # trailers grpclib already waits on: the connection is closed instead
            return self._reset_malformed(sid, [])
        if opens_stream and any(isinstance(e, RequestReceived) and not _well_formed(e)
                                for e in events):
            return self._reset_malformed(sid, events)
        return frames, events

    def _refuse(self, frame: HeadersFrame) -> _FrameResult:
        """Open the stream as h2 would, reset it at once, and tell grpclib nothing about it."""
        connection = self._connection
        # Decoding keeps the HPACK table in step with the client's, refused or not.
        headers = _decode_headers(connection.decoder, frame.data)
        events = connection.state_machine.process_input(ConnectionInputs.RECV_HEADERS)
        # Raises h2's protocol errors for a stream id that is reused, too low or even.
        stream = connection._begin_new_stream(frame.stream_id, AllowedStreamIDs.ODD)
        with contextlib.suppress(UnicodeDecodeError):  # refused anyway; its state advanced
            stream.receive_headers(headers, "END_STREAM" in frame.flags,
                                   connection.config.header_encoding)
        connection.reset_stream(frame.stream_id, ErrorCodes.REFUSED_STREAM)
        self.refused += 1
        self._on_refused()
        return [], events

    def _reset_malformed(self, sid: int, events: list[Event]) -> _FrameResult:
        """RFC 9113 §8.1.1: a malformed request is a stream error of type PROTOCOL_ERROR."""
        self._connection.reset_stream(sid, ErrorCodes.PROTOCOL_ERROR)
        self.malformed += 1
        kept = [e for e in events if not (isinstance(e, (RequestReceived, StreamEnded))
                                          and e.stream_id == sid)]
        return [], kept


def _well_formed(event: RequestReceived) -> bool:
    names = {name for name, _ in event.headers or ()}
    return names >= _REQUIRED


def _skip_empty(process: EventHandler) -> Callable[[DataReceived], None]:
    def process_data(event: DataReceived) -> None:
        if event.data or event.flow_controlled_length:
            process(event)

    return process_data


class _LimitedProtocol(H2Protocol):
    """grpclib's connection protocol, plus the stream limit and the hardening above."""

    def __init__(self, base: H2Protocol, limit: int, on_refused: Refused) -> None:
        super().__init__(base.handler, base.config, base.h2_config)
        self._limit = limit
        self._on_refused = on_refused
        self.stream_limit: StreamLimit | None = None
        self._transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self._transport = transport
        super().connection_made(transport)
        processors = self.processor.processors
        processors[UnknownFrameReceived] = _ignore_event
        processors[DataReceived] = _skip_empty(cast(EventHandler, processors[DataReceived]))
        h2_connection = self.connection._connection
        h2_connection.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: self._limit})
        self.stream_limit = StreamLimit(h2_connection, self._limit, self._on_refused)
        self.connection.flush()

    def abort(self) -> None:
        """Drop the connection without flushing (see :meth:`LimitedServer.abort_connections`)."""
        if self._transport is not None:
            self._transport.abort()  # a no-op once the connection is gone

    def pause_writing(self) -> None:
        super().pause_writing()
        self._transport.pause_reading()  # no-op once closing

    def resume_writing(self) -> None:
        super().resume_writing()
        self._transport.resume_reading()

    def is_open(self) -> bool:
        connection = getattr(self, "connection", None)
        return connection is not None and not connection.is_closing()

    def close_connection(self) -> None:
        """Send GOAWAY and close this connection (server shutdown); idempotent."""
        if not self.is_open():
            return
        connection = self.connection
        connection._connection.close_connection()
        connection.flush()
        self.processor.close("Server shut down")

    def data_received(self, data: bytes) -> None:
        try:
            super().data_received(data)
        except Exception as exc:
            # Never let it reach the loop's exception handler (see the module docstring).
            log.warning("closing a connection whose data could not be processed",
                        extra={"reason": type(exc).__name__})
            self.processor.close("Protocol error")


class LimitedServer(Server):
    """A grpclib ``Server`` whose every connection allows at most ``max_concurrent_streams``
    concurrent streams; ``on_refused`` is called for each stream refused past it."""

    def __init__(self, handlers: Collection[Any], *, max_concurrent_streams: int,
                 on_refused: Refused = _ignore, **kwargs: Any) -> None:
        super().__init__(handlers, **kwargs)
        # A SETTINGS value is 32 bits; past 2^31 - 1 stream ids run out anyway ("unlimited").
        self.max_concurrent_streams = min(max_concurrent_streams, _MAX_SETTING)
        self._on_refused = on_refused
        self._protocols: weakref.WeakSet[_LimitedProtocol] = weakref.WeakSet()

    def _protocol_factory(self) -> H2Protocol:
        # grpclib's factory registers the connection's handler; keep that, wrap the protocol.
        base = super()._protocol_factory()
        protocol = _LimitedProtocol(base, self.max_concurrent_streams, self._on_refused)
        self._protocols.add(protocol)
        return protocol

    @property
    def open_connections(self) -> int:
        return sum(1 for p in self._protocols if p.is_open())

    def close_connections(self) -> None:
        """Close every accepted connection with a GOAWAY. grpclib's ``close()`` only cancels
        running calls: an idle client would keep a half-dead connection (and the server an
        open socket) until its next call timed out."""
        for protocol in list(self._protocols):
            protocol.close_connection()

    def abort_connections(self) -> None:
        """Drop every connection at once, unsent data and all: the last step of a shutdown
        whose connections did not close in time (a client that stopped reading keeps a
        closing transport waiting for its buffer to drain)."""
        for protocol in list(self._protocols):
            protocol.abort()

    async def wait_calls_closed(self) -> None:
        """Wait until the calls ``close()`` cancelled have finished — not for the connections:
        grpclib's ``wait_closed`` awaits ``asyncio.Server.wait_closed``, which from Python 3.12
        waits until every client has disconnected."""
        handlers = self._handlers
        if handlers:
            await asyncio.wait({asyncio.ensure_future(h.wait_closed()) for h in handlers})

    async def wait_connections_closed(self) -> None:
        """Wait until the listening socket and every connection are closed (after
        :meth:`close_connections`; the caller bounds it)."""
        server = self._server
        if server is not None:
            await server.wait_closed()
