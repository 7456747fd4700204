"""An independent model of the cache for the fuzz tests: the validation rules of
docs/VALIDATION.md written out again (not imported from the server), and what each RPC must
answer and change.

Each ``Model`` method takes a decoded request and returns an :class:`Outcome`: the status codes
the server may answer with and, for a successful write, how the model changes. The fuzz tests
apply the change only when the server said OK, then compare the server's List with the model.
The one place two answers are allowed is an object within a few bytes of the size limit (the
server stamps condition times, whose encoded size varies); there the model follows the server.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

from google.protobuf.message import Message
from grpclib.const import Status

from deviceapi.proto.device.v1alpha1 import gpu_pb2 as pb
from deviceapi.proto.device.v1alpha1 import provider_pb2 as ppb

NAME_MAX = 128
CONDITION_TYPE_MAX = 128
REASON_MAX = 256
MESSAGE_MAX = 4096
RECOMMENDED_ACTION_MAX = 4096
NAMESPACE_MAX = 253
PROVIDER_ID_MAX = 253
STATUSES = frozenset({"True", "False", "Unknown"})
INT64_MAX = 2**63 - 1

_NAME = re.compile(r"(?:GPU|MIG)-[0-9A-Fa-f][0-9A-Fa-f-]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

OK = frozenset({Status.OK})
INVALID = frozenset({Status.INVALID_ARGUMENT})
NOT_FOUND = frozenset({Status.NOT_FOUND})
ABORTED = frozenset({Status.ABORTED})
EXHAUSTED = frozenset({Status.RESOURCE_EXHAUSTED})
OUT_OF_RANGE = frozenset({Status.OUT_OF_RANGE})


@dataclasses.dataclass(frozen=True)
class Outcome:
    """Acceptable status codes, and the model change a successful answer makes."""

    codes: frozenset[Status]
    commit: Callable[[], None] | None = None
    #: For WatchGpus answered OK: how many events the stream starts with.
    initial_events: int = 0


def name_ok(name: str) -> bool:
    return bool(name) and len(name) <= NAME_MAX and _NAME.fullmatch(name) is not None


def provider_ok(provider: str) -> bool:
    return len(provider) <= PROVIDER_ID_MAX and not _CONTROL.search(provider)


def condition_ok(c: pb.Condition) -> bool:
    return (bool(c.type) and len(c.type) <= CONDITION_TYPE_MAX and not _CONTROL.search(c.type)
            and c.status in STATUSES and len(c.reason) <= REASON_MAX
            and len(c.message) <= MESSAGE_MAX)


def status_ok(status: pb.GpuStatus, max_conditions: int) -> bool:
    types = [c.type for c in status.conditions]
    return (len(types) <= max_conditions and all(condition_ok(c) for c in status.conditions)
            and len(set(types)) == len(types)
            and len(status.recommended_action) <= RECOMMENDED_ACTION_MAX)


def version_text(text: str) -> int | None:
    """A decimal resource version ("" is 0); None when the server must refuse it."""
    if not text:
        return 0
    if not (text.isascii() and text.isdigit()) or int(text) > INT64_MAX:
        return None
    return int(text)


@dataclasses.dataclass(frozen=True)
class Limits:
    max_gpus: int = 1024
    max_conditions: int = 32
    max_object_bytes: int = 65536
    watch_history: int = 1024


class Model:
    """The GPUs a correct server holds, by name, and its resource version."""

    def __init__(self, limits: Limits, base: int = 0) -> None:
        self.limits = limits
        self.gpus: dict[str, pb.Gpu] = {}
        #: The server's starting version (SPEC §2: from the wall clock, never 0).
        self.base = base
        self.rv = base

    # -- reads ---------------------------------------------------------------------------------

    def get(self, name: str) -> Outcome:
        if not name_ok(name):
            return Outcome(INVALID)
        return Outcome(OK if name in self.gpus else NOT_FOUND)

    def watch(self, version: str) -> Outcome:
        rv = version_text(version)
        if rv is None:
            return Outcome(INVALID)
        if rv == 0:
            return Outcome(OK, initial_events=len(self.gpus))
        history = min(self.limits.watch_history, self.rv - self.base)
        if rv > self.rv or rv < self.rv - history:
            return Outcome(OUT_OF_RANGE)
        return Outcome(OK, initial_events=self.rv - rv)

    # -- writes --------------------------------------------------------------------------------

    def create(self, gpu: pb.Gpu | None, provider: str) -> Outcome:
        if gpu is None:
            return Outcome(INVALID)
        return self._create(gpu.metadata.name, gpu.spec, gpu.status, gpu.metadata.namespace,
                            provider)

    def register(self, name: str, spec: pb.GpuSpec, status: pb.GpuStatus,
                 provider: str) -> Outcome:
        return self._create(name, spec, status, "", provider)

    def update(self, gpu: pb.Gpu | None, provider: str) -> Outcome:
        if gpu is None:
            return Outcome(INVALID)
        name = gpu.metadata.name
        if not (provider_ok(provider) and name_ok(name) and self._spec_ok(gpu.spec)
                and len(gpu.metadata.namespace) <= NAMESPACE_MAX):
            return Outcome(INVALID)
        if gpu.resource_version < 0:
            return Outcome(INVALID)
        expected = gpu.resource_version or version_text(gpu.metadata.resource_version)
        if expected is None:
            return Outcome(INVALID)
        return self._write(name, expected, gpu.spec, gpu.status, gpu.metadata.namespace)

    def update_status(self, name: str, status: pb.GpuStatus | None, expected: int,
                      provider: str) -> Outcome:
        if not name or status is None or not provider_ok(provider) or not name_ok(name):
            return Outcome(INVALID)
        if expected < 0:
            return Outcome(INVALID)
        current = self.gpus.get(name)
        namespace = current.metadata.namespace if current is not None else ""
        spec = current.spec if current is not None else pb.GpuSpec()
        return self._write(name, expected, spec, status, namespace)

    def update_condition(self, name: str, condition: pb.Condition | None,
                         provider: str) -> Outcome:
        if condition is None or not provider_ok(provider) or not name_ok(name):
            return Outcome(INVALID)
        if not condition_ok(condition):
            return Outcome(INVALID)
        current = self.gpus.get(name)
        if current is None:
            return Outcome(NOT_FOUND)
        conditions = list(current.status.conditions)
        types = [c.type for c in conditions]
        incoming = pb.Condition()
        incoming.CopyFrom(condition)
        incoming.ClearField("last_transition_time")  # the server owns it here
        if condition.type in types:
            conditions[types.index(condition.type)] = incoming
        else:
            conditions.append(incoming)
        status = pb.GpuStatus(conditions=conditions,
                              recommended_action=current.status.recommended_action)
        if len(conditions) > self.limits.max_conditions:
            return Outcome(INVALID)
        return self._write(name, 0, current.spec, status, current.metadata.namespace)

    def delete(self, name: str, *, missing_ok: bool = False) -> Outcome:
        if not name_ok(name):
            return Outcome(INVALID)
        if name not in self.gpus:
            return Outcome(OK if missing_ok else NOT_FOUND)

        def commit() -> None:
            del self.gpus[name]
            self.rv += 1

        return Outcome(OK, commit)

    def heartbeat(self, provider: str, names: Sequence[str]) -> Outcome:
        if not provider or not provider_ok(provider):
            return Outcome(INVALID)
        if not all(name_ok(n) for n in names):
            return Outcome(INVALID)
        return Outcome(OK)  # ownership only: nothing a reader sees changes

    # -- helpers -------------------------------------------------------------------------------

    def _spec_ok(self, spec: pb.GpuSpec) -> bool:
        return not spec.uuid or name_ok(spec.uuid)

    def _create(self, name: str, spec: pb.GpuSpec, status: pb.GpuStatus, namespace: str,
                provider: str) -> Outcome:
        if not (provider_ok(provider) and name_ok(name) and self._spec_ok(spec)
                and status_ok(status, self.limits.max_conditions)
                and len(namespace) <= NAMESPACE_MAX):
            return Outcome(INVALID)
        if name in self.gpus:
            return Outcome(OK)  # idempotent: the existing object, created=false
        if len(self.gpus) >= self.limits.max_gpus:
            return Outcome(EXHAUSTED)
        return self._sized(name, spec, status, namespace)

    def _write(self, name: str, expected: int, spec: pb.GpuSpec, status: pb.GpuStatus,
               namespace: str) -> Outcome:
        """An update of an existing GPU. A status that breaks a rule on a GPU that is missing
        or at another version may be answered either way: the contract does not order those
        checks (the server validates a status against the stored GPU)."""
        current = self.gpus.get(name)
        valid = status_ok(status, self.limits.max_conditions)
        missing: frozenset[Status] | None = None
        if current is None:
            missing = NOT_FOUND
        elif expected and expected != current.resource_version:
            missing = ABORTED
        if missing is not None:
            return Outcome(missing if valid else missing | INVALID)
        if not valid:
            return Outcome(INVALID)
        return self._sized(name, spec, status, namespace)

    def _sized(self, name: str, spec: pb.GpuSpec, status: pb.GpuStatus,
               namespace: str) -> Outcome:
        rv = self.rv + 1
        stored = pb.Gpu(
            metadata=pb.ObjectMeta(name=name, resource_version=str(rv), namespace=namespace),
            spec=spec if spec.uuid else pb.GpuSpec(uuid=name),
            status=pb.GpuStatus(conditions=status.conditions,
                                recommended_action=status.recommended_action),
            resource_version=rv,
        )

        def commit() -> None:
            self.gpus[name] = stored
            self.rv = rv

        # The server stamps each condition that has no transition time (8 to 14 bytes encoded,
        # up to 24 when it keeps one a client wrote earlier), and length prefixes may grow.
        unstamped = sum(not c.HasField("last_transition_time") for c in stored.status.conditions)
        size = stored.ByteSize()
        low, high = size + 8 * unstamped, size + 25 * unstamped + 3
        limit = self.limits.max_object_bytes
        if high <= limit:
            return Outcome(OK, commit)
        if low > limit:
            return Outcome(INVALID)
        return Outcome(OK | INVALID, commit)

    # -- comparison ----------------------------------------------------------------------------

    def check_list(self, listing: pb.GpuList) -> None:
        """The server's List is exactly the model (timestamps and unknown fields aside)."""
        assert int(listing.metadata.resource_version) == self.rv, (
            f"list version {listing.metadata.resource_version}, model {self.rv}")
        got = [_view(g) for g in listing.items]
        want = [_view(self.gpus[n]) for n in sorted(self.gpus)]
        assert got == want


