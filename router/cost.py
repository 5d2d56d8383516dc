"""The ``kv`` routing policy's cost functions, shared by the gateway's router
(``policy.py``) and the planner's simulator (``loadtest/sim_router.py``), so what the
planner predicts is what the gateway decides. Plain numbers in, a cost in token units
out: no protobuf, no workers, nothing imported.

Decode worker D::

    used KV tokens + decode_request_tokens * running requests + queued prefill tokens
    + overlap_weight * prompt tokens D lacks + free-KV pressure

where the pressure grows steeply (8 blocks' worth of tokens per block) once admitting
the prompt would leave D with fewer than ``free_reserve_frac`` of its blocks free, and
dominates everything when the prompt does not fit at all. Prefill worker P::

    overlap_weight * prompt tokens P lacks + queued prefill tokens

Ties go to the caller's seeded RNG (``pick``), so decisions are deterministic.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

NO_ROOM_COST = 1e15
"""Added when the prompt does not fit in a worker's free KV blocks at all."""
PRESSURE_BLOCKS_PER_BLOCK = 8
"""Every block short of the reserve costs this many blocks' worth of tokens."""

T = TypeVar("T")


@dataclass(frozen=True)
class CostWeights:
    overlap_weight: float = 1.0
    """Tokens of cost per prompt token a worker must compute (lacks in its cache)."""
    decode_request_tokens: int = 256
    """The cost of one running request on a decode worker, in tokens."""
    free_reserve_frac: float = 0.05
    """Free-KV fraction below which the pressure term starts."""


def decode_cost(w: CostWeights, *, prompt_tokens: int, hit_blocks: int, block_size: int, used_tokens: int,
                requests: int, queued_prefill_tokens: int, free_blocks: int | None, total_blocks: int) -> float:
    """D's cost for a prompt of ``prompt_tokens`` of which it holds ``hit_blocks`` blocks;
    ``free_blocks``: its free blocks less what it already promised (None: unknown, no
    pressure term), ``total_blocks``: its pool (0: unknown)."""
    cost = (used_tokens + w.decode_request_tokens * requests + queued_prefill_tokens
            + w.overlap_weight * (prompt_tokens - hit_blocks * block_size))
    if total_blocks and free_blocks is not None:
        free_after = free_blocks - (-(-prompt_tokens // block_size) - hit_blocks)
        reserve = w.free_reserve_frac * total_blocks
        if free_after < reserve:
            cost += PRESSURE_BLOCKS_PER_BLOCK * block_size * (reserve - free_after)
            if free_after < 0:
                cost += NO_ROOM_COST
    return cost


def prefill_cost(w: CostWeights, *, prompt_tokens: int, hit_blocks: int, block_size: int,
                 queued_prefill_tokens: int) -> float:
    """P's cost for the prompt: what it must compute, behind what it has queued."""
    return w.overlap_weight * (prompt_tokens - hit_blocks * block_size) + queued_prefill_tokens


def pick(costs: Sequence[tuple[float, T]], rng: random.Random) -> T:
    """The cheapest candidate, exact ties broken by ``rng`` (in the candidates' order)."""
    best = min(c for c, _ in costs)
    tied = [x for c, x in costs if c == best]
    return tied[0] if len(tied) == 1 else rng.choice(tied)


__all__ = ["CostWeights", "NO_ROOM_COST", "decode_cost", "pick", "prefill_cost"]
