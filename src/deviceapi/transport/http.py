"""A small trio-native HTTP/1.1 server for the health and metrics ports (SPEC §6).

It serves a handful of GET endpoints to kubelet probes and Prometheus, so it is deliberately
minimal: one request per connection (``Connection: close``), no request bodies, no chunked
encoding, no keep-alive. What it does bound, because the ports are reachable from the node:

- the request line (``max_request_line`` bytes → 414) and the whole head (``max_head_bytes`` →
  431);
- the time a client may take to send its head, and to take the response (``request_timeout``
  seconds of trio time each → 408 / close), so a slow or silent client cannot hold a connection;
- the number of connections served at once (``max_connections``): the accept loop waits for a
  free slot before accepting, so excess clients wait in the kernel's backlog.

An *app* is a plain function ``Request -> Response`` (it must not block: it runs on the event
loop); :func:`health_app` and :func:`metrics_app` build the two the server uses.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit

import trio
from prometheus_client.exposition import choose_encoder

from .metrics import ServerMetrics

log = logging.getLogger("deviceapi.http")


_REASONS: Mapping[int, str] = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
# accept() errors that mean "out of descriptors or memory right now": wait and retry, as
# trio.serve_listeners does, rather than crash the listener.
_TRANSIENT_ACCEPT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})

TEXT_PLAIN = "text/plain; charset=utf-8"
# Lingering close bounds (see _drain).
_DRAIN_SECONDS = 1.0
_DRAIN_BYTES = 65536


@dataclasses.dataclass(frozen=True, slots=True)
class HttpLimits:
    """Per-server bounds (see the module docstring)."""

    #: Seconds (trio time) a client gets to send its request head, and again to take the
    #: response.
    request_timeout: float = 10.0
    max_request_line: int = 4096
    max_head_bytes: int = 16384
    max_connections: int = 64


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    """One parsed request head. Header names are lower case; repeated headers are joined with
    ``", "``."""

    method: str
    path: str
    query: str
    headers: Mapping[str, str]


@dataclasses.dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = TEXT_PLAIN
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def text(cls, status: int, text: str, *headers: tuple[str, str]) -> Response:
        """A one-line plain-text response (a trailing newline is added)."""
        return cls(status, (text.rstrip("\n") + "\n").encode(), TEXT_PLAIN, headers)


HttpApp = Callable[[Request], Response]
Readiness = Callable[[], tuple[bool, str]]


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# -- apps ----------------------------------------------------------------------------------------


def route(routes: Mapping[str, HttpApp]) -> HttpApp:
    """An app dispatching on the exact path: unknown path → 404; a known path with a method
    other than GET or HEAD → 405 (HEAD is answered like GET, without the body)."""
    table = dict(routes)

    def app(request: Request) -> Response:
        handler = table.get(request.path)
        if handler is None:
            return Response.text(404, "not found")
        if request.method not in ("GET", "HEAD"):
            return Response.text(405, "method not allowed", ("Allow", "GET, HEAD"))
        return handler(request)

    return app


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "not ready"


def health_app(ready: Readiness) -> HttpApp:
    """The health port: ``/healthz`` and ``/livez`` answer 200 while the process serves;
    ``/readyz`` answers 200 when ``ready()`` says so, else 503 with its one-line reason.

    ``ready`` is called on every probe and must not block; if it raises, the probe answers 503
    (and the error is logged): a broken readiness check must not look ready.
    """

    def alive(_: Request) -> Response:
        return Response.text(200, "ok")

    def readyz(_: Request) -> Response:
        try:
            is_ready, reason = ready()
        except Exception:
            log.warning("readiness check failed", exc_info=True)
            return Response.text(503, "readiness check failed")
        if is_ready:
            return Response.text(200, "ok")
        return Response.text(503, _one_line(reason))

    return route({"/healthz": alive, "/livez": alive, "/readyz": readyz})


def metrics_app(metrics: ServerMetrics) -> HttpApp:
    """The metrics port: ``/metrics`` refreshes the mirrored gauges, then renders the registry
    as Prometheus text (0.0.4), or as OpenMetrics when the Accept header asks for
    ``application/openmetrics-text``."""

    def scrape(request: Request) -> Response:
        metrics.refresh()
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(200, encoder(metrics.registry), content_type)

    return route({"/metrics": scrape})


# -- server --------------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class HttpPorts:
    """The bound HTTP ports (they differ from the flags when those ask for port 0)."""

    health: int = 0
    metrics: int = 0


class HttpEndpoints:
    """A server's two HTTP ports (health probes, metrics) as one supervised child.

    Each incarnation binds both, then records the ports it got in :attr:`ports`."""

    def __init__(self, health: tuple[str | None, int], metrics: tuple[str | None, int],
                 ready: Readiness, server_metrics: ServerMetrics) -> None:
        self._health = health
        self._metrics = metrics
        self._ready = ready
        self._server_metrics = server_metrics
        self.ports = HttpPorts()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        async with trio.open_nursery() as nursery:
            self.ports.health = await nursery.start(
                serve_http, *self._health, health_app(self._ready))
            self.ports.metrics = await nursery.start(
                serve_http, *self._metrics, metrics_app(self._server_metrics))
            task_status.started()


async def serve_http(
    host: str | None,
    port: int,
    app: HttpApp,
    *,
    limits: HttpLimits = HttpLimits(),
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``host:port`` until cancelled. Start it with ``nursery.start``, which
    returns the bound port (useful with ``port=0``; with several addresses, the first one's).

    ``host`` None or ``""`` listens on every interface. A bind failure (address in use, an
    address this host does not have, a name that does not resolve) raises ``OSError`` naming
    the address and port, before ``started`` (so ``nursery.start`` raises it). The original
    error is not chained: the server prints the innermost cause of a startup failure, and the
    operator needs the port, which only this one names. On cancellation the listeners close and
    the connections being served are cancelled.
    """
    where = f"[{host}]:{port}" if host and ":" in host else f"{host or '*'}:{port}"
    try:
        listeners = await trio.open_tcp_listeners(port, host=host or None)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise OSError(exc.errno, f"HTTP listener {where}: {reason}") from None
    slots = trio.Semaphore(limits.max_connections)
    try:
        bound: int = listeners[0].socket.getsockname()[1]
        shown = f"[{host}]" if host and ":" in host else host or "*"
        log.info("HTTP listening on %s:%d", shown, bound)
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(_accept_loop, listener, slots, app, limits)
            task_status.started(bound)
    finally:
        for listener in listeners:
            with trio.CancelScope(shield=True):
                await listener.aclose()


