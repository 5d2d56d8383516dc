"""Absorbed MLA decode attention over the paged latent cache, in Triton, split-K.

The GPU twin of ``engine.mla.mla_decode_attention`` (that pure-torch function is the
specification). One new query per sequence whose ``W_UK`` is already absorbed:
``q = [q_nope W_UK, q_pe]`` ``[B, H, R + P]`` (R = kv_lora_rank, P = qk_rope_head_dim);
the cache layer ``[num_blocks, 1, 1, block_size, R + P]`` holds per token the latent
``c`` (R values) then the roped key ``k_pe`` (P). Keys are the whole rows, values their
first R values: ``out[b, h] = softmax(scale * q[b, h] . rows) @ rows[:, :R]``, ``[B, H, R]``.

1. ``_mla_split_kernel``, grid ``(batch, cdiv(H, BLOCK_H), num_splits)``: a program takes
   BLOCK_H query heads of one sequence (all heads share the one latent "KV head", so each
   latent tile is read once for BLOCK_H heads) and one of ``num_splits`` tile-aligned
   partitions of that sequence's context, and runs an online softmax (float32, base 2)
   over tiles of TILE tokens gathered through the block table. The score is two dots,
   ``q_lat . c + q_pe . k_pe``, so R and P need only be powers of two each (576 = 512 + 64
   is not one). It writes the normalised output, or (splits > 1) the partition's max,
   sum and unnormalised output.
2. The split merge is ``decode_attention._decode_reduce_kernel`` (log-sum-exp), whose
   partial layout this kernel shares.

As in ``decode_attention``, ``num_splits`` depends on shapes only (CUDA-graph safe) and a
row with ``context_lens`` 0 produces zeros.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .decode_attention import _LOG2E, MAX_SPLITS, _decode_reduce_kernel, _is_pow2, choose_num_splits

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

MAX_BLOCK_H = 64
"""Query heads per program at most."""
MAX_ACC_ELEMENTS = 8192
"""Bound on a program's [BLOCK_H, R] float32 accumulator (and its q tile): 16 heads at
DeepSeek's R = 512, 64 KiB of registers over 8 warps."""


@triton.jit
def _mla_split_kernel(
    q_ptr, cache_ptr, block_tables_ptr, context_lens_ptr,
    out_ptr, part_m_ptr, part_l_ptr, part_o_ptr,
    qk_scale, num_heads,
    stride_qb, stride_qh,
    stride_cache_block, stride_cache_tok,
    stride_bt, max_blocks,
    stride_ob, stride_oh,
    num_splits,
    R: tl.constexpr, P: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, IS_SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    head_block = tl.program_id(1)
    split = tl.program_id(2)

    # NOTE: a context longer than the block table is a caller bug; clamp to stay in bounds.
    ctx_len = tl.minimum(tl.load(context_lens_ptr + seq), max_blocks * BLOCK_SIZE)
    split_len = tl.cdiv(tl.cdiv(ctx_len, num_splits), TILE) * TILE
    start = split * split_len
    end = tl.minimum(start + split_len, ctx_len)

    heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    head_mask = heads < num_heads
    r_dims = tl.arange(0, R)
    p_dims = tl.arange(0, P)
    q_row = q_ptr + seq * stride_qb + heads[:, None] * stride_qh
    # Rows past num_heads are zero queries (tl.dot needs >= 16 rows); never stored.
    q_lat = tl.load(q_row + r_dims[None, :], mask=head_mask[:, None], other=0.0)
    q_pe = tl.load(q_row + R + p_dims[None, :], mask=head_mask[:, None], other=0.0)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, R], tl.float32)

    bt_row_ptr = block_tables_ptr + seq * stride_bt
    tile_offs = tl.arange(0, TILE)
    for tile_start in range(start, end, TILE):
        toks = tile_start + tile_offs
        tok_mask = toks < end
        # int64: block_id * stride overflows int32 in a large cache.
        block_ids = tl.load(bt_row_ptr + toks // BLOCK_SIZE, mask=tok_mask, other=0).to(tl.int64)
        rows = cache_ptr + block_ids * stride_cache_block + (toks % BLOCK_SIZE) * stride_cache_tok
        c = tl.load(rows[:, None] + r_dims[None, :], mask=tok_mask[:, None], other=0.0)  # [TILE, R]
        k_pe = tl.load(rows[:, None] + R + p_dims[None, :], mask=tok_mask[:, None], other=0.0)  # [TILE, P]

        s = tl.dot(q_lat, tl.trans(c), input_precision=DOT_PRECISION)
        s += tl.dot(q_pe, tl.trans(k_pe), input_precision=DOT_PRECISION)
        s = s * qk_scale
        s = tl.where(tok_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile in [start, end) has a token
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c, input_precision=DOT_PRECISION)
        m_i = m_new

    if not IS_SPLIT:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # an empty context writes zeros, not NaN
        out_ptrs = out_ptr + seq * stride_ob + heads[:, None] * stride_oh + r_dims[None, :]
        tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=head_mask[:, None])
    else:
        part = (seq * num_heads + heads) * num_splits + split  # [BLOCK_H]
        tl.store(part_m_ptr + part, m_i, mask=head_mask)
        tl.store(part_l_ptr + part, l_i, mask=head_mask)
        tl.store(part_o_ptr + part[:, None] * R + r_dims[None, :], acc, mask=head_mask[:, None])


