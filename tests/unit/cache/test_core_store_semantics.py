"""``_store.apply`` by example: versions, idempotency, conflicts, condition upserts, transition
times, masking/unmasking (SPEC §2, §4), and regression tests for the bugs found in them."""

from __future__ import annotations

import pytest
from core_helpers import (
    HEARTBEAT_TIMEOUT_REASON,
    READY,
    Applier,
    cond,
    conditions_of,
    fingerprint,
    gpu,
    ready_of,
    status,
    ts,
)

from deviceapi._errors import Conflict, InvalidArgument
from deviceapi.cache._store import (
    ClaimGpus,
    CreateGpu,
    DeleteGpu,
    Limits,
    MaskProvider,
    RegisterGpu,
    UnmaskProvider,
    UpdateGpu,
    UpdateGpuStatus,
    apply,
)
from deviceapi.proto.device.v1alpha1.gpu_pb2 import GpuSpec

A, B, C = "GPU-0a", "GPU-0b", "GPU-0c"


# ---- versions and events ---------------------------------------------------------------------


def test_every_write_takes_the_next_version_and_stamps_both_fields() -> None:
    run = Applier()
    result, events = run(CreateGpu(gpu(A, cond("Ready")), "p1"))
    assert (result.rv, result.created, [e.type for e in events]) == (1, True, ["ADDED"])
    result, events = run(UpdateGpuStatus(A, status(cond("Ready", "False"))))
    assert (result.rv, [e.type for e in events]) == (2, ["MODIFIED"])
    stored = run.state.gpus[A]
    assert stored.resource_version == 2 and stored.metadata.resource_version == "2"
    last = run.state.gpus[A]
    result, events = run(DeleteGpu(A))
    assert (result.rv, result.deleted, result.gpu) == (3, True, None)
    (deleted,) = events
    assert deleted.type == "DELETED" and deleted.rv == 3
    assert deleted.gpu.metadata.resource_version == "3"
    assert conditions_of(deleted.gpu) == conditions_of(last)  # the last state, new version
    assert run.state.rv == 3 and A not in run.state.gpus and A not in run.state.owners


def test_create_is_idempotent_and_reports_the_existing_object() -> None:
    run = Applier()
    first, _ = run(CreateGpu(gpu(A, cond("Ready")), "p1"))
    again, events = run(CreateGpu(gpu(A, cond("Ready", "False"), uuid="GPU-ff"), "p1"))
    assert events == [] and run.state.rv == 1
    assert not again.created and again.gpu == first.gpu and again.rv == 1
    # a register of the same name is idempotent too, and moves ownership to its provider
    again, events = run(RegisterGpu(A, GpuSpec(), status(), "p2"))
    assert events == [] and not again.created and run.state.owners == {A: "p2"}
    # without a provider id, ownership stays
    run(RegisterGpu(A, GpuSpec(), status()))
    assert run.state.owners == {A: "p2"}


def test_invalid_create_of_an_existing_name_is_still_rejected() -> None:
    run = Applier()
    run.register(A)
    with pytest.raises(InvalidArgument):
        run(CreateGpu(gpu(A, cond("Ready", "maybe"))))


def test_update_gpu_replaces_spec_and_status_update_status_keeps_spec() -> None:
    run = Applier()
    run(CreateGpu(gpu(A, cond("X"), cond("Y"), uuid="GPU-aa", namespace="ns", action="a")))
    run(UpdateGpu(gpu(A, cond("Z"), uuid="GPU-bb", namespace="ns2")))
    stored = run.state.gpus[A]
    assert (stored.spec.uuid, stored.metadata.namespace) == ("GPU-bb", "ns2")
    assert conditions_of(stored) == [("Z", "True", "", "")]
    assert stored.status.recommended_action == ""
    run(UpdateGpu(gpu(A)))  # an empty uuid defaults to the name
    assert run.state.gpus[A].spec.uuid == A
    run(UpdateGpu(gpu(A, uuid="GPU-cc")))
    run(UpdateGpuStatus(A, status(cond("W"), action="reboot")))
    stored = run.state.gpus[A]
    assert stored.spec.uuid == "GPU-cc"
    assert conditions_of(stored) == [("W", "True", "", "")]
    assert stored.status.recommended_action == "reboot"


