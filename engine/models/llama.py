"""Llama-family decoder: Llama 2/3.x and Mistral, Qwen2 (q/k/v bias), Qwen3 (q/k RMSNorm).

Inputs are flat: all of a step's tokens from every request in one dimension
``T``; the paged attention metadata says which request each token belongs to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import AttentionBackend, AttentionMetadata
from ..config import ModelConfig
from ..layers import (
    ColumnParallelLinear,
    QKVParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
    set_fused_ops,
)
from ..parallel import TPGroup


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, tp, cfg.attention_bias)
        self.num_heads = self.qkv_proj.num_local_heads
        self.num_kv_heads = self.qkv_proj.num_local_kv_heads
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, tp)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.scale = cfg.head_dim**-0.5
        self.backend = AttentionBackend()
        self.k_scale = 1.0
        self.v_scale = 1.0
        """FP8 KV cache scales of this layer (``set_kv_scales``); unused by other caches."""

    def forward(self, rope, x: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """rope: ``rotate(q, k) -> (q, k)`` from ``RotaryEmbedding.for_step``; x: [T, hidden]."""
        T = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, (H + 2 Hkv) D]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope(q, k)
        self.backend.store_kv(kv_layer, k, v, meta, self.k_scale, self.v_scale)
        o = self.backend.forward(q, kv_layer, meta, self.scale, self.k_scale, self.v_scale)
        return self.o_proj(o.view(T, q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup, intermediate_size: int | None = None) -> None:
        super().__init__()
        intermediate_size = intermediate_size or cfg.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(cfg.hidden_size, [intermediate_size] * 2, tp)
        self.down_proj = RowParallelLinear(intermediate_size, cfg.hidden_size, tp)
        self.fused_ops = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_ops:
            from ..kernels.activation import silu_and_mul

            return self.down_proj(silu_and_mul(self.gate_up_proj(x)))
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup, mlp: nn.Module | None = None) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, tp)
        self.mlp = MLP(cfg, tp) if mlp is None else mlp  # mlp: x [T, hidden] -> [T, hidden], reduced over TP
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, rope, x, residual, kv_layer, meta):
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(rope, x, kv_layer, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    # checkpoint name fragment -> (our parameter fragment, shard id)
    stacked_params = {
        ".q_proj.": (".qkv_proj.", "q"),
        ".k_proj.": (".qkv_proj.", "k"),
        ".v_proj.": (".qkv_proj.", "v"),
        ".gate_proj.": (".gate_up_proj.", 0),
        ".up_proj.": (".gate_up_proj.", 1),
    }

    def __init__(self, cfg: ModelConfig, tp: TPGroup, dtype: torch.dtype, max_positions: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling, dtype)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(cfg, tp, self.make_mlp(cfg, tp, i)) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = self.embed_tokens if cfg.tie_word_embeddings else VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)

    def make_mlp(self, cfg: ModelConfig, tp: TPGroup, layer: int) -> nn.Module:
        """Layer ``layer``'s feed-forward block; mixture-of-experts models override this."""
        return MLP(cfg, tp)

    def set_kernels(self, attention: AttentionBackend, fused_ops: bool) -> None:
        """Choose the attention backend and whether norms, RoPE and SiLU-mul use fused kernels."""
        for layer in self.layers:
            layer.self_attn.backend = attention
        set_fused_ops(self, fused_ops)

    def set_kv_scales(self, k_scales: list[float], v_scales: list[float]) -> None:
        """Each layer's FP8 KV cache scales (stored = x / scale)."""
        for layer, k, v in zip(self.layers, k_scales, v_scales, strict=True):
            layer.self_attn.k_scale, layer.self_attn.v_scale = float(k), float(v)

    @property
    def num_local_kv_heads(self) -> int:
        return self.layers[0].self_attn.num_kv_heads

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, hidden]."""
        x = self.embed_tokens(input_ids)
        rope = self.rotary.for_step(positions)
        residual = None
        for i, layer in enumerate(self.layers):
            x, residual = layer(rope, x, residual, kv_cache[i], meta)
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
        for frag, (ours, shard) in self.stacked_params.items():
            if frag in name:
                return name.replace(frag, ours), shard
        return name, None
