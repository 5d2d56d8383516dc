"""The engine on the cluster-shared KV pool (engine/kv_pool_tier.py) against a real
``mooncake_master`` on loopback: blocks one engine evicts to its host tier are put to the
pool, and another engine (its own client, its own host tier) reads them into its host
tier instead of computing them, with greedy output token-identical to transformers and
to an engine without the pool. A master SIGKILLed while requests wait on the pool costs
no request and no correctness: they compute what they could not read. Each test ends
with every region block free, no tier entry pinned and no host slot left reserved.
"""

from __future__ import annotations

import importlib
import platform
import random
import sys
import time

import pytest

import hf_reference as H
from pdserve.engine import LLM, SamplingParams
from pdserve.kvtransfer.kvpool import KVPoolConfig

pytestmark = pytest.mark.integration

if sys.platform != "linux" or platform.machine() not in ("x86_64", "aarch64"):
    pytest.skip("mooncake-transfer-engine-non-cuda ships Linux x86_64/aarch64 wheels only", allow_module_level=True)
try:  # installed by `make setup` (the kvpool extra): missing is a failure, not a skip
    importlib.import_module("mooncake.store")
except ImportError as e:
    pytest.fail(f"Mooncake is not importable ({e}): run `make setup`", pytrace=False)

from pdserve.deploy.kvpool import MasterProcess  # noqa: E402

