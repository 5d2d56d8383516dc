"""DeepSeek pieces against transformers' own modules: config parsing, grouped top-k
routing, YaRN, and absorbed decode against expanded attention (engine/mla.py)."""

from __future__ import annotations

import math

import pytest
import torch

from pdserve.engine.attention import AttentionBackend
from pdserve.engine.config import GroupedTopKConfig, ModelConfig, YarnScaling
from pdserve.engine.mla import MLAAttention, MLARotary, softmax_scale, yarn_inv_freq
from pdserve.engine.models.deepseek import grouped_topk
from pdserve.engine.models.deepseek_config import parse_deepseek_v2, parse_deepseek_v3
from pdserve.engine.parallel import TPGroup

V3 = dict(
    architectures=["DeepseekV3ForCausalLM"], vocab_size=64, hidden_size=32, intermediate_size=64,
    moe_intermediate_size=16, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
    n_shared_experts=1, n_routed_experts=8, routed_scaling_factor=2.5, kv_lora_rank=32, q_lora_rank=24,
    qk_rope_head_dim=16, v_head_dim=8, qk_nope_head_dim=8, n_group=4, topk_group=2, num_experts_per_tok=2,
    first_k_dense_replace=1, norm_topk_prob=True, hidden_act="silu", max_position_embeddings=256,
    rms_norm_eps=1e-6, rope_interleave=True,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                     "original_max_position_embeddings": 64, "mscale": 1.0, "mscale_all_dim": 0.8},
)
V2 = dict(V3, architectures=["DeepseekV2ForCausalLM"], q_lora_rank=None, topk_method="group_limited_greedy",
          norm_topk_prob=False)


def test_parse_v3_and_v2():
    v3 = parse_deepseek_v3(V3)
    assert (v3["num_kv_heads"], v3["head_dim"]) == (1, 48)  # the cache's one latent head
    assert v3["moe"].sparse_layers == (1, 2) and v3["moe"].renormalize
    assert v3["grouped_topk"] == GroupedTopKConfig("sigmoid", "noaux_tc", 4, 2, 2.5, 1)
    assert v3["mla"].yarn == YarnScaling(4.0, 64, 32.0, 1.0, 1.0, 0.8)
    v2 = parse_deepseek_v2(V2)
    assert v2["mla"].q_lora_rank is None and not v2["moe"].renormalize
    assert v2["grouped_topk"].topk_method == "group_limited_greedy"
    greedy = parse_deepseek_v2(dict(V2, topk_method="greedy", n_group=None, topk_group=None))
    assert (greedy["grouped_topk"].num_groups, greedy["grouped_topk"].topk_groups) == (1, 1)


@pytest.mark.parametrize(("parse", "change", "field"), [
    (parse_deepseek_v3, dict(topk_method="greedy"), "topk_method='greedy'"),
    (parse_deepseek_v3, dict(scoring_func="softmax"), "scoring_func='softmax'"),
    (parse_deepseek_v3, dict(moe_layer_freq=2), "moe_layer_freq=2"),
    (parse_deepseek_v3, dict(n_group=3), "n_group=3"),
    (parse_deepseek_v3, dict(topk_group=5), "topk_group"),
    (parse_deepseek_v3, dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (parse_deepseek_v3, dict(attention_bias=True), "attention_bias=True"),
    (parse_deepseek_v3, dict(kv_lora_rank=None), "kv_lora_rank=None"),
    (parse_deepseek_v3, dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0}), "rope_type='dynamic'"),
    (parse_deepseek_v3, dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), "factor is required"),
    (parse_deepseek_v2, dict(topk_method="noaux_tc"), "topk_method='noaux_tc'"),
    (parse_deepseek_v2, dict(scoring_func="sigmoid"), "scoring_func='sigmoid'"),
    (parse_deepseek_v2, dict(norm_topk_prob=True), "norm_topk_prob=True"),
])
def test_unsupported_options_name_the_field(parse, change, field):
    with pytest.raises(ValueError, match=field.replace("(", r"\(").replace(")", r"\)")):
        parse(dict(V3 if parse is parse_deepseek_v3 else V2, **change))


def test_from_dir_reads_yarn_for_mla_only(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps(dict(V3, rope_parameters=dict(V3["rope_parameters"], mscale=None))))
    cfg = ModelConfig.from_dir(tmp_path)
    assert cfg.cache_kind == "mla_latent" and cfg.num_cache_planes == 1 and cfg.mla.yarn.factor == 4.0
    (tmp_path / "config.json").write_text(json.dumps(dict(V3, topk_method="bogus")))
    with pytest.raises(ValueError, match="topk_method='bogus'"):
        ModelConfig.from_dir(tmp_path)
    llama = dict(architectures=["LlamaForCausalLM"], vocab_size=64, hidden_size=32, intermediate_size=64,
                 num_hidden_layers=1, num_attention_heads=4, rope_parameters=V3["rope_parameters"])
    (tmp_path / "config.json").write_text(json.dumps(llama))
    with pytest.raises(ValueError, match="unsupported rope_type 'yarn'"):  # YaRN is read for MLA models only
        ModelConfig.from_dir(tmp_path)


