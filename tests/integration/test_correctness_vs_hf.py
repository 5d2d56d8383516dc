"""The engine must reproduce Hugging Face transformers, token for token.

Reference: tests/hf_reference.py (float32, batch 1, no padding, plain greedy
argmax of the raw logits).  Models: tiny random checkpoints built once per
session (tests/conftest.py MODEL_VARIANTS).

Cases are "<model variant>:<engine config>" strings; the ``engine`` fixture is
module-scoped and indirectly parametrised, so pytest groups all tests of one
case together and only one LLM (and, for tp2, one worker process) is alive at
a time.

Every test ends with all KV blocks free (cached-but-unreferenced blocks count
as free).
"""

from __future__ import annotations

import math
import multiprocessing
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import hf_reference as H
from pdserve.engine import LLM, SamplingParams

pytestmark = pytest.mark.integration

BLOCK_SIZE = 16
MAX_TOKENS = 32
POOL_BLOCKS = 256  # explicit pool: small, deterministic, never forces eviction for these batches

# Just enough for the longest single request of the standard batch
# (200 prompt + 32 generated = 232 tokens -> 15 blocks) plus one spare, while the
# whole batch needs ~56 blocks: requests must wait / be preempted and recomputed.
LONGEST_REQUEST_BLOCKS = math.ceil((max(H.STANDARD_LENGTHS) + MAX_TOKENS) / BLOCK_SIZE)
PREEMPT_BLOCKS = LONGEST_REQUEST_BLOCKS + 1

# float32 logits tolerance.  Measured on these models: HF vs HF with a different
# but equally valid summation order (eager vs sdpa attention; one full forward
# over prompt+output vs KV-cached incremental decode) differs by up to ~1e-5 on
# logits of magnitude <= ~5 (std ~1.1); the error is absolute in nature (it
# comes from the final hidden state times lm_head), so near-zero logits see it
# too.  The engine differs from HF by the same kind of reassociation (paged
# attention, fused projections, TP partial sums all-reduced), so atol=1e-4
# (~10x the observed noise, ~1e-4 of the logit scale) plus rtol=1e-4 for the
# large logits.  Real bugs (missing/wrong norm weight, bias, RoPE variant or
# theta, KV of the wrong position) move logits by >= 1e-2.
LOGITS_RTOL = 1e-4
LOGITS_ATOL = 1e-4

BASE_ENGINE_KWARGS = dict(
    tensor_parallel_size=1,
    dtype="float32",
    block_size=BLOCK_SIZE,
    num_kv_blocks=POOL_BLOCKS,
    enable_prefix_caching=True,
    max_num_batched_tokens=2048,
    prefill_chunk_size=None,
    max_num_seqs=256,
    seed=0,
)

ENGINE_CONFIGS: dict[str, dict] = {
    "default": {},
    "no_prefix_cache": dict(enable_prefix_caching=False),
    # every prompt longer than 16 tokens is prefilled over several steps,
    # chunk boundaries on block boundaries
    "chunk16": dict(prefill_chunk_size=16),
    # step budget (40, not a multiple of the block size) below the longest
    # prompt -> budget-driven chunking, chunk boundaries inside blocks, decodes
    # and prefill chunks mixed in one step; max_num_seqs=3 keeps requests queued.
    "small_budget": dict(max_num_batched_tokens=40, max_num_seqs=3),
    "preempt": dict(num_kv_blocks=PREEMPT_BLOCKS),
    "tp2": dict(tensor_parallel_size=2),
    "tp2_preempt": dict(tensor_parallel_size=2, num_kv_blocks=PREEMPT_BLOCKS),
}

ARCHS = ("llama", "qwen2", "qwen3")
SINGLE_PROCESS_CONFIGS = ("default", "no_prefix_cache", "chunk16", "small_budget", "preempt")
CHECKPOINT_VARIANTS = ("llama-tied", "llama-rope3", "llama-rope3-legacy", "llama-sharded")


def _case(variant: str, config: str):
    marks = [pytest.mark.slow] if config.startswith("tp") else []
    return pytest.param(f"{variant}:{config}", id=f"{variant}-{config}", marks=marks)


ALL_CASES = (
    [_case(a, c) for a in ARCHS for c in SINGLE_PROCESS_CONFIGS]
    + [_case(a, "tp2") for a in ARCHS]  # Qwen2 bias / Qwen3 q,k-norm sharding too
    + [_case("llama", "tp2_preempt")]
    + [_case(v, "default") for v in CHECKPOINT_VARIANTS]
)
DEFAULT_CASES = [_case(a, "default") for a in ARCHS]
MIXED_LENGTH_CASES = DEFAULT_CASES + [_case("llama", "preempt"), _case("llama", "tp2_preempt")]


