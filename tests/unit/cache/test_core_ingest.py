"""SPEC §7.2's mapping (``cache.ingest.plan``) and its commit (``_store`` IngestHealthEvents),
by example and by property: which GPUs, which condition, recommended actions across checks,
STORE_ONLY, atomic batches, idempotency keys, and §7.3's polarity in the health classification.
"""

from __future__ import annotations

import dataclasses

import pytest
from core_helpers import cond, gpu, ts
from hypothesis import example, given, settings
from hypothesis import strategies as st

from deviceapi._errors import InvalidArgument, ResourceExhausted
from deviceapi.cache import health, ingest
from deviceapi.cache._store import (
    CreateGpu,
    DeleteGpu,
    IngestHealthEvents,
    Limits,
    MaskProvider,
    Result,
    State,
    UpdateCondition,
    apply,
)
from deviceapi.cache.ingest import HealthEvent
from deviceapi.proto.datamodels import health_event_pb2 as wire
from deviceapi.proto.device.v1alpha1.gpu_pb2 import Gpu

A, B, C = "GPU-0a", "GPU-0b", "GPU-0c"
UNKNOWN = "GPU-0f"
NOW = ts(1_000)
LIMITS = Limits(max_conditions=32)


def held(*names: str, limits: Limits = LIMITS) -> State:
    state = State()
    for name in names:
        state, _, _ = apply(state, CreateGpu(gpu(name, cond("NVMLReady")), "nvml"), limits, NOW)
    return state


def ingest_batch(state: State, *events: HealthEvent, key: str = "",
                 limits: Limits = LIMITS) -> tuple[State, Result]:
    new_state, result, _ = apply(state, IngestHealthEvents(tuple(events), key), limits, NOW)
    return new_state, result


def condition(state: State, name: str, type_: str) -> tuple[str, str, str] | None:
    found = next((c for c in state.gpus[name].status.conditions if c.type == type_), None)
    return None if found is None else (found.status, found.reason, found.message)


def _event(check: str, uuids: tuple[str, ...], *, healthy: bool = False, fatal: bool = False,
           codes: tuple[str, ...] = (), action: str = "", at: int | None = 500,
           store_only: bool = False, indexed: bool | None = None) -> HealthEvent:
    return HealthEvent(
        check=check, healthy=healthy, fatal=fatal, agent="gpu-health-monitor",
        message=f"{check}: {codes or 'ok'}", action=action, error_codes=codes, uuids=uuids,
        other_gpu_entities=bool(uuids) if indexed is None else indexed,
        generated=None if at is None else ts(at), store_only=store_only)


def fatal(check: str, *uuids: str, code: str = "DCGM_FR_VOLATILE_DBE_DETECTED",
          action: str = "COMPONENT_RESET", at: int = 500, **kw: bool) -> HealthEvent:
    """Shaped like gpu-health-monitor's: GPU index + PCI + GPU_UUID entities, one errorCode."""
    return _event(check, uuids, fatal=True, codes=(code,) if code else (), action=action,
                  at=at, **kw)


def warning(check: str, *uuids: str, code: str = "DCGM_FR_CLOCK_THROTTLE_THERMAL",
            at: int = 500) -> HealthEvent:
    return _event(check, uuids, codes=(code,) if code else (), at=at)


def healthy(check: str, *uuids: str, codes: tuple[str, ...] = (), at: int = 600) -> HealthEvent:
    return _event(check, uuids, healthy=True, codes=codes, at=at)


def node(check: str = "GpuDcgmConnectivityFailure", *, ok: bool = False,
         code: str = "DCGM_CONNECTIVITY_ERROR", at: int = 700) -> HealthEvent:
    """No GPU entity at all: a node-level event (DCGM unreachable, and back)."""
    return _event(check, (), healthy=ok, fatal=not ok, codes=() if ok else (code,),
                  action="" if ok else "CONTACT_SUPPORT", at=at)


# ---- the condition of each event kind -----------------------------------------------------------


