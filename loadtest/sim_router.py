"""The simulator's router: the gateway's policies (router/policy.py) over simulated workers.

The ``kv`` costs are the router's own functions (``pdserve.router.cost``, proto-free), so
the simulator decides as the gateway does; the policies' control flow is re-stated here
because ``pdserve.router.policy`` works on protobuf worker records. One difference: this
router reads the workers' exact current load (the real one reads Stats reports up to a
second old plus its own decisions since).

- ``kv``: decode worker D = the cheapest by ``cost.decode_costs``; D prefills locally
  when it lacks fewer than ``disagg_threshold_tokens`` prompt tokens, else prefill
  worker P = the cheapest by ``cost.prefill_costs``. ``weights`` carries the imbalance
  thresholds (``CostWeights().always_balancing()`` is the old, wait-based cost).
- ``round_robin`` / ``random`` / ``least_loaded``: no cache knowledge; remote prefill
  whenever the prompt has at least ``disagg_threshold_tokens`` tokens.

Exact ties go to a seeded RNG, so a simulation is deterministic.
"""

from __future__ import annotations

import random
from typing import Sequence

from pdserve.router.cost import CostWeights, DecodeCandidate, PrefillCandidate, choose, decode_costs, prefill_costs

from .sim_workers import DecodeWorker, PrefillWorker

POLICIES = ("kv", "round_robin", "random", "least_loaded")



class SimRouter:
    def __init__(self, policy: str, decode: Sequence[DecodeWorker], prefill: Sequence[PrefillWorker],
                 block_size: int, disagg_threshold_tokens: int, seed: int = 0,
                 weights: CostWeights | None = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}: choose one of {', '.join(POLICIES)}")
        self.policy = policy
        self.decode = list(decode)
        self.prefill = list(prefill)
        self.block_size = block_size
        self.threshold = disagg_threshold_tokens
        self.weights = weights or CostWeights()
        self._rng = random.Random(seed)
        self._rr_decode = 0
        self._rr_prefill = 0
        self.num_local = 0
        self.num_remote = 0
        self.last_prefill_hit_tokens = 0
        """The chosen prefill worker's prompt tokens held, as the last kv decision saw them."""

    def route(self, input_len: int, hashes: Sequence[int], now: float) -> tuple[DecodeWorker, PrefillWorker | None]:
        self.last_prefill_hit_tokens = 0
        if self.policy == "kv":
            d, p = self._route_kv(input_len, hashes, now)
        else:
            d, p = self._route_simple(input_len)
        if p is None:
            self.num_local += 1
        else:
            self.num_remote += 1
        return d, p

    def _route_kv(self, n: int, hashes: Sequence[int], now: float):
        bs = self.block_size
        max_hit = min(len(hashes), (n - 1) // bs)
        w = self.weights
        cands = []
        hits = {}
        for d in self.decode:
            hit = hits[d] = d.view.match(hashes, max_hit, now) if max_hit else 0
            waiting_blocks = sum(-(-s.prompt_len // bs) for s in d.waiting)
            cands.append(DecodeCandidate(hit_blocks=hit, used_tokens=(d.num_total_blocks - d.num_free_blocks) * bs,
                                         requests=d.num_requests(), queued_prefill_tokens=d.num_queued_prefill_tokens(),
                                         free_blocks=d.num_free_blocks - waiting_blocks,
                                         total_blocks=d.num_total_blocks))
        d = choose(decode_costs(w, n, bs, cands), self.decode, self._rng)
        p = None
        if n - hits[d] * bs >= self.threshold and self.prefill:
            pcands = [PrefillCandidate(x.view.match(hashes, max_hit, now) if max_hit else 0, x.num_queued_tokens)
                      for x in self.prefill]
            p = choose(prefill_costs(w, n, bs, pcands), self.prefill, self._rng)
            self.last_prefill_hit_tokens = pcands[self.prefill.index(p)].hit_blocks * bs
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
