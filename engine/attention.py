"""Paged attention in pure torch: the CPU path and the specification for GPU kernels.

KV layout, one region per rank: ``[num_layers, num_blocks, 2, num_kv_heads,
block_size, head_dim]`` (cache kind "kv"; an MLA model's "mla_latent" cache has
one plane and one latent head instead, see engine/mla.py). Layer-major so a prefill
worker can ship layer l while computing l+1; K and V of a block adjacent and
head-major inside it, so one (layer, block) is one contiguous run and a
tensor-parallel re-shard is a contiguous slice of heads. See docs/architecture.md.

Token ``t`` of a request lives in block ``block_table[t // block_size]`` at offset
``t % block_size``; the flat "slot" is ``block_id * block_size + offset``.

The seam: a model layer calls an ``AttentionBackend`` (``build_metadata`` once per
step, then ``store_kv`` and ``forward`` per layer). ``AttentionBackend`` itself is this
pure-torch path; ``TritonAttentionBackend`` runs the kernels of engine/kernels
(``EngineConfig.attention_backend`` picks one).
"""

from __future__ import annotations

import os
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
    prefill_cu_query_lens: torch.Tensor | None = None
    """[num_prefills + 1] int32 on the device: prefix sums of the query lengths (kernel backends)."""
    prefill_context_lens_tensor: torch.Tensor | None = None
    """[num_prefills] int32 on the device (kernel backends)."""
    prefill_block_tables: torch.Tensor | None = None
    """[num_prefills, max_blocks] int32 on the device (kernel backends)."""
    max_prefill_query_len: int = 0
    """Longest prefill chunk of the step (sizes the prefill kernel's grid; kernel backends)."""

    def build_decode_mask(self, block_size: int) -> None:
        if self.num_decodes:
            width = self.decode_block_tables.shape[1] * block_size
            keys = torch.arange(width, device=self.decode_context_lens.device)
            self.decode_mask = (keys[None, :] < self.decode_context_lens[:, None])[:, None, None, :]


FP8_MAX = 448.0
"""Largest finite float8_e4m3fn value; quantization clamps to it (e4m3fn has no inf)."""
FP8_KV_DTYPE = torch.float8_e4m3fn


def quantize_kv(x: torch.Tensor, scale: float) -> torch.Tensor:
    """One plane of new keys or values as stored in an FP8 cache: ``x / scale`` rounded to
    float8_e4m3fn, clamped first so an outlier saturates instead of becoming NaN. The
    kernels (engine/kernels/kv_store.py) compute exactly this."""
    x = x.float()
    # Divide by a tensor: CUDA turns ``tensor / python_float`` into a multiply by the
    # reciprocal, which is not always the correctly rounded quotient the kernel computes.
    return (x / torch.full_like(x, scale)).clamp(-FP8_MAX, FP8_MAX).to(FP8_KV_DTYPE)