def hf_config(cfg: dict):
    import transformers

    cls = transformers.DeepseekV3Config if cfg["architectures"][0].startswith("DeepseekV3") else transformers.DeepseekV2Config
    return cls(**{k: v for k, v in cfg.items() if k != "architectures"})


@pytest.mark.parametrize("cfg", [V3, V2, dict(V2, topk_method="greedy")], ids=["v3", "v2-grouped", "v2-greedy"])
def test_grouped_topk_matches_transformers_router(cfg):
    """Same experts and weights as transformers' router for random tokens (ties have
    probability 0 with continuous random logits)."""
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    is_v3 = cfg is V3
    hf = (DeepseekV3TopkRouter if is_v3 else DeepseekV2TopkRouter)(hf_config(cfg))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(hf.weight.shape, generator=g))
        if is_v3:  # large enough to change which experts and groups win
            hf.e_score_correction_bias.copy_(0.3 * torch.randn(8, generator=g))
    x = torch.randn(64, 32, generator=g)
    _, hf_w, hf_ids = hf(x)
    parsed = (parse_deepseek_v3 if is_v3 else parse_deepseek_v2)(cfg)
    logits = torch.nn.functional.linear(x, hf.weight)
    w, ids = grouped_topk(logits, hf.e_score_correction_bias if is_v3 else None, parsed["grouped_topk"],
                          parsed["moe"].top_k, parsed["moe"].renormalize)
    order, hf_order = ids.argsort(-1), hf_ids.argsort(-1)
    assert torch.equal(ids.gather(1, order), hf_ids.gather(1, hf_order))
    torch.testing.assert_close(w.gather(1, order), hf_w.gather(1, hf_order), rtol=1e-6, atol=1e-7)
    if is_v3:  # the bias changed some choice, so the test can see a missing bias
        unbiased, _ = grouped_topk(logits, None, parsed["grouped_topk"], 2, True)
        assert not torch.equal(unbiased, w)


@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
     "mscale": 1.0, "mscale_all_dim": 0.8},
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096,
     "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1},  # DeepSeek-V3's own
    {"rope_type": "yarn", "rope_theta": 500.0, "factor": 8.0, "original_max_position_embeddings": 32},
])
def test_yarn_matches_transformers(rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, yarn_apply_mscale

    cfg = dict(V3, rope_parameters=rope, max_position_embeddings=rope["original_max_position_embeddings"] * 4)
    mla = parse_deepseek_v3(cfg)["mla"]
    hf_inv, hf_attn = ROPE_INIT_FUNCTIONS["yarn"](hf_config(cfg), "cpu")
    inv, attn = yarn_inv_freq(mla.qk_rope_head_dim, rope["rope_theta"], mla.yarn)
    assert torch.equal(inv, hf_inv) and attn == hf_attn
    assert softmax_scale(mla) == yarn_apply_mscale(rope, mla.qk_head_dim**-0.5)
    if rope.get("mscale_all_dim"):
        assert not math.isclose(softmax_scale(mla), mla.qk_head_dim**-0.5)


@pytest.mark.parametrize("q_lora", [24, None])
def test_absorbed_decode_equals_expanded_attention(q_lora):
    """The decode path (W_UK absorbed into q, W_UV after attention over the latent) gives
    what expanding the latent to per-head K/V gives, for a token over a paged context."""
    parsed = parse_deepseek_v3(dict(V3, q_lora_rank=q_lora))
    mcfg = ModelConfig(model_dir="", architecture="DeepseekV3ForCausalLM", vocab_size=64, hidden_size=32,
                       intermediate_size=64, num_layers=1, num_heads=4, max_position_embeddings=256,
                       rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None, tie_word_embeddings=False,
                       **parsed)
    torch.set_default_dtype(torch.float64)
    try:
        attn = MLAAttention(mcfg, TPGroup())
        rotary = MLARotary(mcfg.mla, 10000.0, 256, torch.float64)
    finally:
        torch.set_default_dtype(torch.float32)
    g = torch.Generator().manual_seed(0)
    for p in attn.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    block_size, ctx = 4, 11
    cache = torch.zeros(1, 8, 1, 1, block_size, 48, dtype=torch.float64)
    table = torch.tensor([5, 2, 7], dtype=torch.long)  # 3 blocks for 11 tokens, out of order
    x = torch.randn(ctx, 32, generator=g, dtype=torch.float64)
    positions = torch.arange(ctx)
    slots = table[positions // block_size] * block_size + positions % block_size
    backend = attn.backend
    # The whole sequence as one prefill (expanded), then its last token again as a decode.
    meta = backend.build_metadata(slots, torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                                  torch.tensor([[ctx, ctx]]), table[None], block_size)
    prefill = attn(rotary, rotary.for_step(positions), x, cache[0], meta)
    meta = backend.build_metadata(slots[-1:], table[None], torch.tensor([ctx]), torch.zeros(0, 2, dtype=torch.long),
                                  torch.zeros(0, 3, dtype=torch.long), block_size)
    decode = attn(rotary, rotary.for_step(positions[-1:]), x[-1:], cache[0], meta)
    torch.testing.assert_close(decode, prefill[-1:], rtol=1e-10, atol=1e-10)
    assert isinstance(backend, AttentionBackend)
