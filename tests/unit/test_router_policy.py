"""Router policies: kv, round_robin, random, least_loaded; conditional disaggregation."""

from __future__ import annotations

import dataclasses
import random
import subprocess
import sys
import textwrap

import pytest

from pdserve.engine.hashing import block_hashes
from pdserve.proto import pdserve_pb2 as pb
from pdserve.router.policy import POLICIES, NoWorkersError, Router, RoutingDecision

BS = 16


def w(worker_id: str, role=pb.DECODE, num_kv_blocks: int = 4096, started_at_ms: int = 1) -> pb.WorkerInfo:
    return pb.WorkerInfo(worker_id=worker_id, role=role, num_kv_blocks=num_kv_blocks, started_at_ms=started_at_ms)


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 32000) for _ in range(n)]


def cluster(policy="kv", n_decode=2, n_prefill=2, **kw) -> Router:
    r = Router(policy, block_size=BS, **kw)
    r.update_workers([w(f"d{i}") for i in range(n_decode)] + [w(f"p{i}", pb.PREFILL) for i in range(n_prefill)])
    return r


# --------------------------------------------------------------------- basics


def test_policies_and_arguments():
    assert POLICIES == ("kv", "round_robin", "random", "least_loaded")
    with pytest.raises(ValueError, match="unknown routing policy"):
        Router("fastest")
    with pytest.raises(ValueError):
        Router(block_size=0)
    with pytest.raises(ValueError):
        Router(disagg_threshold_tokens=-1)
    with pytest.raises(ValueError):
        cluster().route([])


@pytest.mark.parametrize("policy", POLICIES)
def test_no_decode_worker_raises(policy):
    r = Router(policy)
    with pytest.raises(NoWorkersError):
        r.route([1, 2, 3])
    r.update_workers([w("p0", pb.PREFILL), pb.WorkerInfo(worker_id="x", role=pb.ROLE_UNSPECIFIED)])
    with pytest.raises(RuntimeError, match="no live decode worker"):
        r.route([1, 2, 3])
    r.update_workers([w("p0", pb.PREFILL), w("b0", pb.BOTH)])
    assert r.route([1, 2, 3]).decode_worker_id == "b0"


def test_decision_is_frozen():
    d = cluster().route(prompt(0, 40))
    assert isinstance(d, RoutingDecision)
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.decode_worker_id = "x"  # type: ignore[misc]


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_routes_only_to_live_workers_and_is_deterministic(policy):
    def run(seed):
        r = cluster(policy, n_decode=3, n_prefill=2, seed=seed, disagg_threshold_tokens=64)
        out = []
        for i in range(30):
            p = prompt(i % 5, 50 + 20 * (i % 4))
            d = r.route(p)
            assert d.decode_worker_id in {"d0", "d1", "d2"}
            assert d.prefill_worker_id in {None, "p0", "p1"}
            assert d.policy == policy
            out.append(d)
            if i % 3 == 0:
                r.on_finished(d, p)
        return out

    assert run(1) == run(1)


# ------------------------------------------------------------ simple policies


def test_round_robin():
    r = cluster("round_robin", n_decode=3, n_prefill=2, disagg_threshold_tokens=100)
    long, short = prompt(1, 100), prompt(2, 99)
    ds = [r.route(long) for _ in range(6)]
    assert [d.decode_worker_id for d in ds] == ["d0", "d1", "d2", "d0", "d1", "d2"]
    assert [d.prefill_worker_id for d in ds] == ["p0", "p1", "p0", "p1", "p0", "p1"]
    assert all(d.cached_tokens_prefill == 0 and d.cached_tokens_decode == 0 for d in ds)
    # below the threshold: local prefill, the prefill rotation does not advance
    d = r.route(short)
    assert d.prefill_worker_id is None and d.decode_worker_id == "d0"
    assert r.route(long).prefill_worker_id == "p0"


def test_random_is_seeded_and_covers_workers():
    seqs = []
    for seed in (3, 3, 4):
        r = cluster("random", n_decode=4, n_prefill=3, seed=seed, disagg_threshold_tokens=1)
        seqs.append([(d.decode_worker_id, d.prefill_worker_id) for d in (r.route([1, 2, 3]) for _ in range(40))])
    assert seqs[0] == seqs[1]
    assert seqs[0] != seqs[2]
    assert {d for d, _ in seqs[0]} == {"d0", "d1", "d2", "d3"}
    assert {p for _, p in seqs[0]} == {"p0", "p1", "p2"}


