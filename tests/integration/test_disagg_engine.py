"""The disaggregation protocol at the engine level, in one process.

A decode engine admits a request with ``remote_prefill`` and allocates its blocks; a
prefill engine computes the prompt, samples the first token and holds its blocks; the
"transfer" here is a direct copy between the two KV regions (the real backends are
tested in test_kvtransfer). Output must equal a single engine's, and every block
must come back on both sides.
"""

from __future__ import annotations

import pytest

import hf_reference as H
from pdserve.engine import LLM, SamplingParams
from pdserve.engine.config import CacheConfig, EngineConfig, ModelConfig
from pdserve.engine.engine import LLMEngine

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model_dir(hf_model_dir):
    return hf_model_dir("llama")


def make_engine(model_dir, num_blocks=64):
    return LLMEngine(EngineConfig(model=ModelConfig.from_dir(model_dir), cache=CacheConfig(num_blocks=num_blocks)))


def all_free(engine: LLMEngine) -> bool:
    s = engine.kv_cache_stats()
    return s.num_free_blocks == s.num_total_blocks


class Pair:
    """A prefill engine feeding a decode engine; counts the blocks it moved."""

    def __init__(self, model_dir, p_blocks=64, d_blocks=64):
        self.p = make_engine(model_dir, p_blocks)
        self.d = make_engine(model_dir, d_blocks)
        self.num_moved_blocks = 0
        self.outputs: dict[str, dict[int, list[int]]] = {}

    def submit(self, rid, prompt, params):
        self.d.add_request(rid, prompt, params, remote_prefill=True)

    def prefill(self, rp):
        """Run one remote prefill on P, copy its KV into D's blocks, complete it on D."""
        rid = rp.request.request_id
        self.p.add_prefill_only(rid, rp.request.prompt_token_ids, rp.request.sampling_params)
        first = None
        while first is None:
            for delta in self.p.step():
                if delta.request_id == rid and delta.finish_reason is not None:
                    first = delta
        assert self.p.take_finished(rid, rp.request.prompt_token_ids) is not None
        src = self.p.block_ids(rid)[rp.first_block_index :]
        assert len(src) == len(rp.block_ids)
        d_cache, p_cache = self.d.executor.runner.kv_cache, self.p.executor.runner.kv_cache
        d_cache[:, rp.block_ids] = p_cache[:, src]
        self.num_moved_blocks += len(src)
        assert self.p.release(rid)
        lp = first.logprobs[0] if first.logprobs else None
        self.record(self.d.complete_remote_prefill(rid, first.token_ids[0], lp))

    def record(self, delta):
        self.outputs.setdefault(delta.request_id, {}).setdefault(delta.index, []).extend(delta.token_ids)

    def run_prompts(self, prompts, params) -> "Pair":
        """Submit every prompt (request ids "0", "1", ...) and run them all to the end."""
        for i, p in enumerate(prompts):
            self.submit(str(i), p, params)
        self.run()
        return self

    def run(self):
        while self.d.has_unfinished:
            for delta in self.d.step():
                self.record(delta)
            for rp in self.d.take_remote_prefills():
                self.prefill(rp)

    def tokens(self, rid, index=0):
        return self.outputs[rid][index]


