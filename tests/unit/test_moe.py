"""Mixture-of-experts pieces on one rank: the registry's config parsers, routing, the
torch twin of the fused expert computation, and FusedMoE's weight loading."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from pdserve.engine.config import EngineConfig, ModelConfig, MoEConfig, ParallelConfig
from pdserve.engine.models import registry
from pdserve.engine.moe import FusedMoE, fused_experts_torch, select_experts, set_expert_dispatch
from pdserve.engine.parallel import TPGroup

BASE = {
    "vocab_size": 100,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}
QWEN3_MOE = {**BASE, "architectures": ["Qwen3MoeForCausalLM"], "num_experts": 8, "num_experts_per_tok": 2,
             "moe_intermediate_size": 32, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []}
MIXTRAL = {**BASE, "architectures": ["MixtralForCausalLM"], "num_local_experts": 4, "num_experts_per_tok": 2}
QWEN2_MOE = {**BASE, "architectures": ["Qwen2MoeForCausalLM"], "num_experts": 4, "num_experts_per_tok": 2,
             "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64}


def load(tmp_path, cfg) -> ModelConfig:
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return ModelConfig.from_dir(tmp_path)


# --- registry and parsers -----------------------------------------------------------


def test_dense_architectures_keep_their_flags(tmp_path):
    for name, bias, qk_norm in [("LlamaForCausalLM", False, False), ("MistralForCausalLM", False, False),
                                ("Qwen2ForCausalLM", True, False), ("Qwen3ForCausalLM", False, True)]:
        m = load(tmp_path, {**BASE, "architectures": [name]})
        assert (m.architecture, m.attention_bias, m.qk_norm, m.moe) == (name, bias, qk_norm, None)
        assert registry.model_class(name).__name__ == "LlamaForCausalLM"


def test_qwen3_moe_sparse_layers(tmp_path):
    m = load(tmp_path, QWEN3_MOE)
    assert m.qk_norm and m.moe == MoEConfig(8, 2, 32, True, (0, 1, 2, 3))
    # decoder_sparse_step=2: layers 1 and 3 are sparse; mlp_only_layers then drops 3
    m = load(tmp_path, {**QWEN3_MOE, "decoder_sparse_step": 2, "mlp_only_layers": [3]})
    assert m.moe.sparse_layers == (1,) and m.moe.is_sparse(1) and not m.moe.is_sparse(0)
    # transformers 5 writes Qwen3-MoE's expert count as num_local_experts
    spelled = {k: v for k, v in QWEN3_MOE.items() if k != "num_experts"} | {"num_local_experts": 8}
    assert load(tmp_path, spelled).moe.num_experts == 8
    assert registry.model_class("Qwen3MoeForCausalLM").__name__ == "SparseMoeForCausalLM"


def test_mixtral_and_qwen2_moe(tmp_path):
    m = load(tmp_path, MIXTRAL)
    assert m.moe == MoEConfig(4, 2, 128, True, (0, 1, 2, 3)) and not m.qk_norm
    m = load(tmp_path, QWEN2_MOE)
    assert m.attention_bias and m.moe.shared_expert_intermediate_size == 64 and not m.moe.renormalize


@pytest.mark.parametrize(
    "change, field",
    [
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"num_experts": 0}, "num_experts"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
        ({"mlp_only_layers": [7]}, "mlp_only_layers"),
        ({"decoder_sparse_step": 0}, "decoder_sparse_step"),
        ({"moe_intermediate_size": None}, "moe_intermediate_size"),
    ],
)
def test_bad_moe_config_names_the_field(tmp_path, change, field):
    with pytest.raises(ValueError, match=field):
        load(tmp_path, {**QWEN3_MOE, **change})


def test_experts_must_split_evenly_over_tp(tmp_path):
    m = load(tmp_path, {**QWEN3_MOE, "num_experts": 6})
    with pytest.raises(ValueError, match="num_experts=6 is not divisible by tensor_parallel_size=4"):
        EngineConfig(model=m, parallel=ParallelConfig(4))
    with pytest.raises(ValueError, match="expert_dispatch"):
        ParallelConfig(2, expert_dispatch="broadcast")


def test_register_refuses_a_duplicate_and_unknown_names_list_supported():
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.ARCHITECTURES["MixtralForCausalLM"])
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*MixtralForCausalLM.*Qwen3MoeForCausalLM"):
        registry.model_class("GPT2LMHeadModel")


# --- routing and the twin -----------------------------------------------------------


def test_select_experts_is_softmax_top_k():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0], [3.0, 0.0, 0.0, 2.5]])
    w, ids = select_experts(logits, 2, renormalize=False)
    probs = logits.softmax(-1)
    assert ids.tolist() == [[1, 2], [0, 3]] and w.dtype == torch.float32
    torch.testing.assert_close(w, probs.gather(1, ids))
    w_norm, _ = select_experts(logits, 2, renormalize=True)
    torch.testing.assert_close(w_norm, w / w.sum(-1, keepdim=True))


def _naive(x, w13, w2, weights, ids, first_expert):
    """The definition, one (token, choice) at a time."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j]) - first_expert
            if 0 <= e < w13.shape[0]:
                gate, up = (w13[e] @ x[t]).chunk(2)
                out[t] += weights[t, j] * (w2[e] @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize("first_expert, num_local", [(0, 6), (3, 3)])
def test_fused_experts_torch_matches_the_definition(first_expert, num_local):
    g = torch.Generator().manual_seed(0)
    T, H, I, k = 11, 32, 24, 3
    x = torch.randn(T, H, generator=g)
    w13 = torch.randn(num_local, 2 * I, H, generator=g) / H**0.5
    w2 = torch.randn(num_local, H, I, generator=g) / I**0.5
    weights, ids = select_experts(torch.randn(T, 6, generator=g), k, renormalize=True)
    out = fused_experts_torch(x, w13, w2, weights, ids, first_expert)
    torch.testing.assert_close(out, _naive(x, w13, w2, weights, ids, first_expert), atol=1e-5, rtol=1e-5)
    assert out.abs().max() > 0.1


# --- FusedMoE weights ----------------------------------------------------------------


def test_fused_moe_loads_only_its_experts():
    E, H, I = 4, 8, 6
    g = torch.Generator().manual_seed(1)
    full = {(e, m): torch.randn(*((I, H) if m != "down" else (H, I)), generator=g) for e in range(E)
            for m in ("gate", "up", "down")}
    moe = FusedMoE(E, H, I, TPGroup(rank=1, size=2))  # experts 2 and 3
    assert (moe.first_expert, moe.num_local_experts) == (2, 2)
    for (e, m), t in full.items():
        param = moe.w2 if m == "down" else moe.w13
        param.weight_loader(param, t, (e, m))
    for local, e in enumerate((2, 3)):
        assert torch.equal(moe.w13[local], torch.cat([full[e, "gate"], full[e, "up"]]))
        assert torch.equal(moe.w2[local], full[e, "down"])
    # transformers 5's fused in-memory layout: every expert in one tensor
    fused = FusedMoE(E, H, I, TPGroup(rank=1, size=2))
    stacked = torch.stack([torch.cat([full[e, "gate"], full[e, "up"]]) for e in range(E)])
    fused.w13.weight_loader(fused.w13, stacked, (None, "gate_up"))
    assert torch.equal(fused.w13, moe.w13)
    with pytest.raises(ValueError, match="expert 3 up has shape"):
        moe.w13.weight_loader(moe.w13, torch.zeros(I + 1, H), (3, "up"))


def test_set_expert_dispatch():
    moe = FusedMoE(4, 8, 6, TPGroup())
    root = torch.nn.ModuleList([moe])
    set_expert_dispatch(root, "all_to_all")
    assert moe.dispatch == "all_to_all"
    with pytest.raises(ValueError, match="expert_dispatch must be one of"):
        set_expert_dispatch(root, "gather")


def test_loader_names_a_missing_expert(tmp_path):
    """A checkpoint without one expert's matrix is refused at load, naming it."""
    from safetensors.torch import save_file

    from pdserve.engine.loader import load_model

    cfg = {**MIXTRAL, "num_hidden_layers": 1, "vocab_size": 16, "num_local_experts": 2}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = ModelConfig.from_dir(tmp_path)
    H, I = m.hidden_size, m.moe.intermediate_size
    tensors = {"model.embed_tokens.weight": torch.randn(16, H), "lm_head.weight": torch.randn(16, H),
               "model.norm.weight": torch.ones(H), "model.layers.0.input_layernorm.weight": torch.ones(H),
               "model.layers.0.post_attention_layernorm.weight": torch.ones(H),
               "model.layers.0.block_sparse_moe.gate.weight": torch.randn(2, H)}
    for proj, rows in (("q", 4 * 16), ("k", 2 * 16), ("v", 2 * 16)):
        tensors[f"model.layers.0.self_attn.{proj}_proj.weight"] = torch.randn(rows, H)
    tensors["model.layers.0.self_attn.o_proj.weight"] = torch.randn(H, 4 * 16)
    for e in range(2):
        for w, shape in (("w1", (I, H)), ("w3", (I, H)), ("w2", (H, I))):
            if (e, w) != (1, "w3"):
                tensors[f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight"] = torch.randn(*shape)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="layers.0.mlp.experts: expert 1 up"):
        load_model(m, TPGroup(), torch.float32, "cpu", 64)
    tensors["model.layers.0.block_sparse_moe.experts.1.w3.weight"] = torch.randn(I, H)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    model = load_model(m, TPGroup(), torch.float32, "cpu", 64)
    assert torch.equal(model.layers[0].mlp.experts.w13[1, I:], tensors["model.layers.0.block_sparse_moe.experts.1.w3.weight"])


def test_fused_experts_torch_with_no_tokens():
    """A rank that receives no rows (all-to-all dispatch) computes an empty result."""
    from pdserve.engine.moe import fused_experts_torch

    x = torch.zeros(0, 8)
    out = fused_experts_torch(x, torch.randn(2, 12, 8), torch.randn(2, 8, 6), torch.zeros(0, 1),
                              torch.zeros(0, 1, dtype=torch.long))
    assert out.shape == (0, 8)