def test_least_loaded_uses_inflight_requests_and_reports():
    r = cluster("least_loaded", n_decode=3, n_prefill=2, disagg_threshold_tokens=10)
    p = prompt(0, 20)
    ds = [r.route(p) for _ in range(3)]
    assert [d.decode_worker_id for d in ds] == ["d0", "d1", "d2"]  # ties by worker id
    assert [d.prefill_worker_id for d in ds] == ["p0", "p1", "p0"]
    r.on_finished(ds[1], p)
    assert r.route(p).decode_worker_id == "d1"
    # reported load counts too: d0 reports 5 running -> d2 (1 in flight) is next
    r.update_load("d0", pb.StatsResponse(worker_id="d0", num_running=5))
    r.update_load("d1", pb.StatsResponse(worker_id="d1", num_running=1, num_waiting=1))
    assert r.route(p).decode_worker_id == "d2"
    assert r.inflight()["d2"] == 2


def test_simple_policies_disaggregate_by_prompt_length_only():
    for policy in ("round_robin", "random", "least_loaded"):
        r = cluster(policy, n_decode=1, n_prefill=1, disagg_threshold_tokens=256)
        assert r.route(prompt(0, 255)).prefill_worker_id is None
        assert r.route(prompt(0, 256)).prefill_worker_id == "p0"
        # no prefill-capable worker: always local
        r.update_workers([w("d0")])
        assert r.route(prompt(0, 5000)).prefill_worker_id is None


# --------------------------------------------------------------------- kv policy


def test_kv_sends_a_family_to_the_worker_holding_its_prefix():
    r = cluster("kv", n_decode=2, n_prefill=2, disagg_threshold_tokens=256)
    prefix = prompt(42, 512)
    # p1 holds the family's prefix (from its KV events). Suffixes of 300 tokens: the
    # decode worker always lacks more than the threshold, so prefill is remote.
    r.index.add_blocks("p1", block_hashes(prefix, BS))
    for i in range(5):
        p = prefix + prompt(100 + i, 300)
        d = r.route(p)
        assert d.prefill_worker_id == "p1"
        assert d.cached_tokens_prefill == 512
        r.on_finished(d, p)
    # a decode worker holding the prefix gets the family and prefills locally
    r2 = cluster("kv", n_decode=2, n_prefill=2, disagg_threshold_tokens=256)
    r2.index.add_blocks("d1", block_hashes(prefix, BS))
    for i in range(5):
        p = prefix + prompt(200 + i, 40)
        d = r2.route(p)
        assert (d.decode_worker_id, d.prefill_worker_id) == ("d1", None)
        assert d.cached_tokens_decode == 512 and d.cached_tokens_prefill == 512
        r2.on_finished(d, p)


def test_kv_follows_its_own_decisions_before_events_arrive():
    r = cluster("kv", n_decode=2, n_prefill=2, disagg_threshold_tokens=256, seed=5)
    families = [prompt(1000 + f, 512) for f in range(2)]
    first = {}
    for i in range(12):
        f = i % 2
        p = families[f] + prompt(i, 30)
        d = r.route(p)
        if f not in first:
            first[f] = d
            assert d.prefill_worker_id is not None and d.cached_tokens_prefill == 0
        else:
            # The decode worker chosen the first time holds the prefix (optimistically)
            # and lacks fewer than 256 tokens: it prefills locally.
            assert d.decode_worker_id == first[f].decode_worker_id
            assert d.prefill_worker_id is None
            assert d.cached_tokens_decode == 512
        r.on_finished(d, p)
    assert r.index.stats().num_optimistic_entries > 0


def test_kv_conditional_disaggregation_threshold():
    prefix = prompt(7, 320)  # 20 blocks
    hashes = block_hashes(prefix, BS)
    for extra, want_local in ((0, True), (95, True), (96, False), (500, False)):
        r = cluster("kv", n_decode=1, n_prefill=1, disagg_threshold_tokens=100)
        r.index.add_blocks("d0", hashes[:16])  # d0 holds 256 tokens
        p = prefix[:260] + prompt(9, extra)
        d = r.route(p)
        uncached = len(p) - d.cached_tokens_decode
        assert d.cached_tokens_decode == 256
        assert (d.prefill_worker_id is None) == want_local, (extra, uncached)
        assert (uncached < 100) == want_local


def test_kv_no_prefill_worker_means_local():
    r = cluster("kv", n_decode=2, n_prefill=0, disagg_threshold_tokens=0)
    d = r.route(prompt(0, 2000))
    assert d.prefill_worker_id is None and d.cached_tokens_prefill == d.cached_tokens_decode == 0