@dataclass
class Engine:
    case: str
    variant: str
    config: str
    model_dir: Path
    llm: LLM
    vocab_size: int
    eos_token_id: int

    @property
    def prefix_caching(self) -> bool:
        return engine_kwargs(self.config)["enable_prefix_caching"]


def engine_kwargs(config: str) -> dict:
    kw = dict(BASE_ENGINE_KWARGS)
    kw.update(ENGINE_CONFIGS[config])
    return kw


def _wait_no_children(timeout: float = 15.0) -> list:
    deadline = time.monotonic() + timeout
    while True:
        kids = multiprocessing.active_children()
        if not kids or time.monotonic() > deadline:
            return kids
        time.sleep(0.1)


@pytest.fixture(scope="module")
def engine(request, hf_model_dir):
    variant, config = request.param.split(":")
    model_dir = hf_model_dir(variant)
    cfg = H.read_config(model_dir)
    llm = LLM(model=str(model_dir), **engine_kwargs(config))
    try:
        yield Engine(request.param, variant, config, model_dir, llm, cfg["vocab_size"], cfg["eos_token_id"])
    finally:
        llm.shutdown()
    if engine_kwargs(config)["tensor_parallel_size"] > 1:
        left = _wait_no_children()
        assert not left, f"[{request.param}] worker processes still alive after shutdown(): {left}"


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def greedy(max_tokens: int = MAX_TOKENS, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=kw.pop("ignore_eos", True), **kw)


def assert_all_blocks_free(llm: LLM, label: str) -> None:
    s = llm.kv_cache_stats()
    assert s.num_free_blocks == s.num_total_blocks, (
        f"[{label}] {s.num_total_blocks - s.num_free_blocks} of {s.num_total_blocks} KV blocks are still "
        f"referenced after generate() returned (free={s.num_free_blocks}, cached={s.num_cached_blocks})"
    )


def check_against_hf(label: str, prompts, outs, traces, max_tokens) -> None:
    """Token-exact comparison; reports every mismatching prompt with its first differing position."""
    assert len(outs) == len(prompts), f"[{label}] {len(outs)} outputs for {len(prompts)} prompts"
    ids = [o.request_id for o in outs]
    assert len(set(ids)) == len(ids), f"[{label}] duplicate request ids: {ids}"
    problems = []
    for i, (p, o, tr) in enumerate(zip(prompts, outs, traces)):
        mt = max_tokens[i] if isinstance(max_tokens, (list, tuple)) else max_tokens
        if list(o.prompt_token_ids) != list(p):
            problems.append(f"[{label}] prompt #{i}: outputs are not in prompt order / prompt_token_ids "
                            f"differ (len {len(o.prompt_token_ids)} vs {len(p)})")
            continue
        ref = H.GreedyTrace(tr.tokens[:mt], tr.logits[:mt])
        msg = H.describe_token_mismatch(label, i, p, list(o.token_ids), ref)
        if msg:
            problems.append(msg)
        elif o.finish_reason != "length":
            problems.append(f"[{label}] prompt #{i} (len {len(p)}): finish_reason={o.finish_reason!r}, "
                            f"expected 'length' (ignore_eos=True, max_tokens={mt})")
    assert not problems, f"{len(problems)} of {len(prompts)} prompts differ from HF:\n" + "\n".join(problems)


