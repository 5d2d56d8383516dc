"""The cluster simulator against queueing theory and the engine's rules.

Every profile here is hand-made, so each expected figure follows from the cost model
on paper: a prefill of ``n`` tokens takes ``prefill_token_s * n``, a decode step
``iteration_s`` (plus the per-sequence terms where a test sets them).
"""

from __future__ import annotations

import random

import pytest

from pdserve.loadtest.profile import CostFit, DeploymentInfo, Profile
from pdserve.loadtest.simulator import SLO, ClusterConfig, SimRequest, simulate


def _profile(iteration_s=0.0, prefill_token_s=0.0, decode_seq_s=0.0, remote_overhead_s=0.0, local_overhead_s=0.0,
             **deployment) -> Profile:
    fit = CostFit(iteration_s=iteration_s, prefill_token_s=prefill_token_s, prefill_attn_s=0.0,
                  decode_seq_s=decode_seq_s, decode_ctx_s=0.0, remote_overhead_s=remote_overhead_s,
                  local_overhead_s=local_overhead_s)
    return Profile(DeploymentInfo(**deployment), fit)


def _poisson(num: int, rate: float, input_len: int, output_len: int, seed: int = 0) -> list[SimRequest]:
    rng = random.Random(seed)
    t = 0.0
    out = []
    for i in range(num):
        t += rng.expovariate(rate)
        out.append(SimRequest(i, t, input_len, output_len))
    return out


def test_one_prefill_worker_is_an_md1_queue():
    # One prompt per iteration (budget = prompt length), deterministic service S, Poisson
    # arrivals, no overheads: the prefill worker is M/D/1 and the mean wait in its queue is
    # Pollaczek-Khinchine's rho*S / (2(1-rho)).
    n, service_s, rate = 100, 0.1, 5.0
    profile = _profile(prefill_token_s=service_s / n, max_num_batched_tokens=n, disagg_threshold_tokens=1)
    result = simulate(profile, ClusterConfig(1, 1), _poisson(20_000, rate, n, 1, seed=1))
    mean_wait = sum(r.prefill_wait_s for r in result.results) / len(result.results)
    rho = rate * service_s
    expected = rho * service_s / (2 * (1 - rho))
    # 20k customers at rho=0.5: the sample mean's spread across seeds is about 3%; 8% is
    # comfortably outside it yet far below a model error (M/M/1 would predict 2x).
    assert mean_wait == pytest.approx(expected, rel=0.08)
    assert all(r.is_remote_prefill for r in result.results)
    # TTFT is longer than wait + service when the worker was busy: a finished prompt's KV
    # write is a command that waits for the worker's next iteration (as in the engine).
    assert all(r.ttft_s >= r.prefill_wait_s + service_s - 1e-9 for r in result.results)


def test_kv_write_waits_for_the_next_prefill_iteration_only_with_tp():
    # Two prompts 10 ms apart on one prefill worker: the second arrives during the first's
    # iteration. At TP 1 the first's KV write starts as its iteration ends (pdserve runs
    # transfer calls beside the engine loop); at TP 2 it is a command between steps, so
    # it waits for the second's iteration.
    profile = _profile(prefill_token_s=1e-3, max_num_batched_tokens=100, disagg_threshold_tokens=1)
    requests = [SimRequest(0, 0.0, 100, 1), SimRequest(1, 0.01, 100, 1)]
    first, second = simulate(profile, ClusterConfig(1, 1), requests).results
    assert first.ttft_s == pytest.approx(0.1)
    assert second.ttft_s == pytest.approx(0.19)
    # TP 2 at efficiency 1: each iteration takes half as long (50 ms).
    first, second = simulate(profile, ClusterConfig(1, 1, prefill_tp=2, tp_efficiency=1.0), requests).results
    assert first.ttft_s == pytest.approx(0.1)  # written after the second's iteration, not at 0.05
    assert second.ttft_s == pytest.approx(0.09)


