"""XID classification: a pure function, tested by table and by properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deviceapi._config import DEFAULT_CRITICAL_XIDS, DEFAULT_IGNORED_XIDS, XidSet, parse_xids
from deviceapi.providers.nvml.xids import XID_DESCRIPTIONS, XidClass, classify, describe

IGN, CRIT, LOG = XidClass.IGNORED, XidClass.CRITICAL, XidClass.LOGGED
NONE = XidSet()
ALL = XidSet(everything=True)


@pytest.mark.parametrize(
    ("xid", "ignored", "critical", "expected"),
    [
        # defaults
        *[(x, "", "", IGN) for x in (13, 31, 43, 45, 68, 109)],
        *[(x, "", "", CRIT) for x in (48, 63, 64, 74, 79, 92, 94, 95, 119, 120)],
        (8, "", "", LOG),
        (32, "", "", LOG),
        (0, "", "", LOG),
        # user extras add to the defaults
        (32, "32", "", IGN),
        (32, "", "32", CRIT),
        (79, "32", "", CRIT),
        # an explicit ignore beats everything, an explicit critical beats a default ignore
        (79, "79", "", IGN),
        (13, "", "13", CRIT),
        (13, "13", "13", IGN),
        (79, "79", "79", IGN),
        # `all` is the fallback for XIDs nothing more specific classifies
        (32, "all", "", IGN),
        (79, "all", "", CRIT),
        (32, "", "all", CRIT),
        (13, "", "all", IGN),
        (32, "all", "all", CRIT),
        (13, "all", "all", IGN),
        (79, "all", "all", CRIT),
        (79, "all", "79", CRIT),
        (79, "79", "all", IGN),
        (13, "all", "13", CRIT),
    ],
    ids=lambda v: repr(v) if isinstance(v, str) else str(v),
)
def test_table(xid: int, ignored: str, critical: str, expected: XidClass) -> None:
    assert classify(xid, parse_xids(ignored), parse_xids(critical)) is expected


def test_defaults_without_arguments() -> None:
    assert classify(79) is CRIT
    assert classify(13) is IGN
    assert classify(32) is LOG


xids = st.integers(min_value=0, max_value=300)
xid_sets = st.one_of(
    st.just(ALL),
    st.frozensets(xids, max_size=8).map(lambda s: XidSet(s)),
)


@given(xids, xid_sets, xid_sets)
def test_explicit_ignore_always_wins(xid: int, ignored: XidSet, critical: XidSet) -> None:
    ignored = XidSet(ignored.xids | {xid}, ignored.everything)
    assert classify(xid, ignored, critical) is IGN


@given(xids, xid_sets, xid_sets)
def test_explicit_critical_wins_unless_explicitly_ignored(
    xid: int, ignored: XidSet, critical: XidSet
) -> None:
    critical = XidSet(critical.xids | {xid}, critical.everything)
    expected = IGN if xid in ignored.xids else CRIT
    assert classify(xid, ignored, critical) is expected


@given(xids)
def test_no_extras_is_the_default_table(xid: int) -> None:
    expected = CRIT if xid in DEFAULT_CRITICAL_XIDS else IGN if xid in DEFAULT_IGNORED_XIDS else LOG
    assert classify(xid, NONE, NONE) is expected


@given(xids, xid_sets, xid_sets)
def test_logged_only_when_nothing_claims_it(xid: int, ignored: XidSet, critical: XidSet) -> None:
    verdict = classify(xid, ignored, critical)
    claimed = (
        xid in ignored
        or xid in critical
        or xid in DEFAULT_CRITICAL_XIDS
        or xid in DEFAULT_IGNORED_XIDS
    )
    assert (verdict is LOG) == (not claimed)


@given(xids, xid_sets, xid_sets, xids)
def test_adding_a_critical_xid_never_hides_a_critical_one(
    xid: int, ignored: XidSet, critical: XidSet, extra: int
) -> None:
    before = classify(xid, ignored, critical)
    after = classify(xid, ignored, XidSet(critical.xids | {extra}, critical.everything))
    if before is CRIT:
        assert after is CRIT


@given(xids, xid_sets)
def test_critical_all_keeps_default_ignored_ignored(xid: int, ignored: XidSet) -> None:
    verdict = classify(xid, ignored, ALL)
    if xid in ignored.xids or xid in DEFAULT_IGNORED_XIDS:
        assert verdict is IGN
    else:
        assert verdict is CRIT


def test_describe() -> None:
    assert describe(79) == "XID 79: GPU has fallen off the bus"
    assert describe(7) == "XID 7"
    assert all(describe(x).startswith(f"XID {x}: ") for x in XID_DESCRIPTIONS)
    assert XID_DESCRIPTIONS.keys() >= DEFAULT_CRITICAL_XIDS
    assert XID_DESCRIPTIONS.keys() >= DEFAULT_IGNORED_XIDS
