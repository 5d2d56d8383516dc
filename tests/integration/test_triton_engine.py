"""The whole engine on the Triton attention backend reproduces Hugging Face token for token.

Without CUDA the kernels run through Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), which is slow: a few prompts, 8 tokens each. float32 (the
interpreter mishandles bfloat16 on CPU). The reference is tests/hf_reference.py's
greedy loop; the torch backend's equality with it is tested in
test_correctness_vs_hf.py, so a difference here is the kernels' or their wiring's.

Cases: mixed prompt lengths around block boundaries; a second wave that hits the
prefix cache (a prefix ending mid-prompt, continued by new tokens); chunked prefill
with a chunk smaller than a prompt and a step budget that mixes decodes with
prefill chunks; fused norm/rotary/SiLU kernels on and off; Llama, Qwen3 (q/k norm)
and Qwen2 (q/k/v bias). Every case ends with all KV blocks free.
"""

from __future__ import annotations

import pytest

import hf_reference as H
from pdserve.engine import SamplingParams
from pdserve.engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.engine.engine import LLMEngine

pytestmark = pytest.mark.integration

BLOCK_SIZE = 16
MAX_TOKENS = 8
NUM_BLOCKS = 64

CHUNKED = SchedulerConfig(max_num_batched_tokens=40, prefill_chunk_size=16)
CASES = {
    # every prompt > 16 tokens prefilled over several steps; 40-token budget (not a
    # multiple of the block size) puts decodes and prefill chunks in one step
    "llama-chunked-fused": ("llama", dict(scheduler=CHUNKED, use_fused_ops=True)),
    "llama-whole-prompts": ("llama", dict(use_fused_ops=False)),
    # q/k RMSNorm on strided views of the qkv projection, head_dim 64 (fused kernels)
    "qwen3-fused": ("qwen3", dict(use_fused_ops=True)),
    # q/k/v bias (whole prompts, fused kernels off: the interpreter is slow, and chunking
    # and fusion are covered above)
    "qwen2": ("qwen2", dict(use_fused_ops=False)),
}


def _engine(model_dir, case: str) -> LLMEngine:
    config = EngineConfig(
        model=ModelConfig.from_dir(model_dir),
        cache=CacheConfig(block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS),
        attention_backend="triton",
        **CASES[case][1],
    )
    return LLMEngine(config)


def _generate(engine: LLMEngine, prompts: list[list[int]], tag: str):
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, p, params)
    done = {}
    while engine.has_unfinished:
        engine.step()
        for rid, p in zip(ids, prompts):
            if rid not in done:
                out = engine.take_finished(rid, p)
                if out is not None:
                    done[rid] = out
    return [done[rid] for rid in ids]


def _check(label: str, model_dir, prompts, outs) -> None:
    refs = H.hf_greedy_steps(model_dir, prompts, MAX_TOKENS)
    problems = []
    for i, (p, o, ref) in enumerate(zip(prompts, outs, refs)):
        msg = H.describe_token_mismatch(label, i, p, list(o.outputs[0].token_ids), ref)
        if msg:
            problems.append(msg)
    assert not problems, "\n".join(problems)


def _assert_all_blocks_free(engine: LLMEngine, label: str) -> None:
    s = engine.kv_cache_stats()
    assert s.num_free_blocks == s.num_total_blocks == NUM_BLOCKS, f"[{label}] blocks still referenced: {s}"


# llama-whole-prompts (the chunked case's model without chunking or fusion) is in the heavy
# tier for time: the interpreter makes every case slow.
@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.heavy) if c == "llama-whole-prompts" else c
                                  for c in CASES])
def test_triton_engine_matches_hf(case, hf_model_dir):
    model_dir = hf_model_dir(CASES[case][0])
    vocab = H.read_config(model_dir)["vocab_size"]
    engine = _engine(model_dir, case)
    try:
        assert engine.executor.runner.attention.name == "triton"
        wave1 = H.random_prompts(vocab, [1, 17, 40], seed=31)
        _check(f"{case} wave 1", model_dir, wave1, _generate(engine, wave1, "w1"))
        _assert_all_blocks_free(engine, case)
        assert engine.kv_cache_stats().num_cached_blocks >= 3  # 17 -> 1 full block, 40 -> 2
        if not case.startswith("llama"):
            return  # the prefix-hit path is the same for every architecture; the interpreter is slow

        # The 40-token prompt's first 32 tokens (2 cached blocks) continued by 7 new ones.
        wave2 = [wave1[2][:32] + H.random_prompts(vocab, [7], seed=32)[0]]
        outs = _generate(engine, wave2, "w2")
        assert outs[0].num_cached_tokens == 32, f"[{case}] expected a 32-token prefix hit, got {outs[0].num_cached_tokens}"
        _check(f"{case} wave 2 (prefix hit)", model_dir, wave2, outs)
        _assert_all_blocks_free(engine, case)
    finally:
        engine.shutdown()