def test_constant_decode_step_gives_tpot_equal_to_the_step():
    step_s = 0.02
    profile = _profile(iteration_s=step_s)
    result = simulate(profile, ClusterConfig(1, 2), _poisson(200, 20.0, 300, 50))
    for r in result.results:
        assert r.tpot_s == pytest.approx(step_s)
    assert result.summary["tpot_ms"]["p99"] == pytest.approx(step_s * 1e3)


def test_decode_step_grows_with_the_batch():
    # Everything at once on one decode worker: 8 requests decode together, so each step is
    # iteration_s + 8 * decode_seq_s.
    profile = _profile(iteration_s=0.01, decode_seq_s=0.002)
    requests = [SimRequest(i, 0.0, 32, 20) for i in range(8)]
    result = simulate(profile, ClusterConfig(1, 1), requests)
    for r in result.results:
        assert r.tpot_s == pytest.approx(0.01 + 8 * 0.002)


def test_kv_capacity_too_small_makes_requests_wait():
    profile = _profile(iteration_s=0.01, prefill_token_s=1e-4)
    requests = [SimRequest(i, 0.01 * i, 320, 40) for i in range(40)]
    roomy = simulate(profile, ClusterConfig(1, 1, kv_blocks_per_decode_worker=4096), requests)
    # 23 blocks per request at most: 50 blocks hold two at a time.
    tight = simulate(profile, ClusterConfig(1, 1, kv_blocks_per_decode_worker=50), requests)
    assert roomy.summary["max_decode_waiting"] == 0
    assert tight.summary["max_decode_waiting"] > 10
    assert tight.summary["ttft_ms"]["p50"] > 3 * roomy.summary["ttft_ms"]["p50"]
    for result in (roomy, tight):
        assert result.summary["num_completed"] == 40
        assert result.summary["num_leaked_blocks"] == 0


def test_decode_growth_beyond_capacity_preempts_and_recomputes():
    # Prompts fit (2 blocks each, 3 admitted) but their outputs do not: growing requests
    # preempt the latest admitted one, which is recomputed later; all finish, no leak.
    profile = _profile(iteration_s=0.001, prefill_token_s=1e-5)
    requests = [SimRequest(i, 0.0, 32, 100) for i in range(3)]
    result = simulate(profile, ClusterConfig(1, 1, kv_blocks_per_decode_worker=12), requests)
    s = result.summary
    assert s["num_preemptions"] > 0
    assert s["num_completed"] == 3 and s["num_leaked_blocks"] == 0
    assert s["prefill_tokens_computed"] > 3 * 32  # recomputation


def test_request_larger_than_a_decode_worker_is_refused():
    with pytest.raises(ValueError, match="KV capacity"):
        simulate(_profile(), ClusterConfig(1, 1, kv_blocks_per_decode_worker=4), [SimRequest(0, 0.0, 100, 10)])


def test_threshold_decides_local_or_remote_prefill():
    profile = _profile(iteration_s=0.001, prefill_token_s=1e-5, disagg_threshold_tokens=256)
    requests = [SimRequest(i, 0.1 * i, 100 if i % 2 else 600, 4) for i in range(20)]
    for policy in ("kv", "round_robin", "least_loaded"):
        result = simulate(profile, ClusterConfig(2, 2, policy=policy), requests)
        for r in result.results:
            assert r.is_remote_prefill == (r.input_len >= 256), (policy, r)


def test_overheads_add_to_ttft_by_path():
    profile = _profile(iteration_s=0.01, prefill_token_s=1e-4, remote_overhead_s=0.05, local_overhead_s=0.02)
    remote = simulate(profile, ClusterConfig(1, 1), [SimRequest(0, 0.0, 500, 1)]).results[0]
    local = simulate(profile, ClusterConfig(1, 1), [SimRequest(0, 0.0, 100, 1)]).results[0]
    assert remote.ttft_s == pytest.approx(0.05 + 0.01 + 500e-4)
    assert local.ttft_s == pytest.approx(0.02 + 0.01 + 100e-4)


