"""The kv policy's pure cost functions (router/cost.py), case by case: a prefix queued
on a worker counts as held, load counts only past both imbalance thresholds, decode-side
locality, the free-KV pressure, and the old always-balancing cost as the thresholds at 0."""

import random

import pytest

from pdserve.router.cost import (LOAD_TIEBREAK, NO_ROOM_COST, CostWeights, DecodeCandidate, PrefillCandidate, choose,
                                 decode_costs, prefill_costs)

BS = 16
W = CostWeights()


def best(costs, keys=None):
    keys = keys or list(range(len(costs)))
    return choose(costs, keys, random.Random(0))


def test_prefill_work_decides_below_the_threshold():
    # P holds 1024 of 1040 tokens (its leader's prefill still queued: 1040 tokens); Q is idle.
    cands = [PrefillCandidate(hit_blocks=64, queued_prefill_tokens=1040), PrefillCandidate(0, 0)]
    costs = prefill_costs(W, 1040, BS, cands)
    assert best(costs) == 0
    assert costs[0] == pytest.approx(16 + LOAD_TIEBREAK * 1040) and costs[1] == 1040
    # The old cost (always balancing) prefers the idle worker: 16 + 1040 > 1040.
    assert best(prefill_costs(W.always_balancing(), 1040, BS, cands)) == 1


def test_prefill_load_counts_past_both_thresholds():
    def winner(q_holder, q_other):
        return best(prefill_costs(W, 2000, BS, [PrefillCandidate(120, q_holder), PrefillCandidate(0, q_other)]))
    assert winner(W.balance_abs_tokens, 0) == 0  # at the absolute threshold: not past it
    assert winner(W.balance_abs_tokens + 100, 0) == 1  # 80 + 4196 > 2000
    # far apart in tokens but within the ratio: locality
    assert winner(30_000, 25_000) == 0
    # past the ratio but within the absolute threshold: locality
    assert winner(3000, 100) == 0
    # past both
    assert winner(40_000, 10_000) == 1


def test_equal_work_goes_to_the_least_loaded():
    costs = prefill_costs(W, 500, BS, [PrefillCandidate(0, 300), PrefillCandidate(0, 200), PrefillCandidate(0, 900)])
    assert best(costs) == 1
    dc = decode_costs(W, 500, BS, [DecodeCandidate(0, 4000, 3, 0, 900, 1000), DecodeCandidate(0, 1000, 1, 0, 900, 1000)])
    assert best(dc) == 1


def test_decode_locality_and_its_threshold():
    def cand(hit, requests):
        return DecodeCandidate(hit_blocks=hit, used_tokens=1600, requests=requests, queued_prefill_tokens=0,
                               free_blocks=800, total_blocks=1000)
    # D0 holds a 900-token conversation; a few more running requests than D1: stays local
    assert best(decode_costs(W, 1000, BS, [cand(56, 6), cand(0, 2)])) == 0
    # D0 overloaded (40 vs 2 requests: 9728 tokens more, ratio 5.5): the conversation moves
    assert best(decode_costs(W, 1000, BS, [cand(56, 40), cand(0, 2)])) == 1


def test_decode_pressure_always_applies():
    full = DecodeCandidate(hit_blocks=56, used_tokens=0, requests=0, queued_prefill_tokens=0, free_blocks=5,
                           total_blocks=1000)
    roomy = DecodeCandidate(hit_blocks=0, used_tokens=0, requests=0, queued_prefill_tokens=0, free_blocks=900,
                            total_blocks=1000)
    costs = decode_costs(W, 1000, BS, [full, roomy])
    assert costs[0] >= NO_ROOM_COST and best(costs) == 1


def test_weights_are_validated():
    with pytest.raises(ValueError, match="balance_rel"):
        CostWeights(balance_rel=0.9)
    with pytest.raises(ValueError, match="decode_balance_abs_tokens"):
        CostWeights(decode_balance_abs_tokens=-1)


def test_tiers_device_beats_host_beats_recompute():
    # 1024-token prefix: worker 0 in its KV region, worker 1 in its host tier, worker 2 nowhere
    cands = [PrefillCandidate(64, 0), PrefillCandidate(0, 0, tier_blocks=64), PrefillCandidate(0, 0)]
    costs = prefill_costs(W, 1040, BS, cands)
    assert costs[0] < costs[1] < costs[2]
    assert costs[1] == pytest.approx(16 + W.tier_weight * 1024, rel=1e-6)
    assert best(prefill_costs(W, 1040, BS, cands[1:]), [1, 2]) == 1
    with pytest.raises(ValueError, match="tier_weight"):
        CostWeights(tier_weight=1.5)


def test_tiers_device_beats_host_beats_pool_beats_recompute():
    # 1024-token prefix: in the KV region, the host tier, the KV pool, nowhere.
    cands = [PrefillCandidate(64, 0), PrefillCandidate(0, 0, tier_blocks=64), PrefillCandidate(0, 0, pool_blocks=64),
             PrefillCandidate(0, 0)]
    costs = prefill_costs(W, 1040, BS, cands)
    assert costs[0] < costs[1] < costs[2] < costs[3]
    assert costs[2] == pytest.approx(16 + W.pool_weight * 1024, rel=1e-6)
    assert W.tier_weight < W.pool_weight < W.overlap_weight
    # Decode side alike: host 32 blocks then pool 32 blocks beats the pool alone for all 64.
    d = dict(used_tokens=0, requests=0, queued_prefill_tokens=0, free_blocks=4000, total_blocks=4096)
    costs = decode_costs(W, 1040, BS, [DecodeCandidate(0, tier_blocks=32, pool_blocks=32, **d),
                                       DecodeCandidate(0, pool_blocks=64, **d), DecodeCandidate(0, **d)])
    assert best(costs) == 0 and costs[1] < costs[2]
    with pytest.raises(ValueError, match="pool_weight"):
        CostWeights(pool_weight=-0.1)
