"""The rate sweep: the highest request rate at which enough requests meet the SLOs.

:class:`RateSearch` is the search alone, on any function rate -> SLO attainment (it
assumes attainment does not grow with the rate, which holds for a server up to
measurement noise):

1. Ramp: try ``start_rate``, then multiply by ``growth`` while the attainment is at
   least ``target``.
2. Bisect: between the highest passing rate (0 if none passed) and the lowest failing
   one, try the midpoint, until ``max_steps`` rates were tried in all or the bracket is
   narrower than ``rel_tol`` of the failing rate.

The answer is the highest rate that passed (None if none did); when the ramp never
failed within the step budget, the server was not saturated and the answer is only a
lower bound (``is_saturated`` False).

:func:`arun_sweep` drives it with real load tests: each step is the configured run
with ``rate`` replaced, its records and summary written under ``out_dir/rate_<r>``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .config import LoadTestConfig
from .prompts import PromptFactory
from .report import plot_sweep, write_run
from .runner import arun_loadtest


@dataclass
class RateSearch:
    """State of one bounded search; ask ``next_rate()``, then ``record`` its attainment."""

    start_rate: float
    target: float = 0.9
    max_steps: int = 8
    growth: float = 2.0
    rel_tol: float = 0.05
    tried: list[tuple[float, float]] = field(default_factory=list)
    best_rate: float | None = None
    """Highest rate whose attainment reached ``target``."""
    fail_rate: float | None = None
    """Lowest rate that failed."""

    def __post_init__(self) -> None:
        if not self.start_rate > 0:
            raise ValueError(f"start_rate must be > 0, got {self.start_rate}")
        if not 0 < self.target <= 1:
            raise ValueError(f"target attainment must be in (0, 1], got {self.target}")
        if not isinstance(self.max_steps, int) or self.max_steps < 1:
            raise ValueError(f"max_steps must be an integer >= 1, got {self.max_steps!r}")
        if not self.growth > 1:
            raise ValueError(f"growth must be > 1, got {self.growth}")

    @property
    def is_saturated(self) -> bool:
        return self.fail_rate is not None

    def next_rate(self) -> float | None:
        """The next rate to try; None when the search is over."""
        if len(self.tried) >= self.max_steps:
            return None
        if self.fail_rate is None:
            return self.start_rate if self.best_rate is None else self.best_rate * self.growth
        low = self.best_rate or 0.0
        if self.fail_rate - low <= self.rel_tol * self.fail_rate:
            return None
        return (low + self.fail_rate) / 2

    def record(self, rate: float, attainment: float) -> None:
        self.tried.append((rate, attainment))
        if attainment >= self.target:
            self.best_rate = rate if self.best_rate is None else max(self.best_rate, rate)
        else:
            self.fail_rate = rate if self.fail_rate is None else min(self.fail_rate, rate)

    def run(self, attainment_at: Callable[[float], float]) -> float | None:
        """Search on a plain function (tests, simulators); returns ``best_rate``."""
        while (rate := self.next_rate()) is not None:
            self.record(rate, attainment_at(rate))
        return self.best_rate


@dataclass
class SweepResult:
    best_rate: float | None
    is_saturated: bool
    points: list[dict]
    """Per rate tried, in order: ``rate`` plus that run's summary."""

    def to_json(self, target: float) -> dict:
        return {"attainment_target": target, "best_rate": self.best_rate, "is_saturated": self.is_saturated,
                "points": self.points}


def run_sweep(config: LoadTestConfig, target: float = 0.9, max_steps: int = 8, start_rate: float | None = None,
              out_dir: str | Path | None = None) -> SweepResult:
    """:func:`arun_sweep`, blocking."""
    return asyncio.run(arun_sweep(config, target, max_steps, start_rate, out_dir))


async def arun_sweep(config: LoadTestConfig, target: float = 0.9, max_steps: int = 8,
                     start_rate: float | None = None, out_dir: str | Path | None = None,
                     on_step: Callable[[float, dict], None] | None = None) -> SweepResult:
    """Sweep ``config`` over request rates (its ``rate`` is the start unless ``start_rate``)."""
    if not config.has_slo:
        raise ValueError("a sweep needs at least one SLO (slo_ttft_ms, slo_tpot_ms or slo_e2e_ms)")
    if config.workload == "trace":
        raise ValueError("a sweep varies the request rate; the trace workload takes its arrivals from the trace "
                         "(use trace_time_scale instead)")
    search = RateSearch(start_rate or config.rate or 1.0, target, max_steps)
    factory = PromptFactory.from_dir(config.tokenizer_dir)
    points: list[dict] = []
    while (rate := search.next_rate()) is not None:
        result = await arun_loadtest(dataclasses.replace(config, rate=rate), factory)
        search.record(rate, result.summary["slo_attainment"])
        points.append({"rate": rate, **result.summary})
        if out_dir is not None:
            write_run(Path(out_dir) / f"rate_{rate:.4g}", result.config, result.model, result.summary,
                      result.records, plots=False)
        if on_step is not None:
            on_step(rate, result.summary)
    sweep = SweepResult(search.best_rate, search.is_saturated, points)
    if out_dir is not None:
        out = Path(out_dir)
        (out / "sweep.json").write_text(json.dumps(sweep.to_json(target), indent=2) + "\n")
        plot_sweep(points, out)
    return sweep