async def _accept_loop(
    listener: trio.SocketListener,
    slots: trio.Semaphore,
    app: HttpApp,
    limits: HttpLimits,
) -> None:
    async with trio.open_nursery() as nursery:
        while True:
            await slots.acquire()
            try:
                stream = await listener.accept()
            except OSError as exc:
                slots.release()
                if exc.errno not in _TRANSIENT_ACCEPT_ERRNOS:
                    raise
                log.warning("HTTP accept failed; retrying", extra={"reason": exc.strerror})
                await trio.sleep(0.1)
                continue
            except BaseException:
                slots.release()
                raise
            nursery.start_soon(_serve_connection, stream, slots, app, limits)


async def _serve_connection(
    stream: trio.SocketStream,
    slots: trio.Semaphore,
    app: HttpApp,
    limits: HttpLimits,
) -> None:
    """Read one request, answer it, close. Client-side failures end the connection quietly."""
    try:
        async with stream:
            response, method = await _respond(stream, app, limits)
            if response is None:
                return
            with trio.move_on_after(limits.request_timeout):
                await stream.send_all(_encode(response, head_only=method == "HEAD"))
                await stream.send_eof()
            await _drain(stream, limits.request_timeout)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        log.debug("HTTP client went away", extra={"reason": str(exc)})
    finally:
        slots.release()