def test_fatal_event_sets_false_with_its_error_code_time_and_action() -> None:
    state, result = ingest_batch(held(A, B), fatal("GpuMemWatch", A, at=1234))
    assert condition(state, A, "GpuMemWatch") == (
        "False", "DCGM_FR_VOLATILE_DBE_DETECTED", "GpuMemWatch: ('DCGM_FR_VOLATILE_DBE_DETECTED',)")
    stored = next(c for c in state.gpus[A].status.conditions if c.type == "GpuMemWatch")
    assert stored.last_transition_time == ts(1234)  # from generatedTimestamp
    assert state.gpus[A].status.recommended_action == "COMPONENT_RESET"
    assert condition(state, B, "GpuMemWatch") is None  # only the GPUs it names
    assert condition(state, A, "NVMLReady") == ("True", "", "")  # other conditions kept
    assert result.plan is not None and (result.plan.received, result.plan.applied) == (1, 1)
    assert state.owners[A] == "nvml"  # ingest never takes ownership (heartbeat masking)


def test_fatal_event_without_error_code_is_unhealthy() -> None:
    state, _ = ingest_batch(held(A), fatal("GpuPcieWatch", A, code=""))
    assert condition(state, A, "GpuPcieWatch")[:2] == ("False", "Unhealthy")  # type: ignore[index]


def test_non_fatal_event_is_a_warning_and_stays_schedulable() -> None:
    state, _ = ingest_batch(held(A), warning("GpuThermalWatch", A))
    assert condition(state, A, "GpuThermalWatch")[:2] == (  # type: ignore[index]
        "True", "DCGM_FR_CLOCK_THROTTLE_THERMAL")
    assert state.gpus[A].status.recommended_action == ""
    assert health.classify(state.gpus[A]) == "healthy"
    state, _ = ingest_batch(state, warning("GpuThermalWatch", A, code=""))
    assert condition(state, A, "GpuThermalWatch")[:2] == ("True", "Warning")  # type: ignore[index]


def test_healthy_event_recovers_the_check_and_clears_the_action() -> None:
    state, _ = ingest_batch(held(A), fatal("GpuMemWatch", A))
    state, _ = ingest_batch(state, healthy("GpuMemWatch", A, at=900))
    assert condition(state, A, "GpuMemWatch")[:2] == ("True", "Healthy")  # type: ignore[index]
    stored = next(c for c in state.gpus[A].status.conditions if c.type == "GpuMemWatch")
    assert stored.last_transition_time == ts(900)
    assert state.gpus[A].status.recommended_action == ""
    assert A not in state.checks


def test_node_level_event_turns_the_check_unknown_on_every_gpu_and_back() -> None:
    state, _ = ingest_batch(held(A, B, C), fatal("GpuMemWatch", B, action="RESTART_VM"))
    state, _ = ingest_batch(state, node())
    for name in (A, B, C):
        assert condition(state, name, "GpuDcgmConnectivityFailure")[:2] == (  # type: ignore[index]
            "Unknown", "DCGM_CONNECTIVITY_ERROR")
        assert health.classify(state.gpus[name]) != "healthy"  # never silently stale
    # node-level events never set recommended_action; B keeps its own
    assert [state.gpus[n].status.recommended_action for n in (A, B, C)] == ["", "RESTART_VM", ""]
    state, _ = ingest_batch(state, node(ok=True))
    for name in (A, B, C):
        assert condition(state, name, "GpuDcgmConnectivityFailure")[:2] == (  # type: ignore[index]
            "True", "Healthy")
    assert state.gpus[B].status.recommended_action == "RESTART_VM"


def test_only_other_entities_is_node_level() -> None:
    switch = dataclasses.replace(node(), other_gpu_entities=False)  # e.g. only NVSWITCH
    state, _ = ingest_batch(held(A, B), switch)
    assert {condition(state, n, "GpuDcgmConnectivityFailure")[0] for n in (A, B)} == {  # type: ignore[index]
        "Unknown"}


def test_store_only_is_counted_and_not_applied() -> None:
    before = held(A)
    state, result = ingest_batch(before, fatal("GpuMemWatch", A, store_only=True))
    assert state.gpus == before.gpus and state.rv == before.rv
    assert result.plan is not None and (result.plan.store_only, result.plan.applied) == (1, 0)


def test_unresolvable_gpus_are_counted_never_invented() -> None:
    by_index = _event("GpuMemWatch", (), fatal=True, codes=("X",), indexed=True)  # GPU + PCI only
    stranger = fatal("GpuMemWatch", UNKNOWN)
    before = held(A)
    state, result = ingest_batch(before, by_index, stranger)
    assert set(state.gpus) == {A} and state.gpus == before.gpus
    assert result.plan is not None
    assert [(u.index, u.reason) for u in result.plan.unresolved] == [
        (0, "index_or_pci_only"), (1, "unknown_uuid")]
    # a known and an unknown UUID: applied to the known one, the stranger reported
    state, result = ingest_batch(before, fatal("GpuMemWatch", UNKNOWN, A))
    assert condition(state, A, "GpuMemWatch")[0] == "False"  # type: ignore[index]
    assert result.plan is not None and result.plan.unknown_uuids == (UNKNOWN,)