def test_optimistic_concurrency() -> None:
    run = Applier()
    run.register(A)  # rv 1
    run.register(B)  # rv 2
    for bad in (2, 3, 10**12):
        with pytest.raises(Conflict):
            run(UpdateGpu(gpu(A, rv=bad)))
        with pytest.raises(Conflict):
            run(UpdateGpu(gpu(A, meta_rv=str(bad))))
        with pytest.raises(Conflict):
            run(UpdateGpuStatus(A, status(), bad))
    run(UpdateGpuStatus(A, status(cond("X")), 1))  # matches -> rv 3
    with pytest.raises(Conflict):
        run(UpdateGpuStatus(A, status(), 1))  # now stale
    run(UpdateGpu(gpu(A, rv=3)))
    assert run.state.rv == 4


def test_stored_messages_do_not_alias_the_command() -> None:
    run = Applier()
    command_gpu = gpu(A, cond("Ready"), uuid="GPU-aa")
    run(CreateGpu(command_gpu))
    snapshot = fingerprint(run.state)
    command_gpu.spec.uuid = "GPU-bb"
    command_gpu.status.conditions[0].status = "False"
    command_gpu.metadata.name = "GPU-cc"
    assert fingerprint(run.state) == snapshot
    command_status = status(cond("X"))
    run(UpdateGpuStatus(A, command_status))
    snapshot = fingerprint(run.state)
    command_status.conditions[0].type = "Y"
    assert fingerprint(run.state) == snapshot


def test_lists_of_other_gpus_are_shared_not_copied() -> None:
    """A write touches one object: the others stay the very same (immutable) messages."""
    run = Applier()
    run.register(A)
    run.register(B)
    b_before = run.state.gpus[B]
    run.condition(A, cond("X"))
    assert run.state.gpus[B] is b_before


# ---- UpdateCondition and transition times ----------------------------------------------------


def test_update_condition_upserts_in_place_and_keeps_the_others() -> None:
    run = Applier()
    run.register(A, cond("A1"), cond("A2", "False"), cond("A3", "Unknown"), provider="p1")
    run.condition(A, cond("A2", "True", reason="fixed"), provider="p2")
    assert conditions_of(run.state.gpus[A]) == [
        ("A1", "True", "", ""), ("A2", "True", "fixed", ""), ("A3", "Unknown", "", "")]
    run.condition(A, cond("A0", "False"), provider="p2")  # a new type is appended
    assert [c.type for c in run.state.gpus[A].status.conditions] == ["A1", "A2", "A3", "A0"]
    assert run.state.owners == {A: "p2"}


def test_transition_time_kept_when_status_unchanged_refreshed_when_changed() -> None:
    run = Applier()
    run.register(A, cond("X"), cond("Y"))
    created = run.clock
    run.condition(A, cond("X", "True", reason="other reason", message="new message"))
    x, y = run.state.gpus[A].status.conditions
    assert x.last_transition_time == ts(created) and x.reason == "other reason"
    assert y.last_transition_time == ts(created)
    run.condition(A, cond("X", "False"))
    changed = run.clock
    x, y = run.state.gpus[A].status.conditions
    assert x.last_transition_time == ts(changed)
    assert y.last_transition_time == ts(created)
    run.condition(A, cond("X", "False", reason="still false"))
    assert run.state.gpus[A].status.conditions[0].last_transition_time == ts(changed)
    run.condition(A, cond("Z", "Unknown"))  # new type: now
    assert run.state.gpus[A].status.conditions[2].last_transition_time == ts(run.clock)


