"""Hugging Face reference harness for engine correctness tests.

Everything here runs on CPU in float32 with Hugging Face ``transformers`` as the
ground truth.  Models are tiny, random-weight checkpoints written to a local
directory (nothing is ever downloaded); prompts are token-id lists (no
tokenizer files are written).

Public helpers
--------------
make_random_hf_model(out_dir, arch, *, tied, rope_llama3, sharded, seed, config_style, **overrides)
hf_greedy(model_dir, prompts, max_new_tokens)            -> list[list[int]]
hf_greedy_steps(model_dir, prompts, max_new_tokens)      -> list[GreedyTrace]  (tokens + per-step logits)
hf_next_token_logits(model_dir, prompts)                 -> list[Tensor[vocab]]
hf_rope_inv_freq(model_dir)                              -> Tensor  (what HF really uses)
random_prompts(vocab_size, lengths, seed)
shared_prefix_prompts(vocab_size, prefix_len, suffix_lengths, seed, num_prefixes=1)
first_mismatch(a, b)                                     -> index or None
describe_token_mismatch(...)                             -> human readable failure text

Notes on transformers 5.x
-------------------------
* RoPE settings are spelled ``rope_parameters`` in 5.x (``rope_theta`` lives
  *inside* that dict, next to ``rope_type`` and the scaling keys).  Checkpoints
  written by transformers < 5 (i.e. nearly every checkpoint on the Hub) spell it
  as a top-level ``rope_theta`` plus an optional ``rope_scaling`` dict.  HF 5.x
  reads both.  ``make_random_hf_model(config_style="legacy")`` rewrites the
  saved config.json into the old spelling so the engine is tested on both.
* ``generate()`` in 5.x merges the call's settings over the model's saved
  generation_config, so ``generate(..., eos_token_id=None)`` (or a
  GenerationConfig with eos_token_id=None) still stops at the checkpoint's EOS
  (observed: 6- and 8-token outputs for max_new_tokens=32).  The only
  per-call way to force N tokens (``min_new_tokens``) *masks* EOS to -inf,
  which changes greedy choices when EOS is the argmax -- not ``ignore_eos``
  semantics (keep going, EOS may still be emitted).  Setting
  ``model.generation_config.eos_token_id = None`` does work, but the
  reference simply runs its own greedy loop over the model's forward with a
  DynamicCache: argmax of the raw float32 logits, exactly N steps, no logits
  processors.  It was checked to equal ``generate()`` with the model's EOS
  cleared on every variant.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

__all__ = [
    "ARCH_CLASSES",
    "DEFAULT_VOCAB_SIZE",
    "GreedyTrace",
    "LLAMA3_ROPE",
    "describe_token_mismatch",
    "first_mismatch",
    "hf_greedy",
    "hf_greedy_steps",
    "hf_next_token_logits",
    "hf_rope_inv_freq",
    "hf_router_margin",
    "hf_deepseek_routing_margin",
    "load_hf_model",
    "make_random_hf_model",
    "random_prompts",
    "read_config",
    "shared_prefix_prompts",
    "standard_prompts",
    "STANDARD_LENGTHS",
]

ARCH_CLASSES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
}

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

# Shape shared by all archs.  vocab 1536 is deliberately not a power of two
# (but divisible by 2 so a vocab-parallel TP=2 split is even).
DEFAULT_VOCAB_SIZE = 1536

_COMMON = dict(
    vocab_size=DEFAULT_VOCAB_SIZE,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=1024,
    # 0.1 (not HF's 0.02): logits std ~1.1 and greedy generations that rarely
    # fall into short loops (0.02-0.05 gives period-1..3 cycles, esp. tied).
    initializer_range=0.1,
    hidden_act="silu",
    bos_token_id=1,
    pad_token_id=0,
    dtype="float32",
)

# Per-arch defaults that mirror the real model families and make config
# reading observable: non-default rope_theta everywhere; Qwen3 uses a head_dim
# that is NOT hidden_size // num_attention_heads (as the real Qwen3 models do),
# so an engine deriving head_dim from hidden_size is caught.
_ARCH_DEFAULTS = {
    "llama": dict(rope_theta=500000.0, rms_norm_eps=1e-5),
    "qwen2": dict(rope_theta=1000000.0, rms_norm_eps=1e-6),
    "qwen3": dict(rope_theta=1000000.0, rms_norm_eps=1e-6, head_dim=64),
    # Mixture of experts: 8 experts, top-2, so a TP=2 expert-parallel split holds 4 per
    # rank. Qwen3-MoE renormalizes its top-k (norm_topk_prob, as the released models do)
    # and keeps layer 1 dense (mlp_only_layers; intermediate_size is that layer's MLP);
    # Qwen2-MoE does not renormalize and adds the gated shared expert.
    "qwen3_moe": dict(rope_theta=1000000.0, rms_norm_eps=1e-6, head_dim=64, num_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=64, norm_topk_prob=True, mlp_only_layers=[1], decoder_sparse_step=1),
    "qwen2_moe": dict(rope_theta=1000000.0, rms_norm_eps=1e-6, num_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=64, shared_expert_intermediate_size=128, norm_topk_prob=False),
    "mixtral": dict(rope_theta=1000000.0, rms_norm_eps=1e-5, num_local_experts=8, num_experts_per_tok=2,
                    intermediate_size=96),
    # MLA + grouped routing. Every dimension differs from the others (nope 32, rope 16, v 24,
    # kv rank 32, q rank 48) so a swapped one fails on shape; kv_lora_rank and the rope dim
    # are powers of two >= 16 so the Triton MLA decode kernel applies. MLA expands K/V to
    # every head: num_key_value_heads must equal num_attention_heads in transformers.
    # 8 experts in 4 groups, a token's 2 from the best 2 groups; layer 0 dense.
    "deepseek_v3": dict(rope_theta=10000.0, rms_norm_eps=1e-6, num_key_value_heads=4, q_lora_rank=48,
                        kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=24,
                        n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                        moe_intermediate_size=64, n_shared_experts=1, first_k_dense_replace=1,
                        routed_scaling_factor=2.5, norm_topk_prob=True, rope_interleave=True,
                        max_position_embeddings=256),
    # V2-Lite style: no q LoRA (a plain q_proj), softmax scores, group-limited greedy, two
    # shared experts, no renormalization.
    "deepseek_v2": dict(rope_theta=10000.0, rms_norm_eps=1e-6, num_key_value_heads=4, q_lora_rank=None,
                        kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=24,
                        n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                        topk_method="group_limited_greedy", moe_intermediate_size=64, n_shared_experts=2,
                        first_k_dense_replace=1, routed_scaling_factor=1.5, norm_topk_prob=False,
                        max_position_embeddings=256),
}

# DeepSeek's YaRN (rope_yarn=True): factor 4 over a 64-token original context (the
# DeepSeek models' max_position_embeddings above is 4 * 64, as YaRN expects); mscale and
# mscale_all_dim differ so both the cos/sin factor and the softmax factor are not 1.
DEEPSEEK_YARN = {
    "rope_type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 0.8,
}

# Scale of the random perturbations applied on top of HF's init.
_NORM_JITTER = 0.1   # RMSNorm / q_norm / k_norm weights ~ 1 + 0.1 * N(0, 1)
_BIAS_STD = 0.1      # Qwen2 q/k/v bias ~ 0.1 * N(0, 1)   (HF initialises them to 0)


def _config_class(arch: str):
    import transformers

    if arch == "llama":
        return transformers.LlamaConfig
    if arch == "qwen2":
        return transformers.Qwen2Config
    if arch == "qwen3":
        return transformers.Qwen3Config
    if arch == "qwen3_moe":
        return transformers.Qwen3MoeConfig
    if arch == "qwen2_moe":
        return transformers.Qwen2MoeConfig
    if arch == "mixtral":
        return transformers.MixtralConfig
    if arch == "deepseek_v3":
        return transformers.DeepseekV3Config
    if arch == "deepseek_v2":
        return transformers.DeepseekV2Config
    raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(ARCH_CLASSES)}")


def read_config(model_dir) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def make_random_hf_model(
    out_dir,
    arch: str,
    *,
    tied: bool = False,
    rope_llama3: bool = False,
    rope_yarn: bool = False,
    sharded: bool = False,
    seed: int = 0,
    config_style: str = "v5",
    eos_probe_prompts: Sequence[Sequence[int]] | None = None,
    **overrides,
) -> Path:
    """Build a tiny random-weight HF checkpoint in ``out_dir`` and return the path.

    arch: "llama" | "qwen2" | "qwen3" | "qwen3_moe" | "qwen2_moe" | "mixtral".
    tied: tie_word_embeddings=True (no lm_head.weight in the checkpoint).
    rope_llama3: Llama-3.1 style rope scaling with original_max_position_embeddings=64.
    rope_yarn: DeepSeek's YaRN scaling (DEEPSEEK_YARN).
    sharded: >= 3 safetensors shards plus model.safetensors.index.json.
    config_style: "v5"  -> config.json exactly as transformers 5.x writes it
                           (``rope_parameters`` dict holding rope_theta/rope_type/...).
                  "legacy" -> pre-5.x spelling used by Hub checkpoints
                           (top-level ``rope_theta``; ``rope_scaling`` dict or null).
    overrides: any config field (e.g. vocab_size=2048, num_hidden_layers=2,
               eos_token_id=5).  When eos_token_id is not given, the EOS id is
               chosen as a token the model's greedy decoding actually produces
               (see _pick_eos_token), so that ``ignore_eos`` and stop-on-EOS are
               exercised by ordinary greedy tests.  ``eos_probe_prompts``
               (e.g. the test suite's standard prompts) steer that choice.
    """
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    if config_style not in ("v5", "legacy"):
        raise ValueError(f"config_style must be 'v5' or 'legacy', got {config_style!r}")
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)

    cfg_kwargs = dict(_COMMON)
    cfg_kwargs.update(_ARCH_DEFAULTS[arch] if arch in _ARCH_DEFAULTS else {})
    cfg_kwargs.update(overrides)
    eos_given = "eos_token_id" in overrides
    if not eos_given:
        cfg_kwargs["eos_token_id"] = 2  # provisional, replaced below
    rope_theta = float(cfg_kwargs.pop("rope_theta"))
    rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
    if rope_llama3:
        rope_parameters = dict(LLAMA3_ROPE, rope_theta=rope_theta)
    if rope_yarn:
        rope_parameters = dict(DEEPSEEK_YARN, rope_theta=rope_theta)
    if arch.startswith("deepseek"):
        cfg_kwargs.pop("head_dim", None)  # transformers sets it to qk_rope_head_dim
    cfg_kwargs.setdefault("rope_parameters", rope_parameters)
    cfg_kwargs["tie_word_embeddings"] = bool(tied)
    if arch in ("qwen2", "qwen2_moe"):
        cfg_kwargs.setdefault("use_sliding_window", False)

    config = _config_class(arch)(**cfg_kwargs)
    config.architectures = [ARCH_CLASSES[arch]]

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    _perturb_weights(model, arch, seed)

    if tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), (
            "tie_word_embeddings=True but HF did not tie lm_head to embed_tokens"
        )

    if not eos_given:
        eos = _pick_eos_token(model, config.vocab_size, seed, eos_probe_prompts)
        config.eos_token_id = eos
        model.config.eos_token_id = eos

    save_kwargs = dict(safe_serialization=True)
    if sharded:
        n_bytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
        # ~1/4 of the model per shard -> at least 3 shards even after tensor packing.
        shard_kb = max(1, n_bytes // 4 // 1024)
        save_kwargs["max_shard_size"] = f"{shard_kb}KB"
    model.save_pretrained(out_dir, **save_kwargs)

    gen = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    gen.save_pretrained(out_dir)

    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if config_style == "legacy":
        rp = cfg.pop("rope_parameters")
        cfg["rope_theta"] = rp.pop("rope_theta")
        cfg["rope_scaling"] = None if rp.get("rope_type", "default") == "default" else rp
        _write_json(cfg_path, cfg)

    _check_saved_checkpoint(out_dir, arch, tied=tied, rope_llama3=rope_llama3, sharded=sharded,
                            rope_theta=rope_theta, config_style=config_style, rope_yarn=rope_yarn)
    return out_dir


@torch.no_grad()
def _perturb_weights(model, arch: str, seed: int) -> None:
    """Make norms / biases non-trivial so a missing or misapplied one is visible."""
    g = torch.Generator().manual_seed(10_000 + seed)
    touched_bias = 0
    touched_qk_norm = 0
    routing_bias = [(n, b) for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]
    for name, p in [*model.named_parameters(), *routing_bias]:
        leaf = name.rsplit(".", 1)
        if name.endswith("norm.weight"):
            # input_layernorm, post_attention_layernorm, model.norm, q_norm, k_norm
            p.copy_(1.0 + _NORM_JITTER * torch.randn(p.shape, generator=g))
            if ".q_norm." in name or ".k_norm." in name:
                touched_qk_norm += 1
        elif name.endswith("e_score_correction_bias"):
            # DeepSeek-V3's routing bias (zero from HF's init): large enough to change choices.
            p.copy_(_BIAS_STD * torch.randn(p.shape, generator=g))
        elif leaf[-1] == "bias" and any(f".{k}_proj." in name for k in "qkv"):
            p.copy_(_BIAS_STD * torch.randn(p.shape, generator=g))
            touched_bias += 1
    n_layers = model.config.num_hidden_layers
    if arch == "qwen2":
        assert touched_bias == 3 * n_layers, f"expected q/k/v bias in every Qwen2 layer, got {touched_bias}"
    if arch in ("qwen3", "qwen3_moe"):
        assert touched_qk_norm == 2 * n_layers, f"expected q_norm/k_norm in every Qwen3 layer, got {touched_qk_norm}"


@torch.no_grad()
def _pick_eos_token(model, vocab_size: int, seed: int, probe_prompts=None, n_new: int = 32) -> int:
    """Pick as EOS a token that greedy decoding of this model emits mid-sequence.

    Declaring such a token EOS means ordinary greedy tests emit EOS in the
    middle of generations, so an engine that stops on EOS despite
    ignore_eos=True, or that masks EOS (min_tokens-style), diverges from the
    reference, and a stop-on-EOS test has something to stop on.
    """
    if probe_prompts is None:
        probe_prompts = random_prompts(vocab_size, [1, 7, 16, 25, 40, 64, 90, 130], seed=50_000 + seed)
    n_seqs: dict[int, int] = {}
    first_pos: dict[int, int] = {}
    for p in probe_prompts:
        toks, _ = _greedy_one(model, p, n_new, keep_logits=False)
        for t in set(toks):
            n_seqs[t] = n_seqs.get(t, 0) + 1
        for i, t in enumerate(toks):
            first_pos[t] = min(first_pos.get(t, 1 << 30), i)
    # Appearing in several (not all) sequences, never as the very first token
    # (so a stop-on-EOS test still yields some output), and not a special id.
    def score(t):
        return (t < _LOW_ID, first_pos[t] == 0, -n_seqs[t], -first_pos[t], t)
    return int(min(n_seqs, key=score))


def _check_saved_checkpoint(out_dir: Path, arch: str, *, tied, rope_llama3, sharded, rope_theta, config_style,
                            rope_yarn=False):
    from transformers import AutoConfig

    cfg = read_config(out_dir)
    assert cfg["architectures"] == [ARCH_CLASSES[arch]], cfg["architectures"]
    assert bool(cfg.get("tie_word_embeddings")) == bool(tied)
    if config_style == "v5":
        rp = cfg["rope_parameters"]
        assert "rope_scaling" not in cfg and "rope_theta" not in cfg
    else:
        rp = dict(cfg["rope_scaling"] or {"rope_type": "default"}, rope_theta=cfg["rope_theta"])
        assert "rope_parameters" not in cfg
    assert float(rp["rope_theta"]) == rope_theta
    if rope_llama3:
        for k, v in LLAMA3_ROPE.items():
            assert rp[k] == v, (k, rp)
    elif rope_yarn:
        for k, v in DEEPSEEK_YARN.items():
            assert rp[k] == v, (k, rp)
    else:
        assert rp.get("rope_type", "default") == "default", rp
    # ... and that HF itself reads it back the same way.
    hf_cfg = AutoConfig.from_pretrained(out_dir)
    assert float(hf_cfg.rope_parameters["rope_theta"]) == rope_theta, hf_cfg.rope_parameters
    assert hf_cfg.rope_parameters["rope_type"] == ("llama3" if rope_llama3 else "yarn" if rope_yarn else "default")

    st_files = sorted(p.name for p in out_dir.glob("*.safetensors"))
    if sharded:
        assert len(st_files) >= 3, st_files
        index = json.loads((out_dir / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == set(st_files)
    else:
        assert st_files == ["model.safetensors"], st_files
    assert (out_dir / "generation_config.json").exists()

    from safetensors import safe_open

    names = set()
    for f in st_files:
        with safe_open(str(out_dir / f), framework="pt") as fh:
            names.update(fh.keys())
    assert ("lm_head.weight" in names) == (not tied), (tied, sorted(names)[:5])
    if arch == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in names
    if arch in ("qwen3", "qwen3_moe"):
        assert "model.layers.0.self_attn.q_norm.weight" in names
    if arch in ("qwen3_moe", "qwen2_moe"):  # saved per expert, as the Hub's checkpoints are
        assert "model.layers.0.mlp.experts.7.down_proj.weight" in names and "model.layers.0.mlp.gate.weight" in names
    if arch == "mixtral":
        assert "model.layers.0.block_sparse_moe.experts.7.w2.weight" in names
    if arch.startswith("deepseek"):  # layer 0 dense, then experts saved one by one
        assert "model.layers.1.mlp.experts.7.down_proj.weight" in names and "model.layers.0.mlp.gate_proj.weight" in names
        assert ("model.layers.1.mlp.gate.e_score_correction_bias" in names) == (arch == "deepseek_v3")


# --------------------------------------------------------------------------
# Reference inference
# --------------------------------------------------------------------------

_MODEL_CACHE: dict[tuple[str, str, str], object] = {}
_GREEDY_CACHE: dict[tuple[str, tuple[int, ...]], "GreedyTrace"] = {}


def _key(model_dir) -> str:
    return str(Path(model_dir).resolve())


def load_hf_model(model_dir, dtype: torch.dtype = torch.float32, attn_implementation: str = "eager"):
    """AutoModelForCausalLM, cached per (directory, dtype, attention impl)."""
    from transformers import AutoModelForCausalLM

    key = (_key(model_dir), str(dtype), attn_implementation)
    m = _MODEL_CACHE.get(key)
    if m is None:
        m = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=dtype, attn_implementation=attn_implementation
        )
        m.eval()
        _MODEL_CACHE[key] = m
    return m


def clear_hf_cache() -> None:
    _MODEL_CACHE.clear()
    _GREEDY_CACHE.clear()


@dataclass
class GreedyTrace:
    """Greedy continuation of one prompt.

    tokens[i]  : the i-th generated token (argmax of logits[i]).
    logits[i]  : float32 [vocab] logits that produced tokens[i]
                 (logits[0] are the first-step / next-token logits of the prompt).
    """

    tokens: list[int]
    logits: torch.Tensor  # [n, vocab] float32

    def margin(self, i: int) -> float:
        """top1 - top2 logit gap at step i (how safe the greedy choice is)."""
        top2 = torch.topk(self.logits[i], 2).values
        return float(top2[0] - top2[1])

    @property
    def logprobs(self) -> torch.Tensor:
        return torch.log_softmax(self.logits.double(), dim=-1).float()


@torch.no_grad()
def _greedy_one(model, prompt: Sequence[int], n: int, keep_logits: bool = True):
    if len(prompt) == 0:
        raise ValueError("empty prompt")
    ids = torch.tensor([list(prompt)], dtype=torch.long)
    out = model(input_ids=ids, use_cache=True)
    past = out.past_key_values
    logits = out.logits[0, -1].float()
    toks: list[int] = []
    rows: list[torch.Tensor] = []
    for step in range(n):
        t = int(torch.argmax(logits))
        toks.append(t)
        if keep_logits:
            rows.append(logits.clone())
        if step == n - 1:
            break
        out = model(input_ids=torch.tensor([[t]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits = out.logits[0, -1].float()
    assert len(toks) == n
    stacked = torch.stack(rows) if keep_logits else None
    return toks, stacked


def hf_greedy_steps(model_dir, prompts: Iterable[Sequence[int]], max_new_tokens: int) -> list[GreedyTrace]:
    """Greedy decode each prompt separately (batch 1, no padding) in float32.

    Exactly ``max_new_tokens`` tokens per prompt; EOS is neither a stop nor
    masked.  Results are cached per (model_dir, prompt) and reused for shorter
    requests.
    """
    model = load_hf_model(model_dir)
    key_dir = _key(model_dir)
    res = []
    for p in prompts:
        p = tuple(int(t) for t in p)
        k = (key_dir, p)
        tr = _GREEDY_CACHE.get(k)
        if tr is None or len(tr.tokens) < max_new_tokens:
            toks, logits = _greedy_one(model, p, max_new_tokens)
            tr = GreedyTrace(toks, logits)
            _GREEDY_CACHE[k] = tr
        res.append(GreedyTrace(tr.tokens[:max_new_tokens], tr.logits[:max_new_tokens]))
    return res


def hf_greedy(model_dir, prompts: Iterable[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    """New tokens only, exactly max_new_tokens per prompt."""
    return [tr.tokens for tr in hf_greedy_steps(model_dir, prompts, max_new_tokens)]


@torch.no_grad()
def hf_next_token_logits(model_dir, prompts: Iterable[Sequence[int]], dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Logits (float32 [vocab]) for the token after each prompt: one full forward, batch 1."""
    model = load_hf_model(model_dir, dtype=dtype)
    res = []
    for p in prompts:
        ids = torch.tensor([list(p)], dtype=torch.long)
        res.append(model(input_ids=ids, use_cache=False).logits[0, -1].float().clone())
    return res


@torch.no_grad()
def hf_router_margin(model_dir, sequences: Iterable[Sequence[int]]) -> float:
    """Smallest gap between the k-th and (k+1)-th router logit of any token, layer and
    sequence (each run as one full forward): how far a mixture-of-experts model's expert
    choice is from a tie. An engine computes router logits with a different summation
    order (~1e-6 apart in float32); a gap below that makes its choice legitimately differ."""
    model = load_hf_model(model_dir)
    top_k = model.config.num_experts_per_tok
    logits: list[torch.Tensor] = []
    routers = [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
    assert routers, f"{type(model).__name__} has no *TopKRouter module"
    hooks = [m.register_forward_hook(lambda mod, args, out: logits.append(out[0].float())) for m in routers]
    try:
        for seq in sequences:
            model(input_ids=torch.tensor([list(seq)], dtype=torch.long), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    top = torch.cat(logits).topk(top_k + 1, dim=-1).values
    return float((top[:, top_k - 1] - top[:, top_k]).min())


@torch.no_grad()
def hf_deepseek_routing_margin(model_dir, sequences: Iterable[Sequence[int]]) -> float:
    """DeepSeek's ``hf_router_margin``: the smallest gap, over every token, MoE layer and
    sequence (one full forward each), between the last chosen and the first rejected
    candidate of its routing, in the space the choice is made in: group scores (when
    groups are limited) and the biased expert scores within the chosen groups."""
    model = load_hf_model(model_dir)
    cfg = model.config
    routers = [m for m in model.modules() if type(m).__name__ in ("DeepseekV3TopkRouter", "DeepseekV2TopkRouter")]
    assert routers, f"{type(model).__name__} has no DeepSeek router"
    gaps: list[float] = []

    def gap(x: torch.Tensor, k: int) -> float:
        top = x.topk(k + 1, dim=-1).values
        return float((top[:, k - 1] - top[:, k]).min())

    def hook(mod, args, out):
        logits = out[0].float()
        v3 = type(mod).__name__ == "DeepseekV3TopkRouter"
        scores = logits.sigmoid() + mod.e_score_correction_bias if v3 else logits.softmax(-1)
        method = "noaux_tc" if v3 else cfg.topk_method
        n_group, topk_group = (cfg.n_group, cfg.topk_group) if method != "greedy" else (1, 1)
        if topk_group < n_group:
            grouped = scores.view(-1, n_group, scores.shape[-1] // n_group)
            group_scores = grouped.topk(2, -1).values.sum(-1) if v3 else grouped.max(-1).values
            gaps.append(gap(group_scores, topk_group))
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(topk_group, -1).indices, True)
            scores = scores.masked_fill(~keep.repeat_interleave(scores.shape[-1] // n_group, 1), float("-inf"))
        gaps.append(gap(scores, cfg.num_experts_per_tok))

    hooks = [m.register_forward_hook(hook) for m in routers]
    try:
        for seq in sequences:
            model(input_ids=torch.tensor([list(seq)], dtype=torch.long), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return min(gaps)


def hf_rope_inv_freq(model_dir) -> torch.Tensor:
    """The inverse frequencies HF's loaded model really uses (to verify scaling is applied)."""
    model = load_hf_model(model_dir)
    return model.model.rotary_emb.inv_freq.detach().clone().float()


def default_rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


# --------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------

_LOW_ID = 3  # keep prompts clear of pad/bos ids; EOS may still appear in prompts

# Prompt lengths of the standard correctness batch: 1 token, and both sides of
# the 16- and 32-token block boundaries, plus multi-block prompts.
STANDARD_LENGTHS = (1, 15, 16, 17, 31, 32, 33, 64, 100, 200)
STANDARD_SEED = 1


def standard_prompts(vocab_size: int) -> list[list[int]]:
    return random_prompts(vocab_size, STANDARD_LENGTHS, seed=STANDARD_SEED)


def random_prompts(vocab_size: int, lengths: Sequence[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(_LOW_ID, vocab_size, (int(n),), generator=g).tolist() for n in lengths]


def shared_prefix_prompts(
    vocab_size: int,
    prefix_len: int,
    suffix_lengths: Sequence[int],
    seed: int,
    num_prefixes: int = 1,
) -> list[list[int]]:
    """Prompts that share long prefixes.

    For each of ``num_prefixes`` random prefixes of length ``prefix_len``, one
    prompt per entry of ``suffix_lengths`` (a suffix length of 0 gives the bare
    prefix).  Output order: prefix-major.
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_prefixes):
        prefix = torch.randint(_LOW_ID, vocab_size, (prefix_len,), generator=g).tolist()
        for n in suffix_lengths:
            out.append(prefix + torch.randint(_LOW_ID, vocab_size, (int(n),), generator=g).tolist())
    return out


# --------------------------------------------------------------------------
# Comparison helpers
# --------------------------------------------------------------------------


def first_mismatch(a: Sequence[int], b: Sequence[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if int(x) != int(y):
            return i
    if len(a) != len(b):
        return min(len(a), len(b))
    return None


def describe_token_mismatch(label: str, idx: int, prompt: Sequence[int], ours: Sequence[int],
                            trace: GreedyTrace) -> str | None:
    ref = trace.tokens
    pos = first_mismatch(ours, ref)
    if pos is None:
        return None
    msg = [f"[{label}] prompt #{idx} (len {len(prompt)}): first differing generated position {pos}"
           f" (absolute position {len(prompt) + pos})"]
    if pos < len(ours) and pos < len(ref):
        lg = trace.logits[pos]
        top = torch.topk(lg, 3)
        msg.append(f"  ours={ours[pos]} ref={ref[pos]}; HF top3 ids={top.indices.tolist()} "
                   f"logits={[round(v, 5) for v in top.values.tolist()]} margin={trace.margin(pos):.3g}; "
                   f"HF logit of ours={float(lg[int(ours[pos])]) if 0 <= int(ours[pos]) < lg.numel() else 'n/a'}")
    else:
        msg.append(f"  length ours={len(ours)} ref={len(ref)}")
    msg.append(f"  ours={list(ours)}")
    msg.append(f"  ref ={list(ref)}")
    return "\n".join(msg)


def fp8_kv_round(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` as an FP8 (e4m3) KV cache with this scale gives it back: x / scale rounded to
    float8_e4m3fn (saturating at +-448), times scale. Written from the definition, not
    imported from pdserve."""
    return ((x.float() / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)


def fp8_kv_attention_impl(k_scales: Sequence[float], v_scales: Sequence[float]) -> str:
    """Register (once) and name a transformers attention implementation that is eager
    attention over keys and values rounded as an FP8 KV cache with these per-layer
    scales stores them: the reference for ``kv_cache_dtype="fp8_e4m3"``. (The HF cache
    keeps full precision; rounding the whole K/V at every step gives the same values.)"""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.models.llama.modeling_llama import eager_attention_forward

    ks, vs = tuple(float(k) for k in k_scales), tuple(float(v) for v in v_scales)
    name = f"fp8kv_{abs(hash((ks, vs))):x}"

    def attention(module, query, key, value, attention_mask, **kwargs):
        i = module.layer_idx
        return eager_attention_forward(module, query, fp8_kv_round(key, ks[i]), fp8_kv_round(value, vs[i]),
                                       attention_mask, **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, eager_mask)  # without it a new name gets no causal mask
    return name


def hf_greedy_fp8_kv(model_dir, prompts: Iterable[Sequence[int]], max_new_tokens: int,
                     k_scales: Sequence[float], v_scales: Sequence[float]) -> list[GreedyTrace]:
    """Greedy decode (batch 1, float32) with keys and values rounded as an FP8 cache stores them."""
    model = load_hf_model(model_dir, attn_implementation=fp8_kv_attention_impl(k_scales, v_scales))
    return [GreedyTrace(*_greedy_one(model, [int(t) for t in p], max_new_tokens)) for p in prompts]