def full_prompt_blocks(prompts) -> set[tuple[int, ...]]:
    """Distinct full-block token prefixes (what a prefix cache keys on)."""
    out = set()
    for p in prompts:
        for j in range(len(p) // BLOCK_SIZE):
            out.add(tuple(p[: (j + 1) * BLOCK_SIZE]))
    return out


def check_logits(label: str, prompts, ours, refs) -> None:
    assert len(ours) == len(prompts), f"[{label}] {len(ours)} logit rows for {len(prompts)} prompts"
    for i, (p, a, b) in enumerate(zip(prompts, ours, refs)):
        assert isinstance(a, torch.Tensor) and a.dtype == torch.float32 and tuple(a.shape) == tuple(b.shape), (
            f"[{label}] prompt #{i}: expected float32 tensor of shape {tuple(b.shape)}, got "
            f"{type(a).__name__} {getattr(a, 'dtype', None)} {tuple(getattr(a, 'shape', ()))}"
        )
        torch.testing.assert_close(
            a.cpu(), b, rtol=LOGITS_RTOL, atol=LOGITS_ATOL,
            msg=lambda m, i=i, p=p: f"[{label}] next-token logits of prompt #{i} (len {len(p)}) differ from HF:\n{m}",
        )


# ---------------------------------------------------------------------------
# tests on the shared per-case engine
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ALL_CASES, indirect=True)
def test_greedy_matches_hf(engine):
    """Standard batch (lengths 1..200 around block boundaries), 32 greedy tokens, ignore_eos.

    With prefix caching on, the batch is generated a second time: every prompt
    now hits the cache (the 16/32/64-token prompts entirely), and the output
    must not change.
    """
    llm = engine.llm
    prompts = H.standard_prompts(engine.vocab_size)
    traces = H.hf_greedy_steps(engine.model_dir, prompts, MAX_TOKENS)
    # The checkpoint's EOS id is emitted mid-generation by the reference, so this
    # also checks that ignore_eos neither stops nor masks EOS.
    assert any(engine.eos_token_id in tr.tokens for tr in traces), "precondition: EOS appears in reference output"

    outs = llm.generate(prompts, greedy())
    check_against_hf(f"{engine.case} run 1", prompts, outs, traces, MAX_TOKENS)
    assert_all_blocks_free(llm, engine.case)

    stats = llm.kv_cache_stats()
    if not engine.prefix_caching:
        assert stats.num_cached_blocks == 0, f"[{engine.case}] prefix caching is off but {stats.num_cached_blocks} blocks are cached"
        return

    assert stats.num_cached_blocks > 0, f"[{engine.case}] prefix caching on, but nothing cached after a full batch"
    if stats.num_total_blocks >= POOL_BLOCKS:  # no eviction was needed: every full prompt block must be cached
        need = len(full_prompt_blocks(prompts))
        assert stats.num_cached_blocks >= need, (
            f"[{engine.case}] only {stats.num_cached_blocks} cached blocks, the prompts alone have {need} full blocks"
        )

    outs2 = llm.generate(prompts, greedy())
    check_against_hf(f"{engine.case} run 2 (prefix-cache hits)", prompts, outs2, traces, MAX_TOKENS)
    cached = [getattr(o, "num_cached_tokens", None) for o in outs2]
    if cached[0] is not None and stats.num_total_blocks >= POOL_BLOCKS:
        for i, (p, c) in enumerate(zip(prompts, cached)):
            if len(p) > 2 * BLOCK_SIZE:
                assert c >= BLOCK_SIZE, f"[{engine.case}] run 2 prompt #{i} (len {len(p)}) reused only {c} cached tokens"
    assert_all_blocks_free(llm, engine.case)


@pytest.mark.parametrize("engine", ALL_CASES, indirect=True)
def test_first_step_logits_match_hf(engine):
    llm = engine.llm
    prompts = H.standard_prompts(engine.vocab_size)
    ours = llm.next_token_logits(prompts)
    refs = H.hf_next_token_logits(engine.model_dir, prompts)
    check_logits(engine.case, prompts, ours, refs)
    assert_all_blocks_free(llm, engine.case)


@pytest.mark.parametrize("engine", MIXED_LENGTH_CASES, indirect=True)
def test_per_request_sampling_params(engine):
    """One SamplingParams per prompt: requests finish at different steps and free
    their blocks while the others keep decoding."""
    llm = engine.llm
    prompts = H.standard_prompts(engine.vocab_size)
    max_tokens = [1, 2, 5, 9, 16, 17, 24, 31, 32, 3][: len(prompts)]
    traces = H.hf_greedy_steps(engine.model_dir, prompts, MAX_TOKENS)
    outs = llm.generate(prompts, [greedy(m) for m in max_tokens])
    check_against_hf(f"{engine.case} per-request max_tokens", prompts, outs, traces, max_tokens)
    assert_all_blocks_free(llm, engine.case)


LOGPROBS_K = 5
LOGPROBS_ATOL = 1e-4  # same reasoning as LOGITS_ATOL: log_softmax(x) = x - logsumexp(x)
LOGPROBS_RTOL = 1e-4