def test_update_condition_ignores_a_client_transition_time() -> None:
    run = Applier()
    run.register(A, cond("X"))
    created = run.clock
    run.condition(A, cond("X", "True", ltt=5))  # unchanged: the stored time stays
    assert run.state.gpus[A].status.conditions[0].last_transition_time == ts(created)
    run.condition(A, cond("X", "False", ltt=5))  # changed: the server's now
    assert run.state.gpus[A].status.conditions[0].last_transition_time == ts(run.clock)


def test_update_status_transition_times_per_type() -> None:
    run = Applier()
    run.register(A, cond("X"), cond("Y"))
    created = run.clock
    run(UpdateGpuStatus(A, status(cond("Y", "False"), cond("X"), cond("Z"))))
    y, x, z = run.state.gpus[A].status.conditions
    assert x.last_transition_time == ts(created)
    assert y.last_transition_time == ts(run.clock) and z.last_transition_time == ts(run.clock)


# ---- heartbeat masks --------------------------------------------------------------------------


def _masked_setup() -> Applier:
    run = Applier()
    run.register(A, cond("X"), cond(READY, "True", "Healthy", "all good"), provider="p1")
    run.register(B, cond("X"), provider="p1")  # p1 never wrote Ready on B
    run.register(C, cond(READY), provider="p2")
    return run


def test_mask_sets_unknown_on_exactly_the_providers_gpus() -> None:
    run = _masked_setup()
    c_before = run.state.gpus[C]
    _, events = run(MaskProvider("p1"))
    assert [(e.type, e.gpu.metadata.name, e.rv) for e in events] == [
        ("MODIFIED", A, 4), ("MODIFIED", B, 5)]
    for name in (A, B):
        shown = ready_of(run.state.gpus[name])
        assert shown is not None
        assert (shown.status, shown.reason) == ("Unknown", HEARTBEAT_TIMEOUT_REASON)
        assert "p1" in shown.message
        assert shown.last_transition_time == ts(run.clock)
        assert ("X", "True", "", "") in conditions_of(run.state.gpus[name])
    assert run.state.gpus[C] is c_before
    # masking again changes nothing
    _, events = run(MaskProvider("p1"))
    assert events == [] and run.state.rv == 5


def test_unmask_restores_the_written_ready_or_removes_the_servers() -> None:
    run = _masked_setup()
    a_ready = conditions_of(run.state.gpus[A])
    run(MaskProvider("p1"))
    _, events = run(UnmaskProvider("p1"))
    assert [e.gpu.metadata.name for e in events] == [A, B]
    assert sorted(conditions_of(run.state.gpus[A])) == sorted(a_ready)
    assert conditions_of(run.state.gpus[B]) == [("X", "True", "", "")]
    assert run.state.masked == {}
    _, events = run(UnmaskProvider("p1"))  # nothing masked: nothing happens
    assert events == []


@pytest.mark.parametrize("how", ["condition", "status"])
def test_a_ready_written_while_masked_is_remembered_not_shown(how: str) -> None:
    run = _masked_setup()
    run(MaskProvider("p1"))
    written = cond(READY, "False", "XidCritical", "xid 79")
    if how == "condition":
        run.condition(A, written, provider="p1")
    else:
        run(UpdateGpuStatus(A, status(cond("X"), written), 0, "p1"))
    shown = ready_of(run.state.gpus[A])
    assert shown is not None and shown.reason == HEARTBEAT_TIMEOUT_REASON
    run(UnmaskProvider("p1"))
    assert (READY, "False", "XidCritical", "xid 79") in conditions_of(run.state.gpus[A])


def test_a_status_without_ready_written_while_masked_removes_ready_on_unmask() -> None:
    run = _masked_setup()
    run(MaskProvider("p1"))
    run(UpdateGpuStatus(A, status(cond("X", "False")), 0, "p1"))
    assert ready_of(run.state.gpus[A]) is not None  # still shown as Unknown
    run(UnmaskProvider("p1"))
    assert conditions_of(run.state.gpus[A]) == [("X", "False", "", "")]


