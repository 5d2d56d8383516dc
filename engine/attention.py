"""Paged attention in pure torch: the CPU path and the specification for GPU kernels.

KV layout, one region per rank: ``[num_layers, num_blocks, 2, num_kv_heads,
block_size, head_dim]``. Layer-major so a prefill worker can ship layer l while
computing l+1; K and V of a block adjacent and head-major inside it, so one
(layer, block) is one contiguous run and a tensor-parallel re-shard is a
contiguous slice of heads. See docs/architecture.md.

Token ``t`` of a request lives in block ``block_table[t // block_size]`` at offset
``t % block_size``; the flat "slot" is ``block_id * block_size + offset``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Where this step's tokens go and what they attend to.

    Tokens are ordered decodes first (one token per request), then prefill chunks.
    """

    slot_mapping: torch.Tensor
    """[num_tokens] flat slot of each new token."""
    num_decodes: int
    decode_block_tables: torch.Tensor
    """[num_decodes, max_blocks] block ids (padding entries point at block 0 and are masked)."""
    decode_context_lens: torch.Tensor
    """[num_decodes] tokens each decode attends to, its new token included."""
    prefill_query_lens: list[int]
    prefill_context_lens: list[int]
    prefill_block_ids: list[torch.Tensor]
    decode_mask: torch.Tensor | None = None
    """[num_decodes, 1, 1, max_blocks * block_size] True where a key is visible; built once per step."""

    def build_decode_mask(self, block_size: int) -> None:
        if self.num_decodes:
            width = self.decode_block_tables.shape[1] * block_size
            keys = torch.arange(width, device=self.decode_context_lens.device)
            self.decode_mask = (keys[None, :] < self.decode_context_lens[:, None])[:, None, None, :]


def store_kv(kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write new keys/values into their slots. kv_layer: [N, 2, Hkv, bs, D]; k, v: [T, Hkv, D]."""
    _, _, num_heads, block_size, head_dim = kv_layer.shape
    blocks = torch.div(slot_mapping, block_size, rounding_mode="floor")
    offsets = slot_mapping - blocks * block_size
    # Row (block, kv, head, offset) of the cache viewed as [N * 2 * Hkv * bs, D]. NOTE: index_copy_
    # on rows is a memcpy per row; advanced-index assignment into the 5-D view is ~100x slower.
    k_rows = (blocks[:, None] * (2 * num_heads) + torch.arange(num_heads, device=slot_mapping.device)[None, :]) * block_size + offsets[:, None]
    rows = torch.cat([k_rows.flatten(), (k_rows + num_heads * block_size).flatten()])
    kv_layer.view(-1, head_dim).index_copy_(0, rows, torch.cat([k.reshape(-1, head_dim), v.reshape(-1, head_dim)]))


def gather_kv(kv_layer: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Copy the listed blocks out as contiguous per-head sequences.

    kv_layer: [N, 2, Hkv, bs, D]; block_ids: [nb] or [B, nb] -> [2, (B,) Hkv, nb * bs, D].
    NOTE: index_select on the contiguous region reads only the listed blocks; advanced
    indexing on a transposed view first materialises the whole layer (measured ~500x slower).
    """
    _, _, num_heads, block_size, head_dim = kv_layer.shape
    g = kv_layer.index_select(0, block_ids.flatten()).view(*block_ids.shape, 2, num_heads, block_size, head_dim)
    if block_ids.dim() == 1:  # [nb, 2, H, bs, D] -> [2, H, nb, bs, D]
        g = g.permute(1, 2, 0, 3, 4)
    else:  # [B, nb, 2, H, bs, D] -> [2, B, H, nb, bs, D]
        g = g.permute(2, 0, 3, 1, 4, 5)
    return g.flatten(-3, -2)


def paged_attention(
    q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Attention of this step's queries over the paged cache (new keys already stored).

    q: [T, H, D] -> [T, H, D]. Grouped-query: query head h reads KV head h // (H / Hkv).
    """
    out = torch.empty_like(q)
    nd = meta.num_decodes
    if nd:
        k, v = gather_kv(kv_layer, meta.decode_block_tables)  # [B, Hkv, S, D] each
        num_kv_heads = k.shape[1]
        # The H / Hkv query heads sharing a KV head become that head's query rows: the same
        # math as enable_gqa, and measured 6x faster in bfloat16 on the CPU flash kernel.
        qg = q[:nd].view(nd, num_kv_heads, -1, q.shape[-1])  # [B, Hkv, G, D]
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=meta.decode_mask, scale=scale)
        out[:nd] = o.reshape(nd, -1, q.shape[-1])
    start = nd
    for q_len, ctx_len, block_ids in zip(meta.prefill_query_lens, meta.prefill_context_lens, meta.prefill_block_ids):
        kv = gather_kv(kv_layer, block_ids)[:, :, :ctx_len]  # [2, Hkv, ctx, D]
        k, v = kv[0], kv[1]
        qs = q[start : start + q_len].transpose(0, 1)  # [H, q_len, D]
        if q_len == ctx_len:
            o = F.scaled_dot_product_attention(qs, k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:
            # Query i sits at position ctx_len - q_len + i and sees keys up to it.
            qpos = torch.arange(ctx_len - q_len, ctx_len, device=q.device)[:, None]
            mask = torch.arange(ctx_len, device=q.device)[None, :] <= qpos
            o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[start : start + q_len] = o.transpose(0, 1)
        start += q_len
    return out