def _check_inputs(q, cache_layer, block_tables, context_lens, scale, kv_lora_rank) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be [batch, num_heads, kv_lora_rank + rope_dim], got shape {tuple(q.shape)}")
    if cache_layer.dim() != 5 or cache_layer.shape[1:3] != (1, 1):
        raise ValueError(f"cache_layer must be [num_blocks, 1, 1, block_size, latent_dim], got shape {tuple(cache_layer.shape)}")
    batch, _, dim = q.shape
    block_size, cache_dim = cache_layer.shape[3], cache_layer.shape[4]
    rope = dim - kv_lora_rank
    if cache_dim != dim:
        raise ValueError(f"cache latent_dim {cache_dim} differs from q's {dim}")
    if not (_is_pow2(kv_lora_rank) and kv_lora_rank >= 16 and _is_pow2(rope) and rope >= 16):
        raise ValueError(f"kv_lora_rank {kv_lora_rank} and rope dim {rope} must be powers of two >= 16")
    if q.dtype not in _DTYPES or cache_layer.dtype != q.dtype:
        raise ValueError(f"q and cache_layer must share a dtype of {_DTYPES}, got {q.dtype} and {cache_layer.dtype}")
    if not _is_pow2(block_size):
        raise ValueError(f"block_size {block_size} must be a power of two")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or block_tables.shape[1] == 0:
        raise ValueError(f"block_tables must be [batch={batch}, max_blocks >= 1], got shape {tuple(block_tables.shape)}")
    if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:
        raise ValueError(f"block_tables and context_lens must be int32, got {block_tables.dtype} and {context_lens.dtype}")
    if context_lens.dim() != 1 or context_lens.shape[0] != batch or not context_lens.is_contiguous():
        raise ValueError(f"context_lens must be contiguous [batch={batch}], got shape {tuple(context_lens.shape)}")
    for name, t in (("cache_layer", cache_layer), ("block_tables", block_tables), ("context_lens", context_lens)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    if q.stride(-1) != 1 or cache_layer.stride(-1) != 1 or block_tables.stride(-1) != 1:
        raise ValueError(f"the last dimension of q, cache_layer and block_tables must be contiguous, got strides "
                         f"{q.stride()}, {cache_layer.stride()}, {block_tables.stride()}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float, got {scale}")


def mla_decode(
    q: torch.Tensor,
    cache_layer: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    kv_lora_rank: int,
    *,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    block_h: int | None = None,
) -> torch.Tensor:
    """Absorbed MLA decode; returns ``out`` ``[B, H, kv_lora_rank]`` in q's dtype.

    q: ``[B, H, R + P]``; cache_layer: ``[N, 1, 1, bs, R + P]``; block_tables ``[B, max_blocks]``
    int32; context_lens ``[B]`` int32 (tokens attended, the new one included; 0 gives zeros).
    ``num_splits`` in [1, MAX_SPLITS]; None picks ``choose_num_splits`` for
    ``cdiv(H, BLOCK_H)`` head blocks per sequence. ``block_h`` (query heads per program, a
    power of two >= 16) is chosen from the shapes when None.
    """
    _check_inputs(q, cache_layer, block_tables, context_lens, scale, kv_lora_rank)
    batch, num_heads, dim = q.shape
    block_size = cache_layer.shape[3]
    max_blocks = block_tables.shape[1]
    if block_h is None:
        block_h = max(16, min(MAX_BLOCK_H, triton.next_power_of_2(num_heads), MAX_ACC_ELEMENTS // kv_lora_rank))
    elif not _is_pow2(block_h) or not 16 <= block_h <= MAX_BLOCK_H:
        raise ValueError(f"block_h must be a power of two in [16, {MAX_BLOCK_H}], got {block_h}")
    head_blocks = triton.cdiv(num_heads, block_h)
    if num_splits is None:
        num_splits = choose_num_splits(batch, head_blocks, max_blocks, block_size, q.device)
    elif not isinstance(num_splits, int) or isinstance(num_splits, bool) or not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be an int in [1, {MAX_SPLITS}], got {num_splits!r}")
    shape = (batch, num_heads, kv_lora_rank)
    if out is None:
        out = q.new_empty(shape)
    elif out.shape != shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(f"out must be {shape} {q.dtype} on {q.device} with a contiguous last dimension, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    if batch == 0:
        return out
    if num_splits == 1:
        part_m = part_l = part_o = out  # never touched: the kernel writes out directly
    else:
        n = batch * num_heads * num_splits
        part = torch.empty(n * (kv_lora_rank + 2), dtype=torch.float32, device=q.device)
        part_m, part_l, part_o = part[:n], part[n : 2 * n], part[2 * n :]
    # Latent tiles (c and k_pe together) of about 16 KiB, 16 to 64 tokens (a power of two).
    fits = max(1, (16 * 1024) // (dim * q.element_size()))
    tile = max(16, min(64, 1 << (fits.bit_length() - 1)))
    _mla_split_kernel[(batch, head_blocks, num_splits)](
        q, cache_layer, block_tables, context_lens,
        out, part_m, part_l, part_o,
        scale * _LOG2E, num_heads,
        q.stride(0), q.stride(1),
        cache_layer.stride(0), cache_layer.stride(3),
        block_tables.stride(0), max_blocks,
        out.stride(0), out.stride(1),
        num_splits,
        R=kv_lora_rank, P=dim - kv_lora_rank, BLOCK_H=block_h,
        BLOCK_SIZE=block_size, TILE=tile, IS_SPLIT=num_splits > 1,
        # fp32 inputs must not drop to tf32; fp16/bf16 ignore this.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=8 if kv_lora_rank >= 256 else 4, num_stages=2,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(batch, num_heads)](
            part_m, part_l, part_o, out,
            out.stride(0), out.stride(1), num_splits,
            HEAD_DIM=kv_lora_rank, SPLITS_PAD=triton.next_power_of_2(num_splits),
            num_warps=4,
        )
    return out