# ---- recommended_action across checks -----------------------------------------------------------


def test_recommended_action_follows_the_latest_fatal_event_among_failing_checks() -> None:
    state, _ = ingest_batch(held(A), fatal("GpuMemWatch", A, action="COMPONENT_RESET"))
    state, _ = ingest_batch(state, fatal("GpuPcieWatch", A, action="RESTART_VM"))
    assert state.gpus[A].status.recommended_action == "RESTART_VM"
    state, _ = ingest_batch(state, fatal("GpuNvlinkWatch", A, action=""))  # NONE sets nothing
    assert state.gpus[A].status.recommended_action == "RESTART_VM"
    state, _ = ingest_batch(state, healthy("GpuPcieWatch", A))
    assert state.gpus[A].status.recommended_action == "COMPONENT_RESET"
    state, _ = ingest_batch(state, warning("GpuMemWatch", A))  # not fatal: stops failing
    assert state.gpus[A].status.recommended_action == ""


def test_actions_from_any_nvsentinel_version() -> None:
    assert ingest.action_name(wire.COMPONENT_RESET) == "COMPONENT_RESET"
    assert ingest.action_name(wire.NONE) == ""
    assert ingest.action_name(wire.CUSTOM, "drain and page the on-call") == (
        "drain and page the on-call")
    assert ingest.action_name(wire.CUSTOM) == "CUSTOM"
    assert ingest.action_name(77) == "77"  # a value this version does not know
    for value in wire.RecommendedAction.values():
        expected = "" if value == wire.NONE else wire.RecommendedAction.Name(value)
        assert ingest.action_name(value) == expected  # the table is the proto's enum


def test_partial_recovery_keeps_the_check_failing() -> None:
    # gpu-health-monitor sends a new fault first, then a healthy event for the recovered code.
    state, _ = ingest_batch(held(A), fatal("GpuMemWatch", A, code="E1", action="RESTART_VM"))
    state, _ = ingest_batch(state, fatal("GpuMemWatch", A, code="E2", action="COMPONENT_RESET"),
                            healthy("GpuMemWatch", A, codes=("E1",)))
    assert condition(state, A, "GpuMemWatch")[:2] == ("False", "E2")  # type: ignore[index]
    assert state.gpus[A].status.recommended_action == "COMPONENT_RESET"
    state, _ = ingest_batch(state, healthy("GpuMemWatch", A, codes=("E2",)))
    assert condition(state, A, "GpuMemWatch")[:2] == ("True", "Healthy")  # type: ignore[index]
    assert state.gpus[A].status.recommended_action == ""


# ---- atomic batches, idempotency, limits --------------------------------------------------------


def test_batch_over_max_conditions_is_refused_whole() -> None:
    limits = Limits(max_conditions=3)
    before = held(A, B, limits=limits)  # one condition each
    with pytest.raises(ResourceExhausted, match="nothing of the batch was applied"):
        ingest_batch(before, fatal("C1", A, B), fatal("C2", B), fatal("C3", B), limits=limits)
    state, _ = ingest_batch(before, fatal("C1", A, B), fatal("C2", B), limits=limits)
    assert len(state.gpus[B].status.conditions) == 3


def test_invalid_condition_refuses_the_batch() -> None:
    with pytest.raises(InvalidArgument):
        ingest_batch(held(A), fatal("GpuMemWatch", A), fatal("bad\ncheck", A))


def test_idempotency_key_applies_a_batch_once_within_bounded_memory() -> None:
    state, first = ingest_batch(held(A), fatal("GpuMemWatch", A), key="k1")
    again, second = ingest_batch(state, healthy("GpuMemWatch", A), key="k1")
    assert again is state and second.plan is None and second.rv == first.rv
    for i in range(ingest.IDEMPOTENCY_KEYS):
        state, _ = ingest_batch(state, key=f"filler-{i}")
    assert len(state.ingest_keys) == ingest.IDEMPOTENCY_KEYS and "k1" not in state.ingest_keys
    state, result = ingest_batch(state, healthy("GpuMemWatch", A), key="k1")
    assert result.plan is not None and condition(state, A, "GpuMemWatch")[0] == "True"  # type: ignore[index]


