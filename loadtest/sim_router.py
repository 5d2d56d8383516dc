"""The simulator's router: the gateway's policies (router/policy.py) over simulated workers.

Re-stated here rather than imported because ``pdserve.router`` speaks protobuf and
``loadtest/`` stays proto-free. Same decisions, one difference: the router reads the
workers' exact current load (the real one reads Stats reports up to a second old plus
its own decisions since).

- ``kv``: decode worker D = argmin of ``used KV tokens + 256 * requests + queued prefill
  tokens + overlap * prompt tokens D lacks + free-KV pressure``; D prefills locally when
  it lacks fewer than ``disagg_threshold_tokens`` prompt tokens, else prefill worker P =
  argmin of ``overlap * uncached tokens on P + P's queued prefill tokens``.
- ``round_robin`` / ``random`` / ``least_loaded``: no cache knowledge; remote prefill
  whenever the prompt has at least ``disagg_threshold_tokens`` tokens.

Exact ties go to a seeded RNG, so a simulation is deterministic.
"""

from __future__ import annotations

import random
from typing import Sequence

from .sim_workers import DecodeWorker, PrefillWorker

POLICIES = ("kv", "round_robin", "random", "least_loaded")

_DECODE_REQUEST_TOKENS = 256
_FREE_RESERVE_FRAC = 0.05
_NO_ROOM_COST = 1e15


class SimRouter:
    def __init__(self, policy: str, decode: Sequence[DecodeWorker], prefill: Sequence[PrefillWorker],
                 block_size: int, disagg_threshold_tokens: int, seed: int = 0, overlap_weight: float = 1.0) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}: choose one of {', '.join(POLICIES)}")
        self.policy = policy
        self.decode = list(decode)
        self.prefill = list(prefill)
        self.block_size = block_size
        self.threshold = disagg_threshold_tokens
        self.overlap_weight = overlap_weight
        self._rng = random.Random(seed)
        self._rr_decode = 0
        self._rr_prefill = 0
        self.num_local = 0
        self.num_remote = 0

    def route(self, input_len: int, hashes: Sequence[int], now: float) -> tuple[DecodeWorker, PrefillWorker | None]:
        if self.policy == "kv":
            d, p = self._route_kv(input_len, hashes, now)
        else:
            d, p = self._route_simple(input_len)
        if p is None:
            self.num_local += 1
        else:
            self.num_remote += 1
        return d, p

    def _pick(self, costs: list[tuple[float, object]]):
        best = min(c for c, _ in costs)
        tied = [w for c, w in costs if c == best]
        return tied[0] if len(tied) == 1 else self._rng.choice(tied)

    def _route_kv(self, n: int, hashes: Sequence[int], now: float):
        bs = self.block_size
        max_hit = min(len(hashes), (n - 1) // bs)
        prompt_blocks = -(-n // bs)
        costs = []
        hits = {}
        for d in self.decode:
            hit = d.view.match(hashes, max_hit, now) if max_hit else 0
            hits[d] = hit
            used = (d.num_total_blocks - d.num_free_blocks) * bs
            cost = (used + _DECODE_REQUEST_TOKENS * d.num_requests() + d.num_queued_prefill_tokens()
                    + self.overlap_weight * (n - hit * bs))
            waiting_blocks = sum(-(-s.prompt_len // bs) for s in d.waiting)
            free_after = d.num_free_blocks - waiting_blocks - (prompt_blocks - hit)
            reserve = _FREE_RESERVE_FRAC * d.num_total_blocks
            if free_after < reserve:
                cost += 8 * bs * (reserve - free_after)
                if free_after < 0:
                    cost += _NO_ROOM_COST
            costs.append((cost, d))
        d = self._pick(costs)
        p = None
        if n - hits[d] * bs >= self.threshold and self.prefill:
            costs = []
            for w in self.prefill:
                hit = w.view.match(hashes, max_hit, now) if max_hit else 0
                costs.append((self.overlap_weight * (n - hit * bs) + w.num_queued_tokens, w))
            p = self._pick(costs)
        full = hashes[: n // bs]
        if full:
            d.view.add_optimistic(full, now)
            if p is not None:
                p.view.add_optimistic(full, now)
        return d, p

    def _route_simple(self, n: int):
        if self.policy == "round_robin":
            d = self.decode[self._rr_decode % len(self.decode)]
            self._rr_decode += 1
        elif self.policy == "random":
            d = self._rng.choice(self.decode)
        else:
            d = min(self.decode, key=lambda w: (w.num_requests(), w.name))
        p = None
        if n >= self.threshold and self.prefill:
            if self.policy == "round_robin":
                p = self.prefill[self._rr_prefill % len(self.prefill)]
                self._rr_prefill += 1
            elif self.policy == "random":
                p = self._rng.choice(self.prefill)
            else:
                p = min(self.prefill, key=lambda w: (w.num_inflight, w.name))
        return d, p
