"""DeepSeek-V3 and DeepSeek-V2: multi-head latent attention and grouped-routing experts.

One class serves both (``DeepseekV3ForCausalLM``, ``DeepseekV2ForCausalLM``); they
differ only in config values (engine/models/deepseek_config.py): the routing (V3 sigmoid
scores + ``e_score_correction_bias``, groups ranked by their top-2; V2 softmax, greedy or
groups ranked by their max) and RoPE's layout. Attention is ``engine/mla.py`` over the
latent cache (``ModelConfig.cache_kind == "mla_latent"``). Layers before
``first_k_dense_replace`` have a dense MLP; the others route each token to ``top_k`` of
the experts (``FusedMoE``, expert-parallel over the TP ranks) and add the shared experts,
one dense tensor-parallel MLP of ``n_shared_experts * moe_intermediate_size``.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import AttentionMetadata
from ..config import GroupedTopKConfig, ModelConfig
from ..layers import RMSNorm, VocabParallelEmbedding, _copy_loader, set_fused_ops
from ..mla import MLAAttention, MLABackend, MLARotary
from ..moe import FusedMoE
from ..parallel import TPGroup
from .llama import MLP


def grouped_topk(
    router_logits: torch.Tensor, correction_bias: torch.Tensor | None, routing: GroupedTopKConfig,
    top_k: int, renormalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's routing: router_logits [T, E] float32 -> (weights [T, k] float32, ids [T, k]).

    The choice: score every expert (sigmoid, or softmax over experts), add the correction
    bias (V3), rank the ``num_groups`` groups of consecutive experts (V3: sum of a group's
    two best; V2: its best), keep the ``topk_groups`` best groups and take the ``top_k``
    best experts in them. The weights are the unbiased scores of those experts,
    renormalized to sum to 1 if asked, times ``routed_scaling_factor``.
    """
    T, E = router_logits.shape
    if routing.scoring_func == "sigmoid":
        scores = router_logits.sigmoid()
    else:
        scores = router_logits.softmax(dim=-1, dtype=torch.float32)
    choice = scores if correction_bias is None else scores + correction_bias
    if routing.topk_method != "greedy" and routing.topk_groups < routing.num_groups:
        grouped = choice.view(T, routing.num_groups, E // routing.num_groups)
        if routing.topk_method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_scores = grouped.max(dim=-1).values
        group_ids = group_scores.topk(routing.topk_groups, dim=-1, sorted=False).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_ids, True)
        # V3 masks other groups to -inf, V2 to 0 (scores are positive, so the choice is the same).
        choice = choice.masked_fill(~keep.repeat_interleave(E // routing.num_groups, dim=1), float("-inf"))
    ids = choice.topk(top_k, dim=-1, sorted=False).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routing.routed_scaling_factor, ids


def _fp32_param(*shape: int) -> nn.Parameter:
    """The router stays float32 whatever the model dtype, as in the reference."""
    p = nn.Parameter(torch.empty(*shape, dtype=torch.float32), requires_grad=False)
    p.weight_loader = _copy_loader
    return p


class DeepseekMoE(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup) -> None:
        super().__init__()
        moe, routing = cfg.moe, cfg.grouped_topk
        self.routing, self.top_k, self.renormalize = routing, moe.top_k, moe.renormalize
        self.gate = _fp32_param(moe.num_experts, cfg.hidden_size)
        self.e_score_correction_bias = _fp32_param(moe.num_experts) if routing.topk_method == "noaux_tc" else None
        self.experts = FusedMoE(moe.num_experts, cfg.hidden_size, moe.intermediate_size, tp)
        shared = routing.num_shared_experts * moe.intermediate_size
        self.shared_experts = MLP(cfg, tp, shared) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, hidden] (the same on every rank) -> [T, hidden], reduced over TP."""
        logits = F.linear(x.float(), self.gate)  # [T, E] float32
        weights, ids = grouped_topk(logits, self.e_score_correction_bias, self.routing, self.top_k, self.renormalize)
        out = self.experts(x, weights, ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


class DeepseekDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup, layer: int) -> None:
        super().__init__()
        self.self_attn = MLAAttention(cfg, tp)
        self.mlp = DeepseekMoE(cfg, tp) if cfg.moe.is_sparse(layer) else MLP(cfg, tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, rotary, cos_sin, x, residual, cache_layer, meta):
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(rotary, cos_sin, x, cache_layer, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


# layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight: one expert's matrix (checkpoints)
_EXPERT = re.compile(r"^(layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
# layers.{i}.mlp.experts.{gate_up_proj|down_proj}: every expert at once (transformers 5 in memory)
_FUSED_EXPERTS = re.compile(r"^(layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_LAYER = re.compile(r"^layers\.(\d+)\.")


class DeepseekForCausalLM(nn.Module):
    """DeepSeek-V3 / V2 for one TP rank. The KV cache it reads is the MLA latent cache:
    ``[num_layers, num_blocks, 1, 1, block_size, kv_lora_rank + qk_rope_head_dim]``."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup, dtype: torch.dtype, max_positions: int) -> None:
        super().__init__()
        if cfg.mla is None or cfg.moe is None or cfg.grouped_topk is None:
            raise ValueError(f"{cfg.architecture} needs the MLA, MoE and routing config sections")
        self.cfg = cfg
        self.rotary = MLARotary(cfg.mla, cfg.rope_theta, max_positions, dtype)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(DeepseekDecoderLayer(cfg, tp, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = self.embed_tokens if cfg.tie_word_embeddings else VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)

    def set_kernels(self, attention: MLABackend, fused_ops: bool) -> None:
        """The MLA backend (engine/mla.py) and whether norms, SiLU-mul and experts use fused kernels."""
        if not isinstance(attention, MLABackend):
            raise ValueError(f"{self.cfg.architecture} needs an MLA attention backend, got {type(attention).__name__}")
        for layer in self.layers:
            layer.self_attn.backend = attention
        set_fused_ops(self, fused_ops)

    @property
    def num_local_kv_heads(self) -> int:
        return 1  # the latent, replicated on every rank

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, hidden]."""
        x = self.embed_tokens(input_ids)
        cos_sin = self.rotary.for_step(positions)
        residual = None
        for i, layer in enumerate(self.layers):
            x, residual = layer(self.rotary, cos_sin, x, residual, kv_cache[i], meta)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.logits(hidden)

    def param_for(self, ckpt_name: str) -> tuple[str, object] | None:
        """Map a checkpoint tensor name to (our parameter name, shard id); None to skip it."""
        name = ckpt_name.removeprefix("model.")
        if "rotary_emb.inv_freq" in name:
            return None
        if name == "lm_head.weight":
            return None if self.cfg.tie_word_embeddings else ("lm_head.weight", None)
        if (m := _LAYER.match(name)) and int(m.group(1)) >= self.cfg.num_layers:
            return None  # multi-token-prediction layers (V3's layer 61): not used for decoding
        if m := _EXPERT.match(name):
            prefix, expert, which = m.groups()
            return f"{prefix}.{'w2' if which == 'down' else 'w13'}", (int(expert), which)
        if m := _FUSED_EXPERTS.match(name):
            prefix, matrix = m.groups()
            return (f"{prefix}.w13", (None, "gate_up")) if matrix == "gate_up_proj" else (f"{prefix}.w2", (None, "down"))
        if name.endswith(".mlp.gate.weight"):
            return name.removesuffix(".weight"), None
        if name.endswith(".mlp.gate.e_score_correction_bias"):
            return name.replace(".gate.", "."), None
        for frag, shard in ((".gate_proj.", 0), (".up_proj.", 1)):
            if frag in name:  # dense MLP and shared experts
                return name.replace(frag, ".gate_up_proj."), shard
        return name, None
