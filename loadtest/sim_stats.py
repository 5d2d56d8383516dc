"""Per-request results of a simulation and their summary, in the load test's shape.

The summary's keys match the load test's (``ttft_ms``/``tpot_ms``/``e2e_ms`` each with
``mean, p50, p90, p95, p99``; ``request_throughput``, ``output_throughput``,
``goodput``, ``slo_attainment``, ``num_completed``) so measured and simulated runs
print side by side; ``goodput_per_gpu`` is the planner's objective.

Goodput = requests that met every SLO / duration, where the duration runs from the
first arrival to the last completion. A request with one output token has no TPOT;
it is judged on TTFT alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class SLO:
    """Latency objectives in milliseconds; ``None`` (default): no objective on that metric."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "tpot_ms", "e2e_ms"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"SLO {name} must be a positive number of milliseconds, got {value!r}")

    def is_met(self, ttft_s: float, tpot_s: float | None, e2e_s: float) -> bool:
        if self.e2e_ms is not None and e2e_s * 1e3 > self.e2e_ms:
            return False
        if self.ttft_ms is not None and ttft_s * 1e3 > self.ttft_ms:
            return False
        if self.tpot_ms is not None and tpot_s is not None and tpot_s * 1e3 > self.tpot_ms:
            return False
        return True


@dataclass(frozen=True)
class RequestResult:
    request_id: int
    arrival_s: float
    input_len: int
    output_len: int
    ttft_s: float
    #: Mean time per output token after the first; None with one output token.
    tpot_s: float | None
    e2e_s: float
    is_remote_prefill: bool
    #: Prompt tokens the prefilling worker found in its prefix cache.
    cached_tokens: int
    num_preemptions: int = 0
    #: From reaching the worker that prefills it to its first prompt chunk: the prefill queue's wait.
    prefill_wait_s: float | None = None


def percentiles_ms(values_s: Sequence[float]) -> dict:
    if not values_s:
        return {k: None for k in ("mean", "p50", "p90", "p95", "p99")}
    ms = np.asarray(values_s, dtype=float) * 1e3
    p50, p90, p95, p99 = np.percentile(ms, [50, 90, 95, 99])
    return {"mean": float(ms.mean()), "p50": float(p50), "p90": float(p90), "p95": float(p95), "p99": float(p99)}


def summarize(results: Sequence[RequestResult], slo: SLO, num_gpus: int) -> dict:
    if not results:
        raise ValueError("no results to summarize")
    start = min(r.arrival_s for r in results)
    end = max(r.arrival_s + r.e2e_s for r in results)
    duration = max(end - start, 1e-9)
    num_ok = sum(slo.is_met(r.ttft_s, r.tpot_s, r.e2e_s) for r in results)
    goodput = num_ok / duration
    return {
        "num_completed": len(results),
        "duration_s": duration,
        "ttft_ms": percentiles_ms([r.ttft_s for r in results]),
        "tpot_ms": percentiles_ms([r.tpot_s for r in results if r.tpot_s is not None]),
        "e2e_ms": percentiles_ms([r.e2e_s for r in results]),
        "request_throughput": len(results) / duration,
        "output_throughput": sum(r.output_len for r in results) / duration,
        "goodput": goodput,
        "slo_attainment": num_ok / len(results),
        "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms, "e2e_ms": slo.e2e_ms},
        "num_gpus": num_gpus,
        "goodput_per_gpu": goodput / num_gpus,
    }