def test_kv_both_role_worker_as_decode_and_prefill():
    r = Router("kv", block_size=BS, disagg_threshold_tokens=64)
    r.update_workers([w("b0", pb.BOTH)])
    # the only prefill-capable worker is the decode worker itself: local prefill
    assert r.route(prompt(0, 1000)).prefill_worker_id is None
    r.update_workers([w("b0", pb.BOTH), w("b1", pb.BOTH), w("d0")])
    r.index.add_blocks("b1", block_hashes(prompt(1, 800), BS))
    r.update_load("b1", pb.StatsResponse(num_running=50, num_kv_blocks_total=4096, num_kv_blocks_free=4000))
    d = r.route(prompt(1, 800) + [5] * 10)
    # b1 is busy decoding, so another worker decodes, but b1 prefills (it holds 800 tokens)
    assert d.decode_worker_id in {"b0", "d0"}
    assert d.prefill_worker_id == "b1" and d.cached_tokens_prefill == 800


def test_kv_cached_tokens_leave_one_token_to_compute():
    r = cluster("kv", n_decode=1, n_prefill=1)
    p = prompt(3, 64)  # exactly 4 blocks, all cached
    r.index.add_blocks("d0", block_hashes(p, BS))
    d = r.route(p)
    assert d.cached_tokens_decode == 48  # the engine recomputes the last block's tokens
    # caller-supplied hashes (e.g. with a tenant salt) are used as given
    salted = block_hashes(p, BS, extra_keys=b"tenant-a")
    d2 = r.route(p, salted)
    assert d2.cached_tokens_decode == 0


def test_kv_load_beats_overlap():
    r = cluster("kv", n_decode=2, n_prefill=1)
    prefix = prompt(11, 512)
    r.index.add_blocks("d0", block_hashes(prefix, BS))
    p = prefix + prompt(12, 30)
    assert r.route(p).decode_worker_id == "d0"
    r.update_load("d0", pb.StatsResponse(num_running=20, num_kv_blocks_total=4096, num_kv_blocks_free=3000))
    r.update_load("d1", pb.StatsResponse(num_running=1, num_kv_blocks_total=4096, num_kv_blocks_free=4000))
    d = r.route(p)
    assert d.decode_worker_id == "d1"
    assert d.prefill_worker_id == "p0"  # d1 lacks 542 tokens


def test_kv_avoids_decode_worker_low_on_free_blocks():
    r = cluster("kv", n_decode=2, n_prefill=1)
    prefix = prompt(13, 256)
    r.index.add_blocks("d0", block_hashes(prefix, BS))
    # d0 has the prefix and the lighter batch, but the rest of the prompt would not fit
    r.update_load("d0", pb.StatsResponse(num_running=1, num_kv_blocks_total=1000, num_kv_blocks_free=20))
    r.update_load("d1", pb.StatsResponse(num_running=3, num_kv_blocks_total=1000, num_kv_blocks_free=900))
    p = prefix + prompt(14, 600)
    assert r.route(p).decode_worker_id == "d1"


def test_kv_own_inflight_estimate_spreads_a_burst():
    r = cluster("kv", n_decode=4, n_prefill=2, disagg_threshold_tokens=256)
    chosen = [r.route(prompt(100 + i, 1000)) for i in range(8)]  # distinct prompts, no reports
    decode_counts = {}
    prefill_counts = {}
    for d in chosen:
        decode_counts[d.decode_worker_id] = decode_counts.get(d.decode_worker_id, 0) + 1
        prefill_counts[d.prefill_worker_id] = prefill_counts.get(d.prefill_worker_id, 0) + 1
    assert decode_counts == {"d0": 2, "d1": 2, "d2": 2, "d3": 2}
    assert prefill_counts == {"p0": 4, "p1": 4}


def test_kv_prefill_load_counts_only_past_the_imbalance_thresholds():
    prefix = prompt(21, 640)
    p = prefix + prompt(22, 200)
    # (queued on p0, overlap weight, thresholds, want): p0 holds 640 of the 840 tokens
    always = {"balance_abs_tokens": 0, "balance_rel": 1.0}
    for queued, weight, kw, want in ((0, 1.0, {}, "p0"),
                                     (700, 1.0, {}, "p0"),  # below the threshold: locality
                                     (700, 1.0, always, "p1"),  # the old cost: 200 + 700 > 840
                                     (700, 2.0, always, "p0"),
                                     (7000, 1.0, {}, "p1"),  # past both thresholds: 200 + 7000 > 840
                                     (7000, 1.0, {"balance_abs_tokens": 8192}, "p0")):
        r = cluster("kv", n_decode=1, n_prefill=2, overlap_weight=weight, **kw)
        r.index.add_blocks("p0", block_hashes(prefix, BS))
        r.update_load("p0", pb.StatsResponse(num_queued_prefill_tokens=queued))
        assert r.route(p).prefill_worker_id == want, (queued, weight, kw)


