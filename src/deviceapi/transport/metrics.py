"""Prometheus metrics of one server runtime (SPEC §6) and the gRPC instrumentation.

One :class:`ServerMetrics` per runtime, built on a ``CollectorRegistry`` the runtime owns (never
the global one), so two runtimes can live in one process (tests do).

Two kinds of values:

- **Pushed counters**: events the actors and the transport count as they happen
  (``count_update``, ``count_watch_event``, ``count_eviction``, ``count_rejected``,
  ``count_restart``, ``count_heartbeat_timeout``) and the gRPC metrics recorded by
  :func:`instrument_mapping`. These are a dict lookup and an add: safe on the hot path.
- **Mirrored gauges**: values that describe actor state (GPU counts, resource version, active
  watch streams, provider sessions, NVML state). The runtime registers *refreshers* with
  :meth:`ServerMetrics.add_refresher`; the ``/metrics`` handler calls :meth:`ServerMetrics.refresh`
  before rendering, and each refresher copies the numbers from an actor's ``statistics()`` record
  into the ``set_*`` methods. Nothing is pushed on the write path, and a scrape always shows the
  state at scrape time.

gRPC instrumentation: :func:`instrument_mapping` wraps each handler function of a grpclib
service's ``__mapping__()``. Wrapping was chosen over grpclib's event hooks
(``grpclib.events.listen``) because the hooks cannot measure a call: there is no "request done"
event, and nothing ties a ``RecvRequest`` to its ``SendTrailingMetadata`` to time it; the event
is also not sent when the handler is cancelled (client reset, deadline). The wrapper sees the
call begin and end in one frame, knows the cardinality from the ``Handler`` record, and resolves
its label children once, at wrap time. The code it records is the one grpclib sends (see
:func:`_handled_code`).
"""

from __future__ import annotations

import asyncio
import logging
import platform
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol

from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

if TYPE_CHECKING:
    from grpclib.server import Stream

log = logging.getLogger("deviceapi.metrics")

PREFIX: Final = "device_api_server_"

#: The readiness gate's states; ``readiness_state`` has one series per state.
READINESS_STATES: Final = ("WAITING_FOR_PROVIDERS", "READY", "SHUTTING_DOWN")
#: ``cache_updates_total{operation}`` label values created up front (any other value works too).
UPDATE_OPERATIONS: Final = (
    "create",
    "update",
    "update_status",
    "delete",
    "register",
    "unregister",
    "update_condition",
    "heartbeat_timeout",
    "heartbeat_restore",
    "ingest",
)
#: ``watch_events_total{type}`` label values (SPEC §3 event types).
WATCH_EVENT_TYPES: Final = ("ADDED", "MODIFIED", "DELETED")
#: ``watch_evictions_total{reason}`` label values (SPEC §3: full queue, stalled stream).
EVICTION_REASONS: Final = ("queue_full", "slow_subscriber")
#: ``requests_rejected_total{reason}`` label values created up front (any other value works too):
#: a limit's name (``ResourceExhausted.reason``), or the lower-case status name of a refused
#: request (the transport's ``rejection_reason``).
REJECT_REASONS: Final = (
    "invalid_argument",
    "unavailable",
    "max_gpus",
    "max_watchers",
    "subscribe_rate",
    "write_queue",
    "max_message_bytes",
    "actor_restart",
    "internal",
)
#: ``platform_connector_events_total{outcome}`` label values (SPEC §7.2 ingest): every event
#: received counts once as ``received`` and once as what became of it: ``applied``,
#: ``store_only`` (STORE_ONLY, not applied), ``unresolved_index_or_pci`` /
#: ``unresolved_unknown_uuid`` (it named GPUs, none of them held), ``duplicate`` (its batch
#: repeated an idempotency key already applied) or ``rejected`` (its batch was refused).
INGEST_OUTCOMES: Final = (
    "received",
    "applied",
    "store_only",
    "unresolved_index_or_pci",
    "unresolved_unknown_uuid",
    "duplicate",
    "rejected",
)
#: ``grpc_type`` label per grpclib cardinality (the names of go-grpc-prometheus).
GRPC_TYPES: Final[Mapping[Cardinality, str]] = {
    Cardinality.UNARY_UNARY: "unary",
    Cardinality.UNARY_STREAM: "server_stream",
    Cardinality.STREAM_UNARY: "client_stream",
    Cardinality.STREAM_STREAM: "bidi_stream",
}
#: ``grpc_code`` label per status: the upper-case names of the gRPC spec (``OK``, ``NOT_FOUND``,
#: ``DEADLINE_EXCEEDED``), as Python's gRPC exporters write them. (Go's go-grpc-prometheus writes
#: ``NotFound``/``DeadlineExceeded``; alert rules must match whichever this map produces.)
GRPC_CODE_LABELS: Final[Mapping[Status, str]] = {code: code.name for code in Status}
#: Buckets of ``grpc_server_handling_seconds``: 0.5 ms .. 10 s, with 0.5 s (the chart's latency
#: alert threshold) on a bucket edge so the alert's quantile estimate is exact there.
HANDLING_SECONDS_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)

