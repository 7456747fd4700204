"""The server-side metadata SPEC §7.1 shows (uid, generation, creation time), as pure
transitions: set at creation, kept by every write, moved only by spec changes, dropped on
delete, carried by every event; and §7.1's own commands (exclusive create, spec-only update,
immutable namespace/uid, namespaced delete)."""

from __future__ import annotations

import pytest
from core_helpers import Applier, cond, fingerprint, gpu, status, ts

from deviceapi._errors import AlreadyExists, InvalidArgument, NotFound
from deviceapi.actors._store import (
    CreateGpu,
    DeleteGpu,
    MaskProvider,
    RegisterGpu,
    UnmaskProvider,
    UpdateCondition,
    UpdateGpu,
    UpdateGpuStatus,
    UpdateSpec,
    apply,
    in_namespace,
)
from deviceapi.proto.device.v1alpha1.gpu_pb2 import GpuSpec

A = "GPU-0a"
B = "GPU-0b"


def test_create_sets_info_and_every_write_keeps_it() -> None:
    run = Applier()
    result, events = run(CreateGpu(gpu(A, cond("Ready")), uid="u-1"))
    info = run.state.info[A]
    assert (info.uid, info.generation, info.created) == ("u-1", 1, ts(1001))
    assert result.info == info and events[0].info == info

    # status writes of every kind leave the generation alone
    for command in (UpdateGpuStatus(A, status(cond("Ready", "False"))),
                    UpdateCondition(A, cond("Xid", "True"), "p"),
                    MaskProvider("p"), UnmaskProvider("p")):
        _, events = run(command)
        assert run.state.info[A] == info
        assert all(e.info == info for e in events)

    # a spec change (through §1's UpdateGpu or §7.1's UpdateSpec) is a new generation
    result, _ = run(UpdateGpu(gpu(A, uuid=B)))
    assert result.info is not None and result.info.generation == 2
    result, _ = run(UpdateSpec(A, GpuSpec(uuid=B)))
    assert result.info is not None and result.info.generation == 2  # same spec
    result, _ = run(UpdateSpec(A, GpuSpec()))  # "" is the name: a change back
    assert result.info is not None and result.info.generation == 3
    assert run.state.info[A].uid == "u-1" and run.state.info[A].created == ts(1001)

    # delete: the DELETED event carries the last info; the state forgets it
    _, events = run(DeleteGpu(A))
    assert events[0].info is not None and events[0].info.generation == 3
    assert A not in run.state.info


def test_register_draws_a_fresh_uid_per_command_and_recreate_gets_a_new_one() -> None:
    run = Applier()
    run(RegisterGpu(A, GpuSpec(), status()))
    first = run.state.info[A].uid
    run(DeleteGpu(A))
    run(RegisterGpu(A, GpuSpec(), status()))
    assert run.state.info[A].uid != first and len(first) == 36


def test_exclusive_create_is_already_exists_and_changes_nothing() -> None:
    run = Applier()
    run(CreateGpu(gpu(A)))
    before = fingerprint(run.state)
    with pytest.raises(AlreadyExists):
        apply(run.state, CreateGpu(gpu(A), exclusive=True), run.limits, ts(5))
    assert fingerprint(run.state) == before
    result, events = run(CreateGpu(gpu(A)))  # §1's create stays idempotent
    assert not result.created and not events and result.info == run.state.info[A]


def test_update_spec_keeps_status_and_checks_identity() -> None:
    run = Applier()
    run(CreateGpu(gpu(A, cond("Ready"), namespace="team-a"), uid="u-1"))
    status_before = run.state.gpus[A].status
    result, _ = run(UpdateSpec(A, GpuSpec(uuid=B), namespace="team-a", uid="u-1"))
    assert result.gpu is not None and result.gpu.status == status_before
    assert result.gpu.spec.uuid == B and result.gpu.metadata.namespace == "team-a"

    before = fingerprint(run.state)
    for command in (UpdateSpec(A, GpuSpec(), namespace="default"),
                    UpdateSpec(A, GpuSpec()),  # "" is "default", not team-a
                    UpdateSpec(A, GpuSpec(), namespace="team-a", uid="u-2"),
                    UpdateSpec(A, GpuSpec(uuid="GPU-zz"), namespace="team-a"),
                    UpdateGpuStatus(A, status(), identity=("team-b", ""))):
        with pytest.raises(InvalidArgument):
            apply(run.state, command, run.limits, ts(5))
    with pytest.raises(NotFound):
        apply(run.state, UpdateSpec(B, GpuSpec()), run.limits, ts(5))
    assert fingerprint(run.state) == before


def test_update_spec_on_a_masked_gpu_keeps_the_mask() -> None:
    """A spec write while the provider's heartbeat is overdue must not record the server's
    Ready=Unknown as the provider's own."""
    run = Applier()
    run(CreateGpu(gpu(A, cond("Ready", "True")), provider="p"))
    run(MaskProvider("p"))
    run(UpdateSpec(A, GpuSpec(uuid=B), provider="p"))
    masked = run.state.masked[A]
    assert masked is not None and masked.status == "True"
    run(UnmaskProvider("p"))
    assert [(c.type, c.status) for c in run.state.gpus[A].status.conditions] == [
        ("Ready", "True")]


def test_namespaced_delete_and_reads() -> None:
    run = Applier()
    run(CreateGpu(gpu(A)))  # stored "" reads as "default"
    run(CreateGpu(gpu(B, namespace="team-a")))
    assert in_namespace(run.state.gpus[A], "default") and in_namespace(run.state.gpus[A], "")
    assert not in_namespace(run.state.gpus[A], "team-a")
    before = fingerprint(run.state)
    with pytest.raises(NotFound):
        apply(run.state, DeleteGpu(B, namespace="default"), run.limits, ts(5))
    assert fingerprint(run.state) == before
    run(DeleteGpu(B, namespace="team-a"))
    run(DeleteGpu(A, namespace="default"))
    assert not run.state.gpus and not run.state.info