def test_kv_relative_threshold_needs_both():
    prefix = prompt(23, 640)
    p = prefix + prompt(24, 200)
    # p0 holds the prefix with 10000 queued, p1 has 8000: 2000 apart (< 4096), ratio 1.25 (< 1.5)
    for q0, q1, want in ((10000, 8000, "p0"), (30000, 8000, "p1"), (10000, 1000, "p1")):
        r = cluster("kv", n_decode=1, n_prefill=2)
        r.index.add_blocks("p0", block_hashes(prefix, BS))
        r.update_load("p0", pb.StatsResponse(num_queued_prefill_tokens=q0))
        r.update_load("p1", pb.StatsResponse(num_queued_prefill_tokens=q1))
        assert r.route(p).prefill_worker_id == want, (q0, q1)


def test_kv_follower_waits_for_the_prefix_in_flight():
    """The issue's case: a group's first prefill is still queued on P (an optimistic
    entry, its tokens in P's queue); the follower goes to P, not to an idle Q."""
    r = cluster("kv", n_decode=1, n_prefill=2, disagg_threshold_tokens=1)
    prefix = prompt(25, 1024)
    leader = r.route(prefix + prompt(26, 16))
    follower = r.route(prefix + prompt(27, 16))
    assert leader.prefill_worker_id is not None
    assert follower.prefill_worker_id == leader.prefill_worker_id
    assert follower.cached_tokens_prefill == 1024
    # A fresh group goes to the other, idle worker (equal work: load breaks the tie).
    other = r.route(prompt(28, 1040))
    assert other.prefill_worker_id not in (None, leader.prefill_worker_id)
    # The old cost sends the follower away: the leader's 1040 queued tokens weigh more.
    old = cluster("kv", n_decode=1, n_prefill=2, disagg_threshold_tokens=1, balance_abs_tokens=0, balance_rel=1.0)
    lead = old.route(prefix + prompt(26, 16))
    assert old.route(prefix + prompt(27, 16)).prefill_worker_id != lead.prefill_worker_id


def test_kv_decode_locality_for_a_returning_conversation():
    """Turn 2 of a conversation returns to the decode worker holding turn 1 (local
    prefill of the new tokens only), unless that worker is overloaded."""
    turn1 = prompt(29, 900)
    turn2 = turn1 + prompt(30, 100)
    for running, want_local in ((4, True), (40, False)):
        r = cluster("kv", n_decode=2, n_prefill=1, disagg_threshold_tokens=256)
        r.index.add_blocks("d0", block_hashes(turn1, BS))
        for d in ("d0", "d1"):
            r.update_load(d, pb.StatsResponse(num_kv_blocks_total=4096, num_kv_blocks_free=4000,
                                              num_running=running if d == "d0" else 2))
        got = r.route(turn2)
        if want_local:
            assert (got.decode_worker_id, got.prefill_worker_id, got.cached_tokens_decode) == ("d0", None, 896)
        else:
            assert got.decode_worker_id == "d1" and got.prefill_worker_id == "p0"