def test_unchanged_write_is_skipped() -> None:
    state, _ = ingest_batch(held(A), fatal("GpuMemWatch", A, at=10))
    again, _ = ingest_batch(state, fatal("GpuMemWatch", A, at=20))  # same verdict, later
    assert again.rv == state.rv and again.gpus == state.gpus


def test_masked_gpu_keeps_the_servers_ready_and_deleted_gpu_drops_its_ledger() -> None:
    state = held(A)
    state, _, _ = apply(state, UpdateCondition(A, cond("Ready"), "nvml"), LIMITS, NOW)
    state, _, _ = apply(state, MaskProvider("nvml"), LIMITS, NOW)
    state, _ = ingest_batch(state, fatal("GpuMemWatch", A))
    assert condition(state, A, "Ready")[:2] == ("Unknown", "ProviderHeartbeatTimeout")  # type: ignore[index]
    assert condition(state, A, "GpuMemWatch")[0] == "False"  # type: ignore[index]
    state, _, _ = apply(state, DeleteGpu(A), LIMITS, NOW)
    assert A not in state.checks


# ---- §7.3 ---------------------------------------------------------------------------------------


def test_problem_conditions_invert_the_polarity() -> None:
    g = gpu(A, cond("NVMLReady"), cond("XidCritical", "True"))
    assert health.classify(g) == "healthy"
    assert health.classify(g, frozenset({"XidCritical"})) == "unhealthy"
    g = gpu(A, cond("NVMLReady"), cond("XidCritical", "False"))
    assert health.classify(g) == "unhealthy"
    assert health.classify(g, frozenset({"XidCritical"})) == "healthy"
    g = gpu(A, cond("XidCritical", "Unknown"))
    assert health.classify(g, frozenset({"XidCritical"})) == "unknown"
    counts = health.count([gpu(A, cond("Overheated", "True")), gpu(B, cond("Overheated", "False"))],
                          frozenset({"Overheated"}))
    assert (counts.healthy, counts.unhealthy, counts.unknown) == (1, 1, 0)


# ---- properties ---------------------------------------------------------------------------------

HELD = (A, B, C)
CHECKS = ("GpuMemWatch", "GpuPcieWatch", "GpuDcgmConnectivityFailure")
ACTIONS = ("", "COMPONENT_RESET", "RESTART_VM", "77")


@st.composite
def events(draw: st.DrawFn) -> HealthEvent:
    check = draw(st.sampled_from(CHECKS))
    shape = draw(st.sampled_from(("uuid", "uuid", "two", "index", "unknown", "node")))
    uuids: tuple[str, ...] = {
        "uuid": (draw(st.sampled_from(HELD)),),
        "two": tuple(draw(st.lists(st.sampled_from((*HELD, UNKNOWN)), min_size=1, max_size=3))),
        "index": (), "unknown": (UNKNOWN,), "node": (),
    }[shape]
    is_healthy = draw(st.booleans())
    codes = tuple(draw(st.lists(st.sampled_from(("E1", "E2")), max_size=2, unique=True)))
    return HealthEvent(
        check=check, healthy=is_healthy, fatal=not is_healthy and draw(st.booleans()),
        agent="gpu-health-monitor", message="m", action=draw(st.sampled_from(ACTIONS)),
        error_codes=codes, uuids=uuids, other_gpu_entities=shape != "node",
        generated=ts(draw(st.integers(1, 5))),
        store_only=draw(st.booleans()) and draw(st.booleans()))


batches = st.lists(events(), max_size=8)


def _view(state: State) -> dict[str, tuple[tuple[tuple[str, str, str], ...], str]]:
    """What a consumer sees (versions aside)."""
    def conditions(g: Gpu) -> tuple[tuple[str, str, str], ...]:
        return tuple(sorted((c.type, c.status, c.reason) for c in g.status.conditions))
    return {n: (conditions(g), g.status.recommended_action) for n, g in state.gpus.items()}


@settings(max_examples=100, deadline=None)
@given(batches, batches)
def test_a_batch_is_the_same_as_its_events_one_by_one(first: list[HealthEvent],
                                                      second: list[HealthEvent]) -> None:
    whole, _ = ingest_batch(ingest_batch(held(*HELD), *first)[0], *second)
    state = held(*HELD)
    for item in [*first, *second]:
        state, _ = ingest_batch(state, item)
    assert _view(state) == _view(whole)
    assert state.checks == whole.checks


