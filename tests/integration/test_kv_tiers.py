"""The host KV tier (engine/kv_tiers.py) against transformers: blocks evicted from a
small KV region go to host memory and come back on a prefix hit, and greedy output stays
token-identical to the Hugging Face reference -- alone, with chunked prefill and
preemption, and at tensor-parallel size 2 (every rank moves its own shard). Each test
ends with every region block free, no host slot pinned, and the tier's counters showing
that blocks really went down and came back."""

from __future__ import annotations

import random

import pytest

import hf_reference as H
from pdserve.engine import LLM, SamplingParams, kv_tiers

pytestmark = pytest.mark.integration

MAX_TOKENS = 12


def workload(vocab: int, seed: int = 0) -> list[list[int]]:
    """Six 64-token prefixes, each used by three requests (suffixes 1-30 tokens), in
    rounds: with a 24-block region, each round evicts the previous one's prefixes."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, vocab) for _ in range(64)] for _ in range(6)]
    return [p + [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 31))] for _ in range(3) for p in prefixes]


@pytest.fixture(scope="module")
def case(hf_model_dir):
    """(model dir, prompts, the reference's greedy tokens): computed once for the module."""
    model_dir = hf_model_dir("llama")
    prompts = workload(H.read_config(model_dir)["vocab_size"])
    return model_dir, prompts, H.hf_greedy(model_dir, prompts, MAX_TOKENS)


def run_and_check(llm: LLM, case, batch: int) -> None:
    model_dir, prompts, want = case
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    got = []
    for i in range(0, len(prompts), batch):
        got += [o.outputs[0].token_ids for o in llm.generate(prompts[i:i + batch], sp)]
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"prompt {i}: first difference at token {H.first_mismatch(g, w)}: {g} != {w}"
    e = llm.engine
    s = llm.kv_cache_stats()
    assert s.num_free_blocks == s.num_total_blocks
    assert e.kv.host.num_pinned == 0 and not e.scheduler.loading
    stats = e.stats()
    assert stats.tier_hit_tokens >= 64 * 6, stats  # later rounds found their prefixes in the host tier
    assert stats.num_host_blocks_used > 0


@pytest.mark.parametrize("config,batch", [
    (dict(), 3),
    (dict(prefill_chunk_size=16, max_num_batched_tokens=48), 3),
    (dict(num_kv_blocks=14), 6),  # too small for the batch: preemption, recompute with tier hits
])
def test_host_tier_is_exact(case, config, batch):
    llm = LLM(case[0], **{"num_kv_blocks": 24, "kv_offload_memory": 1 << 20, **config})
    try:
        run_and_check(llm, case, batch)
        runner = llm.engine.executor.runner
        assert runner.host_kv.num_saved > 0 and runner.host_kv.num_loaded > 0
    finally:
        llm.shutdown()


@pytest.mark.slow
def test_host_tier_tensor_parallel_is_exact(case):
    llm = LLM(case[0], num_kv_blocks=24, kv_offload_memory=1 << 20, tensor_parallel_size=2)
    try:
        run_and_check(llm, case, batch=3)
    finally:
        llm.shutdown()


def test_abort_while_loading_leaks_nothing(case):
    model_dir, prompts, _ = case
    llm = LLM(model_dir, num_kv_blocks=24, kv_offload_memory=1 << 20)
    try:
        sp = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
        llm.generate(prompts[:6], sp)  # six prefixes: the first ones are evicted to the host tier
        e = llm.engine
        e.add_request("again", prompts[6], sp)  # prefix 0 again: only the host tier has it
        e.step()
        assert "again" in e.scheduler.loading
        e.abort_request("again")
        assert e.kv.host.num_pinned == 0
        while e.has_unfinished:
            e.step()
        e.step()  # the aborted request's copies land before its blocks serve anyone else
        s = llm.kv_cache_stats()
        assert s.num_free_blocks == s.num_total_blocks
        assert e.kv.host.num_pinned == 0
    finally:
        llm.shutdown()


def test_bad_host_tier_configuration(hf_model_dir):
    model_dir = hf_model_dir("llama")
    with pytest.raises(ValueError, match="cannot hold one KV block"):
        LLM(model_dir, num_kv_blocks=24, kv_offload_memory=100)
    with pytest.raises(ValueError, match="offload_memory_bytes must be >= 0"):
        LLM(model_dir, num_kv_blocks=24, kv_offload_memory=-1)
    with pytest.raises(ValueError, match="needs enable_prefix_caching"):
        LLM(model_dir, num_kv_blocks=24, kv_offload_memory=1 << 20, enable_prefix_caching=False)


def test_disk_tier_is_exact_and_survives_a_restart(case, tmp_path, monkeypatch):
    """A host tier of 8 blocks spills to disk; a second engine on the same directory
    (a restarted worker) re-indexes the files, publishes them, and serves the prefixes
    from disk: exact, and without computing them. The first engine uses the default
    (page-cache) I/O; the restarted one turns on O_DIRECT reads (PDSERVE_KV_DISK_DIRECT)
    and finds nothing in the page cache (as after a reboot), so its reads take the
    O_DIRECT path where the file system allows it."""
    model_dir, prompts, want = case
    monkeypatch.delenv("PDSERVE_KV_DISK_DIRECT", raising=False)
    llm = LLM(model_dir, num_kv_blocks=24, kv_offload_memory=8 * 2 * 1024 * 16, kv_offload_dir=tmp_path / "kv")
    try:
        e = llm.engine
        assert 0 < e.num_host_blocks <= 10 and e.num_disk_blocks > 0
        run_and_check(llm, case, batch=3)
        files = e.executor.runner.host_kv.disk
        assert files.num_written > 0 and not files.direct
        assert len(e.kv.disk) > 0 and e.kv.disk.num_pinned == 0
        held = len(e.kv.disk)
        with pytest.raises(ValueError, match="in use by another worker"):
            LLM(model_dir, num_kv_blocks=24, kv_offload_memory=1 << 20, kv_offload_dir=tmp_path / "kv")
    finally:
        llm.shutdown()
    monkeypatch.setenv("PDSERVE_KV_DISK_DIRECT", "1")
    again = LLM(model_dir, num_kv_blocks=24, kv_offload_memory=8 * 2 * 1024 * 16, kv_offload_dir=tmp_path / "kv")
    try:
        e = again.engine
        assert len(e.kv.disk) == held
        stored = [ev for ev in e.kv.take_events() if ev.tier == "disk"]
        assert sum(len(ev.block_hashes) for ev in stored) == held  # published for the routers
        sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
        monkeypatch.setattr(kv_tiers, "cached_pages", lambda fd, size: 0)  # a cold page cache
        outs = again.generate(prompts[-3:], sp)
        assert [o.outputs[0].token_ids for o in outs] == want[-3:]
        disk = e.executor.runner.host_kv.disk
        assert e.stats().tier_hit_tokens > 0 and disk.num_read > 0
        assert disk.num_direct_reads == (disk.num_read if disk.direct else 0)
        assert disk.direct or not kv_tiers._supports_direct(disk.dir)
        s = again.kv_cache_stats()
        assert s.num_free_blocks == s.num_total_blocks and e.kv.disk.num_pinned == 0
    finally:
        again.shutdown()


def test_bad_disk_tier_configuration(case, tmp_path):
    model_dir = case[0]
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match="not writable"):
        LLM(model_dir, num_kv_blocks=24, kv_offload_memory=1 << 20, kv_offload_dir=tmp_path / "a-file" / "kv")
    with pytest.raises(ValueError, match="needs offload_memory_bytes"):
        LLM(model_dir, num_kv_blocks=24, kv_offload_dir=tmp_path / "kv")
    with pytest.raises(ValueError, match="cannot hold one KV block"):
        LLM(model_dir, num_kv_blocks=24, kv_offload_memory=1 << 20, kv_offload_dir=tmp_path / "kv",
            kv_offload_dir_bytes=10)


