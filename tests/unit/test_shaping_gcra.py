"""sidecar.shaping.gcra: exact admission times, the burst, recovery, and the bound on
admissions in any window (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.shaping.gcra import Gcra
from sidecar.shaping.model import Rate


def test_a_burst_of_count_is_admitted_at_once_then_one_per_interval() -> None:
    gcra, rate = Gcra(), Rate(3, 3.0)  # 3 per 3 s: one per second, burst 3
    assert [gcra.reserve("k", rate, 0.0, 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert gcra.reserve("k", rate, 0.0, 0.0) is None  # the 4th would need a wait of 1 s
    assert gcra.reserve("k", rate, 0.0, 5.0) == pytest.approx(1.0)  # reserved for t=1
    assert gcra.reserve("k", rate, 0.0, 5.0) == pytest.approx(2.0)  # and t=2
    assert gcra.reserve("k", rate, 0.0, 1.5) is None  # t=3 is over 1.5 s away: not reserved
    assert gcra.reserve("k", rate, 0.0, 3.0) == pytest.approx(3.0)


def test_nothing_is_reserved_when_the_wait_is_over_max_wait() -> None:
    gcra, rate = Gcra(), Rate(1, 10.0)
    assert gcra.reserve("k", rate, 0.0, 0.0) == 0.0
    for _ in range(5):
        assert gcra.reserve("k", rate, 0.0, 9.0) is None
    assert gcra.reserve("k", rate, 10.0, 0.0) == 0.0  # the refusals took nothing


def test_recovery_one_interval_frees_one_admission() -> None:
    gcra, rate = Gcra(), Rate(100, 60.0)  # "100/min": one per 0.6 s, burst 100
    assert all(gcra.reserve("k", rate, 0.0, 0.0) == 0.0 for _ in range(100))
    assert gcra.reserve("k", rate, 0.0, 0.0) is None
    assert gcra.reserve("k", rate, 0.6, 0.0) == 0.0
    assert gcra.reserve("k", rate, 0.6, 0.0) is None
    assert gcra.reserve("k", rate, 1.0, 1.0) == pytest.approx(0.2)
    # A full period idle gives the whole burst back, and no more.
    assert all(gcra.reserve("k", rate, 100.0, 0.0) == 0.0 for _ in range(100))
    assert gcra.reserve("k", rate, 100.0, 0.0) is None


def test_keys_are_independent() -> None:
    gcra, rate = Gcra(), Rate(1, 60.0)
    assert gcra.reserve("a", rate, 0.0, 0.0) == 0.0
    assert gcra.reserve("b", rate, 0.0, 0.0) == 0.0
    assert gcra.reserve("a", rate, 0.0, 0.0) is None


def test_the_table_is_pruned_of_keys_back_to_fresh() -> None:
    gcra, rate = Gcra(), Rate(1, 1.0)
    for i in range(5000):
        gcra.reserve(f"k{i}", rate, float(i), 0.0)  # each key's TAT passes a second later
    assert len(gcra) < 2100


@settings(max_examples=300, deadline=None)
@given(
    count=st.integers(1, 20),
    per=st.sampled_from([1.0, 3.0, 60.0]),
    max_wait=st.sampled_from([0.0, 0.5, 5.0]),
    gaps=st.lists(st.floats(0.0, 2.0, allow_nan=False), min_size=1, max_size=200),
)
def test_never_more_than_count_plus_elapsed_over_interval_in_any_window(
    count: int, per: float, max_wait: float, gaps: list[float]
) -> None:
    """Requests at arbitrary times: the admissions (request time + wait) in any window
    [a, b] number at most count + (b - a) / interval; every wait is within max_wait."""
    gcra, rate = Gcra(), Rate(count, per)
    now, admitted = 0.0, []
    for gap in gaps:
        now += gap
        wait = gcra.reserve("k", rate, now, max_wait)
        if wait is not None:
            assert 0.0 <= wait <= max_wait + 1e-9
            admitted.append(now + wait)
    admitted.sort()
    for i, start in enumerate(admitted):
        for j in range(i, len(admitted)):
            inside = j - i + 1
            assert inside <= count + (admitted[j] - start) / rate.interval + 1e-6


def test_take_admits_the_burst_room_left_at_once_and_no_more() -> None:
    gcra, rate = Gcra(), Rate(10, 1.0)  # a burst of 10, then one per 0.1 s
    assert gcra.take("k", rate, 0.0, 4) == 4
    assert gcra.take("k", rate, 0.0, 10) == 6  # the rest of the burst
    assert gcra.take("k", rate, 0.0, 1) == 0
    assert gcra.reserve("k", rate, 0.0, 0.0) is None  # taken means reserved for everyone
    assert gcra.take("k", rate, 0.35, 10) == 3