@settings(max_examples=100, deadline=None)
@given(batches, batches)
def test_never_invents_gpus_and_store_only_changes_nothing(prior: list[HealthEvent],
                                                           batch: list[HealthEvent]) -> None:
    state, _ = ingest_batch(held(*HELD), *prior)
    after, result = ingest_batch(state, *batch)
    assert set(after.gpus) == set(HELD) and set(after.checks) <= set(HELD)
    assert result.plan is not None and set(result.plan.changes) <= set(HELD)
    without, _ = ingest_batch(state, *(e for e in batch if not e.store_only))
    assert _view(without) == _view(after) and without.checks == after.checks
    plan = result.plan
    assert plan.received == len(batch) == (
        plan.applied + plan.store_only + len(plan.unresolved))


@settings(max_examples=100, deadline=None)
@given(batches, batches)
def test_resending_a_batch_changes_nothing(prior: list[HealthEvent],
                                           batch: list[HealthEvent]) -> None:
    state, _ = ingest_batch(ingest_batch(held(*HELD), *prior)[0], *batch)
    again, _ = ingest_batch(state, *batch)
    assert again.rv == state.rv and _view(again) == _view(state)


def _fatal(check: str, action: str, *uuids: str, healthy: bool = False) -> HealthEvent:
    return HealthEvent(check=check, healthy=healthy, fatal=not healthy, agent="gpu-health-monitor",
                       message="m", action=action, error_codes=(), uuids=uuids,
                       other_gpu_entities=bool(uuids), generated=ts(1), store_only=False)


@settings(max_examples=100, deadline=None)
@given(batches, batches)
# Found by hypothesis: two fatal checks on one GPU, then the later one healed by a node-level
# event: the action falls back to the other check's, which a node-level event did not set.
@example([_fatal("GpuPcieWatch", "COMPONENT_RESET", A), _fatal("GpuMemWatch", "RESTART_VM", A)],
         [_fatal("GpuMemWatch", "", healthy=True)])
def test_recommended_action_is_that_of_a_failing_check_and_node_level_never_sets_it(
        prior: list[HealthEvent], batch: list[HealthEvent]) -> None:
    state, _ = ingest_batch(held(*HELD), *prior)
    after, _ = ingest_batch(state, *batch)
    for name, g in after.gpus.items():
        failing = {r.action for r in after.checks.get(name, {}).values()
                   if r.failing is not None and r.action}
        action = g.status.recommended_action
        assert (action in failing) if failing else action == ""
    # Node-level events never set an action; a healthy one ends its check's failure (the
    # check is True again on every GPU), which may clear the action that check had set or
    # hand it back to another check still failing (SPEC §7.2: the most recent of those).
    node_only = [e for e in batch if not e.uuids and not e.other_gpu_entities]
    touched, _ = ingest_batch(state, *node_only)
    for name, g in touched.gpus.items():
        failing_before = {r.action for r in state.checks.get(name, {}).values()
                          if r.failing is not None and r.action}
        assert g.status.recommended_action in {"", *failing_before}
    unhealthy_only = [e for e in node_only if not e.healthy]
    touched, _ = ingest_batch(state, *unhealthy_only)
    assert {n: g.status.recommended_action for n, g in touched.gpus.items()} == {
        n: g.status.recommended_action for n, g in state.gpus.items()}


@settings(max_examples=100, deadline=None)
@given(batches)
def test_the_last_event_for_a_check_decides_its_status(batch: list[HealthEvent]) -> None:
    state, _ = ingest_batch(held(*HELD), *batch)
    for name in HELD:
        for check in CHECKS:
            relevant = [e for e in batch if not e.store_only and e.check == check and (
                name in e.uuids or (not e.uuids and not e.other_gpu_entities))]
            # a partial recovery (healthy naming codes while others still fail) decides nothing
            decisive = [e for e in relevant if not (e.healthy and e.error_codes)]
            if not relevant or len(decisive) != len(relevant):
                continue
            last = relevant[-1]
            node_level = not last.uuids and not last.other_gpu_entities
            expected = ("True" if last.healthy else "Unknown" if node_level
                        else "False" if last.fatal else "True")
            assert condition(state, name, check)[0] == expected  # type: ignore[index]