def _view(gpu: pb.Gpu) -> tuple[object, ...]:
    return (
        gpu.metadata.name, gpu.metadata.resource_version, gpu.metadata.namespace,
        gpu.resource_version, gpu.spec.uuid, gpu.status.recommended_action,
        tuple((c.type, c.status, c.reason, c.message) for c in gpu.status.conditions),
    )


GPU = "/nvidia.device.v1alpha1.GpuService/"
PROVIDER = "/nvidia.device.v1alpha1.ProviderService/"

#: Every RPC of the two services: method path → request message type.
REQUESTS: dict[str, type[Message]] = {
    GPU + "GetGpu": pb.GetGpuRequest,
    GPU + "ListGpus": pb.ListGpusRequest,
    GPU + "WatchGpus": pb.WatchGpusRequest,
    GPU + "CreateGpu": pb.CreateGpuRequest,
    GPU + "UpdateGpu": pb.UpdateGpuRequest,
    GPU + "UpdateGpuStatus": pb.UpdateGpuStatusRequest,
    GPU + "DeleteGpu": pb.DeleteGpuRequest,
    PROVIDER + "RegisterGpu": ppb.ProviderRegisterGpuRequest,
    PROVIDER + "UnregisterGpu": ppb.ProviderUnregisterGpuRequest,
    PROVIDER + "UpdateGpuStatus": ppb.ProviderUpdateGpuStatusRequest,
    PROVIDER + "UpdateGpuCondition": ppb.ProviderUpdateGpuConditionRequest,
    PROVIDER + "Heartbeat": ppb.HeartbeatRequest,
}