def test_delete_of_a_masked_gpu_forgets_the_mask() -> None:
    run = _masked_setup()
    run(MaskProvider("p1"))
    run(DeleteGpu(A))
    assert A not in run.state.masked
    run.register(A, cond(READY), provider="p1")
    assert (READY, "True", "", "") in conditions_of(run.state.gpus[A])
    _, events = run(UnmaskProvider("p1"))
    assert [e.gpu.metadata.name for e in events] == [B]
    assert (READY, "True", "", "") in conditions_of(run.state.gpus[A])


def test_claim_moves_ownership_of_existing_gpus_only_without_a_version() -> None:
    run = _masked_setup()
    result, events = run(ClaimGpus("p3", (A, "GPU-ee")))
    assert events == [] and result.rv == 3 and run.state.rv == 3
    assert dict(run.state.owners) == {A: "p3", B: "p1", C: "p2"}
    _, events = run(MaskProvider("p3"))
    assert [e.gpu.metadata.name for e in events] == [A]


def test_mask_of_an_unknown_provider_or_empty_id_changes_nothing() -> None:
    run = _masked_setup()
    before = fingerprint(run.state)
    for provider in ("p9", ""):
        _, events = run(MaskProvider(provider))
        assert events == []
        _, events = run(UnmaskProvider(provider))
        assert events == []
    assert fingerprint(run.state) == before


# ---- regressions: bugs this suite found, fixed in src ------------------------------------------


def test_masked_gpu_other_condition_write_keeps_remembered_ready() -> None:
    run = _masked_setup()
    run(MaskProvider("p1"))
    run.condition(A, cond("Xid", "False", "Xid48"), provider="p1")
    run.condition(B, cond("Xid", "False", "Xid48"), provider="p1")
    run(UnmaskProvider("p1"))
    assert (READY, "True", "Healthy", "all good") in conditions_of(run.state.gpus[A])
    assert ready_of(run.state.gpus[B]) is None  # p1 never wrote Ready on B


def test_masked_gpu_status_echoing_the_servers_ready_keeps_remembered_ready() -> None:
    run = _masked_setup()
    run(MaskProvider("p1"))
    shown = run.state.gpus[A].status
    echoed = status(*[c for c in shown.conditions if c.type != "X"], cond("X", "False"))
    run(UpdateGpuStatus(A, echoed, 0, "p1"))
    run(UnmaskProvider("p1"))
    assert (READY, "True", "Healthy", "all good") in conditions_of(run.state.gpus[A])


def test_masked_gpu_accepts_condition_updates_at_the_condition_limit() -> None:
    run = Applier(Limits(max_conditions=3))
    run.register(A, cond("X"), cond("Y"), cond("Z"), provider="p1")
    run(MaskProvider("p1"))
    run.condition(A, cond("X", "False"), provider="p1")  # an existing type: same count
    assert ("X", "False", "", "") in conditions_of(run.state.gpus[A])


def test_unmask_refreshes_the_transition_time_of_a_changed_ready() -> None:
    run = _masked_setup()
    run(MaskProvider("p1"))
    run(UnmaskProvider("p1"))
    restored = ready_of(run.state.gpus[A])
    assert restored is not None and restored.status == "True"
    assert restored.last_transition_time == ts(run.clock)


def test_update_gpu_namespace_is_bounded_like_create() -> None:
    run = Applier()
    run.register(A)
    with pytest.raises(InvalidArgument):
        run(UpdateGpu(gpu(A, namespace="n" * 254)))


def test_apply_is_pure() -> None:
    run = _masked_setup()
    state = run.state
    before = fingerprint(state)
    for command in (MaskProvider("p1"), UnmaskProvider("p1"), DeleteGpu(A),
                    UpdateGpuStatus(B, status(cond("Q")))):
        apply(state, command, Limits(), ts(1))
    assert fingerprint(state) == before
