"""Every bound of SPEC §2/§4 at its edge: the limit passes, one more is rejected (nothing stored).

Lengths are in characters (the spec's unit), so multi-byte text counts per character too.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from core_helpers import Applier, cond, fingerprint, gpu, status, ts
from hypothesis import given, settings
from hypothesis import strategies as st

from deviceapi._errors import DeviceApiError, InvalidArgument, NotFound, ResourceExhausted
from deviceapi.cache._store import (
    ClaimGpus,
    Command,
    CreateGpu,
    DeleteGpu,
    Limits,
    RegisterGpu,
    State,
    UpdateCondition,
    UpdateGpu,
    UpdateGpuStatus,
    apply,
    parse_version,
    validate_name,
)
from deviceapi.proto.device.v1alpha1.gpu_pb2 import Condition, GpuSpec, GpuStatus

NAME = "GPU-0a"


def rejected(command: Command, error: type[DeviceApiError], state: State | None = None,
             limits: Limits | None = None) -> DeviceApiError:
    state = state or State()
    before = fingerprint(state)
    with pytest.raises(error) as info:
        apply(state, command, limits or Limits(), ts(1))
    assert type(info.value) is error  # exactly the class, not a sibling or a parent
    assert fingerprint(state) == before
    return info.value


def accepted(command: Command, state: State | None = None,
             limits: Limits | None = None) -> State:
    after, _, _ = apply(state or State(), command, limits or Limits(), ts(1))
    return after


def with_gpu(*conditions: Condition) -> State:
    return accepted(RegisterGpu(NAME, GpuSpec(), status(*conditions), "p1"))


# ---- GPU names -------------------------------------------------------------------------------

VALID_NAMES = [
    "GPU-0",
    "GPU-a",
    "GPU-ABCDEF",
    "GPU-abcdef01-2345-6789-abcd-ef0123456789",
    "MIG-abcdef01-2345-6789-abcd-ef0123456789",
    "MIG-0-1-2",
    "GPU-a-",
    "GPU-a--b",
    "GPU-" + "f" * 124,  # exactly 128 characters
]
INVALID_NAMES = [
    "",
    "GPU-",
    "MIG-",
    "GPU",
    "gpu-abc",
    "mig-abc",
    "NVL-abc",
    "GPU--abc",  # the first character after the prefix must be hex
    "GPU-xyz",
    "GPU-abc_def",
    "GPU-abc.def",
    "GPU- abc",
    " GPU-abc",
    "GPU-abc ",
    "GPU-abc/def",
    "../GPU-abc",
    "GPU-abc/../../etc",
    "/GPU-abc",
    "GPU-abc\n",
    "GPU-abc\x00",
    "GPU-\x7fabc",
    "GPU-abc\tdef",
    "GPU-\u00e9",
    "GPU-\uff41bc",  # fullwidth 'a'
    "GPU-\u0661\u0662",  # Arabic-Indic digits
    "GPU-\u00b2",  # superscript two
    "GPU-" + "f" * 125,  # 129 characters
    "GPU-abc\u200b",  # zero-width space
]


@pytest.mark.parametrize("name", VALID_NAMES)
def test_valid_names_are_accepted_everywhere(name: str) -> None:
    validate_name(name)
    state = accepted(CreateGpu(gpu(name)))
    assert state.gpus[name].spec.uuid == name  # spec.uuid defaults to the name
    state = accepted(RegisterGpu(name, GpuSpec(uuid=name), GpuStatus()), state)
    state = accepted(UpdateCondition(name, cond("Ready")), state)
    state = accepted(DeleteGpu(name), state)
    assert name not in state.gpus


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_invalid_names_are_rejected_everywhere(name: str) -> None:
    with pytest.raises(InvalidArgument):
        validate_name(name)
    rejected(CreateGpu(gpu(name)), InvalidArgument)
    rejected(RegisterGpu(name, GpuSpec(), GpuStatus()), InvalidArgument)
    rejected(UpdateGpu(gpu(name)), InvalidArgument)
    rejected(UpdateGpuStatus(name, GpuStatus()), InvalidArgument)
    rejected(UpdateCondition(name, cond("Ready")), InvalidArgument)
    rejected(DeleteGpu(name), InvalidArgument)
    rejected(DeleteGpu(name, missing_ok=True), InvalidArgument)
    # as spec.uuid of an otherwise valid GPU
    if name:
        rejected(CreateGpu(gpu(NAME, uuid=name)), InvalidArgument)
        rejected(UpdateGpu(gpu(NAME, uuid=name)), InvalidArgument, with_gpu())


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=140))
def test_name_validation_matches_the_spec_grammar(name: str) -> None:
    hexdigits = set("0123456789abcdefABCDEF")
    ok = (
        len(name) <= 128
        and name[:4] in ("GPU-", "MIG-")
        and len(name) > 4
        and name[4] in hexdigits
        and all(ch in hexdigits or ch == "-" for ch in name[4:])
    )
    if ok:
        validate_name(name)
    else:
        with pytest.raises(InvalidArgument):
            validate_name(name)


def test_name_errors_quote_a_bounded_excerpt() -> None:
    error = rejected(CreateGpu(gpu("x" * 120)), InvalidArgument)
    assert len(str(error)) < 300


def test_missing_gpu_is_not_found_not_invalid() -> None:
    rejected(UpdateGpu(gpu(NAME)), NotFound)
    rejected(UpdateGpuStatus(NAME, GpuStatus()), NotFound)
    rejected(UpdateCondition(NAME, cond("Ready")), NotFound)
    rejected(DeleteGpu(NAME), NotFound)
    assert accepted(DeleteGpu(NAME, missing_ok=True)) == State()


# ---- condition fields ------------------------------------------------------------------------

#: Every way to put one condition into the cache: (label, command for a status/condition).
WRITERS: dict[str, Callable[[Condition], tuple[Command, State]]] = {
    "CreateGpu": lambda c: (CreateGpu(gpu(NAME, c)), State()),
    "RegisterGpu": lambda c: (RegisterGpu(NAME, GpuSpec(), status(c)), State()),
    "UpdateGpu": lambda c: (UpdateGpu(gpu(NAME, c)), with_gpu()),
    "UpdateGpuStatus": lambda c: (UpdateGpuStatus(NAME, status(c)), with_gpu()),
    "UpdateCondition": lambda c: (UpdateCondition(NAME, c), with_gpu()),
}
writers = pytest.mark.parametrize("writer", sorted(WRITERS))

EDGES = [
    # (what, at the limit, one over it)
    ("type", cond("T" * 128), cond("T" * 129)),
    ("type-multibyte", cond("\u00e9" * 128), cond("\u00e9" * 129)),
    ("reason", cond("A", reason="r" * 256), cond("A", reason="r" * 257)),
    ("reason-multibyte", cond("A", reason="\u20ac" * 256), cond("A", reason="\u20ac" * 257)),
    ("message", cond("A", message="m" * 4096), cond("A", message="m" * 4097)),
    ("message-multibyte", cond("A", message="\u00e9" * 4096),
     cond("A", message="\u00e9" * 4097)),
]


@writers
@pytest.mark.parametrize(("what", "at_limit", "over"), EDGES, ids=[e[0] for e in EDGES])
def test_condition_field_lengths(writer: str, what: str, at_limit: Condition,
                                 over: Condition) -> None:
    command, state = WRITERS[writer](at_limit)
    after = accepted(command, state)
    stored = after.gpus[NAME].status.conditions
    assert [(c.type, c.reason, c.message) for c in stored] == [
        (at_limit.type, at_limit.reason, at_limit.message)
    ]  # stored whole, never cut
    command, state = WRITERS[writer](over)
    rejected(command, InvalidArgument, state)


BAD_CONDITIONS = [
    ("no-type", cond("")),
    ("type-nul", cond("A\x00")),
    ("type-newline", cond("A\nB")),
    ("type-tab", cond("A\tB")),
    ("type-del", cond("A\x7f")),
    ("type-unit-separator", cond("\x1f")),
    ("status-empty", cond("A", "")),
    ("status-lowercase", cond("A", "true")),
    ("status-upper", cond("A", "TRUE")),
    ("status-padded", cond("A", "True ")),
    ("status-other", cond("A", "Healthy")),
]


@writers
@pytest.mark.parametrize(("what", "bad"), BAD_CONDITIONS, ids=[b[0] for b in BAD_CONDITIONS])
def test_bad_conditions_are_rejected(writer: str, what: str, bad: Condition) -> None:
    command, state = WRITERS[writer](bad)
    rejected(command, InvalidArgument, state)


@writers
@pytest.mark.parametrize("value", ["True", "False", "Unknown"])
def test_each_condition_status_is_accepted(writer: str, value: str) -> None:
    command, state = WRITERS[writer](cond("Xid", value, reason="r"))
    assert accepted(command, state).gpus[NAME].status.conditions[0].status == value


# ---- condition count, recommended action, duplicates -----------------------------------------

STATUS_WRITERS: dict[str, Callable[[GpuStatus], tuple[Command, State]]] = {
    "CreateGpu": lambda s: (CreateGpu(gpu(NAME, *s.conditions, action=s.recommended_action)),
                            State()),
    "RegisterGpu": lambda s: (RegisterGpu(NAME, GpuSpec(), s), State()),
    "UpdateGpu": lambda s: (UpdateGpu(gpu(NAME, *s.conditions, action=s.recommended_action)),
                            with_gpu()),
    "UpdateGpuStatus": lambda s: (UpdateGpuStatus(NAME, s), with_gpu()),
}
status_writers = pytest.mark.parametrize("writer", sorted(STATUS_WRITERS))


def many(n: int) -> list[Condition]:
    return [cond(f"C{i}") for i in range(n)]


@status_writers
@pytest.mark.parametrize("limit", [32, 3])
def test_condition_count_limit(writer: str, limit: int) -> None:
    limits = Limits(max_conditions=limit)
    command, state = STATUS_WRITERS[writer](status(*many(limit)))
    assert len(accepted(command, state, limits).gpus[NAME].status.conditions) == limit
    command, state = STATUS_WRITERS[writer](status(*many(limit + 1)))
    rejected(command, InvalidArgument, state, limits)


@pytest.mark.parametrize("limit", [32, 3])
def test_condition_count_limit_on_upsert(limit: int) -> None:
    limits = Limits(max_conditions=limit)
    state = accepted(RegisterGpu(NAME, GpuSpec(), status(*many(limit))), limits=limits)
    # replacing an existing type keeps the count: allowed
    after = accepted(UpdateCondition(NAME, cond("C0", "False")), state, limits)
    assert after.gpus[NAME].status.conditions[0].status == "False"
    # a new type would make limit+1
    rejected(UpdateCondition(NAME, cond("New")), InvalidArgument, state, limits)


@status_writers
def test_duplicate_condition_types_are_rejected(writer: str) -> None:
    command, state = STATUS_WRITERS[writer](status(cond("A"), cond("B"), cond("A", "False")))
    rejected(command, InvalidArgument, state)


@status_writers
def test_recommended_action_length(writer: str) -> None:
    command, state = STATUS_WRITERS[writer](status(action="x" * 4096))
    assert accepted(command, state).gpus[NAME].status.recommended_action == "x" * 4096
    command, state = STATUS_WRITERS[writer](status(action="x" * 4097))
    rejected(command, InvalidArgument, state)


# ---- provider ids, namespaces ----------------------------------------------------------------


def test_provider_id_length_and_control_characters() -> None:
    edge, over = "p" * 253, "p" * 254
    assert accepted(RegisterGpu(NAME, GpuSpec(), GpuStatus(), edge)).owners == {NAME: edge}
    for bad in (over, "p\x00", "p\n"):
        rejected(RegisterGpu(NAME, GpuSpec(), GpuStatus(), bad), InvalidArgument)
        rejected(CreateGpu(gpu(NAME), bad), InvalidArgument)
        rejected(UpdateGpu(gpu(NAME), bad), InvalidArgument, with_gpu())
        rejected(UpdateGpuStatus(NAME, GpuStatus(), 0, bad), InvalidArgument, with_gpu())
        rejected(UpdateCondition(NAME, cond("A"), bad), InvalidArgument, with_gpu())
        rejected(ClaimGpus(bad, (NAME,)), InvalidArgument, with_gpu())


def test_create_namespace_length() -> None:
    assert accepted(CreateGpu(gpu(NAME, namespace="n" * 253))).gpus[NAME].metadata.namespace \
        == "n" * 253
    rejected(CreateGpu(gpu(NAME, namespace="n" * 254)), InvalidArgument)


# ---- object size -----------------------------------------------------------------------------


def _stored_size(command: Command, state: State) -> int:
    after, result, _ = apply(state, command, Limits(max_object_bytes=10**9), ts(1))
    stored = after.gpus[NAME]
    assert result.gpu is None or result.gpu is stored
    return stored.ByteSize()


@writers
def test_object_size_limit(writer: str) -> None:
    condition = cond("Big", reason="r" * 200, message="m" * 3000)
    command, state = WRITERS[writer](condition)
    size = _stored_size(command, state)
    # state.gpus may be empty or hold the GPU; the limit applies to the stored object
    assert accepted(command, state, Limits(max_object_bytes=size)).gpus[NAME].ByteSize() == size
    rejected(command, InvalidArgument, state, Limits(max_object_bytes=size - 1))


def test_object_size_limit_default_is_64_kib() -> None:
    # 32 conditions x ~2 KiB of message: well under every per-field bound, over 64 KiB together
    big = [cond(f"C{i}", message="m" * 2100) for i in range(32)]
    rejected(RegisterGpu(NAME, GpuSpec(), status(*big)), InvalidArgument)
    assert Limits().max_object_bytes == 65536
    small = [cond(f"C{i}", message="m" * 1900) for i in range(32)]
    assert accepted(RegisterGpu(NAME, GpuSpec(), status(*small))).gpus[NAME].ByteSize() <= 65536


# ---- max GPUs --------------------------------------------------------------------------------


@pytest.mark.parametrize("register", [False, True], ids=["CreateGpu", "RegisterGpu"])
def test_max_gpus(register: bool) -> None:
    limits = Limits(max_gpus=2)

    def create(name: str) -> Command:
        if register:
            return RegisterGpu(name, GpuSpec(), GpuStatus(), "p1")
        return CreateGpu(gpu(name), "p1")

    state = accepted(create("GPU-01"), limits=limits)
    state = accepted(create("GPU-02"), state, limits)  # at the limit
    error = rejected(create("GPU-03"), ResourceExhausted, state, limits)
    assert isinstance(error, ResourceExhausted) and error.reason == "max_gpus"
    # an idempotent re-create of an existing GPU at the limit still answers created=False
    again, result, events = apply(state, create("GPU-01"), limits, ts(2))
    assert (result.created, events, again.rv) == (False, [], state.rv)
    # freeing a slot makes room again
    state = accepted(DeleteGpu("GPU-02"), state, limits)
    assert "GPU-03" in accepted(create("GPU-03"), state, limits).gpus


def test_max_gpus_zero_refuses_every_create() -> None:
    rejected(CreateGpu(gpu(NAME)), ResourceExhausted, limits=Limits(max_gpus=0))


# ---- versions --------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "value"), [
    ("", 0), ("0", 0), ("1", 1), ("42", 42), ("007", 7), (str(2**63 - 1), 2**63 - 1),
])
def test_parse_version_accepts(text: str, value: int) -> None:
    assert parse_version(text) == value


BAD_VERSIONS = ["abc", "-1", "+1", " 1", "1 ", "1.0", "1e3", "0x10", "\u0661\u0662", "\u00b2",
                "\uff11", str(2**63), str(2**64), "9" * 40, "1\n"]


@pytest.mark.parametrize("text", BAD_VERSIONS)
def test_parse_version_rejects(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_version(text)


@pytest.mark.parametrize("text", BAD_VERSIONS)
def test_update_gpu_rejects_a_bad_metadata_version(text: str) -> None:
    rejected(UpdateGpu(gpu(NAME, meta_rv=text)), InvalidArgument, with_gpu())


def test_update_gpu_version_sources() -> None:
    state = with_gpu()  # at version 1
    assert accepted(UpdateGpu(gpu(NAME, rv=1)), state).rv == 2
    assert accepted(UpdateGpu(gpu(NAME, meta_rv="1")), state).rv == 2
    assert accepted(UpdateGpu(gpu(NAME, meta_rv="")), state).rv == 2  # unconditional
    assert accepted(UpdateGpu(gpu(NAME, meta_rv="0")), state).rv == 2  # unconditional
    # the int64 field wins over the string
    assert accepted(UpdateGpu(gpu(NAME, rv=1, meta_rv="99")), state).rv == 2
    rejected(UpdateGpu(gpu(NAME, rv=-1)), InvalidArgument, state)
    rejected(UpdateGpu(gpu(NAME, rv=-(2**63))), InvalidArgument, state)
    rejected(UpdateGpuStatus(NAME, GpuStatus(), -1), InvalidArgument, state)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=25))
def test_parse_version_is_exactly_non_negative_int64(text: str) -> None:
    if text == "":
        assert parse_version(text) == 0
    elif all(ch in "0123456789" for ch in text) and int(text) < 2**63:
        assert parse_version(text) == int(text)
    else:
        with pytest.raises(InvalidArgument):
            parse_version(text)


def test_applier_helper_counts_versions() -> None:
    run = Applier()
    run.register(NAME, cond("Ready"))
    run.condition(NAME, cond("Ready", "False"))
    assert [e.rv for e in run.events] == [1, 2] and run.state.rv == 2