MAX_TOKENS = 4
BLOCK_BYTES = 2 * 1024 * 16
"""One block of the tiny llama on one rank (test_kv_tiers sizes its tiers with it too)."""
SP = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def workload(vocab: int, seed: int = 0) -> list[list[int]]:
    """Six 64-token (4-block) prefixes, each in two rounds with other suffixes (1-30 tokens)."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, vocab) for _ in range(64)] for _ in range(6)]
    return [p + [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 31))] for _ in range(2) for p in prefixes]


@pytest.fixture(scope="module")
def case(hf_model_dir):
    """(model dir, prompts: round one then round two, the reference's greedy tokens)."""
    model_dir = hf_model_dir("llama")
    prompts = workload(H.read_config(model_dir)["vocab_size"])
    return model_dir, prompts, H.hf_greedy(model_dir, prompts, MAX_TOKENS)


@pytest.fixture(scope="module")
def master():
    """One master for the module's tests that keep it alive (the crash test has its own)."""
    m = MasterProcess().start()
    yield m
    m.stop()


def pool_config(master: MasterProcess) -> KVPoolConfig:
    return KVPoolConfig(master_address=master.address, segment_size=16 << 20, retry_interval_s=1.0,
                        connect_timeout_s=0.5)


def engine(model_dir, pool: KVPoolConfig | None, **kw) -> LLM:
    """A 16-block KV region (two prompts at a time; earlier prefixes are evicted) over a host tier."""
    return LLM(model_dir, **{"num_kv_blocks": 16, "kv_offload_memory": 1 << 20, "kv_pool": pool, **kw})


def serve(llm: LLM, prompts, batch: int = 2) -> list[list[int]]:
    return [o.outputs[0].token_ids for i in range(0, len(prompts), batch) for o in llm.generate(prompts[i:i + batch], SP)]


def check(got, want, first: int = 0) -> None:
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g == w, f"prompt {first + i}: first difference at token {H.first_mismatch(g, w)}: {g} != {w}"


def wait_for_puts(llm: LLM, timeout_s: float = 30.0) -> None:
    agent = llm.engine.executor.runner.pool
    deadline = time.monotonic() + timeout_s
    while agent.num_pending_puts:
        assert time.monotonic() < deadline, "puts to the KV pool did not end"
        time.sleep(0.02)


def assert_nothing_held(llm: LLM) -> None:
    e = llm.engine
    s = llm.kv_cache_stats()
    assert s.num_free_blocks == s.num_total_blocks
    assert not e.has_unfinished and not e.scheduler.loading and not e.scheduler.pool_fetching
    assert e.kv.host.num_pinned == 0 and e.kv.host.num_reserved == 0 and e.scheduler.num_pool_reserved == 0
    assert not e.scheduler._pool_pinned and not e.scheduler._pool_asked


def test_blocks_one_engine_evicted_are_read_by_another(case, master):
    model_dir, prompts, want = case
    a = engine(model_dir, pool_config(master))
    b = engine(model_dir, pool_config(master))
    off = engine(model_dir, None)
    try:
        assert a.engine.kv.pool_enabled and b.engine.kv.pool_enabled
        check(serve(a, prompts[:6]), want[:6])
        wait_for_puts(a)
        sa = a.engine.stats()
        assert sa.pool_puts > 0 and sa.pool_put_failures == 0, sa
        pool_events = [ev for ev in a.engine.kv.take_events() if ev.tier == "pool"]
        assert pool_events and all(ev.block_hashes for ev in pool_events)  # for the routers

        # Round two on B: the prefixes A evicted come from the pool (A's segment), the rest
        # are misses B computes. Same tokens as transformers and as B's tiers without a pool.
        got = serve(b, prompts[6:])
        check(got, want[6:], first=6)
        sb = b.engine.stats()
        assert sb.pool_hit_tokens >= 64 * 2, sb  # at least two 4-block prefixes read from the pool
        assert sb.tier_hit_tokens >= sb.pool_hit_tokens  # ... and loaded through the host tier
        assert sb.pool_get_failures == 0
        assert serve(off, prompts[6:]) == got
        for llm in (a, b, off):
            assert_nothing_held(llm)
    finally:
        for llm in (a, b, off):
            llm.shutdown()


@pytest.mark.slow
def test_tensor_parallel_ranks_agree_on_what_they_read(case, master):
    """TP 2 (one engine: a process holds one TP group), with a host tier too small for its
    working set, so round two reads its own evicted prefixes back from the pool: each
    rank reads its own shard under its own key, and a read ends when both ranks are done,
    with the smaller of their counts (an all-reduce MIN)."""
    model_dir, prompts, want = case
    llm = engine(model_dir, pool_config(master), kv_offload_memory=4 * BLOCK_BYTES, tensor_parallel_size=2)
    try:
        check(serve(llm, prompts[:6]), want[:6])
        wait_for_puts(llm)
        time.sleep(1.0)  # rank 1's puts (not observable from here) end meanwhile
        check(serve(llm, prompts[6:]), want[6:], first=6)
        s = llm.engine.stats()
        assert s.pool_hit_tokens >= 64 * 2 and s.pool_get_failures == 0, s
        assert_nothing_held(llm)
    finally:
        llm.shutdown()


def test_master_crash_while_serving(case):
    """One engine whose host tier (10 blocks) is too small for its working set: its evicted
    prefixes live on only in the pool (its own segment). Round two reads them back, two
    requests at a time; once a read landed and another is in flight, the master is
    SIGKILLed. Every request completes with the reference's tokens (the reads that failed
    computed their blocks), and the engine keeps serving afterwards."""
    model_dir, prompts, want = case
    m = MasterProcess().start()
    llm = engine(model_dir, pool_config(m), kv_offload_memory=8 * BLOCK_BYTES, max_num_seqs=2)
    killed = False
    try:
        check(serve(llm, prompts[:6]), want[:6])
        wait_for_puts(llm)
        e = llm.engine
        for i in range(6, 12):
            e.add_request(f"r{i}", prompts[i], SP)
        out: dict[str, list[int]] = {}
        t0 = time.monotonic()
        while e.has_unfinished:
            for d in e.step():
                out.setdefault(d.request_id, []).extend(d.token_ids)
            if not killed and e.scheduler.pool_fetching and e.stats().pool_hit_tokens:
                m.kill()  # a read in flight, more to come: the rest of the queue asks a dead master
                killed = True
            assert time.monotonic() - t0 < 60, "requests did not complete after the master died"
        assert killed, "no pool read was in flight after a first one landed"
        check([out[f"r{i}"] for i in range(6, 12)], want[6:], first=6)
        for i in range(6, 12):
            assert e.take_finished(f"r{i}", prompts[i]) is not None
        s = e.stats()
        assert s.pool_get_failures + s.pool_put_failures > 0, s
        # Still serving, from its own tiers and by computing: the same tokens.
        check(serve(llm, prompts[:6]), want[:6])
        assert_nothing_held(llm)
    finally:
        if killed:  # leaving a dead master's pool takes the library ~15 s of retries
            m = MasterProcess(rpc_port=m.rpc_port, metrics_port=m.metrics_port).start()
        llm.shutdown()
        m.stop()


def test_bad_configuration_and_unreachable_master(case):
    model_dir, prompts, want = case
    with pytest.raises(ValueError, match="--kv-offload-memory"):
        LLM(model_dir, num_kv_blocks=16, kv_pool=KVPoolConfig(master_address="127.0.0.1:9"))
    # A master that does not answer at start: logged, and the engine serves without the pool.
    llm = engine(model_dir, KVPoolConfig(master_address="127.0.0.1:9", connect_timeout_s=0.2))
    try:
        assert not llm.engine.kv.pool_enabled
        check(serve(llm, prompts[:2]), want[:2])
        assert_nothing_held(llm)
    finally:
        llm.shutdown()
