"""Multi-head latent attention (DeepSeek V2/V3) over a paged latent cache.

The cache (one region per rank, replicated across TP ranks) is
``[num_layers, num_blocks, 1, 1, block_size, kv_lora_rank + qk_rope_head_dim]``: the
engine's KV layout with one plane (no separate V) and one "head". Per token it holds
the compressed KV after ``kv_a_layernorm`` (``c``, kv_lora_rank values) and then the
roped shared key ``k_pe``. Every rank computes and stores the full latent; the query
heads are sharded. Blocks, slots and the prefix cache are the engine's, unchanged.

Per layer, for this step's tokens (decodes first, then prefill chunks)::

    q = q_b_proj(q_a_layernorm(q_a_proj(x)))  or q_proj(x)    # [T, H, nope + rope]
    c, k_pe = kv_a_proj_with_mqa(x); c = kv_a_layernorm(c)    # [T, r], [T, rope]
    q_pe, k_pe = rope(q_pe), rope(k_pe); store [c, k_pe] at the tokens' slots

- **Prefill** (``expanded_attention``) expands the chunk's context latent to per-head
  keys ``[k_nope = W_UK c, k_pe]`` and values ``W_UV c`` (``W_UK``, ``W_UV``: the rows of
  ``kv_b_proj``) and runs causal attention, as the reference does.
- **Decode** absorbs ``W_UK`` into the query (``q_lat = q_nope W_UK``, so
  ``q . k = [q_lat, q_pe] . [c, k_pe]``) and attends over the latent itself, an MQA with
  one head of ``r + rope`` dims whose values are its first ``r`` dims; ``W_UV`` is applied
  after (``o = (p . c) W_UV^T``). Per token that reads ``r + rope`` values instead of
  ``H * (nope + rope + v)``. ``mla_decode_attention`` is the torch specification;
  ``kernels/mla_decode.py`` its Triton twin.

RoPE: DeepSeek rotates interleaved pairs (x0, x1), (x2, x3) ...; like transformers, the
pairs are first de-interleaved (evens, then odds) and rotated as halves, so the cached
``k_pe`` is in that half layout (q . k is unchanged: the same permutation on both).
YaRN scales cos/sin by ``attention_factor`` and the softmax by ``mscale(mscale_all_dim)^2``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionBackend, AttentionMetadata
from .config import MLAConfig, ModelConfig, YarnScaling
from .layers import ColumnParallelLinear, RMSNorm, RowParallelLinear, _param, _rotate_half
from .parallel import TPGroup

# ---------------------------------------------------------------------------------------
# RoPE with YaRN
# ---------------------------------------------------------------------------------------


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature ``0.1 * mscale * ln(factor) + 1`` (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_inv_freq(dim: int, theta: float, yarn: YarnScaling) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [dim / 2], cos/sin multiplier) of YaRN, as transformers computes them.

    Frequencies whose wavelength fits the original context many times (above ``beta_fast``
    rotations) are kept, those below ``beta_slow`` rotations are divided by ``factor``,
    with a linear ramp between.
    """
    def correction_dim(rotations: float) -> float:
        return dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(yarn.beta_fast), correction_dim(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # weight of the unscaled (extrapolated) frequency
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    inv_freq = (1.0 / (yarn.factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    if yarn.attention_factor is not None:
        attn = float(yarn.attention_factor)
    elif yarn.mscale and yarn.mscale_all_dim:
        attn = yarn_mscale(yarn.factor, yarn.mscale) / yarn_mscale(yarn.factor, yarn.mscale_all_dim)
    else:
        attn = yarn_mscale(yarn.factor)
    return inv_freq, attn


def softmax_scale(mla: MLAConfig) -> float:
    """``qk_head_dim^-0.5``, times ``yarn_mscale(factor, mscale_all_dim)^2`` under YaRN."""
    scale = mla.qk_head_dim**-0.5
    if mla.yarn is not None and mla.yarn.mscale_all_dim:
        m = yarn_mscale(mla.yarn.factor, mla.yarn.mscale_all_dim)
        scale = scale * m * m
    return scale


class MLARotary(nn.Module):
    """cos/sin tables ``[max_positions, rope_dim]`` (halves layout, YaRN factor applied)."""

    def __init__(self, mla: MLAConfig, theta: float, max_positions: int, dtype: torch.dtype) -> None:
        super().__init__()
        dim = mla.qk_rope_head_dim
        if mla.yarn is None:
            inv_freq, attn = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)), 1.0
        else:
            inv_freq, attn = yarn_inv_freq(dim, theta, mla.yarn)
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", (emb.cos() * attn).to(dtype), persistent=False)
        self.register_buffer("sin", (emb.sin() * attn).to(dtype), persistent=False)
        self.interleave = mla.rope_interleave

    def for_step(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token tables [T, 1, rope_dim], looked up once per step for every layer."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    def rotate(self, cos_sin, x: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, rope_dim] -> roped, in the halves layout."""
        if self.interleave:
            x = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
        cos, sin = cos_sin
        return x * cos + _rotate_half(x) * sin


# ---------------------------------------------------------------------------------------
# The latent cache and attention over it (torch: the CPU path and the specification)
# ---------------------------------------------------------------------------------------


def store_latent(cache_layer: torch.Tensor, latent: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """cache_layer: [N, 1, 1, bs, D]; latent: [T, D] written at the tokens' slots (a row each)."""
    cache_layer.view(-1, cache_layer.shape[-1]).index_copy_(0, slot_mapping, latent)


def gather_latent(cache_layer: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """The listed blocks as token rows: block_ids [nb] or [B, nb] -> [(B,) nb * bs, D]."""
    num_blocks, _, _, block_size, dim = cache_layer.shape
    g = cache_layer.view(num_blocks, block_size, dim).index_select(0, block_ids.flatten())
    return g.view(*block_ids.shape[:-1], block_ids.shape[-1] * block_size, dim)


def mla_decode_attention(
    q: torch.Tensor, cache_layer: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
    scale: float, kv_lora_rank: int, mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Absorbed decode attention over the latent cache: the specification.

    q: [B, H, D] (``[q_nope W_UK, q_pe]``, D = kv_lora_rank + rope); cache_layer
    [N, 1, 1, bs, D]; block_tables [B, max_blocks] (padding entries any valid block);
    context_lens [B] tokens attended, the new one included. Keys are the latent rows,
    values their first ``kv_lora_rank`` dims. Returns [B, H, kv_lora_rank] in q's dtype.
    ``mask`` [B, 1, 1, max_blocks * bs] (True = visible) may be passed prebuilt.
    """
    lat = gather_latent(cache_layer, block_tables.long()).unsqueeze(1)  # [B, 1, S, D]
    if mask is None:
        keys = torch.arange(lat.shape[2], device=q.device)
        mask = (keys[None, :] < context_lens[:, None])[:, None, None, :]
    return F.scaled_dot_product_attention(
        q.unsqueeze(1), lat, lat[..., :kv_lora_rank], attn_mask=mask, scale=scale
    ).squeeze(1)


@dataclass
class MLAMetadata(AttentionMetadata):
    """The torch metadata plus the int32 decode tables the Triton kernel reads."""

    decode_block_tables_i32: torch.Tensor | None = None
    decode_context_lens_i32: torch.Tensor | None = None


class MLABackend(AttentionBackend):
    """How an MLA layer stores its latent and runs absorbed decode attention (torch).

    Same invariants as ``AttentionBackend``: ``build_metadata`` once per step, then
    per layer ``store_latent`` before ``decode``. Prefill chunks are expanded by the
    layer itself (``expanded_attention``) from ``prefill_block_ids``.
    """

    name = "torch"

    def store_latent(self, cache_layer: torch.Tensor, latent: torch.Tensor, meta: AttentionMetadata) -> None:
        store_latent(cache_layer, latent, meta.slot_mapping)

    def decode(self, q: torch.Tensor, cache_layer: torch.Tensor, meta: AttentionMetadata, scale: float,
               kv_lora_rank: int) -> torch.Tensor:
        """q [num_decodes, H, D] -> [num_decodes, H, kv_lora_rank]."""
        return mla_decode_attention(q, cache_layer, meta.decode_block_tables, meta.decode_context_lens, scale,
                                    kv_lora_rank, meta.decode_mask)


class TritonMLABackend(MLABackend):
    """Decode through ``kernels/mla_decode.py``; prefill and the store as in torch."""

    name = "triton"

    def __init__(self) -> None:
        from .kernels.mla_decode import mla_decode

        self._decode = mla_decode

    def build_metadata(self, slot_mapping, decode_block_tables, decode_context_lens, prefill_lens,
                       prefill_block_tables, block_size) -> MLAMetadata:
        meta = super().build_metadata(slot_mapping, decode_block_tables, decode_context_lens, prefill_lens,
                                      prefill_block_tables, block_size)
        fields = {f: getattr(meta, f) for f in AttentionMetadata.__dataclass_fields__}
        return MLAMetadata(**fields, decode_block_tables_i32=decode_block_tables.to(torch.int32),
                           decode_context_lens_i32=decode_context_lens.to(torch.int32))

    def decode(self, q, cache_layer, meta, scale, kv_lora_rank) -> torch.Tensor:
        return self._decode(q.contiguous(), cache_layer, meta.decode_block_tables_i32, meta.decode_context_lens_i32,
                            scale, kv_lora_rank)


def make_mla_backend(name: str, device: str) -> MLABackend:
    """The MLA backend called ``name`` ("torch" or "triton", resolved from "auto")."""
    if name == "torch":
        return MLABackend()
    if name != "triton":
        raise ValueError(f"unknown attention backend {name!r}; use torch or triton")
    if not device.startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"attention_backend='triton' on device {device!r} needs CUDA or TRITON_INTERPRET=1")
    return TritonMLABackend()


# ---------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------


class ReplicatedLinear(nn.Module):
    """y = x W^T with the whole W on every rank (MLA's down-projections: the latent is replicated)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = _param(out_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class MLAAttention(nn.Module):
    """One MLA layer on one TP rank: its share of the query heads, the whole latent."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup) -> None:
        super().__init__()
        mla = cfg.mla
        self.mla = mla
        H = cfg.num_heads
        self.num_heads = tp.shard(H)[1]
        self.nope, self.rope, self.v_dim, self.rank = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim, mla.kv_lora_rank
        if mla.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(cfg.hidden_size, [H * mla.qk_head_dim], tp)
        else:
            self.q_a_proj = ReplicatedLinear(cfg.hidden_size, mla.q_lora_rank)
            # transformers builds q_a_layernorm and kv_a_layernorm with its default eps, 1e-6.
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, 1e-6)
            self.q_b_proj = ColumnParallelLinear(mla.q_lora_rank, [H * mla.qk_head_dim], tp)
        self.kv_a_proj_with_mqa = ReplicatedLinear(cfg.hidden_size, mla.latent_dim)
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, 1e-6)
        self.kv_b_proj = ColumnParallelLinear(mla.kv_lora_rank, [H * (mla.qk_nope_head_dim + mla.v_head_dim)], tp)
        self.o_proj = RowParallelLinear(H * mla.v_head_dim, cfg.hidden_size, tp)
        self.scale = softmax_scale(mla)
        self.backend: MLABackend = MLABackend()

    def _w_kv_b(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_UK [H, nope, r], W_UV [H, v, r]) of this rank's heads: views of kv_b_proj."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope + self.v_dim, self.rank)
        return w[:, : self.nope], w[:, self.nope :]

    def forward(self, rotary: MLARotary, cos_sin, x: torch.Tensor, cache_layer: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """x: [T, hidden] -> [T, hidden] (all-reduced over TP)."""
        T = x.shape[0]
        if self.mla.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(T, self.num_heads, self.nope + self.rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        c, k_pe = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)
        c = self.kv_a_layernorm(c.contiguous())
        q_pe = rotary.rotate(cos_sin, q_pe)
        k_pe = rotary.rotate(cos_sin, k_pe.unsqueeze(1)).squeeze(1)
        self.backend.store_latent(cache_layer, torch.cat([c, k_pe], dim=-1), meta)

        out = x.new_empty(T, self.num_heads, self.v_dim)
        nd = meta.num_decodes
        if nd:
            out[:nd] = self._absorbed_decode(q_nope[:nd], q_pe[:nd], cache_layer, meta)
        start = nd
        for q_len, ctx_len, block_ids in zip(meta.prefill_query_lens, meta.prefill_context_lens, meta.prefill_block_ids):
            end = start + q_len
            out[start:end] = self.expanded_attention(q_nope[start:end], q_pe[start:end], cache_layer, block_ids, ctx_len)
            start = end
        return self.o_proj(out.view(T, self.num_heads * self.v_dim))

    def _absorbed_decode(self, q_nope, q_pe, cache_layer, meta) -> torch.Tensor:
        w_uk, w_uv = self._w_kv_b()
        q_lat = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [B, H, r]
        o_lat = self.backend.decode(torch.cat([q_lat, q_pe], dim=-1), cache_layer, meta, self.scale, self.rank)
        return torch.bmm(o_lat.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)  # [B, H, v]

    def expanded_attention(self, q_nope, q_pe, cache_layer, block_ids, ctx_len) -> torch.Tensor:
        """One prefill chunk: [q_len, H, *] queries over its first ``ctx_len`` cached tokens,
        the chunk's own last; the latent is expanded to per-head K/V. -> [q_len, H, v]."""
        q_len = q_nope.shape[0]
        lat = gather_latent(cache_layer, block_ids)[:ctx_len]  # [ctx, D]
        kv = F.linear(lat[:, : self.rank], self.kv_b_proj.weight).view(ctx_len, self.num_heads, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, lat[:, None, self.rank :].expand(ctx_len, self.num_heads, self.rope)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(0, 1)  # [H, q_len, nope + rope]
        k, v = k.transpose(0, 1), v.transpose(0, 1)
        if q_len == ctx_len:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            qpos = torch.arange(ctx_len - q_len, ctx_len, device=q.device)[:, None]
            mask = torch.arange(ctx_len, device=q.device)[None, :] <= qpos
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return o.transpose(0, 1)