async def _drain(stream: trio.SocketStream, limit_seconds: float) -> None:
    """Lingering close: read (and drop) what the client still sends, until it closes, for a
    bounded time and amount. Closing with unread input makes the kernel send a reset, which
    can destroy the response before the client reads it (an oversized head, a request body)."""
    budget = _DRAIN_BYTES
    with trio.move_on_after(min(limit_seconds, _DRAIN_SECONDS)):
        while budget > 0:
            chunk = await stream.receive_some(min(budget, 16384))
            if not chunk:
                return
            budget -= len(chunk)


async def _respond(
    stream: trio.SocketStream,
    app: HttpApp,
    limits: HttpLimits,
) -> tuple[Response | None, str]:
    """The response to send (None: the client closed before sending a request)."""
    head: bytes | None = None
    try:
        with trio.move_on_after(limits.request_timeout) as scope:
            head = await _read_head(stream, limits.max_request_line, limits.max_head_bytes)
        if scope.cancelled_caught:
            log.debug("HTTP request timed out", extra={"peer": _peer(stream)})
            return Response.text(408, "request timeout"), "GET"
        if head is None:
            return None, ""
        request = _parse_head(head)
    except _HttpError as exc:
        return Response.text(exc.status, exc.message), "GET"
    try:
        response = app(request)
    except Exception:
        log.exception("HTTP handler failed", extra={"method": request.method})
        response = Response.text(500, "internal error")
    log.debug(
        "HTTP %s %s -> %d", request.method, request.path, response.status,
        extra={"peer": _peer(stream), "code": response.status},
    )
    return response, request.method


def _peer(stream: trio.SocketStream) -> str:
    try:
        host, port, *_ = stream.socket.getpeername()
    except (OSError, ValueError):
        return "?"
    return f"{host}:{port}"


def _find_head_end(buffer: bytearray) -> int:
    """Index just past the blank line ending the head, or -1. Bare LF line ends are accepted."""
    crlf = buffer.find(b"\r\n\r\n")
    lf = buffer.find(b"\n\n")
    ends = [i + 4 for i in (crlf,) if i >= 0] + [i + 2 for i in (lf,) if i >= 0]
    return min(ends) if ends else -1


async def _read_head(
    stream: trio.SocketStream, max_request_line: int, max_head_bytes: int
) -> bytes | None:
    """Bytes of the request head (without the blank line), or None if the client sent
    nothing and closed."""
    buffer = bytearray()
    while True:
        first_line_end = buffer.find(b"\n")
        if (first_line_end if first_line_end >= 0 else len(buffer)) > max_request_line:
            raise _HttpError(414, "request line too long")
        end = _find_head_end(buffer)
        if end > max_head_bytes + 4 or (end < 0 and len(buffer) > max_head_bytes):
            raise _HttpError(431, "request head too large")
        if end >= 0:
            return bytes(buffer[:end]).rstrip(b"\r\n")
        chunk = await stream.receive_some(max_head_bytes + 4 - len(buffer))
        if not chunk:
            if buffer:
                raise _HttpError(400, "incomplete request")
            return None
        buffer += chunk


def _parse_head(head: bytes) -> Request:
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError as exc:  # pragma: no cover - latin-1 decodes every byte
        raise _HttpError(400, "bad encoding") from exc
    lines = [line.rstrip("\r") for line in text.split("\n")]
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[0].isalpha():
        raise _HttpError(400, "malformed request line")
    method, target, _ = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or name[0] in " \t":
            raise _HttpError(400, "malformed header line")
        key = name.lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    split = urlsplit(target)
    return Request(method=method, path=split.path or "/", query=split.query,
                   headers=headers)


def _encode(response: Response, *, head_only: bool) -> bytes:
    reason = _REASONS.get(response.status, "Unknown")
    lines = [
        f"HTTP/1.1 {response.status} {reason}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in response.headers),
    ]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + response.body
