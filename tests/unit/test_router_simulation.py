"""Simulated prefix-cache hit rate of each routing policy on a shared-prefix workload.

What the issue is about: with a few long shared prefixes and prefill workers whose
caches cannot hold all of them, a cache-aware router (``kv``) keeps each prefix on one
worker, so the pool's caches add up; a cache-blind one (round robin) makes every
worker hold every prefix, and they thrash.

Assumptions of the simulation (kept deliberately simple and written down here):

* **Workers.** 2 prefill workers and 1 decode worker; ``disagg_threshold_tokens=0``
  so every prefill is remote and lands in the prefill pool, which is what we measure.
* **Workload.** 400 requests; each picks one of 4 prefixes of 512 tokens (32 blocks of
  16) uniformly at random and appends a unique suffix of 16-64 random tokens.
* **Prefill worker cache.** An LRU of 80 full blocks per worker (2.5 prefixes: the 4
  prefixes fit across the pool but not on one worker). Store-full-blocks semantics, as
  the engine: a prefill hits the longest cached prefix of the prompt's block hashes
  (leaving at least one token to compute), then every full prompt block is cached;
  blocks become most-recent from last to first, so a prompt's tail is evicted before
  its prefix (the engine frees a request's blocks last-first).
* **Events.** Each prefill worker publishes ``BlocksStored`` for blocks it newly
  cached and ``BlocksRemoved`` for blocks it evicted, to a real ``EmbeddedStore``; the
  router's ``EventFollower`` polls only every 4 requests, so events arrive late and the
  router's optimistic entries bridge the lag.
* **Load.** Prefill is instantaneous (the cache changes at routing time); a request
  stays in flight for 8 more routing decisions (its decode), then ``on_finished``;
  every worker reports ``Stats`` (empty prefill queue) every 4 requests.
* **Metric.** Hit rate = prompt tokens found in the prefilling worker's cache / all
  prompt tokens. Ideal = every prefix computed once in the whole run and hit by every
  later request of its family (suffixes never hit).
"""

from __future__ import annotations

import random
from collections import OrderedDict

import pytest

from pdserve.deploy.store import EmbeddedStore
from pdserve.engine.hashing import block_hashes
from pdserve.proto import pdserve_pb2 as pb
from pdserve.router.events import EventFollower
from pdserve.router.policy import POLICIES, Router

BS = 16


class SimulatedPrefixCache:
    """LRU prefix cache of full blocks with the engine's store/evict semantics."""

    def __init__(self, capacity_blocks: int):
        self.capacity = capacity_blocks
        self.lru: OrderedDict[int, None] = OrderedDict()

    def prefill(self, hashes: list[int], num_tokens: int) -> tuple[int, list[int], list[int]]:
        """Returns (hit tokens, newly stored hashes, evicted hashes)."""
        hit = 0
        for h in hashes[: (num_tokens - 1) // BS]:
            if h not in self.lru:
                break
            hit += 1
        new = [h for h in hashes if h not in self.lru]
        for h in reversed(hashes):  # head ends up most recent
            self.lru[h] = None
            self.lru.move_to_end(h)
        evicted = []
        while len(self.lru) > self.capacity:
            evicted.append(self.lru.popitem(last=False)[0])
        return hit * BS, [h for h in new if h in self.lru], evicted


def simulate(policy: str, seed: int, *, num_requests=400, num_prefixes=4, prefix_tokens=512,
             capacity_blocks=80, concurrency=8, event_lag=4, report_every=4) -> tuple[float, float]:
    """(hit rate, ideal hit rate) of ``policy`` on the workload of the module docstring."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(1, 32000) for _ in range(prefix_tokens)] for _ in range(num_prefixes)]
    store = EmbeddedStore()
    router = Router(policy, block_size=BS, disagg_threshold_tokens=0, seed=seed)
    router.update_workers([
        pb.WorkerInfo(worker_id="p0", role=pb.PREFILL, num_kv_blocks=capacity_blocks),
        pb.WorkerInfo(worker_id="p1", role=pb.PREFILL, num_kv_blocks=capacity_blocks),
        pb.WorkerInfo(worker_id="d0", role=pb.DECODE, num_kv_blocks=100_000),
    ])
    follower = EventFollower(store, router.index, registry_interval_s=None)
    caches = {"p0": SimulatedPrefixCache(capacity_blocks), "p1": SimulatedPrefixCache(capacity_blocks)}
    seen: set[int] = set()
    hits = ideal = total = 0
    inflight = []
    for k in range(num_requests):
        f = rng.randrange(num_prefixes)
        tokens = prefixes[f] + [rng.randrange(1, 32000) for _ in range(rng.randrange(16, 65))]
        hashes = block_hashes(tokens, BS)
        decision = router.route(tokens, hashes)
        assert decision.prefill_worker_id is not None  # threshold 0: always remote
        hit, new, evicted = caches[decision.prefill_worker_id].prefill(hashes, len(tokens))
        events = []
        if evicted:
            events.append(pb.KVEvent(removed=pb.BlocksRemoved(block_hashes=evicted)))
        if new:
            events.append(pb.KVEvent(stored=pb.BlocksStored(block_hashes=new, block_size=BS)))
        if events:
            store.publish_kv_events(decision.prefill_worker_id, events)
        hits += hit
        total += len(tokens)
        ideal += prefix_tokens if f in seen else 0
        seen.add(f)
        inflight.append((decision, tokens))
        if len(inflight) > concurrency:
            router.on_finished(*inflight.pop(0))
        if k % event_lag == 0:
            follower.poll()
        if k % report_every == 0:
            for wid in ("p0", "p1"):
                router.update_load(wid, pb.StatsResponse(worker_id=wid, num_kv_blocks_total=capacity_blocks,
                                                         num_kv_blocks_free=capacity_blocks))
    return hits / total, ideal / total


@pytest.fixture(scope="module")
def results() -> dict[str, list[float]]:
    """Fraction of the ideal hit rate, per policy, over 3 seeds."""
    out = {}
    for policy in POLICIES:
        out[policy] = []
        for seed in range(3):
            hit, ideal = simulate(policy, seed)
            out[policy].append(hit / ideal)
    return out


def test_kv_gets_close_to_the_ideal_hit_rate(results):
    assert min(results["kv"]) >= 0.8, results


def test_cache_blind_policies_fall_clearly_below(results):
    for policy in ("round_robin", "random", "least_loaded"):
        assert max(results[policy]) < 0.8, (policy, results)
    assert min(results["kv"]) > max(results["round_robin"]) + 0.2, results


def test_kv_without_any_events_still_keeps_families_together():
    # Events never read: only the router's own (optimistic) entries guide it.
    hit, ideal = simulate("kv", 0, event_lag=10**9)
    assert hit / ideal >= 0.8


def test_ample_cache_makes_every_policy_near_ideal():
    # Sanity check of the simulation: without cache pressure, each of the 2 workers
    # computes each prefix at most once, whatever the policy.
    for policy in ("kv", "round_robin"):
        hit, ideal = simulate(policy, 1, capacity_blocks=1000)
        assert hit / ideal >= 0.95