Refresher = Callable[[], None]


class ServerMetrics:
    """Every metric of SPEC §6, registered on one injected registry.

    ``registry`` must be private to this runtime: the process, platform and GC collectors are
    registered on it too. ``node`` is the node name (the ``info`` metric's label).
    """

    def __init__(self, registry: CollectorRegistry, *, version: str, node: str) -> None:
        self.registry = registry
        self._refreshers: list[Refresher] = []
        self._readiness_state: str | None = None
        r = registry
        p = PREFIX

        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)

        self.info = Gauge(
            p + "info", "Server build and host information (value is always 1).",
            ["version", "python_version", "node"], registry=r,
        )
        self.info.labels(version, platform.python_version(), node).set(1)

        self.cache_gpus_total = Gauge(p + "cache_gpus_total", "GPUs in the cache.", registry=r)
        self.cache_gpus_healthy = Gauge(
            p + "cache_gpus_healthy",
            "GPUs whose conditions are all healthy (True; False for --problem-conditions).",
            registry=r)
        self.cache_gpus_unhealthy = Gauge(
            p + "cache_gpus_unhealthy",
            "GPUs with at least one unhealthy condition (False; True for --problem-conditions).",
            registry=r)
        self.cache_gpus_unknown = Gauge(
            p + "cache_gpus_unknown",
            "GPUs with no condition, or an Unknown one and no False one.", registry=r)
        self.cache_updates = Counter(
            p + "cache_updates_total", "Successful cache writes by operation.",
            ["operation"], registry=r)
        self.cache_resource_version = Gauge(
            p + "cache_resource_version", "Current global resource version of the cache.",
            registry=r)

        self.watch_streams_active = Gauge(
            p + "watch_streams_active", "Open WatchGpus streams.", registry=r)
        self.watch_events = Counter(
            p + "watch_events_total", "Watch events delivered to watchers, by event type.",
            ["type"], registry=r)
        self.watch_evictions = Counter(
            p + "watch_evictions_total",
            "Watchers evicted (stream ended RESOURCE_EXHAUSTED), by reason.",
            ["reason"], registry=r)

        self.nvml_provider_enabled = Gauge(
            p + "nvml_provider_enabled", "1 when the NVML provider runs with a working driver.",
            registry=r)
        self.nvml_gpu_count = Gauge(
            p + "nvml_gpu_count", "GPUs enumerated by the NVML provider.", registry=r)
        self.nvml_health_monitor_running = Gauge(
            p + "nvml_health_monitor_running", "1 while the NVML XID event monitor runs.",
            registry=r)

        self.provider_sessions_active = Gauge(
            p + "provider_sessions_active", "Provider sessions (one per provider id).",
            registry=r)
        self.provider_heartbeat_timeouts = Counter(
            p + "provider_heartbeat_timeouts_total",
            "Provider heartbeat deadlines missed (its GPUs turned Ready=Unknown).", registry=r)

        self.readiness_state = Gauge(
            p + "readiness_state", "1 for the current readiness state, 0 for the others.",
            ["state"], registry=r)
        self.actor_restarts = Counter(
            p + "actor_restarts_total", "Actor restarts by supervisors, by actor.",
            ["actor"], registry=r)
        self.requests_rejected = Counter(
            p + "requests_rejected_total", "Requests refused by a limit or gate, by reason.",
            ["reason"], registry=r)

        self.platform_connector_events = Counter(
            p + "platform_connector_events_total",
            "NVSentinel health events on the platform-connector socket, by outcome.",
            ["outcome"], registry=r)

        self.grpc_started = Counter(
            "grpc_server_started_total", "RPCs started on the server.",
            ["grpc_type", "grpc_service", "grpc_method"], registry=r)
        self.grpc_handled = Counter(
            "grpc_server_handled_total", "RPCs completed on the server, by status code.",
            ["grpc_type", "grpc_service", "grpc_method", "grpc_code"], registry=r)
        self.grpc_handling_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Response latency (seconds) of RPCs handled by the server.",
            ["grpc_type", "grpc_service", "grpc_method"],
            buckets=HANDLING_SECONDS_BUCKETS, registry=r)

        for operation in UPDATE_OPERATIONS:
            self.cache_updates.labels(operation)
        for event_type in WATCH_EVENT_TYPES:
            self.watch_events.labels(event_type)
        for reason in EVICTION_REASONS:
            self.watch_evictions.labels(reason)
        for reason in REJECT_REASONS:
            self.requests_rejected.labels(reason)
        for outcome in INGEST_OUTCOMES:
            self.platform_connector_events.labels(outcome)
        self.set_readiness("WAITING_FOR_PROVIDERS")

    # -- scrape-time refresh -------------------------------------------------------------------

    def add_refresher(self, refresher: Refresher) -> None:
        """Call ``refresher()`` at every scrape, before rendering, in registration order.

        A refresher reads an actor's ``statistics()`` and calls the ``set_*`` methods. It must
        not block (it runs on the event loop, inside the HTTP handler).
        """
        self._refreshers.append(refresher)

    def remove_refresher(self, refresher: Refresher) -> None:
        """Forget a refresher (an actor that is gone for good); unknown ones are ignored."""
        if refresher in self._refreshers:
            self._refreshers.remove(refresher)

    def refresh(self) -> None:
        """Run every refresher. One that raises is logged and skipped: its gauges keep their last
        values and the scrape still succeeds (a restarting actor must not fail the scrape)."""
        for refresher in list(self._refreshers):
            try:
                refresher()
            except Exception:
                log.warning("metrics refresher failed; its gauges keep their last values",
                            exc_info=True, extra={"reason": getattr(refresher, "__name__", "?")})

    # -- mirrored gauges -----------------------------------------------------------------------

    def set_cache_gpus(self, *, total: int, healthy: int, unhealthy: int, unknown: int) -> None:
        """GPU counts by health class (any False → unhealthy; else any non-True or none →
        unknown; else healthy)."""
        self.cache_gpus_total.set(total)
        self.cache_gpus_healthy.set(healthy)
        self.cache_gpus_unhealthy.set(unhealthy)
        self.cache_gpus_unknown.set(unknown)

    def set_cache_resource_version(self, resource_version: int) -> None:
        self.cache_resource_version.set(resource_version)

    def set_watch_streams_active(self, count: int) -> None:
        self.watch_streams_active.set(count)

    def set_provider_sessions_active(self, count: int) -> None:
        self.provider_sessions_active.set(count)

    def set_nvml_provider_enabled(self, enabled: bool) -> None:
        self.nvml_provider_enabled.set(1 if enabled else 0)

    def set_nvml_gpu_count(self, count: int) -> None:
        self.nvml_gpu_count.set(count)

    def set_nvml_health_monitor_running(self, running: bool) -> None:
        self.nvml_health_monitor_running.set(1 if running else 0)

    def set_readiness(self, state: str) -> None:
        """Make ``state`` (one of :data:`READINESS_STATES`) the current one."""
        if state not in READINESS_STATES:
            raise ValueError(f"unknown readiness state {state!r}; expected {READINESS_STATES}")
        for name in READINESS_STATES:
            self.readiness_state.labels(name).set(1 if name == state else 0)
        self._readiness_state = state

    @property
    def readiness(self) -> str | None:
        """The state last given to :meth:`set_readiness`."""
        return self._readiness_state

    # -- pushed counters -----------------------------------------------------------------------

    def count_update(self, operation: str, n: int = 1) -> None:
        """A committed cache write (see :data:`UPDATE_OPERATIONS` for the usual names)."""
        self.cache_updates.labels(operation).inc(n)

    def count_watch_event(self, event_type: str, n: int = 1) -> None:
        """``n`` events of one type delivered to a watcher (batches count once per event)."""
        self.watch_events.labels(event_type).inc(n)

    def count_eviction(self, reason: str) -> None:
        """A watcher evicted (see :data:`EVICTION_REASONS`)."""
        self.watch_evictions.labels(reason).inc()

    def count_rejected(self, reason: str) -> None:
        """A request refused by a limit or gate (see :data:`REJECT_REASONS`)."""
        self.requests_rejected.labels(reason).inc()

    def count_restart(self, actor: str) -> None:
        """A supervisor restarted ``actor`` (the child's name in its supervisor spec)."""
        self.actor_restarts.labels(actor).inc()

    def count_heartbeat_timeout(self) -> None:
        """A provider session missed its heartbeat deadline."""
        self.provider_heartbeat_timeouts.inc()

    def count_ingest(self, outcome: str, n: int = 1) -> None:
        """``n`` ingested events with one outcome (see :data:`INGEST_OUTCOMES`)."""
        if n:
            self.platform_connector_events.labels(outcome).inc(n)

    # -- gRPC ----------------------------------------------------------------------------------

    def instrument(self, mapping: Mapping[str, Handler]) -> dict[str, Handler]:
        """:func:`instrument_mapping` bound to these metrics: a grpclib mapping wrapper."""
        return instrument_mapping(mapping, self)


