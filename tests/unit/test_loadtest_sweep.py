"""The rate search of loadtest/sweep.py on pure functions rate -> SLO attainment."""

from __future__ import annotations

import pytest

from pdserve.loadtest.sweep import RateSearch


def cliff(capacity: float):
    """Every request meets the SLOs below ``capacity``, none above."""
    return lambda rate: 1.0 if rate <= capacity else 0.0


def test_ramp_then_bisect_brackets_the_capacity():
    search = RateSearch(start_rate=1.0, target=0.9, max_steps=10)
    best = search.run(cliff(5.3))
    rates = [r for r, _ in search.tried]
    assert rates[:4] == [1.0, 2.0, 4.0, 8.0]  # geometric ramp until the first failure
    assert len(rates) <= 10
    assert best <= 5.3 < search.fail_rate  # the answer passes and the bracket holds the capacity
    assert search.fail_rate - best <= 0.05 * search.fail_rate or len(rates) == 10
    assert search.is_saturated


def test_step_budget_bounds_the_search():
    search = RateSearch(start_rate=1.0, max_steps=5)
    search.run(cliff(5.3))
    assert [r for r, _ in search.tried] == [1.0, 2.0, 4.0, 8.0, 6.0]
    assert search.best_rate == 4.0 and search.fail_rate == 6.0


def test_gradual_attainment_uses_the_target():
    # Attainment falls linearly from 1 at rate 0 to 0 at rate 20: 90% is met up to rate 2.
    search = RateSearch(start_rate=0.5, target=0.9, max_steps=12)
    best = search.run(lambda rate: max(0.0, 1 - rate / 20))
    assert 1.8 <= best <= 2.0
    assert all((a >= 0.9) == (r <= 2.0) for r, a in search.tried)


def test_first_rate_failing_bisects_down_from_it():
    search = RateSearch(start_rate=10.0, max_steps=6)
    best = search.run(cliff(3.0))
    assert [r for r, _ in search.tried][:3] == [10.0, 5.0, 2.5]
    assert best is not None and best <= 3.0


def test_nothing_passes():
    search = RateSearch(start_rate=1.0, max_steps=4)
    assert search.run(lambda rate: 0.0) is None
    assert [r for r, _ in search.tried] == [1.0, 0.5, 0.25, 0.125]


def test_never_saturated_is_a_lower_bound():
    search = RateSearch(start_rate=1.0, max_steps=4)
    assert search.run(lambda rate: 1.0) == 8.0
    assert not search.is_saturated


@pytest.mark.parametrize("kwargs, message", [
    ({"start_rate": 0.0}, "start_rate"), ({"start_rate": 1.0, "target": 1.5}, "target"),
    ({"start_rate": 1.0, "max_steps": 0}, "max_steps"), ({"start_rate": 1.0, "growth": 1.0}, "growth"),
])
def test_bad_search_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RateSearch(**kwargs)
