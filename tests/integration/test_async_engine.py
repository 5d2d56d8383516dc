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
