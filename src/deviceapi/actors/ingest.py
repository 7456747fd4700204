"""NVSentinel ingest (SPEC §7.2): a batch of health events → per-GPU condition upserts.

:func:`plan` is a pure function from a decoded batch and the current state (the GPUs held, the
ingest ledger) to what the batch changes: the conditions to upsert on each GPU, each GPU's new
``recommended_action`` (when it changes), the next ledger, and the counts the metrics and logs
report. The CacheOwner's transition (``_store``) commits a plan in one step, so a batch is
applied whole or not at all, and concurrent batches are ordered by the owner's mailbox.

The ledger remembers, per GPU and check, what a condition cannot carry: the error codes still
reported and, for a check whose latest event was unhealthy and fatal, that event's action and
receipt order. ``recommended_action`` is derived from it: the action of the most recently
received fatal event among the GPU's checks that are still failing (action NONE sets nothing).
Node-level events never contribute an action; a healthy node-level event makes its check True
on every GPU, so it also ends that check's failure wherever one was recorded.

One departure from a literal reading of SPEC §7.2, because NVSentinel's gpu-health-monitor
really does this: when a check reports several error codes and some recover, the monitor sends
the new fault first and then a *healthy* event naming only the recovered code. Read literally,
that healthy event would flip the check to True while a fault is still active. So a healthy
event that names error codes clears only those codes; the check recovers when no code is left
(a healthy event without codes clears the check at once).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Literal

from google.protobuf.timestamp_pb2 import Timestamp

from ..proto.device.v1alpha1.gpu_pb2 import Condition, Gpu

#: Entity types that name a GPU (SPEC §7.2). Only GPU_UUID can be resolved to a GPU we hold.
GPU_UUID = "GPU_UUID"
GPU_ENTITY_TYPES = frozenset({"GPU", "GPU_UUID", "PCI"})
#: Idempotency keys remembered (the most recent ones; each at most IDEMPOTENCY_KEY_MAX chars).
IDEMPOTENCY_KEYS = 1024
IDEMPOTENCY_KEY_MAX = 256
PROVIDER_PREFIX = "nvsentinel/"

#: NVSentinel's RecommendedAction enum (the values SPEC §7.2 lists). Other versions of
#: NVSentinel send values outside this table; they are kept as their decimal number.
ACTION_NAMES: Mapping[int, str] = {
    0: "NONE",
    2: "COMPONENT_RESET",
    5: "CONTACT_SUPPORT",
    6: "RUN_FIELDDIAG",
    15: "RESTART_VM",
    24: "RESTART_BM",
    25: "REPLACE_VM",
    26: "RUN_DCGMEUD",
    27: "CUSTOM",
    39: "RESTART_APP",
    99: "UNKNOWN",
}
NONE_ACTION = 0
CUSTOM_ACTION = 27

REASON_HEALTHY = "Healthy"
REASON_UNHEALTHY = "Unhealthy"
REASON_WARNING = "Warning"

UnresolvedReason = Literal["index_or_pci_only", "unknown_uuid"]


def action_name(value: int, custom: str = "") -> str:
    """The ``recommended_action`` text of an enum value: its name, CUSTOM's own text (or
    "CUSTOM" when empty), or the decimal number of a value this version does not know.
    NONE is "" (it sets nothing)."""
    if value == NONE_ACTION:
        return ""
    if value == CUSTOM_ACTION:
        return custom or "CUSTOM"
    return ACTION_NAMES.get(value, str(value))


def provider_id(agent: str) -> str:
    """The provider id of a monitor's writes (``nvsentinel/<agent>``)."""
    return PROVIDER_PREFIX + (agent or "unknown")


@dataclasses.dataclass(frozen=True, slots=True)
class HealthEvent:
    """One event, decoded from the wire and validated by the transport."""

    check: str
    healthy: bool = False
    fatal: bool = False
    agent: str = ""
    message: str = ""
    #: ``action_name`` of the event's action ("" for NONE).
    action: str = ""
    error_codes: tuple[str, ...] = ()
    #: Values of the event's GPU_UUID entities, in order.
    uuids: tuple[str, ...] = ()
    #: Whether the event names GPUs in other ways (GPU index, PCI address).
    other_gpu_entities: bool = False
    generated: Timestamp | None = None
    store_only: bool = False

    @property
    def node_level(self) -> bool:
        """No GPU entity at all: the event is about the node, so every GPU."""
        return not self.uuids and not self.other_gpu_entities


@dataclasses.dataclass(frozen=True, slots=True)
class CheckRecord:
    """What the ledger keeps for one check on one GPU."""

    #: Error codes reported for this check and not yet reported recovered.
    codes: frozenset[str] = frozenset()
    #: Receipt order of the latest event when it was unhealthy and fatal; None: not failing.
    failing: int | None = None
    #: That event's action ("" for NONE).
    action: str = ""


#: GPU name → check name → record. Immutable by convention, like the rest of the State.
Ledger = Mapping[str, Mapping[str, CheckRecord]]


