"""The cache's state and its pure transitions: ``apply(state, command) -> (state', result, ...)``.

Everything the CacheOwner does to the data happens here, as a plain function with no I/O, no
clock (``now`` is passed in) and no mutation of its inputs. The owner commits the returned state
in one step, so an exception anywhere in a transition leaves the cache exactly as it was.

Stored ``Gpu`` messages are treated as immutable: a transition builds new messages and never
touches a published one, so readers may hold a snapshot without copying it.

Resource versions: every successful write increments the one global counter and stamps the
written object with it; a transition that changes several GPUs (a provider's heartbeat timeout)
takes one version per GPU, so every event has its own version and the history is contiguous.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from collections.abc import Iterable, Mapping
from typing import Literal

from google.protobuf.timestamp_pb2 import Timestamp

from .._errors import AlreadyExists, Conflict, InvalidArgument, NotFound, ResourceExhausted
from ..proto.device.v1alpha1.gpu_pb2 import Condition, Gpu, GpuSpec, GpuStatus, ObjectMeta
from . import ingest

EventType = Literal["ADDED", "MODIFIED", "DELETED"]

NAME_MAX = 128
CONDITION_TYPE_MAX = 128
REASON_MAX = 256
MESSAGE_MAX = 4096
RECOMMENDED_ACTION_MAX = 4096
NAMESPACE_MAX = 253
PROVIDER_ID_MAX = 253
CONDITION_STATUSES = frozenset({"True", "False", "Unknown"})
#: SPEC §7.1: an empty namespace on a write means this one.
DEFAULT_NAMESPACE = "default"

#: The condition the server writes when a provider's heartbeat is overdue.
READY = "Ready"
HEARTBEAT_TIMEOUT_REASON = "ProviderHeartbeatTimeout"

_NAME_RE = re.compile(r"(GPU|MIG)-[0-9A-Fa-f][0-9A-Fa-f-]*")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """Bounds of SPEC §4 that transitions enforce."""

    max_gpus: int = 1024
    max_conditions: int = 32
    max_object_bytes: int = 65536


@dataclasses.dataclass(frozen=True, slots=True)
class ObjectInfo:
    """Server-side metadata of one GPU that SPEC §1's messages do not carry, kept so that the
    merged upstream API (SPEC §7.1) shows the same object on its own socket: a uid (random, set
    at creation), the generation (1 at creation, +1 whenever the spec changes, through any API)
    and the creation time. ``created`` is never mutated once stored."""

    uid: str
    generation: int
    created: Timestamp


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    """One change, as watchers see it. ``gpu`` carries the version the change was stamped with;
    ``info`` the server-side metadata at that version (None only for events built outside a
    transition, e.g. a watch snapshot, which SPEC §7.1's watch never sends)."""

    type: EventType
    gpu: Gpu
    info: ObjectInfo | None = None

    @property
    def rv(self) -> int:
        return self.gpu.resource_version


@dataclasses.dataclass(frozen=True, slots=True)
class State:
    """An immutable snapshot of the cache. The mappings are never mutated once built."""

    rv: int = 0
    gpus: Mapping[str, Gpu] = dataclasses.field(default_factory=dict)
    #: GPU name → provider id of the provider that last wrote it (its owner).
    owners: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: GPUs whose Ready condition is overridden because their provider's heartbeat is overdue:
    #: name → the Ready condition the provider last wrote (None when it never wrote one).
    masked: Mapping[str, Condition | None] = dataclasses.field(default_factory=dict)
    #: SPEC §7.2 ingest: per GPU and check, what conditions cannot carry (``ingest.Ledger``).
    checks: ingest.Ledger = dataclasses.field(default_factory=dict)
    #: Receipt counter of ingested events (orders fatal events across batches).
    ingest_seq: int = 0
    #: Idempotency keys of the last ``ingest.IDEMPOTENCY_KEYS`` applied batches, oldest first.
    ingest_keys: tuple[str, ...] = ()
    #: GPU name → its server-side metadata (uid, generation, creation time).
    info: Mapping[str, ObjectInfo] = dataclasses.field(default_factory=dict)

    def owned_by(self, provider: str) -> list[str]:
        """Names of the GPUs ``provider`` owns, sorted."""
        return sorted(name for name, owner in self.owners.items() if owner == provider)


@dataclasses.dataclass(frozen=True, slots=True)
class Result:
    """What a write answers: the stored object (None when gone), and create/delete flags."""

    rv: int
    gpu: Gpu | None = None
    created: bool = False
    deleted: bool = False
    #: An ingested batch: what it did (None for every other command, and for a duplicate).
    plan: ingest.Plan | None = None
    #: The server-side metadata of ``gpu`` (SPEC §7.1 answers carry it).
    info: ObjectInfo | None = None


# ---- commands: one closed union of frozen records --------------------------------------------


def new_uid() -> str:
    """A fresh object uid. Drawn when the command is built, so the transition stays pure."""
    return str(uuid.uuid4())


@dataclasses.dataclass(frozen=True, slots=True)
class CreateGpu:
    gpu: Gpu
    provider: str = ""
    #: SPEC §7.1: an existing name is ALREADY_EXISTS instead of §1's idempotent answer.
    exclusive: bool = False
    uid: str = dataclasses.field(default_factory=new_uid)


@dataclasses.dataclass(frozen=True, slots=True)
class RegisterGpu:
    """ProviderService.RegisterGpu: an idempotent create from name, spec and initial status."""

    name: str
    spec: GpuSpec
    status: GpuStatus
    provider: str = ""
    uid: str = dataclasses.field(default_factory=new_uid)


@dataclasses.dataclass(frozen=True, slots=True)
class UpdateGpu:
    gpu: Gpu
    provider: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class UpdateSpec:
    """SPEC §7.1 UpdateGpu: replace the spec only. ``namespace`` and ``uid``, when given, must
    be the stored ones (both are immutable)."""

    name: str
    spec: GpuSpec
    namespace: str = ""
    uid: str = ""
    expected_rv: int = 0
    provider: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class UpdateGpuStatus:
    name: str
    status: GpuStatus
    expected_rv: int = 0
    provider: str = ""
    #: SPEC §7.1 (None elsewhere): the namespace and uid the writer names, checked as UpdateSpec.
    identity: tuple[str, str] | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class UpdateCondition:
    """ProviderService.UpdateGpuCondition: upsert one condition by type, keep the others."""

    name: str
    condition: Condition
    provider: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class DeleteGpu:
    name: str
    #: UnregisterGpu answers deleted=False instead of NOT_FOUND for a missing GPU.
    missing_ok: bool = False
    #: SPEC §7.1: only a GPU in this namespace ("" = any; stored "" is "default").
    namespace: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class MaskProvider:
    """A provider's heartbeat is overdue: its GPUs' Ready turns Unknown."""

    provider: str


@dataclasses.dataclass(frozen=True, slots=True)
class UnmaskProvider:
    """Heartbeats resumed: restore the Ready condition the provider last wrote."""

    provider: str


@dataclasses.dataclass(frozen=True, slots=True)
class IngestHealthEvents:
    """SPEC §7.2: one NVSentinel batch, applied whole or not at all. A batch whose
    ``idempotency_key`` was applied recently answers without applying anything again."""

    events: tuple[ingest.HealthEvent, ...]
    idempotency_key: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class ClaimGpus:
    """A heartbeat names the GPUs its provider owns (existing GPUs only; no version bump)."""

    provider: str
    names: tuple[str, ...]


def operation_of(command: Command) -> str:
    """The ``cache_updates_total{operation}`` label of a command that changed the cache."""
    match command:
        case DeleteGpu(missing_ok=True):
            return "unregister"
        case MaskProvider():
            return "heartbeat_timeout"
        case UnmaskProvider():
            return "heartbeat_restore"
    return _OPERATIONS[type(command)]


Command = (
    CreateGpu
    | RegisterGpu
    | UpdateGpu
    | UpdateSpec
    | UpdateGpuStatus
    | UpdateCondition
    | DeleteGpu
    | MaskProvider
    | UnmaskProvider
    | ClaimGpus
    | IngestHealthEvents
)


_OPERATIONS: dict[type, str] = {
    CreateGpu: "create",
    RegisterGpu: "register",
    UpdateGpu: "update",
    UpdateSpec: "update",
    UpdateGpuStatus: "update_status",
    UpdateCondition: "update_condition",
    DeleteGpu: "delete",
    ClaimGpus: "claim",
    IngestHealthEvents: "ingest",
}


# ---- validation --------------------------------------------------------------------------------


def validate_name(name: str, what: str = "name") -> None:
    """A GPU or MIG UUID: ``GPU-``/``MIG-`` then hex digits and dashes, at most 128 chars."""
    if not name:
        raise InvalidArgument(f"{what} is required")
    if len(name) > NAME_MAX:
        raise InvalidArgument(f"{what} is longer than {NAME_MAX} characters")
    if not _NAME_RE.fullmatch(name):
        raise InvalidArgument(
            f"{what} must be a GPU or MIG UUID (GPU-<hex> or MIG-<hex>), got {_quote(name)}"
        )


def validate_provider(provider: str) -> None:
    if len(provider) > PROVIDER_ID_MAX or _CONTROL_RE.search(provider):
        raise InvalidArgument(
            f"provider id must be at most {PROVIDER_ID_MAX} printable characters"
        )


def validate_condition(condition: Condition) -> None:
    if not condition.type:
        raise InvalidArgument("condition type is required")
    if len(condition.type) > CONDITION_TYPE_MAX or _CONTROL_RE.search(condition.type):
        raise InvalidArgument(
            f"condition type must be at most {CONDITION_TYPE_MAX} characters "
            "without control characters"
        )
    if condition.status not in CONDITION_STATUSES:
        raise InvalidArgument(
            f"condition {condition.type!r}: status must be True, False or Unknown, "
            f"got {_quote(condition.status)}"
        )
    if len(condition.reason) > REASON_MAX:
        raise InvalidArgument(f"condition {condition.type!r}: reason exceeds {REASON_MAX} chars")
    if len(condition.message) > MESSAGE_MAX:
        raise InvalidArgument(
            f"condition {condition.type!r}: message exceeds {MESSAGE_MAX} chars"
        )


def validate_status(status: GpuStatus, limits: Limits) -> None:
    if len(status.conditions) > limits.max_conditions:
        raise InvalidArgument(
            f"{len(status.conditions)} conditions exceed the limit of {limits.max_conditions}"
        )
    seen: set[str] = set()
    for condition in status.conditions:
        validate_condition(condition)
        if condition.type in seen:
            raise InvalidArgument(f"condition type {condition.type!r} appears more than once")
        seen.add(condition.type)
    if len(status.recommended_action) > RECOMMENDED_ACTION_MAX:
        raise InvalidArgument(f"recommended_action exceeds {RECOMMENDED_ACTION_MAX} chars")


def parse_version(text: str, what: str = "resource_version") -> int:
    """A decimal resource version string ("" means 0, i.e. unconditional / from now)."""
    if not text:
        return 0
    if not text.isascii() or not text.isdigit():
        raise InvalidArgument(f"{what} must be a non-negative decimal number, got {_quote(text)}")
    value = int(text)
    if value >= 2**63:
        raise InvalidArgument(f"{what} is out of range")
    return value


def expected_version(gpu: Gpu) -> int:
    """UpdateGpu's expected version: ``resource_version``, else ``metadata.resource_version``."""
    if gpu.resource_version < 0:
        raise InvalidArgument("resource_version must not be negative")
    if gpu.resource_version:
        return gpu.resource_version
    return parse_version(gpu.metadata.resource_version, "metadata.resource_version")


def _quote(text: str, limit: int = 64) -> str:
    shown = text if len(text) <= limit else text[:limit] + "…"
    return repr(shown)


# ---- transitions -------------------------------------------------------------------------------


def apply(state: State, command: Command, limits: Limits, now: Timestamp) -> tuple[
    State, Result, list[Event]
]:
    """The one entry point: validate ``command`` against ``state`` and return the next state.

    Raises a DeviceApiError (nothing changes) when the command is invalid or conflicts.
    """
    match command:
        case CreateGpu(gpu=gpu, provider=provider, exclusive=exclusive, uid=uid):
            validate_provider(provider)
            return _create(state, _gpu_name(gpu), gpu.spec, gpu.status, gpu.metadata, provider,
                           limits, now, uid, exclusive=exclusive)
        case RegisterGpu(name=name, spec=spec, status=status, provider=provider, uid=uid):
            validate_provider(provider)
            return _create(state, name, spec, status, ObjectMeta(name=name), provider, limits, now,
                           uid)
        case UpdateGpu(gpu=gpu, provider=provider):
            validate_provider(provider)
            name = _gpu_name(gpu)
            _check_spec(name, gpu.spec)
            _check_namespace(gpu.metadata.namespace)
            validate_status(gpu.status, limits)
            current = _existing(state, name, expected_version(gpu))
            status = _unecho(state, name, gpu.status)
            return _write(state, name, _spec_or_default(name, gpu.spec), status, current,
                          gpu.metadata.namespace, provider, limits, now)
        case UpdateSpec(name=name, spec=spec, namespace=namespace, uid=uid, expected_rv=expected,
                        provider=provider):
            validate_provider(provider)
            validate_name(name, "metadata.name")
            _check_spec(name, spec)
            _check_namespace(namespace)
            current = _existing(state, name, expected)
            _check_identity(state, current, namespace, uid)
            status = _provider_view(state, name, current).status  # a masked Ready stays masked
            return _write(state, name, _spec_or_default(name, spec), status, current,
                          current.metadata.namespace, provider, limits, now)
        case UpdateGpuStatus(name=name, status=status, expected_rv=expected, provider=provider,
                             identity=identity):
            validate_provider(provider)
            validate_name(name)
            if expected < 0:
                raise InvalidArgument("resource_version must not be negative")
            validate_status(status, limits)
            current = _existing(state, name, expected)
            if identity is not None:
                _check_identity(state, current, *identity)
            status = _unecho(state, name, status)
            return _write(state, name, current.spec, status, current,
                          current.metadata.namespace, provider, limits, now)
        case UpdateCondition(name=name, condition=condition, provider=provider):
            validate_provider(provider)
            validate_name(name)
            validate_condition(condition)
            current = _existing(state, name, 0)
            status = _upsert_condition(_provider_view(state, name, current).status, condition)
            validate_status(status, limits)
            return _write(state, name, current.spec, status, current,
                          current.metadata.namespace, provider, limits, now)
        case DeleteGpu(name=name, missing_ok=missing_ok, namespace=namespace):
            validate_name(name)
            if name not in state.gpus and missing_ok:
                return state, Result(rv=state.rv), []
            current = _existing(state, name, 0)
            if not in_namespace(current, namespace):
                raise NotFound(f"gpu {name!r} not found in namespace {namespace!r}")
            return _delete(state, name, current)
        case MaskProvider(provider=provider):
            return _mask(state, provider, now)
        case UnmaskProvider(provider=provider):
            return _unmask(state, provider, now)
        case ClaimGpus(provider=provider, names=names):
            validate_provider(provider)
            owners = dict(state.owners)
            for name in names:
                if name in state.gpus:
                    owners[name] = provider
            return dataclasses.replace(state, owners=owners), Result(rv=state.rv), []
        case IngestHealthEvents(events=events, idempotency_key=key):
            return _ingest(state, events, key, limits, now)
    raise AssertionError(f"unknown command {command!r}")  # pragma: no cover


def _gpu_name(gpu: Gpu) -> str:
    name = gpu.metadata.name
    validate_name(name, "metadata.name")
    return name


def _check_spec(name: str, spec: GpuSpec) -> None:
    if spec.uuid:
        validate_name(spec.uuid, "spec.uuid")


def _spec_or_default(name: str, spec: GpuSpec) -> GpuSpec:
    """The spec to store: the given one, with the UUID defaulted to the name."""
    return spec if spec.uuid else GpuSpec(uuid=name)


def in_namespace(gpu: Gpu, namespace: str) -> bool:
    """SPEC §7.1 reads: "" matches every namespace; a stored "" is "default"."""
    return not namespace or (gpu.metadata.namespace or DEFAULT_NAMESPACE) == namespace


def _check_identity(state: State, current: Gpu, namespace: str, uid: str) -> None:
    """SPEC §7.1: namespace ("" = "default") and uid ("" = not given) are immutable."""
    name = current.metadata.name
    stored = current.metadata.namespace or DEFAULT_NAMESPACE
    if (namespace or DEFAULT_NAMESPACE) != stored:
        raise InvalidArgument(
            f"gpu {name!r} is in namespace {stored!r}; metadata.namespace is immutable")
    info = state.info.get(name)
    if uid and info is not None and uid != info.uid:
        raise InvalidArgument(f"gpu {name!r} has uid {info.uid!r}; metadata.uid is immutable")


def _existing(state: State, name: str, expected_rv: int) -> Gpu:
    current = state.gpus.get(name)
    if current is None:
        raise NotFound(f"gpu {name!r} not found")
    if expected_rv and expected_rv != current.resource_version:
        raise Conflict(
            f"gpu {name!r} is at resource version {current.resource_version}, "
            f"not {expected_rv}; re-read and retry"
        )
    return current


def _create(state: State, name: str, spec: GpuSpec, status: GpuStatus, meta: ObjectMeta,
            provider: str, limits: Limits, now: Timestamp, uid: str, *,
            exclusive: bool = False) -> tuple[State, Result, list[Event]]:
    validate_name(name)
    _check_spec(name, spec)
    validate_status(status, limits)
    _check_namespace(meta.namespace)
    existing = state.gpus.get(name)
    if existing is not None and exclusive:
        raise AlreadyExists(f"gpu {name!r} already exists")
    if existing is not None:
        # Idempotent: providers re-register after restarts and rely on this.
        if provider and state.owners.get(name) != provider:
            state = dataclasses.replace(state, owners={**state.owners, name: provider})
        return state, Result(rv=existing.resource_version, gpu=existing, created=False,
                             info=state.info.get(name)), []
    if len(state.gpus) >= limits.max_gpus:
        raise ResourceExhausted(
            f"the cache already holds the maximum of {limits.max_gpus} GPUs", "max_gpus"
        )
    rv = state.rv + 1
    conditions = _stamp_conditions(None, status.conditions, now)
    gpu = _build(name, _spec_or_default(name, spec), status, conditions, meta.namespace, rv)
    _check_size(gpu, limits)
    gpus = {**state.gpus, name: gpu}
    owners: Mapping[str, str] = {**state.owners, name: provider} if provider else state.owners
    info = ObjectInfo(uid=uid, generation=1, created=now)
    new_state = dataclasses.replace(state, rv=rv, gpus=gpus, owners=owners,
                                    info={**state.info, name: info})
    return new_state, Result(rv=rv, gpu=gpu, created=True, info=info), [
        Event("ADDED", gpu, info)]


def _check_namespace(namespace: str) -> None:
    if len(namespace) > NAMESPACE_MAX:
        raise InvalidArgument(f"metadata.namespace exceeds {NAMESPACE_MAX} characters")


def _provider_view(state: State, name: str, current: Gpu) -> Gpu:
    """The object as its provider wrote it: on a masked GPU, the provider's own Ready (or
    none) instead of the server's heartbeat-timeout one. Limits and upserts apply to this."""
    if name not in state.masked:
        return current
    own_ready = state.masked[name]
    conditions = [c for c in current.status.conditions if c.type != READY]
    if own_ready is not None:
        conditions.append(own_ready)
    view = Gpu()
    view.CopyFrom(current)
    del view.status.conditions[:]
    view.status.conditions.extend(conditions)
    return view


def _unecho(state: State, name: str, status: GpuStatus) -> GpuStatus:
    """A provider that read a masked GPU back and writes its status again echoes the server's
    Ready; that is not the provider's Ready, so keep the one it last wrote. (The result stays
    valid: one Ready is swapped for an already-validated one, or dropped.)"""
    if name not in state.masked:
        return status
    echoed = next((c for c in status.conditions
                   if c.type == READY and c.reason == HEARTBEAT_TIMEOUT_REASON), None)
    if echoed is None:
        return status
    own_ready = state.masked[name]
    conditions = [c for c in status.conditions if c.type != READY]
    if own_ready is not None:
        conditions.append(own_ready)
    return GpuStatus(conditions=conditions, recommended_action=status.recommended_action)


def _write(state: State, name: str, spec: GpuSpec, status: GpuStatus, current: Gpu,
           namespace: str, provider: str, limits: Limits,
           now: Timestamp) -> tuple[State, Result, list[Event]]:
    masked = state.masked
    view = _provider_view(state, name, current)
    conditions = _stamp_conditions(view.status.conditions, status.conditions, now)
    rv = state.rv + 1
    gpu = _build(name, spec, status, conditions, namespace, rv)
    _check_size(gpu, limits)  # limits bound what the provider wrote
    if name in masked:
        # The provider's heartbeat is overdue: remember what it wrote for Ready, keep Unknown.
        server_ready = _ready_of(current)
        assert server_ready is not None, "a masked GPU always carries the server's Ready"
        masked = {**masked, name: _ready_of(gpu)}
        shown = [c for c in conditions if c.type != READY] + [server_ready]
        gpu = _build(name, spec, status, shown, namespace, rv)
    gpus = {**state.gpus, name: gpu}
    owners: Mapping[str, str] = {**state.owners, name: provider} if provider else state.owners
    info = state.info
    old_info = info.get(name)
    if old_info is not None and spec != current.spec:
        info = {**info, name: dataclasses.replace(old_info, generation=old_info.generation + 1)}
    new_state = dataclasses.replace(state, rv=rv, gpus=gpus, owners=owners, masked=masked,
                                    info=info)
    return new_state, Result(rv=rv, gpu=gpu, info=info.get(name)), [
        Event("MODIFIED", gpu, info.get(name))]


def _delete(state: State, name: str, current: Gpu) -> tuple[State, Result, list[Event]]:
    rv = state.rv + 1
    last = Gpu()
    last.CopyFrom(current)
    last.resource_version = rv
    last.metadata.resource_version = str(rv)
    gpus = {k: v for k, v in state.gpus.items() if k != name}
    owners = {k: v for k, v in state.owners.items() if k != name}
    masked = {k: v for k, v in state.masked.items() if k != name}
    checks = {k: v for k, v in state.checks.items() if k != name}
    info = {k: v for k, v in state.info.items() if k != name}
    new_state = dataclasses.replace(state, rv=rv, gpus=gpus, owners=owners, masked=masked,
                                    checks=checks, info=info)
    return new_state, Result(rv=rv, gpu=None, deleted=True), [
        Event("DELETED", last, state.info.get(name))]


def _mask(state: State, provider: str, now: Timestamp) -> tuple[State, Result, list[Event]]:
    """Override Ready with Unknown on the provider's GPUs, remembering what it had written."""
    unknown = Condition(type=READY, status="Unknown", reason=HEARTBEAT_TIMEOUT_REASON,
                        message=f"provider {provider!r} missed its heartbeat deadline")
    masked = dict(state.masked)
    changes: dict[str, Condition | None] = {}
    for name in state.owned_by(provider):
        if name not in masked:
            masked[name] = _ready_of(state.gpus[name])
            changes[name] = unknown
    return _set_ready(state, masked, changes, now)


def _unmask(state: State, provider: str, now: Timestamp) -> tuple[State, Result, list[Event]]:
    """Put back the Ready condition the provider last wrote (or none, if it never wrote one)."""
    masked = dict(state.masked)
    changes = {name: masked.pop(name) for name in state.owned_by(provider) if name in masked}
    return _set_ready(state, masked, changes, now)


def _ready_of(gpu: Gpu) -> Condition | None:
    return next((c for c in gpu.status.conditions if c.type == READY), None)


def _set_ready(state: State, masked: dict[str, Condition | None],
               changes: dict[str, Condition | None],
               now: Timestamp) -> tuple[State, Result, list[Event]]:
    """Set (None: remove) the Ready condition of each GPU in ``changes``, in name order, one
    version and one MODIFIED event per GPU."""
    gpus = dict(state.gpus)
    rv = state.rv
    events: list[Event] = []
    for name in sorted(changes):
        current = gpus[name]
        conditions = [c for c in current.status.conditions if c.type != READY]
        replacement = changes[name]
        if replacement is not None:
            fresh = Condition()
            fresh.CopyFrom(replacement)
            fresh.ClearField("last_transition_time")  # its status changes now (Unknown ↔ other)
            conditions += _stamp_conditions(current.status.conditions, [fresh], now)
        rv += 1
        gpu = _build(name, current.spec, current.status, conditions, current.metadata.namespace,
                     rv)
        gpus[name] = gpu
        events.append(Event("MODIFIED", gpu, state.info.get(name)))
    new_state = dataclasses.replace(state, rv=rv, gpus=gpus, masked=masked)
    return new_state, Result(rv=rv), events


def _upsert_condition(status: GpuStatus, condition: Condition,
                      keep_time: bool = False) -> GpuStatus:
    """Replace the condition of the same type (or append it); the server owns its timestamp
    (``keep_time``: the caller decided it, as ingest does from the event's own time)."""
    incoming = Condition()
    incoming.CopyFrom(condition)
    if not keep_time:
        incoming.ClearField("last_transition_time")
    conditions = [c for c in status.conditions if c.type != condition.type]
    position = next(
        (i for i, c in enumerate(status.conditions) if c.type == condition.type),
        len(conditions),
    )
    conditions.insert(position, incoming)
    return GpuStatus(conditions=conditions, recommended_action=status.recommended_action)


def _stamp_conditions(
    previous: Iterable[Condition] | None, conditions: Iterable[Condition], now: Timestamp
) -> list[Condition]:
    """Copy ``conditions``, filling unset transition times: kept while a type's status is
    unchanged, ``now`` when it changed or is new."""
    before = {c.type: c for c in previous or ()}
    stamped: list[Condition] = []
    for condition in conditions:
        copy = Condition()
        copy.CopyFrom(condition)
        if not copy.HasField("last_transition_time"):
            old = before.get(copy.type)
            if old is not None and old.status == copy.status and old.HasField(
                "last_transition_time"
            ):
                copy.last_transition_time.CopyFrom(old.last_transition_time)
            else:
                copy.last_transition_time.CopyFrom(now)
        stamped.append(copy)
    return stamped


def _build(name: str, spec: GpuSpec, status: GpuStatus, conditions: list[Condition],
           namespace: str, rv: int) -> Gpu:
    return Gpu(
        metadata=ObjectMeta(name=name, resource_version=str(rv), namespace=namespace),
        spec=spec,
        status=GpuStatus(conditions=conditions, recommended_action=status.recommended_action),
        resource_version=rv,
    )


def _check_size(gpu: Gpu, limits: Limits) -> None:
    size = gpu.ByteSize()
    if size > limits.max_object_bytes:
        raise InvalidArgument(
            f"gpu object is {size} bytes, over the limit of {limits.max_object_bytes}"
        )


def _ingest(state: State, events: tuple[ingest.HealthEvent, ...], key: str, limits: Limits,
            now: Timestamp) -> tuple[State, Result, list[Event]]:
    """Apply a planned batch to every GPU it changes, in name order, one version per GPU; any
    refusal (too many conditions, an invalid condition, an object too large) refuses it all.

    Ingest never takes ownership of a GPU: ownership decides whose heartbeat masks it, and
    NVSentinel's monitors send no heartbeats."""
    if key and key in state.ingest_keys:
        return state, Result(rv=state.rv), []
    plan = ingest.plan(events, state.gpus, state.checks, state.ingest_seq)
    rv = state.rv
    result_events: list[Event] = []
    for name, change in plan.changes.items():
        current = state.gpus[name]
        status = _provider_view(state, name, current).status
        for condition in change.conditions:
            status = _upsert_condition(status, condition, keep_time=True)
        if change.recommended_action is not None:
            status = GpuStatus(conditions=status.conditions,
                               recommended_action=change.recommended_action)
        if len(status.conditions) > limits.max_conditions:
            raise ResourceExhausted(
                f"the batch would give gpu {name!r} {len(status.conditions)} conditions, over "
                f"the limit of {limits.max_conditions}; nothing of the batch was applied",
                "max_conditions")
        validate_status(status, limits)
        state, _, written = _write(state, name, current.spec, status, current,
                                   current.metadata.namespace, "", limits, now)
        result_events.extend(written)
        rv = state.rv
    keys = state.ingest_keys
    if key:
        keys = (*keys[-(ingest.IDEMPOTENCY_KEYS - 1):], key)
    state = dataclasses.replace(state, checks=plan.ledger, ingest_seq=plan.seq,
                                ingest_keys=keys)
    return state, Result(rv=rv, plan=plan), result_events
