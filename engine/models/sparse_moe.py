"""Llama-family decoders whose MLP is a mixture of experts: Qwen3-MoE, Qwen2-MoE, Mixtral.

Attention, norms, RoPE and the embeddings are llama.py's; only the feed-forward block of
the layers ``ModelConfig.moe.sparse_layers`` names changes: a router (a replicated
[E, H] linear), softmax top-k, and ``FusedMoE`` (engine/moe.py), which holds this rank's
experts and returns the combined output. Qwen2-MoE adds one tensor-parallel shared
expert behind a sigmoid gate. Dense layers (Qwen ``mlp_only_layers``) keep llama's MLP.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..config import ModelConfig
from ..layers import _param
from ..moe import FusedMoE, select_experts
from ..parallel import TPGroup
from .llama import MLP, LlamaForCausalLM


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup) -> None:
        super().__init__()
        moe = cfg.moe
        self.top_k = moe.top_k
        self.renormalize = moe.renormalize
        self.gate = _param(moe.num_experts, cfg.hidden_size)  # the router, replicated
        self.experts = FusedMoE(moe.num_experts, cfg.hidden_size, moe.intermediate_size, tp)
        self.shared_expert = None
        if moe.shared_expert_intermediate_size:
            self.shared_expert = MLP(cfg, tp, moe.shared_expert_intermediate_size)
            self.shared_expert_gate = _param(1, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, hidden] -> [T, hidden], the same on every TP rank."""
        router_logits = nn.functional.linear(x, self.gate)  # [T, E]
        topk_weights, topk_ids = select_experts(router_logits, self.top_k, self.renormalize)
        out = self.experts(x, topk_weights, topk_ids)
        if self.shared_expert is not None:
            gate = torch.sigmoid(nn.functional.linear(x, self.shared_expert_gate))  # [T, 1]
            out = out + gate * self.shared_expert(x)
        return out


# layers.{i}.(mlp|block_sparse_moe).experts.{e}.{matrix}.weight: one expert's matrix
_EXPERT = re.compile(r"^(layers\.\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
# layers.{i}.mlp.experts.{gate_up_proj|down_proj}: every expert at once (transformers 5's layout)
_FUSED_EXPERTS = re.compile(r"^(layers\.\d+)\.(?:mlp|block_sparse_moe)\.experts\.(gate_up_proj|down_proj)$")
_MATRIX = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}


class SparseMoeForCausalLM(LlamaForCausalLM):
    def make_mlp(self, cfg: ModelConfig, tp: TPGroup, layer: int) -> nn.Module:
        if cfg.moe.is_sparse(layer):
            return SparseMoeBlock(cfg, tp)
        return MLP(cfg, tp)

    def param_for(self, ckpt_name: str) -> tuple[str, object] | None:
        name = ckpt_name.removeprefix("model.")
        if m := _EXPERT.match(name):
            layer, expert, matrix = m.groups()
            which = _MATRIX.get(matrix)
            if which is None:
                raise ValueError(f"unexpected expert tensor {ckpt_name!r}")
            return f"{layer}.mlp.experts.{'w2' if which == 'down' else 'w13'}", (int(expert), which)
        if m := _FUSED_EXPERTS.match(name):
            layer, matrix = m.groups()
            return (f"{layer}.mlp.experts.w13", (None, "gate_up")) if matrix == "gate_up_proj" else (
                f"{layer}.mlp.experts.w2", (None, "down"))
        name = name.replace(".block_sparse_moe.", ".mlp.")
        if name.endswith(".mlp.gate.weight"):  # the router
            return name.removesuffix(".weight"), None
        if name.endswith(".mlp.shared_expert_gate.weight"):
            return name.removesuffix(".weight"), None
        return super().param_for("model." + name)
