"""AsyncEngine: an engine thread serving concurrent asyncio consumers."""

from __future__ import annotations

import asyncio

import pytest

import hf_reference as H
from pdserve.engine import LLM, SamplingParams
from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.config import CacheConfig, EngineConfig, ModelConfig
from pdserve.engine.engine import LLMEngine

pytestmark = pytest.mark.integration


def test_concurrent_streams_cancel_and_bad_input(hf_model_dir):
    model_dir = hf_model_dir("llama")
    prompts = H.random_prompts(1000, [5, 20, 33, 70], seed=8)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    with LLM(model_dir, num_kv_blocks=64) as llm:
        ref = [o.token_ids for o in llm.generate(prompts, params)]

    async def main():
        engine = LLMEngine(EngineConfig(model=ModelConfig.from_dir(model_dir), cache=CacheConfig(num_blocks=64)))
        aengine = AsyncEngine(engine, asyncio.get_running_loop())

        async def collect(rid, prompt, p=params):
            tokens = []
            async for deltas in aengine.generate(rid, prompt, p):
                for d in deltas:
                    tokens.extend(d.token_ids)
            return tokens

        async def cancelled():
            agen = aengine.generate("gone", prompts[3], SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True))
            await agen.__anext__()
            await agen.aclose()  # the client went away after the first token

        try:
            outs = await asyncio.gather(*(collect(str(i), p) for i, p in enumerate(prompts)), cancelled())
            assert outs[:4] == ref
            with pytest.raises(ValueError, match="99999"):
                await collect("bad", [99999])
            assert await collect("after", prompts[0]) == ref[0]
            stats = await aengine.call(engine.kv_cache_stats)
            assert stats.num_free_blocks == stats.num_total_blocks
            assert await aengine.call(engine.request_ids) == []
        finally:
            aengine.shutdown()

    asyncio.run(main())


def test_a_lagging_consumer_gets_the_steps_it_missed_merged_in_order(hf_model_dir):
    """A consumer slower than the engine gets every step it missed at once: one delta per
    completion per read, each token and logprob exactly once and in order, the finish
    reason on the last delta only."""
    model_dir = hf_model_dir("llama")
    prompt = H.random_prompts(1000, [9], seed=3)[0]
    params = SamplingParams(n=2, temperature=0.8, seed=5, max_tokens=40, ignore_eos=True, logprobs=2)
    with LLM(model_dir, num_kv_blocks=64) as llm:
        ref = llm.generate([prompt], params)[0].outputs

    async def main():
        engine = LLMEngine(EngineConfig(model=ModelConfig.from_dir(model_dir), cache=CacheConfig(num_blocks=64)))
        aengine = AsyncEngine(engine, asyncio.get_running_loop())
        got = {i: {"tokens": [], "logprobs": [], "reasons": []} for i in range(2)}
        sizes = []
        try:
            async for deltas in aengine.generate("lag", prompt, params):
                assert len({d.index for d in deltas}) == len(deltas)
                for d in deltas:
                    g = got[d.index]
                    assert not g["reasons"] or g["reasons"][-1] is None  # nothing after a finish
                    g["tokens"] += d.token_ids
                    g["logprobs"] += d.logprobs
                    g["reasons"].append(d.finish_reason)
                    sizes.append(len(d.token_ids))
                await asyncio.sleep(0.05)  # a slow client: the engine steps on meanwhile
            stats = await aengine.call(engine.kv_cache_stats)
            assert stats.num_free_blocks == stats.num_total_blocks
        finally:
            aengine.shutdown()
        return got, sizes

    got, sizes = asyncio.run(main())
    for i, out in enumerate(ref):
        assert got[i]["tokens"] == out.token_ids
        assert got[i]["logprobs"] == out.logprobs
        assert got[i]["reasons"][-1] == "length" and set(got[i]["reasons"][:-1]) <= {None}
    assert max(sizes) > 1  # steps were merged