def _shared_prefix(num: int, num_groups: int, prefix_blocks: int, suffix_blocks: int, seed: int = 0):
    rng = random.Random(seed)
    out = []
    for i in range(num):
        g = rng.randrange(num_groups)
        hashes = tuple(hash(("p", g, j)) for j in range(prefix_blocks))
        hashes += tuple(hash(("s", i, j)) for j in range(suffix_blocks))
        out.append(SimRequest(i, 0.05 * i, 16 * (prefix_blocks + suffix_blocks), 2, hashes))
    return out


def test_kv_policy_hits_the_prefix_cache_more_than_round_robin():
    # 4 prefixes of 32 blocks, 2 prefill workers caching 80 blocks each (2.5 prefixes);
    # threshold 0 so every prefill is remote, on the pool whose caches we compare.
    profile = _profile(iteration_s=0.001, prefill_token_s=1e-5, kv_blocks_per_prefill_worker=80,
                       disagg_threshold_tokens=0)
    requests = _shared_prefix(400, 4, 32, 2)
    kv = simulate(profile, ClusterConfig(2, 1, policy="kv"), requests).summary
    rr = simulate(profile, ClusterConfig(2, 1, policy="round_robin"), requests).summary
    total = sum(r.input_len for r in requests)
    assert kv["prefix_hit_tokens"] > 0.85 * 400 * 32 * 16
    assert kv["prefix_hit_tokens"] > 1.3 * rr["prefix_hit_tokens"]
    assert kv["prefill_tokens_computed"] == total - kv["prefix_hit_tokens"]
    assert kv["prefill_tokens_computed"] < rr["prefill_tokens_computed"]


def test_closed_loop_keeps_concurrency_requests_in_flight():
    profile = _profile(iteration_s=0.01, prefill_token_s=1e-4)
    requests = [SimRequest(i, 0.0, 300, 10 + i % 7) for i in range(60)]
    result = simulate(profile, ClusterConfig(1, 1), requests, concurrency=4)
    events = sorted([(r.arrival_s, 1) for r in result.results] + [(r.arrival_s + r.e2e_s, -1) for r in result.results],
                    key=lambda e: (e[0], e[1]))
    in_flight = peak = 0
    for _, delta in events:
        in_flight += delta
        peak = max(peak, in_flight)
    assert peak == 4


def test_follow_up_turn_starts_after_the_previous_one_ends():
    profile = _profile(iteration_s=0.01, prefill_token_s=1e-4)
    requests = [SimRequest(0, 0.0, 300, 20), SimRequest(1, 0.0, 400, 20, follows=0), SimRequest(2, 0.5, 300, 5)]
    by_id = {r.request_id: r for r in simulate(profile, ClusterConfig(1, 1), requests).results}
    assert by_id[1].arrival_s == pytest.approx(by_id[0].arrival_s + by_id[0].e2e_s)


def test_goodput_counts_requests_within_slo():
    profile = _profile(iteration_s=0.02, prefill_token_s=1e-4)
    requests = [SimRequest(i, 0.1 * i, 300, 10) for i in range(50)]
    met = simulate(profile, ClusterConfig(1, 1), requests, slo=SLO(ttft_ms=1000, tpot_ms=25)).summary
    missed = simulate(profile, ClusterConfig(1, 1), requests, slo=SLO(tpot_ms=15)).summary
    assert met["slo_attainment"] == 1.0 and met["goodput"] == pytest.approx(met["request_throughput"])
    assert missed["slo_attainment"] == 0.0 and missed["goodput"] == 0.0
    assert met["goodput_per_gpu"] == pytest.approx(met["goodput"] / 2)


def test_simulation_is_deterministic():
    profile = _profile(iteration_s=0.01, prefill_token_s=1e-4)
    requests = _shared_prefix(100, 3, 20, 3)
    a = simulate(profile, ClusterConfig(2, 2, policy="random", seed=3), requests)
    b = simulate(profile, ClusterConfig(2, 2, policy="random", seed=3), requests)
    assert a.results == b.results


