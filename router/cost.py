"""The ``kv`` routing policy's decisions, shared by the gateway's router (``policy.py``)
and the planner's simulator (``loadtest/sim_router.py``), so what the planner predicts
is what the gateway decides. Plain numbers in, a choice out: no protobuf, no workers,
nothing imported.

**What a choice costs: cluster work first, load past a threshold.** The cost of sending
a prompt to a worker is the work it adds to the cluster, the prompt tokens that worker
lacks (``overlap_weight`` tokens each); tokens it holds in a tier below its KV region
(host memory) cost ``tier_weight`` each (copying back beats recomputing, a region hit
beats both), and tokens after those that the cluster-shared KV pool holds (any worker of
the pool can read them into its host tier) ``pool_weight`` each: HBM < host < pool <
recompute. A prefix the worker holds counts as held
whether it is cached or still queued / in flight there (the router's optimistic index
entries, and other gateways' placements): the follower of a group waits for its
leader's prefill rather than recompute the prefix elsewhere, which would double the
compute and split the cache.

Load enters only past an explicit imbalance threshold, absolute and relative, as
SGLang's cache-aware router does: a candidate is *overloaded* when its load exceeds
the least-loaded candidate's by more than ``*_balance_abs_tokens`` **and** is more
than ``*_balance_rel`` times it. An overloaded candidate's cost adds that excess load
(its extra wait, in tokens), so past the threshold the choice weighs locality against
queueing as a wait-only cost would; below it, load only breaks ties between equal
work (``LOAD_TIEBREAK``), so fresh prompts still spread to the least loaded worker.

- Prefill worker P: load = queued prefill tokens.
- Decode worker D: load = used KV tokens + ``decode_request_tokens`` per running
  request + queued prefill tokens; plus, always, the free-KV pressure, which grows
  steeply (8 blocks' worth of tokens per block) once admitting the prompt would leave D
  with fewer than ``free_reserve_frac`` of its blocks free, and dominates everything
  when the prompt does not fit at all. Decode-side locality (a conversation returning
  to the decode worker that holds its previous turns) is the same work term.

Thresholds of 0 and 1.0 make every candidate above the minimum overloaded: the cost is
then work + load, the old wait-based cost (kept as the simulator's "kv (old cost)").

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
LOAD_TIEBREAK = 1e-7
"""Weight of load below the imbalance threshold: it orders equal work only (work
differs by whole tokens; loads stay far below 1e7 tokens)."""

T = TypeVar("T")


@dataclass(frozen=True)
class CostWeights:
    overlap_weight: float = 1.0
    """Tokens of cost per prompt token a worker must compute (lacks in its cache)."""
    decode_request_tokens: int = 256
    """The cost of one running request on a decode worker, in tokens."""
    free_reserve_frac: float = 0.05
    """Free-KV fraction below which the pressure term starts."""
    balance_abs_tokens: int = 6144
    """Prefill: queued tokens above the least-loaded candidate's before load counts."""
    balance_rel: float = 1.5
    """Prefill: ... and the ratio to the least-loaded candidate's queue it must exceed."""
    decode_balance_abs_tokens: int = 4096
    """Decode: load tokens (KV used + per-request weight + queued prefill) above the
    least-loaded candidate's before load counts."""
    decode_balance_rel: float = 1.25
    """Decode: ... and the ratio to the least-loaded candidate's load it must exceed."""
    tier_weight: float = 0.1
    """Cost of a prompt token a worker holds in a tier below its KV region (host memory)
    and must copy back, as a fraction of computing it: 0.1 (a block crosses PCIe in a
    tenth of the time a GPU computes its 16 tokens for a 70B model)."""
    pool_weight: float = 0.2
    """Cost of a prompt token the cluster-shared KV pool holds (read over the network into
    the host tier, then copied in), as a fraction of computing it: above ``tier_weight``."""

    def __post_init__(self) -> None:
        if self.overlap_weight < 0:
            raise ValueError(f"overlap_weight must be >= 0, got {self.overlap_weight}")
        if not 0 <= self.free_reserve_frac < 1:
            raise ValueError(f"free_reserve_frac must be in [0, 1), got {self.free_reserve_frac}")
        for name in ("balance_abs_tokens", "decode_balance_abs_tokens", "decode_request_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.tier_weight <= 1:
            raise ValueError(f"tier_weight must be in [0, 1], got {self.tier_weight}")
        if not 0 <= self.pool_weight <= 1:
            raise ValueError(f"pool_weight must be in [0, 1], got {self.pool_weight}")
        for name in ("balance_rel", "decode_balance_rel"):
            if not getattr(self, name) >= 1.0:
                raise ValueError(f"{name} must be >= 1.0, got {getattr(self, name)}")

    def always_balancing(self) -> "CostWeights":
        """These weights with both thresholds off: the old wait-based cost."""
        from dataclasses import replace

        return replace(self, balance_abs_tokens=0, balance_rel=1.0, decode_balance_abs_tokens=0,
                       decode_balance_rel=1.0)


def overloaded(load: float, min_load: float, abs_tokens: float, rel: float) -> bool:
    """Past both imbalance thresholds against the least-loaded candidate."""
    return load - min_load > abs_tokens and load > rel * min_load


def _load_term(load: float, min_load: float, abs_tokens: float, rel: float) -> float:
    excess = load - min_load
    return excess if overloaded(load, min_load, abs_tokens, rel) else LOAD_TIEBREAK * excess


@dataclass(frozen=True)
class DecodeCandidate:
    """What the router knows of one decode worker for one prompt."""

    hit_blocks: int
    """Leading prompt blocks it holds (cached, or queued / in flight there)."""
    used_tokens: int
    requests: int
    queued_prefill_tokens: int
    free_blocks: int | None
    """Free blocks less what it already promised; None: unknown (no pressure term)."""
    total_blocks: int
    """Its pool; 0: unknown."""
    tier_blocks: int = 0
    """Prompt blocks after ``hit_blocks`` it holds in a tier below its KV region."""
    pool_blocks: int = 0
    """Prompt blocks after those that the KV pool holds (the worker can read them)."""

    def load(self, w: CostWeights) -> float:
        return self.used_tokens + w.decode_request_tokens * self.requests + self.queued_prefill_tokens


@dataclass(frozen=True)
class PrefillCandidate:
    hit_blocks: int
    queued_prefill_tokens: int
    tier_blocks: int = 0
    pool_blocks: int = 0


def work(w: CostWeights, prompt_tokens: int, block_size: int, hit_blocks: int, tier_blocks: int,
         pool_blocks: int = 0) -> float:
    """Tokens of work a candidate adds: what it must compute, plus what it must load back
    from a lower tier at ``tier_weight`` each and read from the KV pool at ``pool_weight``."""
    return (w.overlap_weight * (prompt_tokens - (hit_blocks + tier_blocks + pool_blocks) * block_size)
            + w.tier_weight * tier_blocks * block_size + w.pool_weight * pool_blocks * block_size)


def pressure(w: CostWeights, *, prompt_tokens: int, hit_blocks: int, block_size: int, free_blocks: int | None,
             total_blocks: int) -> float:
    """Free-KV pressure of admitting the prompt on a decode worker (0 with room to spare)."""
    if not total_blocks or free_blocks is None:
        return 0.0
    free_after = free_blocks - (-(-prompt_tokens // block_size) - hit_blocks)
    reserve = w.free_reserve_frac * total_blocks
    if free_after >= reserve:
        return 0.0
    cost = PRESSURE_BLOCKS_PER_BLOCK * block_size * (reserve - free_after)
    return cost + NO_ROOM_COST if free_after < 0 else cost


def decode_costs(w: CostWeights, prompt_tokens: int, block_size: int,
                 candidates: Sequence[DecodeCandidate]) -> list[float]:
    """Each decode candidate's cost for the prompt (see the module docstring)."""
    loads = [c.load(w) for c in candidates]
    least = min(loads, default=0.0)
    return [work(w, prompt_tokens, block_size, c.hit_blocks, c.tier_blocks, c.pool_blocks)
            + _load_term(load, least, w.decode_balance_abs_tokens, w.decode_balance_rel)
            + pressure(w, prompt_tokens=prompt_tokens, hit_blocks=c.hit_blocks, block_size=block_size,
                       free_blocks=c.free_blocks, total_blocks=c.total_blocks)
            for c, load in zip(candidates, loads)]


def prefill_costs(w: CostWeights, prompt_tokens: int, block_size: int,
                  candidates: Sequence[PrefillCandidate]) -> list[float]:
    """Each prefill candidate's cost for the prompt (see the module docstring)."""
    least = min((c.queued_prefill_tokens for c in candidates), default=0)
    return [work(w, prompt_tokens, block_size, c.hit_blocks, c.tier_blocks, c.pool_blocks)
            + _load_term(c.queued_prefill_tokens, least, w.balance_abs_tokens, w.balance_rel)
            for c in candidates]


def choose(costs: Sequence[float], keys: Sequence[T], rng: random.Random) -> T:
    """The key of the cheapest cost, exact ties broken by ``rng``."""
    return pick(list(zip(costs, keys)), rng)


def pick(costs: Sequence[tuple[float, T]], rng: random.Random) -> T:
    """The cheapest candidate, exact ties broken by ``rng`` (in the candidates' order)."""
    best = min(c for c, _ in costs)
    tied = [x for c, x in costs if c == best]
    return tied[0] if len(tied) == 1 else rng.choice(tied)


__all__ = ["CostWeights", "DecodeCandidate", "LOAD_TIEBREAK", "NO_ROOM_COST", "PrefillCandidate", "choose",
           "decode_costs", "overloaded", "pick", "prefill_costs", "pressure"]