def test_kv_thresholds_are_validated():
    for kw in ({"balance_abs_tokens": -1}, {"balance_rel": 0.5}, {"decode_balance_rel": 0.99},
               {"decode_balance_abs_tokens": -5}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            Router("kv", **kw)


def test_prefill_estimate_resets_on_report_and_on_finish():
    r = cluster("kv", n_decode=1, n_prefill=2, seed=0)
    p = prompt(31, 1000)
    d1 = r.route(p)
    assert d1.prefill_worker_id is not None
    first = d1.prefill_worker_id
    other = {"p0", "p1"} - {first}
    # the first prefill is still pending on `first`: a new prompt goes to the other
    d2 = r.route(prompt(32, 1000))
    assert d2.prefill_worker_id in other
    r.on_finished(d1, p)
    r.on_finished(d2, None)
    r.on_finished(d2, None)  # idempotent
    assert r.stats()["untracked_finishes"] == 1
    assert r.inflight() == {}
    # a report resets the router's own delta: the report's queue is what counts
    r.update_load("p0", pb.StatsResponse(num_queued_prefill_tokens=5000))
    d3 = r.route(prompt(33, 1000))
    assert d3.prefill_worker_id == "p1"
    r.update_load("p1", pb.StatsResponse(num_queued_prefill_tokens=0))
    r.update_load("p0", pb.StatsResponse(num_queued_prefill_tokens=0))
    r.on_finished(d3, None)  # routed before p1's last report: p1's estimate stays 0
    assert r.route(prompt(34, 1000)).prefill_worker_id in {"p0", "p1"}


def test_update_workers_drops_departed_and_restarted_workers():
    r = cluster("kv", n_decode=2, n_prefill=2)
    hs = block_hashes(prompt(1, 160), BS)
    for wid in ("d0", "d1", "p0", "p1"):
        r.index.add_blocks(wid, hs)
    r.update_workers([w("d0"), w("d1", started_at_ms=2), w("p0", pb.PREFILL)])
    assert r.index.match(hs) == {"d0": 10, "p0": 10}
    with_load = cluster("least_loaded", n_decode=2, n_prefill=0)
    d = with_load.route([1])
    assert d.decode_worker_id == "d0"
    with_load.update_workers([w("d0", started_at_ms=9), w("d1")])  # d0 restarted
    assert with_load.route([1]).decode_worker_id == "d0"  # its old load is gone
    with_load.on_finished(d, [1])  # finishing the old decision does not touch the new state
    assert with_load.inflight() == {"d0": 1}
    assert set(with_load.workers) == {"d0", "d1"}


def test_tracked_decisions_are_bounded():
    r = cluster("least_loaded", n_decode=2, n_prefill=0, max_tracked=4)
    for _ in range(10):
        r.route([1, 2])
    st = r.stats()
    assert st["tracked_inflight"] == 4 and st["tracked_evicted"] == 6
    assert sum(r.inflight().values()) == 4


def test_stats_counts_decisions():
    r = cluster("kv", n_decode=1, n_prefill=1, disagg_threshold_tokens=100)
    r.route(prompt(1, 50))
    r.route(prompt(2, 500))
    st = r.stats()
    assert st["decisions"] == 2 and st["local_prefill"] == 1 and st["remote_prefill"] == 1
    assert st["prompt_tokens"] == 550 and st["policy"] == "kv"
    assert st["index"].num_optimistic_entries == 3 + 31 + 31


def test_route_is_fast():
    # A loose guard (the benchmark has the real figures): 125-block prompt, 100k blocks.
    import time

    r = Router("kv", block_size=BS)
    r.update_workers([w(f"d{i}") for i in range(8)] + [w(f"p{i}", pb.PREFILL) for i in range(8)])
    rng = random.Random(0)
    for i in range(800):
        r.index.add_blocks(f"{'dp'[i % 2]}{i % 8}", [rng.getrandbits(64) for _ in range(125)])
    p = prompt(5, 2000)
    hs = block_hashes(p, BS)
    r.index.add_blocks("p3", hs[:100])
    best = float("inf")
    for _ in range(50):
        t = time.perf_counter()
        d = r.route(p, hs)
        best = min(best, time.perf_counter() - t)
        r.on_finished(d, p)
    assert best < 0.005


def test_router_never_imports_torch():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        import pdserve.router
        import pdserve.router.index, pdserve.router.policy, pdserve.router.events
        from pdserve.router.policy import Router
        from pdserve.proto import pdserve_pb2 as pb
        r = Router("kv")
        r.update_workers([pb.WorkerInfo(worker_id="d0", role=pb.DECODE)])
        r.route(list(range(100)))
        heavy = [m for m in ("triton", "transformers", "numpy") if m in sys.modules]
        print("OK", heavy)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("OK")


def test_pool_blocks_count_for_every_worker_and_decide_the_prefill_hop():
    # A 1024-token prefix put to the KV pool: every worker can read it, so the work left is
    # the tail; with a 512-token disaggregation threshold no prefill hop is worth it.
    r = cluster(disagg_threshold_tokens=512)
    p = prompt(7, 1040)
    hashes = block_hashes(p, BS)
    r.index.apply_event(pb.KVEvent(worker_id="d1", stored=pb.BlocksStored(block_hashes=hashes[:64],
                                                                         tier=pb.KV_TIER_POOL)))
    d = r.route(p)
    assert d.prefill_worker_id is None and d.cached_tokens_decode == 1024
    # Without it, the prompt is worth a prefill worker.
    assert cluster(disagg_threshold_tokens=512).route(p).prefill_worker_id is not None