# -- gRPC instrumentation ------------------------------------------------------------------------


class Servable(Protocol):
    """What ``grpclib.server.Server`` accepts as a service (grpclib's ``IServable``)."""

    def __mapping__(self) -> Mapping[str, Handler]: ...


class _MethodMetrics:
    """The label children of one RPC method, resolved once at wrap time."""

    __slots__ = ("handled", "seconds", "started")

    def __init__(self, metrics: ServerMetrics, grpc_type: str, service: str, method: str) -> None:
        labels = (grpc_type, service, method)
        self.started = metrics.grpc_started.labels(*labels)
        self.seconds = metrics.grpc_handling_seconds.labels(*labels)
        # Every code exists from the start (as go-grpc-prometheus's InitializeMetrics does), so
        # the first error is an increase from 0, which rate() and increase() can see.
        self.handled = {
            code: metrics.grpc_handled.labels(*labels, GRPC_CODE_LABELS[code]) for code in Status
        }


def split_method_path(path: str) -> tuple[str, str]:
    """``/pkg.Service/Method`` → ``("pkg.Service", "Method")``."""
    service, _, method = path.strip("/").partition("/")
    return service, method


def _deadline_passed(stream: Stream[Any, Any]) -> bool:
    deadline = stream.deadline
    return deadline is not None and deadline.time_remaining() <= 0


