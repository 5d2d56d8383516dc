"""Half-precision engines against the float32 HF reference, and the
unsupported-architecture error.

Tolerances.  Measured on these checkpoints (standard prompts; float32 logits of
magnitude <= ~5, std ~1.1), HF itself run in half precision deviates from HF
float32 by:

  HF bf16: max |dlogit| ~0.10-0.11, relative L2 error ~2.4-2.7 %
  HF fp16: max |dlogit| ~0.013-0.017, relative L2 error ~0.3-0.4 %

bf16 keeps 8 significant bits (unit round-off 2^-9 ~ 2e-3), fp16 11 bits
(2^-12 ~ 2.4e-4); rounding every weight and activation to that and compounding
it over 3 layers, RMSNorms and 128/256-wide dot products gives the figures
above.  Two checks:

1. Relative to HF: the engine's worst deviation from float32 (max-abs and
   relative L2, over the batch) must be at most 1.5x HF's own deviation in the
   same dtype.  The engine may round at other points than HF (fused
   projections, its own attention), hence the 50 % slack; a precision bug
   such as a RoPE table built in half precision roughly doubles the error and
   is caught (checked by mutation).
2. Absolute backstop per prompt with torch.testing.assert_close: bf16
   atol 0.3, fp16 atol 0.05 (~3x HF's own max error) -- gross errors (an
   unconverted weight, overflow, a wrong cast) give O(1) differences.

Exact bugs in the math are the float32 suite's job.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import hf_reference as H
from pdserve.engine import LLM, SamplingParams

pytestmark = pytest.mark.integration

MAX_TOKENS = 16
# dtype: absolute per-logit backstop (see module docstring)
ABS_BACKSTOP = {"bfloat16": 0.3, "float16": 0.05}
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
HF_RELATIVE_SLACK = 1.5
ARCHS = ("llama", "qwen2", "qwen3")


def _engine(model_dir, dtype: str) -> LLM:
    return LLM(model=str(model_dir), tensor_parallel_size=1, dtype=dtype, block_size=16, num_kv_blocks=128,
               enable_prefix_caching=True, max_num_batched_tokens=2048, max_num_seqs=256, seed=0)


@pytest.mark.parametrize("dtype", sorted(ABS_BACKSTOP))
@pytest.mark.parametrize("arch", ARCHS)
def test_half_precision_close_to_fp32_hf(arch, dtype, hf_model_dir):
    model_dir = hf_model_dir(arch)
    V = H.read_config(model_dir)["vocab_size"]
    prompts = H.standard_prompts(V)
    max_abs = ABS_BACKSTOP[dtype]
    label = f"{arch}:{dtype}"
    ref_logits = H.hf_next_token_logits(model_dir, prompts)  # float32
    hf_half = H.hf_next_token_logits(model_dir, prompts, dtype=TORCH_DTYPES[dtype])

    def worst(rows):
        abs_err = max(float((a.float().cpu() - b).abs().max()) for a, b in zip(rows, ref_logits))
        rel_err = max(float((a.float().cpu() - b).norm() / b.norm()) for a, b in zip(rows, ref_logits))
        return abs_err, rel_err

    with _engine(model_dir, dtype) as llm:
        ours = llm.next_token_logits(prompts)
        assert len(ours) == len(prompts)
        for i, (a, b) in enumerate(zip(ours, ref_logits)):
            a = a.float().cpu()
            assert a.shape == b.shape, f"[{label}] prompt #{i}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
            assert torch.isfinite(a).all(), f"[{label}] prompt #{i}: non-finite logits"
            torch.testing.assert_close(
                a, b, rtol=0, atol=max_abs,
                msg=lambda m, i=i: f"[{label}] next-token logits of prompt #{i} (len {len(prompts[i])}):\n{m}",
            )
        (our_abs, our_rel), (hf_abs, hf_rel) = worst(ours), worst(hf_half)
        assert our_abs <= HF_RELATIVE_SLACK * hf_abs and our_rel <= HF_RELATIVE_SLACK * hf_rel, (
            f"[{label}] engine deviates from float32 HF by max-abs {our_abs:.4f} / rel-L2 {our_rel:.4f}; "
            f"HF in {dtype} deviates by {hf_abs:.4f} / {hf_rel:.4f} (allowed: {HF_RELATIVE_SLACK}x)"
        )

        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))
        s = llm.kv_cache_stats()
        assert s.num_free_blocks == s.num_total_blocks, f"[{label}] blocks still referenced: {s}"

    # Greedy in low precision may legitimately leave the fp32 path at a near-tie,
    # so instead of exact equality every generated token must be a near-argmax of
    # the float32 reference evaluated on the engine's own sequence
    # (teacher-forced: one HF forward over prompt + generated tokens).
    model = H.load_hf_model(model_dir)
    problems = []
    for i, (p, o) in enumerate(zip(prompts, outs)):
        toks = list(o.token_ids)
        if len(toks) != MAX_TOKENS or o.finish_reason != "length":
            problems.append(f"prompt #{i}: {len(toks)} tokens, finish_reason={o.finish_reason!r}")
            continue
        if not all(0 <= t < V for t in toks):
            problems.append(f"prompt #{i}: token ids out of range: {toks}")
            continue
        with torch.no_grad():
            lg = model(input_ids=torch.tensor([p + toks[:-1]])).logits[0, len(p) - 1:].float()
        for step, t in enumerate(toks):
            gap = float(lg[step].max() - lg[step, t])
            if gap > 2 * max_abs:
                problems.append(f"prompt #{i} (len {len(p)}) step {step}: token {t} is {gap:.3f} below the fp32 "
                                f"argmax {int(lg[step].argmax())} (allowed {2 * max_abs})")
                break
    assert not problems, f"[{label}] greedy generation is not fp32-greedy within tolerance:\n" + "\n".join(problems)


def test_unknown_architecture_rejected(hf_model_dir, tmp_path):
    src = hf_model_dir("llama")
    dst = tmp_path / "foobar"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["architectures"] = ["FooBarForCausalLM"]
    cfg["model_type"] = "foobar"
    (dst / "config.json").write_text(json.dumps(cfg))
    try:
        llm = LLM(model=str(dst), tensor_parallel_size=1, dtype="float32", block_size=16, num_kv_blocks=16)
    except ValueError as e:
        msg = str(e)
    else:
        llm.shutdown()
        pytest.fail("LLM() accepted architectures=['FooBarForCausalLM']; expected ValueError")
    for name in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert name in msg, f"error message should name supported architecture {name}: {msg!r}"
