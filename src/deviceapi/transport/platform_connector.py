"""SPEC §7.2: NVSentinel's platform connector, ``datamodels.PlatformConnector``, on its own socket.

NVIDIA's health monitors (gpu-health-monitor, syslog-health-monitor, CSP and NCCL checks) push
``HealthEvents`` batches to a Unix socket. This face decodes and validates a batch, hands it to
the CacheOwner as one command (``IngestHealthEvents``: planned by the pure ``cache.ingest.plan``
and committed whole), and answers OK only after that commit, so an acknowledged event is never
lost. The ``idempotency-key`` request header makes a retried batch apply once (the store
remembers the last ``ingest.IDEMPOTENCY_KEYS`` keys, in the same commit as the batch).

Every event is counted (``device_api_server_platform_connector_events_total{outcome}``); events
naming GPUs the server does not hold are logged (``"health event names no GPU this server
holds"``), never invented.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from typing import Any

from google.protobuf.empty_pb2 import Empty
from grpclib.server import Stream

from .._bridge import Bridge
from .._errors import InvalidArgument
from ..cache import _store as store_ops
from ..cache import ingest
from ..cache.port import CorePort
from ..proto.datamodels import health_event_grpc
from ..proto.datamodels import health_event_pb2 as pb
from ..proto.device.v1alpha1.gpu_pb2 import Condition
from ._calls import write
from ._limits import recv_request
from ._status import rpc_errors

log = logging.getLogger("deviceapi.ingest")

SERVICE = "datamodels.PlatformConnector"
METHOD = f"/{SERVICE}/HealthEventOccurredV1"
IDEMPOTENCY_HEADER = "idempotency-key"
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


class PlatformConnectorService(health_event_grpc.PlatformConnectorBase):
    def __init__(self, port: CorePort, bridge: Bridge, max_receive: int) -> None:
        self.port = port
        self.bridge = bridge
        self._limit = max_receive

    async def HealthEventOccurredV1(self, stream: Stream[pb.HealthEvents, Empty]) -> None:
        count = self.port.observer.on_ingest
        received = 0
        with rpc_errors(METHOD, self.port.observer.on_reject):
            request = await recv_request(stream, self._limit)
            received = len(request.events)
            count("received", received)
            try:
                key = idempotency_key(stream.metadata)
                events = decode(request)
                result = await write(self.bridge, self.port,
                                     store_ops.IngestHealthEvents(events, key))
            except Exception as exc:
                count("rejected", received)
                log.warning("health event batch refused", extra={
                    "method": METHOD, "reason": str(exc) or type(exc).__name__})
                raise
            plan = result.plan
            if plan is None:
                count("duplicate", received)
                log.info("health event batch already applied (same idempotency-key)",
                         extra={"method": METHOD, "reason": key})
            else:
                self._report(plan, events, result.rv)
        await stream.send_message(Empty())

    def _report(self, plan: ingest.Plan, events: tuple[ingest.HealthEvent, ...],
                rv: int) -> None:
        count = self.port.observer.on_ingest
        count("applied", plan.applied)
        count("store_only", plan.store_only)
        for reason in ("index_or_pci_only", "unknown_uuid"):
            n = sum(1 for u in plan.unresolved if u.reason == reason)
            count("unresolved_index_or_pci" if reason == "index_or_pci_only"
                  else "unresolved_unknown_uuid", n)
        for item in plan.unresolved:
            log.warning("health event names no GPU this server holds", extra={
                "provider": ingest.provider_id(item.agent), "check": item.check,
                "reason": item.reason, "gpu": ",".join(item.uuids)})
        if plan.unknown_uuids:
            log.warning("health event names GPUs this server does not hold", extra={
                "reason": "unknown_uuid", "gpu": ",".join(plan.unknown_uuids)})
        if plan.changes:
            agents = sorted({ingest.provider_id(e.agent) for e in events if not e.store_only})
            log.info("health events applied", extra={
                "provider": ",".join(agents), "gpu": ",".join(plan.changes),
                "resource_version": rv})


def idempotency_key(metadata: Any) -> str:
    """The ``idempotency-key`` request header ("" when absent)."""
    value = metadata.get(IDEMPOTENCY_HEADER, "") if metadata is not None else ""
    if not isinstance(value, str):
        raise InvalidArgument(f"{IDEMPOTENCY_HEADER} must be text")
    if len(value) > ingest.IDEMPOTENCY_KEY_MAX or _CONTROL_RE.search(value):
        raise InvalidArgument(
            f"{IDEMPOTENCY_HEADER} must be at most {ingest.IDEMPOTENCY_KEY_MAX} printable "
            "characters")
    return value


def decode(request: pb.HealthEvents) -> tuple[ingest.HealthEvent, ...]:
    """Wire → domain records, refusing the whole batch on the first invalid event.

    STORE_ONLY events are only counted, so only the fields the mapping uses of the other events
    are checked: the check name (a condition type), the reason and message it yields, the
    agent (part of the provider id) and the action text."""
    return tuple(_decode_event(i, event) for i, event in enumerate(request.events))


def _decode_event(index: int, event: pb.HealthEvent) -> ingest.HealthEvent:
    store_only = event.processingStrategy == pb.STORE_ONLY
    uuids = tuple(e.entityValue for e in event.entitiesImpacted if e.entityType == ingest.GPU_UUID)
    other = any(e.entityType in ingest.GPU_ENTITY_TYPES and e.entityType != ingest.GPU_UUID
                for e in event.entitiesImpacted)
    decoded = ingest.HealthEvent(
        check=event.checkName,
        healthy=event.isHealthy,
        fatal=event.isFatal,
        agent=event.agent,
        message=event.message,
        action=ingest.action_name(event.recommendedAction, event.customRecommendedAction),
        error_codes=tuple(event.errorCode),
        uuids=uuids,
        other_gpu_entities=other,
        generated=event.generatedTimestamp if event.HasField("generatedTimestamp") else None,
        store_only=store_only,
    )
    if not store_only:
        with _at(index):
            _validate(decoded)
    return decoded


def _validate(event: ingest.HealthEvent) -> None:
    if not event.check:
        raise InvalidArgument("checkName is required (it is the condition type)")
    store_ops.validate_provider(ingest.provider_id(event.agent))
    reason = event.error_codes[0] if event.error_codes else ingest.REASON_UNHEALTHY
    # The condition this event becomes (status aside): the store's own rules.
    store_ops.validate_condition(Condition(
        type=event.check, status="Unknown", reason=reason, message=event.message))
    if len(event.action) > store_ops.RECOMMENDED_ACTION_MAX:
        raise InvalidArgument(
            f"customRecommendedAction exceeds {store_ops.RECOMMENDED_ACTION_MAX} chars")
    if event.generated is not None:
        seconds = event.generated.seconds
        if not 0 <= seconds <= 253402300799 or not 0 <= event.generated.nanos < 10**9:
            raise InvalidArgument("generatedTimestamp is out of range")


@contextlib.contextmanager
def _at(index: int) -> Iterator[None]:
    """Name the offending event in the one-line message."""
    try:
        yield
    except InvalidArgument as exc:
        raise InvalidArgument(f"events[{index}]: {exc}") from None