def _handled_code(
    stream: Stream[Any, Any],
    cardinality: Cardinality,
    error: BaseException | None,
    sent: Status | None,
) -> Status:
    """The status grpclib sends for a call that ended this way (``grpclib.server.Stream``'s
    ``__aexit__`` and ``request_handler``).

    - trailers the handler sent itself (``stream.send_trailing_metadata(status=...)``, as
      grpclib's Health.Check does for an unknown service) carry the code, whatever happens next;
    - normal return → OK, except a unary response without a message, which grpclib answers
      UNKNOWN;
    - ``GRPCError`` → its status;
    - cancelled → DEADLINE_EXCEEDED when the request's deadline has passed (grpclib cancels the
      handler then), else CANCELLED (client reset the stream, or server closed);
    - any other exception → UNKNOWN ("Internal Server Error").
    """
    if sent is not None:
        return sent
    if error is None:
        if cardinality.server_streaming or getattr(stream, "_send_message_done", True):
            return Status.OK
        return Status.UNKNOWN
    if isinstance(error, GRPCError):
        return error.status
    if isinstance(error, asyncio.CancelledError):
        return Status.DEADLINE_EXCEEDED if _deadline_passed(stream) else Status.CANCELLED
    if isinstance(error, StreamTerminatedError):
        return Status.CANCELLED
    return Status.UNKNOWN