def test_async_engine_runs_a_tier_hit_on_an_idle_engine(case):
    """The serving loop (AsyncEngine) with nothing else to do must still step a request
    that waits for its tier blocks (it once went idle with it in ``loading``: the worker
    hung until another request came)."""
    import asyncio

    from pdserve.engine.async_engine import AsyncEngine

    model_dir, prompts, want = case
    llm = LLM(model_dir, num_kv_blocks=8, kv_offload_memory=1 << 20)
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    a, b = prompts[0], prompts[1]  # different prefixes: b evicts a's blocks to the host tier

    async def run(aengine, rid, prompt) -> list[int]:
        tokens = []
        async for deltas in aengine.generate(rid, prompt, sp):
            tokens += [t for d in deltas for t in d.token_ids]
        return tokens

    async def main():
        aengine = AsyncEngine(llm.engine, asyncio.get_running_loop())
        try:
            assert await asyncio.wait_for(run(aengine, "a", a), 60) == want[0]
            assert await asyncio.wait_for(run(aengine, "b", b), 60) == want[1]
            hits = llm.engine.stats().tier_hit_tokens
            assert await asyncio.wait_for(run(aengine, "a2", a), 60) == want[0]
            assert llm.engine.stats().tier_hit_tokens > hits
        finally:
            aengine.shutdown()

    try:
        asyncio.run(main())
        s = llm.kv_cache_stats()
        assert s.num_free_blocks == s.num_total_blocks and llm.engine.kv.host.num_pinned == 0
    finally:
        llm.shutdown()