@pytest.mark.parametrize("kwargs, match", [
    ({"num_prefill": -1, "num_decode": 1}, "num_prefill"),
    ({"num_prefill": 1, "num_decode": 0}, "num_decode"),
    ({"num_prefill": 1, "num_decode": 1, "decode_tp": 0}, "decode_tp"),
    ({"num_prefill": 1, "num_decode": 1, "policy": "fastest"}, "fastest"),
    ({"num_prefill": 1, "num_decode": 1, "tp_efficiency": 1.5}, "tp_efficiency"),
    ({"num_prefill": 1, "num_decode": 1, "kv_blocks_per_decode_worker": 0}, "kv_blocks_per_decode_worker"),
])
def test_bad_cluster_config_names_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClusterConfig(**kwargs)


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="output_len"):
        SimRequest(0, 0.0, 10, 0)
    with pytest.raises(ValueError, match="arrival_s"):
        SimRequest(0, -1.0, 10, 1)
    with pytest.raises(ValueError, match="unique"):
        simulate(_profile(), ClusterConfig(1, 1), [SimRequest(0, 0.0, 10, 1), SimRequest(0, 0.0, 10, 1)])
    with pytest.raises(ValueError, match="follows 7"):
        simulate(_profile(), ClusterConfig(1, 1), [SimRequest(0, 0.0, 10, 1, follows=7)])


def test_the_load_test_workload_spec_drives_the_simulation():
    from pdserve.loadtest import LoadTestConfig, WorkloadBuilder
    from pdserve.loadtest.sim_workload import sim_requests

    cfg = LoadTestConfig("http://127.0.0.1:1", workload="shared-prefix", num_prefix_groups=2, prefix_len=64,
                         suffix_len=40, output_len=7, num_requests=10, rate=5.0)
    requests = sim_requests(cfg, block_size=16)
    planned = WorkloadBuilder(cfg).requests()
    assert [(r.arrival_s, r.input_len, r.output_len) for r in requests] == \
        [(s.arrival_s, s.input_len, s.output_len) for s in planned]
    # Groups alternate: requests 0 and 2 share their 4 prefix blocks, 0 and 1 share nothing.
    assert requests[0].block_hashes[:4] == requests[2].block_hashes[:4]
    assert requests[0].block_hashes[4:] != requests[2].block_hashes[4:]
    assert not set(requests[0].block_hashes) & set(requests[1].block_hashes)

    turns = sim_requests(LoadTestConfig("http://127.0.0.1:1", workload="multi-turn", num_turns=3, input_len=20,
                                        output_len=5, num_requests=6, rate=1.0), block_size=16)
    assert [r.follows for r in turns] == [None, 0, 1, None, 3, 4]
    assert turns[1].block_hashes[: len(turns[0].block_hashes)] == turns[0].block_hashes


def test_shared_host_slows_workers_that_compute_together():
    # A long decode on D while a prompt prefills on P: with a shared host and a 50%
    # colocation slowdown the prefill takes 1.5x; on own devices it does not.
    fit = CostFit(iteration_s=0.01, prefill_token_s=1e-3, prefill_attn_s=0.0, decode_seq_s=0.0, decode_ctx_s=0.0,
                  remote_overhead_s=0.0, local_overhead_s=0.0, prefill_colocation_slowdown=0.5)
    profile = Profile(DeploymentInfo(), fit)
    requests = [SimRequest(0, 0.0, 100, 200), SimRequest(1, 0.5, 300, 1)]
    own = simulate(profile, ClusterConfig(1, 1), requests).results[1]
    shared = simulate(profile, ClusterConfig(1, 1, shared_cpus=2), requests).results[1]
    # 0.5 * (fixed 10 ms + 300 tokens at 1 ms), give or take one 10 ms decode step: the
    # answer lands on a different step boundary of the decode worker.
    assert shared.ttft_s - own.ttft_s == pytest.approx(0.5 * (0.01 + 0.3), abs=0.011)
    with pytest.raises(ValueError, match="shared_cpus"):
        ClusterConfig(1, 1, shared_cpus=0)