@dataclasses.dataclass(frozen=True, slots=True)
class Unresolved:
    """An event that named GPUs none of which the server holds (counted and logged)."""

    index: int
    check: str
    agent: str
    reason: UnresolvedReason
    uuids: tuple[str, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class GpuChange:
    """What a batch changes on one GPU."""

    #: Conditions to upsert by type (complete, with their transition times).
    conditions: tuple[Condition, ...]
    #: The new recommended_action ("" clears it), or None to leave it as it is.
    recommended_action: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    changes: Mapping[str, GpuChange]
    ledger: Ledger
    #: The receipt counter after this batch.
    seq: int
    received: int
    applied: int
    store_only: int
    unresolved: tuple[Unresolved, ...]
    #: UUIDs named by applied events that the server does not hold (the event applied to the
    #: GPUs it could resolve).
    unknown_uuids: tuple[str, ...]


def recommended_action(checks: Mapping[str, CheckRecord]) -> str:
    """The action of the most recently received fatal event among the still-failing checks."""
    best: tuple[int, str] | None = None
    for record in checks.values():
        if record.failing is not None and record.action and (
            best is None or record.failing > best[0]
        ):
            best = (record.failing, record.action)
    return best[1] if best is not None else ""


def plan(events: Sequence[HealthEvent], gpus: Mapping[str, Gpu], ledger: Ledger,
         seq: int) -> Plan:
    """Map a batch onto the GPUs held, in order; later events for a check win."""
    conditions: dict[str, dict[str, Condition]] = {}
    records: dict[str, dict[str, CheckRecord]] = {}
    applied = store_only = 0
    unresolved: list[Unresolved] = []
    unknown: list[str] = []

    def current(name: str) -> dict[str, Condition]:
        if name not in conditions:
            conditions[name] = {c.type: c for c in gpus[name].status.conditions}
        return conditions[name]

    def checks(name: str) -> dict[str, CheckRecord]:
        if name not in records:
            records[name] = dict(ledger.get(name, {}))
        return records[name]

    for index, event in enumerate(events):
        if event.store_only:
            store_only += 1
            continue
        if event.node_level:
            targets = sorted(gpus)
        else:
            targets = [u for u in dict.fromkeys(event.uuids) if u in gpus]
            missing = [u for u in event.uuids if u not in gpus]
            if not targets:
                unresolved.append(Unresolved(
                    index, event.check, event.agent,
                    "unknown_uuid" if event.uuids else "index_or_pci_only", event.uuids))
                continue
            unknown.extend(missing)
        applied += 1
        seq += 1
        for name in targets:
            _apply_event(event, seq, current(name), checks(name))

    changes: dict[str, GpuChange] = {}
    next_ledger = dict(ledger)
    for name in sorted(set(conditions) | set(records)):
        gpu = gpus[name]
        before = {c.type: c for c in gpu.status.conditions}
        upserts = tuple(c for t, c in conditions.get(name, {}).items() if before.get(t) != c)
        action: str | None = None
        if name in records:
            now_checks = records[name]
            was, now = recommended_action(ledger.get(name, {})), recommended_action(now_checks)
            if was != now and gpu.status.recommended_action != now:
                action = now
            if now_checks:
                next_ledger[name] = now_checks
            else:
                next_ledger.pop(name, None)
        if upserts or action is not None:
            changes[name] = GpuChange(upserts, action)
    return Plan(changes=changes, ledger=next_ledger, seq=seq, received=len(events),
                applied=applied, store_only=store_only, unresolved=tuple(unresolved),
                unknown_uuids=tuple(dict.fromkeys(unknown)))


def _apply_event(event: HealthEvent, seq: int, conditions: dict[str, Condition],
                 checks: dict[str, CheckRecord]) -> None:
    """One event on one GPU: upsert its condition, update the check's record."""
    code = event.error_codes[0] if event.error_codes else ""
    record = checks.get(event.check, CheckRecord())
    if event.node_level:
        if event.healthy:
            status, reason = "True", REASON_HEALTHY
            checks.pop(event.check, None)
        else:
            # The monitor cannot see the GPUs: its verdicts are no longer known. Per-GPU
            # records stay (a fatal verdict is not withdrawn by losing sight of the GPU).
            status, reason = "Unknown", code or REASON_UNHEALTHY
    elif event.healthy:
        remaining = record.codes - set(event.error_codes) if event.error_codes else frozenset()
        if remaining:
            checks[event.check] = dataclasses.replace(record, codes=remaining)
            return  # a partial recovery: other codes of this check still fail
        checks.pop(event.check, None)
        status, reason = "True", REASON_HEALTHY
    elif event.fatal:
        status, reason = "False", code or REASON_UNHEALTHY
        checks[event.check] = CheckRecord(record.codes | set(event.error_codes), seq, event.action)
    else:
        status, reason = "True", code or REASON_WARNING
        checks[event.check] = CheckRecord(record.codes | set(event.error_codes), None, "")
    conditions[event.check] = _condition(event, status, reason, conditions.get(event.check))


def _condition(event: HealthEvent, status: str, reason: str,
               previous: Condition | None) -> Condition:
    condition = Condition(type=event.check, status=status, reason=reason, message=event.message)
    if previous is not None and previous.status == status and previous.HasField(
        "last_transition_time"
    ):
        condition.last_transition_time.CopyFrom(previous.last_transition_time)
    elif event.generated is not None:
        condition.last_transition_time.CopyFrom(event.generated)
    return condition
