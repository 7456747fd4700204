"""Restart intensity over a sliding window (pure: time is passed in)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deviceapi.otp import Intensity, RestartWindow


def test_default_is_one_restart_in_five_seconds() -> None:
    window = RestartWindow(Intensity())
    assert window.allow(0.0)
    assert not window.allow(4.9)


def test_restarts_older_than_the_period_are_forgotten() -> None:
    window = RestartWindow(Intensity(restarts=2, period=10.0))
    assert window.allow(0.0)
    assert window.allow(5.0)
    assert not window.allow(10.0)  # 0, 5 and 10 all fall within 10 s (inclusive, as OTP)
    window = RestartWindow(Intensity(restarts=2, period=10.0))
    assert window.allow(0.0)
    assert window.allow(5.0)
    assert window.allow(10.5)


def test_zero_intensity_refuses_every_restart() -> None:
    assert not RestartWindow(Intensity(restarts=0)).allow(0.0)


@pytest.mark.parametrize(("restarts", "period"), [(-1, 5.0), (1, 0.0), (1, -1.0)])
def test_invalid_intensity(restarts: int, period: float) -> None:
    with pytest.raises(ValueError):
        Intensity(restarts, period)


@given(
    st.integers(min_value=0, max_value=5),
    st.floats(min_value=0.1, max_value=100),
    st.lists(st.floats(min_value=0, max_value=50, allow_nan=False), max_size=30),
)
def test_window_matches_counting_by_hand(restarts: int, period: float,
                                         gaps: list[float]) -> None:
    """Until the first refusal, allow() says whether <= restarts stamps lie within the period."""
    window = RestartWindow(Intensity(restarts, period))
    now, stamps = 0.0, []
    for gap in gaps:
        now += gap
        stamps.append(now)
        recent = [t for t in stamps if now - t <= period]
        allowed = window.allow(now)
        assert allowed == (len(recent) <= restarts)
        if not allowed:
            break