def expect(model: Model, path: str, request: Any, provider_header: str = "") -> Outcome:
    """What the server must answer to ``request`` on ``path`` (decoded), given the model."""
    r = request
    method = path.rsplit("/", 1)[1]
    if path.startswith(GPU):
        gpu = r.gpu if method in {"CreateGpu", "UpdateGpu"} and r.HasField("gpu") else None
        match method:
            case "GetGpu":
                return model.get(r.name)
            case "ListGpus":
                return Outcome(OK)
            case "WatchGpus":
                return model.watch(r.opts.resource_version)
            case "CreateGpu":
                return model.create(gpu, provider_header)
            case "UpdateGpu":
                return model.update(gpu, provider_header)
            case "UpdateGpuStatus":
                status = r.status if r.HasField("status") else None
                return model.update_status(r.name, status, r.resource_version, provider_header)
            case "DeleteGpu":
                return model.delete(r.name)
    match method:
        case "RegisterGpu":
            return model.register(r.name, r.spec, r.initial_status, r.provider_id)
        case "UnregisterGpu":
            return model.delete(r.name, missing_ok=True)
        case "UpdateGpuStatus":
            status = r.status if r.HasField("status") else None
            return model.update_status(r.name, status, 0, r.provider_id)
        case "UpdateGpuCondition":
            condition = r.condition if r.HasField("condition") else None
            return model.update_condition(r.name, condition, r.provider_id)
        case "Heartbeat":
            return model.heartbeat(r.provider_id, list(r.gpu_names))
    raise AssertionError(f"unknown method {path}")
