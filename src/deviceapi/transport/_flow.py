"""Writing watch events: pre-encoded, several per HTTP/2 write, and only whole messages.

Fan-out is the hot path (every commit times every watcher), so events arrive here already
serialized once (the hub shares the bytes between watchers) and a stream's queued events go out
in one DATA frame instead of one write each.

Flow control: grpclib writes a message in as many DATA frames as the peer's window allows,
waiting in between. If a stream were abandoned (evicted) in that wait, the client would be left
with half a message and could not read the RESOURCE_EXHAUSTED status behind it. So the writer
first waits — cancellably, without writing anything — until the window and the transport can
take a whole group of messages, and keeps a group within one frame so the write itself does not
suspend. ``writing`` tells the pump when a (larger than one frame) message is on its way, so an
eviction lets it finish. This reads grpclib's protocol-level stream (``Stream._stream``): the
same seam as _limits.py.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
from collections.abc import Sequence
from typing import Any, Protocol

from grpclib.server import Stream
from h2.connection import ConnectionState
from h2.stream import StreamState

_PREFIX = struct.Struct(">?I")
#: An HTTP/2 frame header: 24-bit length, type (0: DATA), flags (none), stream id.
_DATA_HEADER = struct.Struct(">BHBBI")
#: Stream states in which a server may send DATA (h2: no state change).
_SENDABLE = (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE)
#: Linux's SIOCOUTQ (the same number as TIOCOUTQ); 0 where the platform has no such ioctl.
_SIOCOUTQ: int = getattr(termios, "TIOCOUTQ", 0)
_INT = struct.Struct("i")
_FOUR = bytes(_INT.size)


def frame(message: bytes) -> bytes:
    """The 5-byte gRPC prefix (uncompressed, length) and the message."""
    return _PREFIX.pack(False, len(message)) + message


class _Socket(Protocol):
    def fileno(self) -> int: ...


def peer_has_unread(sock: _Socket) -> bool:
    """Whether the reader of this Unix stream socket (a socket, or asyncio's view of one)
    has not yet taken all that was written to it: the kernel charges written data to the
    writer until the reader takes it, and SIOCOUTQ reads that charge. False once the socket is
    closed (its descriptor is looked up each time, and a connection torn down before grpclib
    noticed is not an error) or where the ioctl fails."""
    fd = sock.fileno()
    if fd < 0:
        return False
    try:
        return bool(_INT.unpack(fcntl.ioctl(fd, _SIOCOUTQ, _FOUR))[0])
    except OSError:
        return False


class StreamWriter:
    """Whole-message writes of pre-encoded messages to one server stream."""

    def __init__(self, stream: Stream[Any, Any]) -> None:
        self._stream = stream
        self._raw = stream._stream
        self._h2 = self._raw._h2_connection
        self.writing = False
        self._started = False
        #: Whether the connection is a Unix socket (decided on first use; see client_has_unread).
        self._unix: bool | None = None

    def _window(self) -> int:
        stream_id = self._raw.id
        assert stream_id is not None, "a server stream has its id from the request"
        return int(self._h2.local_flow_control_window(stream_id))

    async def _wait_writable(self, size: int) -> None:
        """Wait until ``size`` bytes fit the send window (capped at the peer's initial window:
        a bigger message could never fit) and the transport accepts writes."""
        raw = self._raw
        needed = min(size, self._h2.remote_settings.initial_window_size)
        while True:
            await raw.connection.write_ready.wait()
            if self._window() >= needed:
                return
            raw.window_updated.clear()
            await raw.window_updated.wait()

    async def start(self) -> None:
        """Send the response headers (once; before any message)."""
        if not self._started:
            await self._stream.send_initial_metadata()
            self._started = True

    def client_has_unread(self) -> bool:
        """Whether the client has not yet read all that was written to this connection
        (:func:`peer_has_unread` on its Unix socket; False on TCP, where SIOCOUTQ counts bytes
        the peer's kernel has not acknowledged, which says nothing about the client)."""
        sock = self._raw._transport.get_extra_info("socket")
        if self._unix is None:
            self._unix = sock is not None and _SIOCOUTQ != 0 and sock.family == socket.AF_UNIX
        return bool(self._unix) and sock is not None and peer_has_unread(sock)

    def can_write_now(self) -> bool:
        """Whether :meth:`write_framed` can write at all (headers sent, transport not paused).

        When it cannot, the caller leaves its messages to :meth:`write_some`, which waits, and
        fails the way grpclib does; a hub can so write to every idle stream in one host-loop
        callback instead of waking one task per stream."""
        return (self._raw.id is not None and self._started
                and self._raw.connection.write_ready.is_set())

    @property
    def frame_limit(self) -> int:
        """The most bytes one write may carry (the peer's largest frame)."""
        return int(self._h2.max_outbound_frame_size)

    def write_framed(self, data: bytes) -> bool:
        """Write ``data`` (whole gRPC messages, already framed) in one DATA frame, now, without
        waiting; False (nothing written) when it cannot go out whole right now. The caller has
        checked :meth:`can_write_now`. Fan-out frames a run of events once and writes the same
        bytes to every stream that is at the same place.

        This is a flusher's innermost step (once per stream per flush), so it does what h2's
        ``send_data`` does for an open stream, without building and serializing a frame object
        and copying the data twice through h2's buffer: debit both flow-control windows and
        write the 9-byte DATA frame header with the data. Any other case (stream or connection
        not open, window too small) returns False, and the waiting path goes through h2."""
        raw = self._raw
        h2 = self._h2
        stream_id = raw.id
        size = len(data)
        try:
            stream = h2.streams.get(stream_id) if stream_id is not None else None
            if (stream is None or stream.state_machine.state not in _SENDABLE
                    or h2.state_machine.state is not ConnectionState.SERVER_OPEN
                    or size > min(stream.outbound_flow_control_window,
                                  h2.outbound_flow_control_window,
                                  h2.max_outbound_frame_size)):
                return False
        except Exception:  # the waiting path meets it again and raises it properly
            return False
        stream.outbound_flow_control_window -= size
        h2.outbound_flow_control_window -= size
        header = _DATA_HEADER.pack(size >> 16, size & 0xFFFF, 0, 0, stream_id)
        raw._transport.write(h2.data_to_send() + header + data)  # h2's own bytes go first
        raw.data_sent += size
        raw.connection.data_sent += size
        raw.connection.data_send_process()
        return True

    async def write_some(self, messages: Sequence[bytes]) -> int:
        """Write the first few of ``messages`` (at least one) in one go; return how many."""
        await self.start()
        first = _PREFIX.size + len(messages[0])
        await self._wait_writable(first)
        budget = max(first, min(self._window(), self._h2.max_outbound_frame_size))
        parts: list[bytes] = []
        size = 0
        for message in messages:
            framed = _PREFIX.size + len(message)
            if parts and size + framed > budget:
                break
            parts.append(frame(message))
            size += framed
        self.writing = True
        try:
            await self._raw.send_data(b"".join(parts))
        finally:
            self.writing = False
        return len(parts)