@pytest.mark.parametrize("engine", DEFAULT_CASES, indirect=True)
def test_logprobs_match_hf(engine):
    llm = engine.llm
    prompts = H.standard_prompts(engine.vocab_size)
    traces = H.hf_greedy_steps(engine.model_dir, prompts, MAX_TOKENS)
    outs = llm.generate(prompts, greedy(logprobs=LOGPROBS_K))
    check_against_hf(f"{engine.case} logprobs run", prompts, outs, traces, MAX_TOKENS)
    for i, (o, tr) in enumerate(zip(outs, traces)):
        lps = o.logprobs
        assert lps is not None and len(lps) == len(tr.tokens), (
            f"[{engine.case}] prompt #{i}: expected {len(tr.tokens)} logprob entries, got {None if lps is None else len(lps)}"
        )
        ref = tr.logprobs
        for step, d in enumerate(lps):
            where = f"[{engine.case}] prompt #{i} step {step}"
            tok = tr.tokens[step]
            assert isinstance(d, dict), f"{where}: logprobs entry is {type(d).__name__}, expected dict"
            assert tok in d, f"{where}: sampled token {tok} missing from logprobs {d}"
            assert len(d) in (LOGPROBS_K, LOGPROBS_K + 1), f"{where}: {len(d)} entries for logprobs={LOGPROBS_K}"
            assert all(isinstance(k, int) and isinstance(v, float) for k, v in d.items()), (
                f"{where}: expected dict[int, float], got {[(type(k).__name__, type(v).__name__) for k, v in d.items()]}"
            )
            keys = list(d)
            torch.testing.assert_close(
                torch.tensor([d[k] for k in keys], dtype=torch.float32), ref[step, keys],
                rtol=LOGPROBS_RTOL, atol=LOGPROBS_ATOL,
                msg=lambda m, where=where, keys=keys: f"{where}: logprobs of tokens {keys} differ from HF log_softmax:\n{m}",
            )
            # the alternatives are HF's top-K (ties at the K-th place may go either way)
            kth = float(torch.topk(ref[step], LOGPROBS_K).values[-1])
            for k in keys:
                if k != tok:
                    assert float(ref[step, k]) >= kth - 1e-4, f"{where}: token {k} is not in HF's top-{LOGPROBS_K}"
            for r in torch.topk(ref[step], LOGPROBS_K).indices.tolist():
                if float(ref[step, r]) > kth + 1e-4:
                    assert r in d, f"{where}: HF top-{LOGPROBS_K} token {r} missing from {keys}"
    assert_all_blocks_free(llm, engine.case)


@pytest.mark.parametrize("engine", DEFAULT_CASES, indirect=True)
def test_stops_at_eos(engine):
    """ignore_eos=False: generation ends at the checkpoint's EOS with finish_reason 'stop'
    (the EOS id itself may or may not be included in token_ids)."""
    llm = engine.llm
    eos = engine.eos_token_id
    prompts = H.standard_prompts(engine.vocab_size)
    refs = H.hf_greedy(engine.model_dir, prompts, MAX_TOKENS)
    assert any(eos in r for r in refs), "precondition: EOS appears in reference output"
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    problems = []
    for i, (o, ref) in enumerate(zip(outs, refs)):
        got = list(o.token_ids)
        if eos in ref:
            k = ref.index(eos)
            ok = got in (ref[:k], ref[: k + 1]) and o.finish_reason == "stop"
            want = f"{ref[:k + 1]} (EOS {eos} at step {k}), finish_reason 'stop'"
        else:
            ok = got == ref and o.finish_reason == "length"
            want = f"{ref}, finish_reason 'length'"
        if not ok:
            problems.append(f"[{engine.case}] prompt #{i} (len {len(prompts[i])}): got {got} "
                            f"finish_reason={o.finish_reason!r}; want {want}")
    assert not problems, "\n".join(problems)
    assert_all_blocks_free(llm, engine.case)