def _instrument_handler(path: str, handler: Handler, metrics: ServerMetrics) -> Handler:
    cardinality: Cardinality = handler.cardinality
    service, method = split_method_path(path)
    m = _MethodMetrics(metrics, GRPC_TYPES[cardinality], service, method)
    func: Callable[[Stream[Any, Any]], Any] = handler.func

    async def instrumented(stream: Stream[Any, Any]) -> None:
        m.started.inc()
        sent: list[Status] = []
        send_trailing_metadata = stream.send_trailing_metadata

        async def record_trailers(*, status: Status = Status.OK, **kwargs: Any) -> None:
            sent.append(status)
            await send_trailing_metadata(status=status, **kwargs)

        # Per-call shim (the stream object is this call's own): sees trailers a handler sends
        # explicitly, the one case where the code is not decided by how the handler ends.
        stream.send_trailing_metadata = record_trailers  # type: ignore[method-assign]
        error: BaseException | None = None
        start = time.perf_counter()
        try:
            await func(stream)
        except BaseException as exc:
            error = exc
            raise
        finally:
            elapsed = time.perf_counter() - start
            code = _handled_code(stream, cardinality, error, sent[0] if sent else None)
            error = None  # no exception → traceback → frame cycle left behind
            # The shim holds the stream's own bound method: a cycle (stream → shim → stream)
            # that kept the call's stream, its HTTP/2 connection and transport for a full
            # collection. grpclib's closing trailers (after this) need no counting.
            del stream.send_trailing_metadata
            m.handled[code].inc()
            m.seconds.observe(elapsed)

    instrumented.__name__ = getattr(func, "__name__", method)
    instrumented.__qualname__ = getattr(func, "__qualname__", method)
    return handler._replace(func=instrumented)


def instrument_mapping(
    mapping: Mapping[str, Handler], metrics: ServerMetrics
) -> dict[str, Handler]:
    """Return ``mapping`` with every handler wrapped to record the three ``grpc_server_*``
    metrics (started, handled by code, handling seconds). Series for every method and code are
    created here, at zero."""
    return {path: _instrument_handler(path, handler, metrics) for path, handler in mapping.items()}


class InstrumentedService:
    """A grpclib servable that serves ``service`` with instrumented handlers.

    Pass it to ``grpclib.server.Server`` (and to ``ServerReflection.extend`` / ``Health``) in
    place of the service: its method paths, and so its service name, are the same.
    """

    def __init__(self, service: Servable, metrics: ServerMetrics) -> None:
        self.service = service
        self._mapping = instrument_mapping(service.__mapping__(), metrics)

    def __mapping__(self) -> dict[str, Handler]:
        return dict(self._mapping)


def instrument_services(
    services: Iterable[Servable], metrics: ServerMetrics
) -> list[InstrumentedService]:
    """Instrument each service; the list goes to ``grpclib.server.Server``."""
    return [InstrumentedService(service, metrics) for service in services]
