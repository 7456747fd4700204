"""The pure restart strategy, against a tiny independent oracle (hypothesis) and by example."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from supervision_helpers import oracle

from deviceapi.otp import RestartPlan, plan_restart, should_restart
from deviceapi.otp._spec import RESTART_TYPES, Restart
from deviceapi.otp._strategy import STRATEGIES, ExitKind, Strategy

restart_types = st.sampled_from(RESTART_TYPES)
exits = st.sampled_from(["normal", "crash"])


@st.composite
def situations(draw: st.DrawFn) -> tuple[Strategy, list[str], dict[str, Restart], str, ExitKind]:
    ids = draw(st.lists(st.text("abcdefgh", min_size=1, max_size=3), min_size=1, max_size=8,
                        unique=True))
    types = {cid: draw(restart_types) for cid in ids}
    return draw(st.sampled_from(STRATEGIES)), ids, types, draw(st.sampled_from(ids)), draw(exits)


@given(situations())
def test_plan_matches_the_oracle(case: tuple[Strategy, list[str], dict[str, Restart], str,
                                             ExitKind]) -> None:
    assert plan_restart(*case) == oracle(*case)


@given(situations())
def test_plan_invariants(case: tuple[Strategy, list[str], dict[str, Restart], str,
                                     ExitKind]) -> None:
    strategy, ids, types, failed, exit = case
    plan = plan_restart(strategy, ids, types, failed, exit)
    position = {cid: index for index, cid in enumerate(ids)}
    # stop: reverse start order, never the failed child (it is already gone)
    assert [position[c] for c in plan.stop] == sorted((position[c] for c in plan.stop),
                                                      reverse=True)
    assert failed not in plan.stop
    # restart: start order; temporary children never come back
    assert [position[c] for c in plan.restart] == sorted(position[c] for c in plan.restart)
    assert all(types[c] != "temporary" for c in plan.restart)
    # every stopped sibling is either restarted or removed, never both
    assert set(plan.stop) == (set(plan.restart) | set(plan.remove)) - {failed}
    assert not set(plan.restart) & set(plan.remove)
    # a child that is not restarted disturbs nobody
    if not should_restart(types[failed], exit):
        assert plan.stop == plan.restart == ()
    else:
        assert failed in plan.restart
    # rest_for_one never touches the children started before the failed one
    if strategy == "rest_for_one":
        earlier = set(ids[: position[failed]])
        assert not earlier & (set(plan.stop) | set(plan.restart) | set(plan.remove))


@pytest.mark.parametrize(
    ("restart", "exit", "expected"),
    [
        ("permanent", "normal", True),
        ("permanent", "crash", True),
        ("transient", "normal", False),
        ("transient", "crash", True),
        ("temporary", "normal", False),
        ("temporary", "crash", False),
    ],
)
def test_should_restart(restart: Restart, exit: ExitKind, expected: bool) -> None:
    assert should_restart(restart, exit) is expected


def test_examples_read_like_otp() -> None:
    ids = ["a", "b", "c", "d"]
    types: dict[str, Restart] = {"a": "permanent", "b": "permanent", "c": "temporary",
                                 "d": "transient"}
    assert plan_restart("one_for_one", ids, types, "b", "crash") == RestartPlan((), ("b",), ())
    assert plan_restart("one_for_all", ids, types, "b", "crash") == RestartPlan(
        ("d", "c", "a"), ("a", "b", "d"), ("c",))
    assert plan_restart("rest_for_one", ids, types, "b", "normal") == RestartPlan(
        ("d", "c"), ("b", "d"), ("c",))
    assert plan_restart("one_for_all", ids, types, "c", "crash") == RestartPlan((), (), ("c",))
    assert plan_restart("one_for_all", ids, types, "d", "normal") == RestartPlan((), (), ())


def test_unknown_child_is_an_error() -> None:
    with pytest.raises(ValueError, match="not a child"):
        plan_restart("one_for_one", ["a"], {"a": "permanent"}, "z", "crash")
