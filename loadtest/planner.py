"""The prefill:decode planner: simulate every deployment a GPU budget allows, pick the best.

Candidates: every (prefill workers, prefill TP, decode workers, decode TP) with at least
one worker in each pool, TP sizes from ``tp_sizes``, and
``num_prefill * prefill_tp + num_decode * decode_tp <= num_gpus``. Each is simulated on
the same requests (:func:`pdserve.loadtest.simulator.simulate`).

Ranking: highest goodput per GPU first; goodputs within ``tie_rel`` of each other count
as a tie (goodput is SLO-meeting requests / run duration, and two configurations that
both meet every SLO differ only by when their last request happens to finish), broken
by lower TTFT p50, then fewer GPUs, then the label.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

from .profile import Profile
from .simulator import SLO, ClusterConfig, SimRequest, SimResult, simulate

__all__ = ["PlanResult", "candidate_configs", "format_table", "plan"]


def candidate_configs(num_gpus: int, tp_sizes: Sequence[int], base: ClusterConfig | None = None,
                      max_workers_per_pool: int | None = None) -> list[ClusterConfig]:
    """Every configuration within the budget; ``base`` supplies the other fields (policy...)."""
    if num_gpus < 2:
        raise ValueError(f"the GPU budget must be >= 2 (one prefill and one decode worker), got {num_gpus}")
    sizes = sorted(set(tp_sizes))
    if not sizes or sizes[0] < 1:
        raise ValueError(f"tp sizes must be integers >= 1, got {list(tp_sizes)}")
    base = base or ClusterConfig(1, 1)
    out = []
    for ptp in sizes:
        for dtp in sizes:
            for num_prefill in range(1, (num_gpus - dtp) // ptp + 1):
                left = num_gpus - num_prefill * ptp
                for num_decode in range(1, left // dtp + 1):
                    if max_workers_per_pool and max(num_prefill, num_decode) > max_workers_per_pool:
                        continue
                    out.append(dataclasses.replace(base, num_prefill=num_prefill, num_decode=num_decode,
                                                   prefill_tp=ptp, decode_tp=dtp))
    if not out:
        raise ValueError(f"no configuration fits {num_gpus} GPUs with tp sizes {sizes}")
    return out


@dataclass
class PlanResult:
    """Every candidate's simulation, best first."""

    ranked: list[SimResult]
    slo: SLO

    @property
    def best(self) -> SimResult:
        return self.ranked[0]

    def rows(self) -> list[dict]:
        rows = []
        for rank, r in enumerate(self.ranked, 1):
            s = r.summary
            c = r.config
            rows.append({
                "rank": rank, "config": c.label, "num_prefill": c.num_prefill, "prefill_tp": c.prefill_tp,
                "num_decode": c.num_decode, "decode_tp": c.decode_tp, "num_gpus": c.num_gpus,
                "ttft_p50_ms": s["ttft_ms"]["p50"], "ttft_p99_ms": s["ttft_ms"]["p99"],
                "tpot_p50_ms": s["tpot_ms"]["p50"], "tpot_p99_ms": s["tpot_ms"]["p99"],
                "goodput": s["goodput"], "goodput_per_gpu": s["goodput_per_gpu"],
                "slo_attainment": s["slo_attainment"], "request_throughput": s["request_throughput"],
            })
        return rows

    def to_json(self) -> dict:
        best = self.best.config
        return {
            "recommended": {"config": best.label, "num_prefill": best.num_prefill, "prefill_tp": best.prefill_tp,
                            "num_decode": best.num_decode, "decode_tp": best.decode_tp, "num_gpus": best.num_gpus},
            "slo": {"ttft_ms": self.slo.ttft_ms, "tpot_ms": self.slo.tpot_ms, "e2e_ms": self.slo.e2e_ms},
            "candidates": self.rows(),
        }


def _sort_key(result: SimResult, best_goodput: float, tie_rel: float):
    s = result.summary
    g = s["goodput_per_gpu"]
    # Quantise relative to the best so near-equal goodputs tie (see the module docstring).
    bucket = math.floor(g / (best_goodput * tie_rel)) if best_goodput > 0 else 0
    ttft = s["ttft_ms"]["p50"]
    return (-bucket, ttft if ttft is not None else math.inf, result.config.num_gpus, result.config.label)


def plan(profile: Profile, requests: Sequence[SimRequest], num_gpus: int, tp_sizes: Sequence[int] = (1,), *,
         slo: SLO | None = None, concurrency: int | None = None, base: ClusterConfig | None = None,
         tie_rel: float = 0.01, max_workers_per_pool: int | None = None) -> PlanResult:
    """Simulate every candidate and rank them (best first)."""
    if not 0 < tie_rel < 1:
        raise ValueError(f"tie_rel must be in (0, 1), got {tie_rel}")
    slo = slo or SLO()
    results = [simulate(profile, c, requests, slo=slo, concurrency=concurrency)
               for c in candidate_configs(num_gpus, tp_sizes, base, max_workers_per_pool)]
    best = max(r.summary["goodput_per_gpu"] for r in results)
    results.sort(key=lambda r: _sort_key(r, best, tie_rel))
    return PlanResult(results, slo)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_table(rows: Sequence[dict]) -> str:
    """A fixed-width text table of :meth:`PlanResult.rows` (or one row per simulation)."""
    header = ("rank", "config", "GPUs", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "goodput", "goodput/GPU",
              "SLO att.")
    lines = [header]
    for r in rows:
        lines.append((str(r.get("rank", "")), r["config"], str(r["num_gpus"]), _ms(r["ttft_p50_ms"]),
                      _ms(r["ttft_p99_ms"]), _ms(r["tpot_p50_ms"]), _ms(r["tpot_p99_ms"]), f"{r['goodput']:.3f}",
                      f"{r['goodput_per_gpu']:.3f}", f"{100 * r['slo_attainment']:.1f}%"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.rjust(w) if i != 1 else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths)))
            for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text) + "\nlatencies in ms; goodput in SLO-meeting requests/s"