# ---------------------------------------------------------------------------
# tests with their own engine
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_cache_shared_prefixes(arch, hf_model_dir):
    """Batch of prompts sharing long prefixes, then a second wave that hits the
    cache: exact repeats (incl. a prompt that is exactly 4 cached blocks, whose
    last token must still be computed), new suffixes on cached prefixes, and a
    multi-turn follow-up (prompt + generated output + more) whose cached blocks
    were partly written during decode."""
    model_dir = hf_model_dir(arch)
    V = H.read_config(model_dir)["vocab_size"]
    label = f"{arch}:prefix-cache"
    p70 = H.shared_prefix_prompts(V, 70, [0, 1, 10, 26, 40], seed=11)  # prefix = 4 full blocks + 6
    p64 = H.shared_prefix_prompts(V, 64, [0, 0, 1, 16], seed=12)  # exactly 4 blocks; two identical prompts
    wave1 = p70 + p64
    with LLM(model=str(model_dir), **engine_kwargs("default")) as llm:
        s0 = llm.kv_cache_stats()
        assert s0.num_cached_blocks == 0 and s0.num_free_blocks == s0.num_total_blocks == POOL_BLOCKS, s0

        traces1 = H.hf_greedy_steps(model_dir, wave1, MAX_TOKENS)
        outs1 = llm.generate(wave1, greedy())
        check_against_hf(f"{label} wave 1", wave1, outs1, traces1, MAX_TOKENS)
        s1 = llm.kv_cache_stats()
        need = len(full_prompt_blocks(wave1))
        assert s1.num_cached_blocks >= need, (
            f"[{label}] {s1.num_cached_blocks} cached blocks after wave 1; its prompts have {need} distinct full blocks"
        )
        assert_all_blocks_free(llm, label)

        extra = H.random_prompts(V, [20, 5], seed=13)
        follow_up = wave1[0] + list(outs1[0].token_ids) + extra[1]  # 70 + 32 + 5 tokens
        wave2 = wave1 + [p70[0] + extra[0], follow_up]
        traces2 = H.hf_greedy_steps(model_dir, wave2, MAX_TOKENS)
        outs2 = llm.generate(wave2, greedy())
        check_against_hf(f"{label} wave 2 (cache hits)", wave2, outs2, traces2, MAX_TOKENS)
        cached = [getattr(o, "num_cached_tokens", None) for o in outs2]
        if cached[0] is not None:
            assert all(c >= 4 * BLOCK_SIZE - BLOCK_SIZE for c in cached), (
                f"[{label}] wave 2 should reuse the cached 4-block prefixes, num_cached_tokens={cached}"
            )
        assert_all_blocks_free(llm, label)

        # next-token logits through the cached path
        ours = llm.next_token_logits(wave2)
        check_logits(f"{label} logits after caching", wave2, ours, H.hf_next_token_logits(model_dir, wave2))
        assert_all_blocks_free(llm, label)


def test_default_kv_pool_size(hf_model_dir):
    """num_kv_blocks=None sizes the pool from the memory budget."""
    model_dir = hf_model_dir("llama")
    V = H.read_config(model_dir)["vocab_size"]
    prompts = H.random_prompts(V, [1, 33, 200], seed=21)
    kw = engine_kwargs("default")
    kw["num_kv_blocks"] = None
    with LLM(model=str(model_dir), **kw) as llm:
        s = llm.kv_cache_stats()
        assert s.num_total_blocks >= LONGEST_REQUEST_BLOCKS and s.num_free_blocks == s.num_total_blocks, s
        outs = llm.generate(prompts, greedy())
        check_against_hf("llama:default-pool", prompts, outs, H.hf_greedy_steps(model_dir, prompts, MAX_TOKENS), MAX_TOKENS)
        assert_all_blocks_free(llm, "llama:default-pool")


@pytest.mark.parametrize("variant", ["llama-rope3", "llama-rope3-legacy"])
def test_llama3_rope_variant_is_real(variant, hf_model_dir):
    """Guards the rope-scaling cases: the checkpoint really declares llama3 scaling,
    HF really applies it, and the standard prompts run past original_max_position_embeddings."""
    model_dir = hf_model_dir(variant)
    cfg = H.read_config(model_dir)
    rp = cfg.get("rope_parameters") or dict(cfg["rope_scaling"], rope_theta=cfg["rope_theta"])
    assert rp["rope_type"] == "llama3", rp
    head_dim = cfg["head_dim"]
    inv = H.hf_rope_inv_freq(model_dir)
    plain = H.default_rope_inv_freq(head_dim, float(rp["rope_theta"]))
    ratio = plain / inv
    assert torch.allclose(ratio[:2], torch.ones(2)), ratio  # high frequencies untouched
    assert torch.allclose(ratio[-4:], torch.full((4,), float(rp["factor"]))), ratio  # low ones scaled
    assert ((ratio > 1.01) & (ratio < rp["factor"] - 0.01)).any(), ratio  # and a smoothed band
    assert max(H.STANDARD_LENGTHS) + MAX_TOKENS > 2 * rp["original_max_position_embeddings"]
