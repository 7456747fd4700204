"""Send a stream message only when HTTP/2 flow control lets all of it go at once.

grpclib writes a message in as many DATA frames as the peer's window allows, waiting in between.
If a watch stream were abandoned (evicted) in that wait, the client would be left with half a
message and could not read the RESOURCE_EXHAUSTED status behind it. So before each message the
watch pump waits — cancellably, and without writing anything — until the stream's window
(which in h2 is the smaller of the stream's and the connection's) holds the whole message; the
send itself then completes without suspending. This reads grpclib's protocol-level stream
(``Stream._stream``): the same seam as _limits.py.
"""

from __future__ import annotations

from typing import Any

from grpclib.server import Stream


async def wait_send_window(stream: Stream[Any, Any], message_size: int) -> None:
    """Wait until ``message_size`` bytes (plus the 5-byte gRPC prefix) fit the send window.

    A message larger than the peer's initial window could never fit; for that one we wait for
    a full window only (and accept that it may be written in several frames).
    """
    raw = stream._stream
    h2 = raw._h2_connection
    needed = min(message_size + 5, h2.remote_settings.initial_window_size)
    while raw.id is not None and h2.local_flow_control_window(raw.id) < needed:
        raw.window_updated.clear()
        await raw.window_updated.wait()