def store_kv(kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
             k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Write new keys/values into their slots. kv_layer: [N, 2, Hkv, bs, D]; k, v: [T, Hkv, D].

    An FP8 cache stores ``quantize_kv(k, k_scale)`` and ``quantize_kv(v, v_scale)``; any
    other cache stores k and v as they are (the scales are not used)."""
    _, _, num_heads, block_size, head_dim = kv_layer.shape
    if kv_layer.dtype == FP8_KV_DTYPE:  # index_copy_ has no float8 kernel: copy the bytes
        kv_layer, k, v = kv_layer.view(torch.uint8), quantize_kv(k, k_scale).view(torch.uint8), quantize_kv(v, v_scale).view(torch.uint8)
    blocks = torch.div(slot_mapping, block_size, rounding_mode="floor")
    offsets = slot_mapping - blocks * block_size
    # Row (block, kv, head, offset) of the cache viewed as [N * 2 * Hkv * bs, D]. NOTE: index_copy_
    # on rows is a memcpy per row; advanced-index assignment into the 5-D view is ~100x slower.
    k_rows = (blocks[:, None] * (2 * num_heads) + torch.arange(num_heads, device=slot_mapping.device)[None, :]) * block_size + offsets[:, None]
    rows = torch.cat([k_rows.flatten(), (k_rows + num_heads * block_size).flatten()])
    kv_layer.view(-1, head_dim).index_copy_(0, rows, torch.cat([k.reshape(-1, head_dim), v.reshape(-1, head_dim)]))


def gather_kv(kv_layer: torch.Tensor, block_ids: torch.Tensor, dtype: torch.dtype | None = None,
              k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """Copy the listed blocks out as contiguous per-head sequences.

    kv_layer: [N, 2, Hkv, bs, D]; block_ids: [nb] or [B, nb] -> [2, (B,) Hkv, nb * bs, D].
    From an FP8 cache the result is dequantized to ``dtype``: the stored values, as
    float32, times ``k_scale`` (plane 0) and ``v_scale`` (plane 1).
    NOTE: index_select on the contiguous region reads only the listed blocks; advanced
    indexing on a transposed view first materialises the whole layer (measured ~500x slower).
    """
    _, _, num_heads, block_size, head_dim = kv_layer.shape
    g = kv_layer.index_select(0, block_ids.flatten()).view(*block_ids.shape, 2, num_heads, block_size, head_dim)
    if block_ids.dim() == 1:  # [nb, 2, H, bs, D] -> [2, H, nb, bs, D]
        g = g.permute(1, 2, 0, 3, 4)
    else:  # [B, nb, 2, H, bs, D] -> [2, B, H, nb, bs, D]
        g = g.permute(2, 0, 3, 1, 4, 5)
    g = g.flatten(-3, -2)
    if kv_layer.dtype == FP8_KV_DTYPE:
        scales = torch.tensor([k_scale, v_scale], device=g.device).view(2, *[1] * (g.dim() - 1))
        g = (g.float() * scales).to(dtype or torch.float32)
    return g


def paged_attention(
    q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float,
    k_scale: float = 1.0, v_scale: float = 1.0,
) -> torch.Tensor:
    """Attention of this step's queries over the paged cache (new keys already stored).

    q: [T, H, D] -> [T, H, D]. Grouped-query: query head h reads KV head h // (H / Hkv).
    An FP8 cache is dequantized (``gather_kv``) to q's dtype first.
    """
    out = torch.empty_like(q)
    nd = meta.num_decodes
    if nd:
        k, v = gather_kv(kv_layer, meta.decode_block_tables, q.dtype, k_scale, v_scale)  # [B, Hkv, S, D] each
        num_kv_heads = k.shape[1]
        # The H / Hkv query heads sharing a KV head become that head's query rows: the same
        # math as enable_gqa, and measured 6x faster in bfloat16 on the CPU flash kernel.
        qg = q[:nd].view(nd, num_kv_heads, -1, q.shape[-1])  # [B, Hkv, G, D]
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=meta.decode_mask, scale=scale)
        out[:nd] = o.reshape(nd, -1, q.shape[-1])
    start = nd
    for q_len, ctx_len, block_ids in zip(meta.prefill_query_lens, meta.prefill_context_lens, meta.prefill_block_ids):
        kv = gather_kv(kv_layer, block_ids, q.dtype, k_scale, v_scale)[:, :, :ctx_len]  # [2, Hkv, ctx, D]
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


class AttentionBackend:
    """How a layer writes this step's keys/values into the paged cache and attends over it.

    Invariants: ``build_metadata`` runs once per step, before the forward, and every layer
    of that step reads the same metadata; ``store_kv`` runs before ``forward`` on the same
    layer (the new tokens attend to themselves). A slot < 0 marks a padding token whose
    key/value is not stored (kernel backends only; the torch path never sees one).

    This class is the pure-torch backend: the CPU path and the specification.
    """

    name = "torch"

    def build_metadata(
        self,
        slot_mapping: torch.Tensor,
        decode_block_tables: torch.Tensor,
        decode_context_lens: torch.Tensor,
        prefill_lens: torch.Tensor,
        prefill_block_tables: torch.Tensor,
        block_size: int,
    ) -> AttentionMetadata:
        """prefill_lens: [num_prefills, 2] (query_len, context_len); tables padded with block 0."""
        lens = prefill_lens.tolist()
        block_ids = [row[: -(-ctx // block_size)] for row, (_, ctx) in zip(prefill_block_tables, lens)]
        meta = AttentionMetadata(
            slot_mapping=slot_mapping,
            num_decodes=decode_context_lens.shape[0],
            decode_block_tables=decode_block_tables,
            decode_context_lens=decode_context_lens,
            prefill_query_lens=[q for q, _ in lens],
            prefill_context_lens=[c for _, c in lens],
            prefill_block_ids=block_ids,
        )
        meta.build_decode_mask(block_size)
        return meta

    def store_kv(self, kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                 k_scale: float = 1.0, v_scale: float = 1.0) -> None:
        """``k_scale`` / ``v_scale``: the layer's FP8 scales (used only by an FP8 cache)."""
        store_kv(kv_layer, k, v, meta.slot_mapping, k_scale, v_scale)

    def forward(self, q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float,
                k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
        return paged_attention(q, kv_layer, meta, scale, k_scale, v_scale)


class TritonAttentionBackend(AttentionBackend):
    """The Triton kernels of engine/kernels: one decode launch and one prefill launch per layer.

    Metadata is int32 on the device and built without reading tensors back to the host,
    so a decode-only step is CUDA-graph capturable (see engine/cuda_graphs.py).
    """

    name = "triton"

    def __init__(self) -> None:
        from .kernels.decode_attention import paged_decode_attention
        from .kernels.kv_store import store_kv as store_kv_kernel
        from .kernels.prefill_attention import paged_prefill_attention

        self._decode = paged_decode_attention
        self._prefill = paged_prefill_attention
        self._store = store_kv_kernel

    def build_metadata(self, slot_mapping, decode_block_tables, decode_context_lens, prefill_lens,
                       prefill_block_tables, block_size) -> AttentionMetadata:
        # prefill_lens is on the host where the caller has it there (rank 0): no device sync.
        device = slot_mapping.device
        query_lens = prefill_lens[:, 0]
        cu = F.pad(torch.cumsum(query_lens, 0, dtype=torch.int32), (1, 0)).to(device)
        return AttentionMetadata(
            slot_mapping=slot_mapping,
            num_decodes=decode_context_lens.shape[0],
            decode_block_tables=decode_block_tables.to(torch.int32),
            decode_context_lens=decode_context_lens.to(torch.int32),
            prefill_query_lens=[],
            prefill_context_lens=[],
            prefill_block_ids=[],
            prefill_cu_query_lens=cu,
            prefill_context_lens_tensor=prefill_lens[:, 1].to(device=device, dtype=torch.int32),
            prefill_block_tables=prefill_block_tables.to(device=device, dtype=torch.int32),
            max_prefill_query_len=int(query_lens.max()) if query_lens.numel() else 0,
        )

    def store_kv(self, kv_layer, k, v, meta, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
        self._store(kv_layer, k, v, meta.slot_mapping, k_scale=k_scale, v_scale=v_scale)

    def forward(self, q, kv_layer, meta, scale, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
        q = q.contiguous()
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            self._decode(q[:nd], kv_layer, meta.decode_block_tables, meta.decode_context_lens, scale, out=out[:nd],
                         k_scale=k_scale, v_scale=v_scale)
        if q.shape[0] > nd:
            self._prefill(
                q[nd:], kv_layer, meta.prefill_cu_query_lens, meta.prefill_context_lens_tensor,
                meta.prefill_block_tables, scale, out=out[nd:], max_query_len=meta.max_prefill_query_len,
                k_scale=k_scale, v_scale=v_scale,
            )
        return out


def make_attention_backend(name: str, device: str, cache_kind: str = "kv") -> AttentionBackend:
    """The backend called ``name`` ("torch" or "triton", already resolved from "auto") for a
    cache of ``cache_kind``: "kv" (this module's layout) or "mla_latent" (engine/mla.py)."""
    if cache_kind == "mla_latent":
        from .mla import make_mla_backend

        return make_mla_backend(name, device)
    if cache_kind != "kv":
        raise ValueError(f"unknown KV cache kind {cache_kind!r}; use kv or mla_latent")
    if name == "torch":
        return AttentionBackend()
    if name != "triton":
        raise ValueError(f"unknown attention backend {name!r}; use torch or triton")
    if not device.startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"attention_backend='triton' on device {device!r} needs CUDA or TRITON_INTERPRET=1")
    return TritonAttentionBackend()
