"""``_store.apply`` against a small independent model (hypothesis RuleBasedStateMachine).

The model knows nothing of protobuf: a GPU is (spec uuid, namespace, [(type, status, reason,
message)] in display order, recommended_action, rv); plus a version counter, owners and the
masked map (name -> the provider's Ready tuple or None). Every rule also draws invalid inputs, and
every step checks the versions / events / immutability invariants of SPEC §2 and §4.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
from core_helpers import HEARTBEAT_TIMEOUT_REASON, READY, fingerprint, ts
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from deviceapi._errors import Conflict, DeviceApiError, InvalidArgument, NotFound, ResourceExhausted
from deviceapi.cache._store import (
    ClaimGpus,
    Command,
    CreateGpu,
    DeleteGpu,
    Event,
    Limits,
    MaskProvider,
    RegisterGpu,
    Result,
    State,
    UnmaskProvider,
    UpdateCondition,
    UpdateGpu,
    UpdateGpuStatus,
    apply,
)
from deviceapi.proto.device.v1alpha1.gpu_pb2 import Condition, Gpu, GpuSpec, GpuStatus, ObjectMeta

LIMITS = Limits(max_gpus=3, max_conditions=4, max_object_bytes=65536)

VALID_NAMES = ["GPU-0a", "GPU-1b", "MIG-2c-3d", "GPU-FF"]
INVALID_NAMES = ["", "gpu-0a", "GPU-", "GPU-xyz", "GPU-0a/x", "../GPU-0a", "GPU-0a\n",
                 "GPU-0\x00", "GPU-\u00e9", "GPU-" + "a" * 125]
names = st.sampled_from(VALID_NAMES)
uuids = st.sampled_from(["", "", "GPU-0a", "MIG-99"])
namespaces = st.sampled_from(["", "ns1"])
providers = st.sampled_from(["", "", "p1", "p1", "p1", "p2", "p3"])
mask_providers = st.sampled_from(["", "p1", "p1", "p1", "p2", "p3"])

TYPES = ["Ready", "Ready", "A", "B", "C", "D"]
STATUSES = ["True", "False", "Unknown"]

CondT = tuple[str, str, str, str]

condition_tuples = st.tuples(
    st.sampled_from(TYPES), st.sampled_from(STATUSES), st.sampled_from(["", "ok", "r1"]),
    st.sampled_from(["", "m"]),
)
condition_lists = st.lists(condition_tuples, max_size=4, unique_by=lambda c: c[0])
actions = st.sampled_from(["", "drain"])

#: At most one field of a write is spoiled; None (most draws) leaves the write valid.
SPOILERS: list[tuple[str, object] | None] = [None] * 70 + [
    *(("name", n) for n in INVALID_NAMES),
    ("uuid", "not-a-uuid"), ("uuid", "GPU-"), ("uuid", "GPU-" + "b" * 125),
    ("provider", "bad\x00id"), ("provider", "p" * 254),
    ("type", ""), ("type", "X\x01"), ("type", "T" * 129),
    ("status", "true"), ("status", ""), ("status", "Yes"),
    ("reason", "x" * 256), ("reason", "y" * 257),
    ("message", "m" * 4096), ("message", "z" * 4097),
    ("dup", None), ("many", None),
    ("action", "a" * 4096), ("action", "a" * 4097),
    ("namespace", "n" * 253), ("namespace", "n" * 254),
]
spoilers = st.sampled_from(SPOILERS)
VERSION_CHOICES = ["zero", "current", "current", "stale", "future", "meta_current", "meta_stale",
                   "meta_bad", "meta_neg", "meta_overflow", "neg"]


@dataclasses.dataclass
class Args:
    name: str
    uuid: str = ""
    provider: str = ""
    cs: list[CondT] = dataclasses.field(default_factory=list)
    action: str = ""
    namespace: str = ""


def spoil(args: Args, spoiler: tuple[str, object] | None) -> Args:
    """Apply one spoiler (some are edge values that are still valid)."""
    if spoiler is None:
        return args
    field, value = spoiler
    cs = list(args.cs)
    index = {"type": 0, "status": 1, "reason": 2, "message": 3}.get(field)
    if index is not None:
        assert isinstance(value, str)
        first = list(cs[0]) if cs else ["E", "True", "", ""]
        first[index] = value
        cs[:1] = [(first[0], first[1], first[2], first[3])]
        return dataclasses.replace(args, cs=cs)
    if field == "dup":
        return dataclasses.replace(args, cs=[*cs, cs[0]] if cs else [("A", "True", "", "")] * 2)
    if field == "many":
        types = [f"M{i}" for i in range(LIMITS.max_conditions + 1)]
        return dataclasses.replace(args, cs=[(t, "True", "", "") for t in types])
    assert isinstance(value, str)
    return dataclasses.replace(args, **{field: value})  # type: ignore[arg-type]


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NAME = re.compile(r"(?:GPU|MIG)-[0-9a-fA-F][-0-9a-fA-F]*")


# ---- the model's own validation (independent of _store's) ------------------------------------


def name_ok(name: str) -> bool:
    return bool(name) and len(name) <= 128 and _NAME.fullmatch(name) is not None


def provider_ok(provider: str) -> bool:
    return len(provider) <= 253 and not _CONTROL.search(provider)


def condition_ok(c: CondT) -> bool:
    type_, status_, reason, message = c
    return (bool(type_) and len(type_) <= 128 and not _CONTROL.search(type_)
            and status_ in STATUSES and len(reason) <= 256 and len(message) <= 4096)


def conditions_ok(cs: list[CondT]) -> bool:
    types = [c[0] for c in cs]
    return (len(cs) <= LIMITS.max_conditions and len(set(types)) == len(types)
            and all(condition_ok(c) for c in cs))


def to_condition(c: CondT) -> Condition:
    return Condition(type=c[0], status=c[1], reason=c[2], message=c[3])


def to_status(cs: list[CondT], action: str) -> GpuStatus:
    return GpuStatus(conditions=[to_condition(c) for c in cs], recommended_action=action)


def tuple_of(c: Condition) -> CondT:
    return (c.type, c.status, c.reason, c.message)


@dataclasses.dataclass
class MGpu:
    uuid: str
    namespace: str
    conditions: list[CondT]
    action: str
    rv: int


def ready(cs: list[CondT]) -> CondT | None:
    return next((c for c in cs if c[0] == READY), None)


def without_ready(cs: list[CondT]) -> list[CondT]:
    return [c for c in cs if c[0] != READY]


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.state = State()
        self.clock = 1000
        # the model
        self.rv = 0
        self.gpus: dict[str, MGpu] = {}
        self.owners: dict[str, str] = {}
        self.masked: dict[str, CondT | None] = {}
        # bookkeeping for the invariants
        self.event_rvs: list[int] = []
        self.last_event_rv: dict[str, int] = {}

    # ---- driving apply -----------------------------------------------------------------------

    def _now(self) -> Timestamp:
        self.clock += 1
        return ts(self.clock)

    def _reject(self, command: Command, error: type[DeviceApiError]) -> None:
        before = self.state
        print_before = fingerprint(before)
        with pytest.raises(error):
            apply(before, command, LIMITS, self._now())
        assert self.state is before
        assert fingerprint(before) == print_before, "a rejected command mutated the state"

    def _accept(self, command: Command, kinds: list[str]) -> tuple[Result, list[Event]]:
        before = self.state
        print_before = fingerprint(before)
        now = self._now()
        after, result, events = apply(before, command, LIMITS, now)
        # the input state (and every published message in it) is never touched
        assert fingerprint(before) == print_before, "apply mutated its input state"
        assert [e.type for e in events] == kinds
        assert after.rv == before.rv + len(events)
        assert [e.rv for e in events] == list(range(before.rv + 1, after.rv + 1))
        for event in events:
            assert event.gpu.resource_version == int(event.gpu.metadata.resource_version)
            name = event.gpu.metadata.name
            self.last_event_rv[name] = event.rv
            if event.type == "DELETED":
                assert name not in after.gpus
                stale = Gpu()
                stale.CopyFrom(before.gpus[name])
                stale.resource_version = event.rv
                stale.metadata.resource_version = str(event.rv)
                assert event.gpu == stale, "DELETED must carry the last state at the new rv"
            elif after.gpus[name].resource_version == event.rv:
                assert after.gpus[name] == event.gpu
        self.event_rvs.extend(e.rv for e in events)
        self.state = after
        self._now_ts = now
        return result, events

    # ---- rules -------------------------------------------------------------------------------

    @initialize(seed=st.lists(st.tuples(names, condition_lists, st.sampled_from(["p1", "p2"])),
                              max_size=3))
    def populate(self, seed: list[tuple[str, list[CondT], str]]) -> None:
        """Start from a few provider-owned GPUs, so that every rule has something to act on."""
        for name, cs, provider in seed:
            self.create(name, "", cs, "", "", provider, True, None)

    @rule(name=names, uuid=uuids, cs=condition_lists, action=actions, namespace=namespaces,
          provider=providers, register=st.booleans(), spoiler=spoilers)
    def create(self, name: str, uuid: str, cs: list[CondT], action: str, namespace: str,
               provider: str, register: bool, spoiler: tuple[str, object] | None) -> None:
        a = spoil(Args(name, uuid, provider, cs, action, namespace), spoiler)
        name, uuid, provider, cs, action, namespace = (a.name, a.uuid, a.provider, a.cs,
                                                        a.action, a.namespace)
        command: Command
        if register:
            namespace = ""
            command = RegisterGpu(name, GpuSpec(uuid=uuid), to_status(cs, action), provider)
        else:
            g = Gpu(metadata=ObjectMeta(name=name, namespace=namespace), spec=GpuSpec(uuid=uuid),
                    status=to_status(cs, action))
            command = CreateGpu(g, provider)
        valid = (provider_ok(provider) and name_ok(name) and (not uuid or name_ok(uuid))
                 and conditions_ok(cs) and len(action) <= 4096 and len(namespace) <= 253)
        if not valid:
            self._reject(command, InvalidArgument)
            return
        if name in self.gpus:
            existing = self.state.gpus[name]
            result, _ = self._accept(command, [])
            assert not result.created
            assert result.gpu is existing
            assert result.rv == existing.resource_version
            if provider:
                self.owners[name] = provider
            return
        if len(self.gpus) >= LIMITS.max_gpus:
            self._reject(command, ResourceExhausted)
            return
        result, events = self._accept(command, ["ADDED"])
        self.rv += 1
        self.gpus[name] = MGpu(uuid or name, namespace, list(cs), action, self.rv)
        if provider:
            self.owners[name] = provider
        assert result.created and result.rv == self.rv and result.gpu == events[0].gpu
        # a new object: every condition's transition time is "now"
        for c in self.state.gpus[name].status.conditions:
            assert c.last_transition_time == self._now_ts

    def _expected_version(self, name: str, choice: str) -> tuple[int, str, bool]:
        """(int field, metadata string, parseable) for an UpdateGpu version choice."""
        current = self.gpus[name].rv if name in self.gpus else 7
        return {
            "zero": (0, "", True),
            "current": (current, "", True),
            "stale": (current - 1 if current > 1 else current + 1, "", True),
            "future": (current + 5, "", True),
            "meta_current": (0, str(current), True),
            "meta_stale": (0, str(current + 3), True),
            "meta_bad": (0, "abc", False),
            "meta_neg": (0, "-1", False),
            "meta_overflow": (0, str(2**63), False),
            "neg": (-1, "", False),
        }[choice]

    def _model_write(self, name: str, cs: list[CondT], provider: str) -> None:
        """What _write does to the model: the provider's list, Ready masked if overdue."""
        m = self.gpus[name]
        if name in self.masked:
            self.masked[name] = ready(cs)
            server_ready = ready(m.conditions)
            assert server_ready is not None
            m.conditions = [*without_ready(cs), server_ready]
        else:
            m.conditions = list(cs)
        self.rv += 1
        m.rv = self.rv
        if provider:
            self.owners[name] = provider

    def _check_stamps(self, before: Gpu | None, after: Gpu) -> None:
        """Transition times: kept for a type whose status is unchanged, else now."""
        old = {c.type: c for c in before.status.conditions} if before is not None else {}
        for c in after.status.conditions:
            prior = old.get(c.type)
            if prior is not None and prior.status == c.status:
                assert c.last_transition_time == prior.last_transition_time, c.type
            else:
                assert c.last_transition_time == self._now_ts, c.type

    @rule(name=names, uuid=uuids, cs=condition_lists, action=actions,
          namespace=st.sampled_from(["", "ns1", "ns2"]), provider=providers,
          version=st.sampled_from(VERSION_CHOICES), spoiler=spoilers)
    def update_gpu(self, name: str, uuid: str, cs: list[CondT], action: str, namespace: str,
                   provider: str, version: str, spoiler: tuple[str, object] | None) -> None:
        a = spoil(Args(name, uuid, provider, cs, action, namespace), spoiler)
        name, uuid, provider, cs, action = a.name, a.uuid, a.provider, a.cs, a.action
        rv_int, rv_meta, parseable = self._expected_version(name, version)
        g = Gpu(metadata=ObjectMeta(name=name, namespace=namespace, resource_version=rv_meta),
                spec=GpuSpec(uuid=uuid), status=to_status(cs, action), resource_version=rv_int)
        command = UpdateGpu(g, provider)
        valid = (provider_ok(provider) and name_ok(name) and (not uuid or name_ok(uuid))
                 and conditions_ok(cs) and len(action) <= 4096 and parseable)
        if not valid:
            self._reject(command, InvalidArgument)
            return
        if name not in self.gpus:
            self._reject(command, NotFound)
            return
        expected = rv_int or (int(rv_meta) if rv_meta else 0)
        if expected and expected != self.gpus[name].rv:
            self._reject(command, Conflict)
            return
        before = self.state.gpus[name]
        result, _ = self._accept(command, ["MODIFIED"])
        self._model_write(name, cs, provider)
        m = self.gpus[name]
        m.uuid = uuid or name
        m.namespace = namespace
        m.action = action
        assert result.rv == self.rv and result.gpu is self.state.gpus[name]
        if name not in self.masked:
            self._check_stamps(before, self.state.gpus[name])

    @rule(name=names, cs=condition_lists, action=actions, provider=providers,
          version=st.sampled_from(["zero", "current", "current", "stale", "future", "neg"]),
          spoiler=spoilers)
    def update_status(self, name: str, cs: list[CondT], action: str, provider: str,
                      version: str, spoiler: tuple[str, object] | None) -> None:
        a = spoil(Args(name, "", provider, cs, action), spoiler)
        name, provider, cs, action = a.name, a.provider, a.cs, a.action
        expected, _, _ = self._expected_version(name, version)
        command = UpdateGpuStatus(name, to_status(cs, action), expected, provider)
        valid = (provider_ok(provider) and name_ok(name) and expected >= 0
                 and conditions_ok(cs) and len(action) <= 4096)
        if not valid:
            self._reject(command, InvalidArgument)
            return
        if name not in self.gpus:
            self._reject(command, NotFound)
            return
        if expected and expected != self.gpus[name].rv:
            self._reject(command, Conflict)
            return
        before = self.state.gpus[name]
        result, _ = self._accept(command, ["MODIFIED"])
        self._model_write(name, cs, provider)
        self.gpus[name].action = action
        assert result.rv == self.rv
        after = self.state.gpus[name]
        assert after.spec == before.spec, "UpdateGpuStatus must leave the spec untouched"
        if name not in self.masked:
            self._check_stamps(before, after)

    @rule(name=names, c=condition_tuples, provider=providers, spoiler=spoilers)
    def update_condition(self, name: str, c: CondT, provider: str,
                         spoiler: tuple[str, object] | None) -> None:
        if spoiler is not None and spoiler[0] not in {"name", "provider", "type", "status",
                                                      "reason", "message"}:
            spoiler = None
        a = spoil(Args(name, "", provider, [c]), spoiler)
        name, provider, c = a.name, a.provider, a.cs[0]
        command = UpdateCondition(name, to_condition(c), provider)
        if not (provider_ok(provider) and name_ok(name) and condition_ok(c)):
            self._reject(command, InvalidArgument)
            return
        if name not in self.gpus:
            self._reject(command, NotFound)
            return
        m = self.gpus[name]
        masked = name in self.masked
        # Limits and the upsert apply to the provider's view: on a masked GPU, its own Ready
        # (remembered) instead of the server's heartbeat-timeout one (kept last on show).
        server_ready = [x for x in m.conditions if x[0] == READY] if masked else []
        own = self.masked.get(name)
        view = ([x for x in m.conditions if x[0] != READY] + ([own] if own else [])
                if masked else list(m.conditions))
        position = next((i for i, old in enumerate(view) if old[0] == c[0]), None)
        if position is None:
            view.append(c)
        else:
            view[position] = c
        if len(view) > LIMITS.max_conditions:
            self._reject(command, InvalidArgument)
            return
        shown = [x for x in view if x[0] != READY] + server_ready if masked else view
        before = self.state.gpus[name]
        result, _ = self._accept(command, ["MODIFIED"])
        self.rv += 1
        m.rv = self.rv
        if provider:
            self.owners[name] = provider
        if masked:  # the provider's Ready is remembered; the server's Unknown stays on show
            if c[0] == READY:
                self.masked[name] = c
            m.conditions = shown
        else:
            m.conditions = shown
            # only the upserted type may get a new transition time
            after = self.state.gpus[name]
            old = {x.type: x for x in before.status.conditions}
            for x in after.status.conditions:
                if x.type != c[0] or (x.type in old and old[x.type].status == x.status):
                    assert x.last_transition_time == old[x.type].last_transition_time
                else:
                    assert x.last_transition_time == self._now_ts
        assert result.rv == self.rv

    @rule(name=st.sampled_from(VALID_NAMES * 3 + INVALID_NAMES[:3]), missing_ok=st.booleans())
    def delete(self, name: str, missing_ok: bool) -> None:
        command = DeleteGpu(name, missing_ok)
        if not name_ok(name):
            self._reject(command, InvalidArgument)
            return
        if name not in self.gpus:
            if not missing_ok:
                self._reject(command, NotFound)
                return
            result, _ = self._accept(command, [])
            assert not result.deleted and result.rv == self.rv
            return
        result, _ = self._accept(command, ["DELETED"])
        self.rv += 1
        del self.gpus[name]
        self.owners.pop(name, None)
        self.masked.pop(name, None)
        assert result.deleted and result.gpu is None and result.rv == self.rv

    @rule(provider=mask_providers)
    def mask(self, provider: str) -> None:
        targets = sorted(n for n, p in self.owners.items() if p == provider
                         and n not in self.masked)
        before = self.state
        _, events = self._accept(MaskProvider(provider), ["MODIFIED"] * len(targets))
        assert [e.gpu.metadata.name for e in events] == targets
        for name in targets:
            m = self.gpus[name]
            self.masked[name] = ready(m.conditions)
            m.conditions = [*without_ready(m.conditions),
                            (READY, "Unknown", HEARTBEAT_TIMEOUT_REASON,
                             f"provider {provider!r} missed its heartbeat deadline")]
            self.rv += 1
            m.rv = self.rv
            old = next((c for c in before.gpus[name].status.conditions if c.type == READY), None)
            new = next(c for c in self.state.gpus[name].status.conditions if c.type == READY)
            if old is not None and old.status == "Unknown":
                assert new.last_transition_time == old.last_transition_time
            else:
                assert new.last_transition_time == self._now_ts

    @rule(provider=mask_providers)
    def unmask(self, provider: str) -> None:
        targets = sorted(n for n, p in self.owners.items() if p == provider and n in self.masked)
        _, events = self._accept(UnmaskProvider(provider), ["MODIFIED"] * len(targets))
        assert [e.gpu.metadata.name for e in events] == targets
        for name in targets:
            m = self.gpus[name]
            restored = self.masked.pop(name)
            m.conditions = without_ready(m.conditions) + ([restored] if restored else [])
            self.rv += 1
            m.rv = self.rv

    @rule(provider=st.sampled_from(["", "p1", "p2", "p3", "bad\x00id"]),
          claimed=st.lists(st.sampled_from([*VALID_NAMES, "GPU-ee", ""]), max_size=3))
    def claim(self, provider: str, claimed: list[str]) -> None:
        command = ClaimGpus(provider, tuple(claimed))
        if not provider_ok(provider):
            self._reject(command, InvalidArgument)
            return
        result, _ = self._accept(command, [])
        assert result.rv == self.rv
        for name in claimed:
            if name in self.gpus:
                self.owners[name] = provider

    # ---- invariants --------------------------------------------------------------------------

    @invariant()
    def matches_model(self) -> None:
        s = self.state
        assert s.rv == self.rv
        assert sorted(s.gpus) == sorted(self.gpus)
        assert dict(s.owners) == self.owners
        assert {n: (tuple_of(c) if c is not None else None) for n, c in s.masked.items()} \
            == self.masked
        for name, m in self.gpus.items():
            g = s.gpus[name]
            assert g.metadata.name == name
            assert g.spec.uuid == m.uuid
            assert g.metadata.namespace == m.namespace
            assert g.status.recommended_action == m.action
            assert [tuple_of(c) for c in g.status.conditions] == m.conditions
            assert all(c.HasField("last_transition_time") for c in g.status.conditions)
            assert g.resource_version == int(g.metadata.resource_version) == m.rv
            assert m.rv == self.last_event_rv[name]

    @invariant()
    def versions_are_contiguous(self) -> None:
        assert self.event_rvs == list(range(1, self.rv + 1))
        assert all(g.resource_version <= self.rv for g in self.state.gpus.values())

    @invariant()
    def masked_gpus_show_unknown(self) -> None:
        for name in self.state.masked:
            shown = [c for c in self.state.gpus[name].status.conditions if c.type == READY]
            assert len(shown) == 1
            assert (shown[0].status, shown[0].reason) == ("Unknown", HEARTBEAT_TIMEOUT_REASON)


StoreMachine.TestCase.settings = settings(
    max_examples=80,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestStoreMachine = StoreMachine.TestCase