def test_greedy_batch_equals_single_engine(model_dir):
    prompts = H.random_prompts(1000, [1, 15, 16, 17, 40, 100], seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    with LLM(model_dir, num_kv_blocks=64) as llm:
        ref = [o.token_ids for o in llm.generate(prompts, params)]
    pair = Pair(model_dir).run_prompts(prompts, params)
    assert [pair.tokens(str(i)) for i in range(len(prompts))] == ref
    assert all_free(pair.p) and all_free(pair.d)


def test_moe_greedy_batch_equals_hf(hf_model_dir):
    """Qwen3-MoE (8 experts, top-2, one dense layer) prefilled on P, decoded on D: the
    routed expert MLPs leave the KV layout as it is, so the same copy carries it."""
    moe_dir = hf_model_dir("qwen3_moe")
    prompts = H.random_prompts(H.read_config(moe_dir)["vocab_size"], [1, 17, 40, 100], seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    pair = Pair(moe_dir).run_prompts(prompts, params)
    assert [pair.tokens(str(i)) for i in range(len(prompts))] == H.hf_greedy(moe_dir, prompts, 24)
    assert all_free(pair.p) and all_free(pair.d)


def test_seeded_sampling_and_n_equal_single_engine(model_dir):
    """The decode side continues the request's seeded stream after the prefill side's draw."""
    prompts = H.random_prompts(1000, [9, 33], seed=4)
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=11, n=3, max_tokens=16, ignore_eos=True, logprobs=2)
    with LLM(model_dir, num_kv_blocks=64) as llm:
        ref = llm.generate(prompts, params)
    pair = Pair(model_dir).run_prompts(prompts, params)
    for i, r in enumerate(ref):
        for c in r.outputs:
            assert pair.tokens(f"{i}#{c.index}", c.index) == c.token_ids
    assert all_free(pair.p) and all_free(pair.d)


def test_prefix_cached_on_decode_moves_only_missing_blocks(model_dir):
    prefix = H.random_prompts(1000, [64], seed=5)[0]
    first, second = prefix + [1, 2, 3], prefix + [4, 5, 6, 7, 8]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    with LLM(model_dir, num_kv_blocks=64) as llm:
        ref = [o.token_ids for o in llm.generate([first, second], params)]
    pair = Pair(model_dir)
    pair.submit("a", first, params)
    pair.run()
    moved = pair.num_moved_blocks
    pair.submit("b", second, params)
    pair.run()
    assert pair.num_moved_blocks - moved == 1  # 69 tokens = 4 cached full blocks + 1 new block
    assert [pair.tokens("a"), pair.tokens("b")] == ref
    assert all_free(pair.p) and all_free(pair.d)


def test_abort_while_waiting_for_kv_frees_both_sides(model_dir):
    pair = Pair(model_dir)
    params = SamplingParams(temperature=0.0, max_tokens=8)
    prompt = H.random_prompts(1000, [50], seed=6)[0]
    pair.submit("x", prompt, params)
    pair.d.step()
    (rp,) = pair.d.take_remote_prefills()
    assert len(rp.block_ids) == 4 and not all_free(pair.d)
    pair.p.add_prefill_only("x", prompt, params)
    while pair.p.has_unfinished:
        pair.p.step()
    assert not all_free(pair.p)  # held for the transfer
    (delta,) = pair.d.abort_request("x", error="prefill worker gone")
    assert delta.finish_reason == "error" and delta.error == "prefill worker gone"
    pair.p.abort_request("x")
    assert all_free(pair.p) and all_free(pair.d)
    assert not pair.d.has_unfinished
    with pytest.raises(ValueError, match="not waiting for KV"):
        pair.d.complete_remote_prefill("x", 1)


def test_remote_admission_waits_for_blocks(model_dir):
    """A decode pool with room for one prompt admits the second only after the first finishes."""
    prompts = H.random_prompts(1000, [40, 40], seed=7)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    pair = Pair(model_dir, d_blocks=4)
    for i, p in enumerate(prompts):
        pair.submit(str(i), p, params)
    pair.d.step()
    assert [rp.request.request_id for rp in pair.d.take_remote_prefills()] == ["0"]
    pair.d.abort_request("0")
    pair.run()
    assert len(pair.tokens("1")) == 4
    assert all_free(pair.p) and all_free(pair.d)


# -- logits processors through P -> D ----------------------------------------------------


def _reference_processors(logits, prompt, output, p, eos_ids):
    """vLLM's definitions, written out: masks, then logit_bias, then repetition, frequency
    and presence penalties (counts of output tokens; repetition over prompt and output)."""
    x = logits.clone()
    if len(output) < p.min_tokens:
        for t in set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_ids)):
            x[t] = float("-inf")
    for t, b in (p.logit_bias or {}).items():
        x[t] += b
    for t in set(prompt) | set(output):
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(output):
        x[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    return x


PROCESSED = SamplingParams(
    temperature=0.0, max_tokens=20, min_tokens=6, repetition_penalty=1.3, frequency_penalty=0.4,
    presence_penalty=0.3, logit_bias={5: 2.0, 17: -3.0, 99: 1.5},
)


def test_processors_greedy_equal_a_reference_on_hf_logits_and_through_p_to_d(model_dir):
    import torch

    prompts = H.random_prompts(1000, [3, 17, 40], seed=8)
    eos_ids = set(ModelConfig.from_dir(model_dir).eos_token_ids)
    hf = H.load_hf_model(model_dir)
    expected = []
    for prompt in prompts:
        out: list[int] = []
        while len(out) < PROCESSED.max_tokens:
            with torch.inference_mode():
                logits = hf(torch.tensor([prompt + out])).logits[0, -1].float()
            tok = int(_reference_processors(logits, prompt, out, PROCESSED, eos_ids).argmax())
            out.append(tok)
            if tok in eos_ids:
                break
        expected.append(out)
    with LLM(model_dir, num_kv_blocks=64) as llm:
        assert [o.token_ids for o in llm.generate(prompts, PROCESSED)] == expected
    pair = Pair(model_dir).run_prompts(prompts, PROCESSED)
    assert [pair.tokens(str(i)) for i in range(len(prompts))] == expected
    assert all_free(pair.p) and all_free(pair.d)


def test_sampled_processors_through_p_to_d_equal_single_engine(model_dir):
    """Seeded sampling with every processor: the first token (sampled on P, with the same
    prompt-based penalties and min_tokens) and the rest (on D) equal one engine's."""
    prompts = H.random_prompts(1000, [9, 33], seed=5)
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=3, n=2, max_tokens=16, min_tokens=4,
                            repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=-0.2,
                            logit_bias={7: 5.0}, banned_token_ids=(1, 2, 3))
    with LLM(model_dir, num_kv_blocks=64) as llm:
        ref = llm.generate(prompts, params)
    pair = Pair(model_dir).run_prompts(prompts, params)
    for i, r in enumerate(ref):
        for c in r.outputs:
            assert pair.tokens(f"{i}#{c.index}", c.index) == c.token_ids
            assert not {1, 2, 3} & set(c.token_ids)
    assert all_free(pair.p) and all_free(pair.d)
