"""Seeded random draws of the load test: token lengths and request arrival times.

A length distribution is written ``KIND:key=value,...`` on the command line:

- ``fixed:N`` (or ``fixed:n=N``) always ``N``;
- ``uniform:min=A,max=B`` integers in ``[A, B]`` inclusive;
- ``normal:mean=M,std=S`` rounded to the nearest integer;
- ``lognormal:mean=M,sigma=S`` whose *mean* is ``M`` (not the mean of the log):
  ``mu = ln(M) - sigma^2 / 2``, so the lengths average ``M`` whatever the spread.

Every draw is rounded and clipped to at least 1 token (a request with an empty
prompt or no output is not a request).

Arrivals (open loop) follow vLLM's benchmark: intervals are gamma distributed with
``shape = burstiness`` and ``scale = 1 / (rate * burstiness)``, so the mean interval is
always ``1 / rate``; ``burstiness = 1`` is a Poisson process (exponential intervals),
below 1 is burstier (coefficient of variation ``1 / sqrt(burstiness)``), above 1 is
more regular.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_KINDS = {"fixed": ("n",), "uniform": ("min", "max"), "normal": ("mean", "std"), "lognormal": ("mean", "sigma")}


@dataclass(frozen=True)
class LengthDistribution:
    """A distribution of token lengths; build from text with :meth:`parse`."""

    kind: str
    params: tuple[tuple[str, float], ...]

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"unknown length distribution {self.kind!r}; use one of {sorted(_KINDS)}")
        p = dict(self.params)
        if set(p) != set(_KINDS[self.kind]):
            raise ValueError(f"{self.kind} takes parameters {list(_KINDS[self.kind])}, got {sorted(p)}")
        for key, value in p.items():
            if not math.isfinite(value):
                raise ValueError(f"{self.kind}: {key} must be finite, got {value}")
        if self.kind == "fixed" and (p["n"] < 1 or p["n"] != int(p["n"])):
            raise ValueError(f"fixed: n must be an integer >= 1, got {p['n']}")
        if self.kind == "uniform" and not 1 <= p["min"] <= p["max"]:
            raise ValueError(f"uniform: need 1 <= min <= max, got min={p['min']} max={p['max']}")
        if self.kind == "normal" and (p["mean"] < 1 or p["std"] < 0):
            raise ValueError(f"normal: need mean >= 1 and std >= 0, got mean={p['mean']} std={p['std']}")
        if self.kind == "lognormal" and (p["mean"] < 1 or p["sigma"] < 0):
            raise ValueError(f"lognormal: need mean >= 1 and sigma >= 0, got mean={p['mean']} sigma={p['sigma']}")

    @classmethod
    def fixed(cls, n: int) -> LengthDistribution:
        return cls("fixed", (("n", float(n)),))

    @classmethod
    def parse(cls, text: str) -> LengthDistribution:
        """``"lognormal:mean=512,sigma=0.6"`` -> a distribution; ValueError naming the text otherwise."""
        kind, sep, rest = str(text).partition(":")
        kind = kind.strip().lower()
        if not sep or not rest.strip():
            raise ValueError(f"length distribution {text!r} must look like KIND:key=value,... "
                             f"(e.g. lognormal:mean=512,sigma=0.6 or fixed:128)")
        params: dict[str, float] = {}
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            if not eq and kind == "fixed" and not params:
                key, value = "n", key
            try:
                params[key.strip()] = float(value)
            except ValueError:
                raise ValueError(f"length distribution {text!r}: {item.strip()!r} is not key=number") from None
        try:
            return cls(kind, tuple(sorted(params.items())))
        except ValueError as e:
            raise ValueError(f"length distribution {text!r}: {e}") from None

    @property
    def mean(self) -> float:
        """The mean before clipping and rounding."""
        p = dict(self.params)
        if self.kind == "fixed":
            return p["n"]
        if self.kind == "uniform":
            return (p["min"] + p["max"]) / 2
        return p["mean"]

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """``size`` integer lengths, each >= 1."""
        p = dict(self.params)
        if self.kind == "fixed":
            values = np.full(size, p["n"])
        elif self.kind == "uniform":
            values = rng.integers(int(p["min"]), int(p["max"]) + 1, size=size)
        elif self.kind == "normal":
            values = rng.normal(p["mean"], p["std"], size=size)
        else:
            sigma = p["sigma"]
            values = rng.lognormal(math.log(p["mean"]) - sigma * sigma / 2, sigma, size=size)
        return np.maximum(np.rint(values), 1).astype(np.int64)

    def __str__(self) -> str:
        return f"{self.kind}:" + ",".join(f"{k}={v:g}" for k, v in self.params)


def arrival_intervals(rng: np.random.Generator, size: int, rate: float, burstiness: float = 1.0) -> np.ndarray:
    """``size`` gaps (seconds) between successive arrivals at ``rate`` requests/s."""
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"rate must be a finite number > 0, got {rate}")
    if not (burstiness > 0 and math.isfinite(burstiness)):
        raise ValueError(f"burstiness must be a finite number > 0, got {burstiness}")
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=size)
