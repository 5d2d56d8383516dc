"""Length distributions and arrival processes of loadtest/distributions.py.

The statistical checks use a fixed seed (so they are deterministic) and a tolerance of
about five standard errors of the estimate, so a correct sampler passes for any seed
with overwhelming probability and a wrong one (wrong scale, wrong shape) cannot.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from pdserve.loadtest.distributions import LengthDistribution, arrival_intervals

N = 20_000


def test_poisson_intervals_have_mean_one_over_rate():
    gaps = arrival_intervals(np.random.default_rng(1), N, rate=4.0, burstiness=1.0)
    # Exponential: std = mean = 0.25, so the mean's standard error is 0.25 / sqrt(N) ~ 0.0018;
    # 4% (0.01) is over five of them.
    assert gaps.mean() == pytest.approx(0.25, rel=0.04)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # CV of an exponential is 1


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_intervals_keep_the_rate_and_set_the_spread(burstiness):
    gaps = arrival_intervals(np.random.default_rng(2), N, rate=10.0, burstiness=burstiness)
    # The mean interval stays 1/rate; the coefficient of variation is 1/sqrt(shape).
    # Standard errors at N = 20000: mean <= 2 * 0.1 / sqrt(N) ~ 0.0014 (for CV 2), and the
    # sample std's relative error sqrt((kurtosis - 1) / 4N) <= 1.8% (kurtosis 3 + 6/shape);
    # 8% and 10% are over four standard errors.
    assert gaps.mean() == pytest.approx(0.1, rel=0.08)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.10)


def test_arrival_parameters_are_validated():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="rate"):
        arrival_intervals(rng, 3, rate=0.0)
    with pytest.raises(ValueError, match="burstiness"):
        arrival_intervals(rng, 3, rate=1.0, burstiness=-1)


@pytest.mark.parametrize("text, mean, tol", [
    ("fixed:128", 128, 0), ("fixed:n=7", 7, 0),
    ("uniform:min=10,max=20", 15, 0.1),
    ("normal:mean=300,std=30", 300, 1.0),
    # lognormal with sigma 0.6: std = mean * sqrt(e^0.36 - 1) ~ 0.66 mean, standard error
    # ~ 0.66 * 512 / sqrt(N) ~ 2.4 tokens; 12 tokens is five of them.
    ("lognormal:mean=512,sigma=0.6", 512, 12),
])
def test_length_distributions_sample_their_mean(text, mean, tol):
    dist = LengthDistribution.parse(text)
    values = dist.sample(np.random.default_rng(3), N)
    assert values.dtype == np.int64 and values.min() >= 1
    assert abs(values.mean() - mean) <= tol
    assert dist.mean == mean
    assert LengthDistribution.parse(str(dist)) == dist  # the text form round-trips


def test_uniform_is_inclusive_and_normal_is_clipped_to_one():
    u = LengthDistribution.parse("uniform:min=3,max=5").sample(np.random.default_rng(4), 2000)
    assert set(u.tolist()) == {3, 4, 5}
    n = LengthDistribution.parse("normal:mean=2,std=50").sample(np.random.default_rng(5), 2000)
    assert n.min() == 1 and (n == 1).sum() > 500  # about half the draws fall below 1


def test_same_seed_same_lengths():
    d = LengthDistribution.parse("lognormal:mean=100,sigma=1")
    a = d.sample(np.random.default_rng(7), 50)
    b = d.sample(np.random.default_rng(7), 50)
    assert (a == b).all()


@pytest.mark.parametrize("text, message", [
    ("lognormal", "KIND:key=value"),
    ("poisson:mean=3", "unknown length distribution"),
    ("normal:mean=100", r"takes parameters \['mean', 'std'\]"),
    ("uniform:min=10,max=5", "min <= max"),
    ("fixed:0", "n must be an integer >= 1"),
    ("fixed:2.5", "n must be an integer >= 1"),
    ("normal:mean=abc,std=1", "is not key=number"),
    ("lognormal:mean=100,sigma=-1", "sigma >= 0"),
    ("normal:mean=nan,std=1", "finite"),
])
def test_bad_distributions_name_the_text(text, message):
    with pytest.raises(ValueError, match=message):
        LengthDistribution.parse(text)
