"""Iteration times of one simulated worker: the profile's fit scaled to the worker's TP size.

Tensor-parallel scaling model (stated, not measured): a worker of TP size ``t`` is
``speedup(t) = t * tp_efficiency ** log2(t)`` times faster than one rank, on the whole
iteration (fixed part included), so 2 ranks at efficiency 0.9 run 1.8x faster, 4 ranks
3.24x, 8 ranks 5.83x. A profile taken at TP size ``p`` is first normalised to one rank
(times ``speedup(p)``). KV capacity scales linearly with TP (every rank brings the same
KV memory). Per-request overheads (gateway, RPCs) do not scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from .profile import CostFit


def tp_speedup(tp_size: int, tp_efficiency: float) -> float:
    if tp_size < 1:
        raise ValueError(f"tp_size must be >= 1, got {tp_size}")
    if not 0 < tp_efficiency <= 1:
        raise ValueError(f"tp_efficiency must be in (0, 1], got {tp_efficiency}")
    return tp_size * tp_efficiency ** math.log2(tp_size)


@dataclass(frozen=True)
class WorkerCosts:
    """Iteration times of one worker; ``scale`` multiplies every compute time."""

    fit: CostFit
    scale: float

    @classmethod
    def for_worker(cls, fit: CostFit, tp_size: int, profiled_tp: int, tp_efficiency: float) -> WorkerCosts:
        return cls(fit, tp_speedup(profiled_tp, tp_efficiency) / tp_speedup(tp_size, tp_efficiency))

    def iteration_s(self, chunks: Sequence[tuple[int, int]] = (), num_decodes: int = 0, sum_ctx: float = 0) -> float:
        """One engine step: prompt ``chunks`` ``(new_len, cached_len)`` plus ``num_decodes`` decodes."""
        return self.fit.step_s(chunks, num_decodes, sum_ctx) * self.scale
