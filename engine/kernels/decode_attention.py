"""Paged decode attention in Triton, split-K: the GPU twin of the decode part of
``engine.attention.paged_attention`` (that pure-torch function is the specification).

One new query token per sequence, its key/value already stored in the paged cache
(``kv_layer``: ``[num_blocks, 2, num_kv_heads, block_size, head_dim]``, K at 0, V at 1).

Data flow:

1. ``_decode_split_kernel``, grid ``(batch, num_kv_heads, num_splits)``. A program
   takes one sequence, one KV head and one of ``num_splits`` equal, tile-aligned
   partitions of *that sequence's* context. It loads the ``G = H / Hkv`` query heads
   sharing the KV head as the rows of one tile, so each KV block is read once per KV
   head, and runs an online softmax (float32, base 2) over tiles of ``TILE`` tokens
   gathered through the block table (so any power-of-two block size works, smaller or
   larger than the tile). It writes the partition's running max, sum and
   unnormalised output; with one split it writes the normalised output directly.
2. ``_decode_reduce_kernel``, grid ``(batch, num_heads)``, only when ``num_splits > 1``:
   rescales the partitions by ``exp2(max_i - max)`` and divides (log-sum-exp merge).

CUDA graphs: no host sync and no Python branch on device values. ``num_splits``
depends only on shapes (batch, KV heads, the block table's width), never on
``context_lens``. Partitions past a short sequence's end are empty and merge with
weight 0. ``out`` and ``workspace`` can be preallocated once (sized with
``workspace_numel``); without ``workspace`` the partials are allocated per call, which
is also legal inside a capture (they come from the graph's private pool). Call once
before capturing so Triton compiles outside the capture. Padded graph batches: rows
with ``context_lens`` 0 produce zeros.

FP8 cache (``kv_layer.dtype == torch.float8_e4m3fn``): the twin reads ``k = stored.float()
* k_scale`` and ``v = stored.float() * v_scale``. The kernel loads the e4m3fn bytes as
``tl.float8e4nv`` (Triton's name for e4m3fn; the cache tensor is passed as is) and converts
them to q's dtype, which is exact (every e4m3fn value is a float16, bfloat16 and float32);
the scales are folded: ``k_scale`` into the softmax scale (``s = (q . k8) * scale * k_scale``)
and ``v_scale`` into the output (``o = v_scale * sum p v8 / sum p``). Mathematically the
twin's formula; numerically it differs only by float32 rounding (the test's tolerance is
the float32 one, 1e-5), and the dots keep q's dtype, so bfloat16/float16 queries still
use the tensor cores. Triton's interpreter loads and widens float8e4nv exactly (all 256
codes checked against torch, except NaN codes 0x7F/0xFF, which it reads as +-480);
compiled, float8e4nv needs sm_89 or newer (Ada, Hopper), which the wrapper checks. The
fp8 path is chosen at compile time from the cache pointer's element type (no new
constexpr), so a float16/bfloat16/float32 cache compiles to the same code as before and
ignores the scales. The scales are plain float32 kernel arguments: a CUDA graph captures them by value, which is
right as they are fixed per layer.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .kv_store import check_fp8_device, check_fp8_scales

_LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FP8_KV_DTYPE = torch.float8_e4m3fn

MIN_TOKENS_PER_SPLIT = 128
"""A partition shorter than this costs more in its partial write and merge than it saves."""
MAX_SPLITS = 64
"""Cap on partitions: the merge kernel holds all of a head's partials in one tile."""
PROGRAMS_PER_SM = 4
"""Target resident split programs per SM: enough loads in flight to saturate HBM."""
_NON_CUDA_NUM_SMS = 132
"""SM count assumed off-GPU (the interpreter), an H100's, so splits match what an H100 gets."""


@triton.jit
def _decode_split_kernel(
    q_ptr, kv_ptr, block_tables_ptr, context_lens_ptr,
    out_ptr, part_m_ptr, part_l_ptr, part_o_ptr,
    qk_scale, v_scale,
    stride_qb, stride_qh,
    stride_kv_block, stride_kv_kv, stride_kv_head, stride_kv_tok,
    stride_bt, max_blocks,
    stride_ob, stride_oh,
    num_splits,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, IS_SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Compile-time, from the cache pointer's type (no extra constexpr: other dtypes compile as before).
    KV_FP8: tl.constexpr = kv_ptr.dtype.element_ty == tl.float8e4nv
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_heads = tl.num_programs(1) * GROUP

    # NOTE: a context longer than the block table is a caller bug; clamping keeps the
    # block-table reads in bounds instead of reading another row.
    ctx_len = tl.minimum(tl.load(context_lens_ptr + seq), max_blocks * BLOCK_SIZE)
    # Equal partitions of this sequence's own context, so long and short sequences in
    # one batch both spread over all splits; trailing ones of a short sequence are empty.
    split_len = tl.cdiv(tl.cdiv(ctx_len, num_splits), TILE) * TILE
    start = split * split_len
    end = tl.minimum(start + split_len, ctx_len)

    rows = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + rows
    row_mask = rows < GROUP
    # Rows past GROUP are zero queries (tl.dot needs >= 16 rows); they are never stored.
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                mask=row_mask[:, None], other=0.0)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)

    k_head_ptr = kv_ptr + kv_head * stride_kv_head
    bt_row_ptr = block_tables_ptr + seq * stride_bt
    tile_offs = tl.arange(0, TILE)
    for tile_start in range(start, end, TILE):
        toks = tile_start + tile_offs
        tok_mask = toks < end
        # int64: block_id * stride_kv_block overflows int32 in a large cache.
        block_ids = tl.load(bt_row_ptr + toks // BLOCK_SIZE, mask=tok_mask, other=0).to(tl.int64)
        tok_offs = block_ids * stride_kv_block + (toks % BLOCK_SIZE) * stride_kv_tok
        kv_offs = tok_offs[:, None] + dims[None, :]
        k = tl.load(k_head_ptr + kv_offs, mask=tok_mask[:, None], other=0.0)
        v = tl.load(k_head_ptr + stride_kv_kv + kv_offs, mask=tok_mask[:, None], other=0.0)
        if KV_FP8:  # exact: k_scale is in qk_scale, v_scale applied to acc below
            k = k.to(q.dtype)
            v = v.to(q.dtype)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [GROUP_PAD, TILE]
        s = tl.where(tok_mask[None, :], s, float("-inf"))
        # Every tile inside [start, end) has a valid token, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if KV_FP8:
        acc = acc * v_scale
    if not IS_SPLIT:
        # l_i == 0 only for an empty context (a padding row): write zeros, not NaN.
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        out_ptrs = out_ptr + seq * stride_ob + heads[:, None] * stride_oh + dims[None, :]
        tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])
    else:
        part = (seq * num_heads + heads) * num_splits + split  # [GROUP_PAD]
        tl.store(part_m_ptr + part, m_i, mask=row_mask)
        tl.store(part_l_ptr + part, l_i, mask=row_mask)
        tl.store(part_o_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=row_mask[:, None])


@triton.jit
def _decode_reduce_kernel(
    part_m_ptr, part_l_ptr, part_o_ptr, out_ptr,
    stride_ob, stride_oh, num_splits,
    HEAD_DIM: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    base = (seq * tl.num_programs(1) + head) * num_splits
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, HEAD_DIM)
    split_mask = splits < num_splits

    m = tl.load(part_m_ptr + base + splits, mask=split_mask, other=float("-inf"))
    l = tl.load(part_l_ptr + base + splits, mask=split_mask, other=0.0)
    o = tl.load(part_o_ptr + (base + splits)[:, None] * HEAD_DIM + dims[None, :],
                mask=split_mask[:, None], other=0.0)
    m_max = tl.max(m, 0)
    # Empty partitions (max -inf) weigh exp2(-inf) = 0. An all-empty (zero-length) context
    # would give -inf - -inf = NaN, so its reference max is 0 instead.
    m_max = tl.where(m_max > float("-inf"), m_max, 0.0)
    w = tl.exp2(m - m_max)
    num = tl.sum(o * w[:, None], 0)
    den = tl.sum(l * w, 0)
    res = num / tl.where(den > 0, den, 1.0)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + dims, res.to(out_ptr.dtype.element_ty))


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return _NON_CUDA_NUM_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(batch_size: int, num_kv_heads: int, max_blocks: int, block_size: int,
                      device: torch.device | str = "cuda") -> int:
    """Partitions per (sequence, KV head), from shapes only (so a CUDA graph stays valid).

    Heuristic: aim for ``PROGRAMS_PER_SM * num_SMs`` split programs in all (a small batch
    alone leaves most SMs idle on a long context), but never partitions shorter than
    ``MIN_TOKENS_PER_SPLIT`` tokens of the block table's capacity, and at most
    ``MAX_SPLITS``. On an H100 (132 SMs), Llama-3-8B (8 KV heads): batch 1 at 32k -> 64,
    batch 32 at 2k -> 3, batch >= 66 -> 1 (no merge kernel at all).
    """
    device = torch.device(device)
    num_programs = max(1, batch_size * num_kv_heads)
    wanted = -(-PROGRAMS_PER_SM * _num_sms(device) // num_programs)
    by_context = max(1, max_blocks * block_size // MIN_TOKENS_PER_SPLIT)
    return max(1, min(wanted, by_context, MAX_SPLITS))


def workspace_numel(batch_size: int, num_heads: int, head_dim: int, num_splits: int) -> int:
    """float32 elements of the partials: max and sum ``[B, H, S]``, output ``[B, H, S, D]``."""
    return batch_size * num_heads * num_splits * (head_dim + 2)


def _tile_tokens(head_dim: int, dtype: torch.dtype) -> int:
    # K and V tiles of at most 16 KiB each: with two pipeline stages several programs stay
    # resident per SM (sm_90 build, bf16, D 128: 38 KiB shared, 80 registers a thread).
    return max(16, min(64, (16 * 1024) // (head_dim * dtype.itemsize)))


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _check_inputs(q, kv_layer, block_tables, context_lens, scale, k_scale, v_scale) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be [batch, num_heads, head_dim], got shape {tuple(q.shape)}")
    if kv_layer.dim() != 5 or kv_layer.shape[1] != 2:
        raise ValueError(f"kv_layer must be [num_blocks, 2, num_kv_heads, block_size, head_dim], got shape {tuple(kv_layer.shape)}")
    batch, num_heads, head_dim = q.shape
    _, _, num_kv_heads, block_size, kv_head_dim = kv_layer.shape
    if q.dtype not in _DTYPES:
        raise ValueError(f"q dtype {q.dtype} not supported; use one of {_DTYPES}")
    if kv_layer.dtype == FP8_KV_DTYPE:
        check_fp8_scales(k_scale, v_scale)
        check_fp8_device(kv_layer.device)
    elif kv_layer.dtype != q.dtype:
        raise ValueError(f"kv_layer dtype {kv_layer.dtype} differs from q dtype {q.dtype}")
    if kv_head_dim != head_dim:
        raise ValueError(f"kv_layer head_dim {kv_head_dim} differs from q head_dim {head_dim}")
    if not _is_pow2(head_dim) or not 16 <= head_dim <= 256:
        raise ValueError(f"head_dim {head_dim} must be a power of two in [16, 256]")
    if not _is_pow2(block_size):
        raise ValueError(f"block_size {block_size} must be a power of two")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or block_tables.shape[1] == 0:
        raise ValueError(f"block_tables must be [batch={batch}, max_blocks >= 1], got shape {tuple(block_tables.shape)}")
    if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:
        raise ValueError(f"block_tables and context_lens must be int32, got {block_tables.dtype} and {context_lens.dtype}")
    if context_lens.dim() != 1 or context_lens.shape[0] != batch:
        raise ValueError(f"context_lens must be [batch={batch}], got shape {tuple(context_lens.shape)}")
    for name, t in (("kv_layer", kv_layer), ("block_tables", block_tables), ("context_lens", context_lens)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    if q.stride(-1) != 1 or kv_layer.stride(-1) != 1 or block_tables.stride(-1) != 1:
        raise ValueError(f"the last dimension of q, kv_layer and block_tables must be contiguous, got strides "
                         f"{q.stride()}, {kv_layer.stride()}, {block_tables.stride()}")
    if not context_lens.is_contiguous():
        raise ValueError(f"context_lens must be contiguous, got stride {context_lens.stride()}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float, got {scale}")


def _check_out(out: torch.Tensor, q: torch.Tensor) -> None:
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out must match q ({tuple(q.shape)}, {q.dtype}, {q.device}), got "
                         f"({tuple(out.shape)}, {out.dtype}, {out.device})")
    if out.stride(-1) != 1:
        raise ValueError(f"out's last dimension must be contiguous, got strides {out.stride()}")


def _partials(workspace, q, num_splits):
    batch, num_heads, head_dim = q.shape
    numel = workspace_numel(batch, num_heads, head_dim, num_splits)
    if workspace is None:
        workspace = torch.empty(numel, dtype=torch.float32, device=q.device)
    elif workspace.dtype != torch.float32 or workspace.device != q.device or not workspace.is_contiguous():
        raise ValueError(f"workspace must be contiguous float32 on {q.device}, got {workspace.dtype} on {workspace.device}")
    elif workspace.numel() < numel:
        raise ValueError(f"workspace has {workspace.numel()} elements, needs workspace_numel(...) = {numel}")
    n = batch * num_heads * num_splits
    flat = workspace.view(-1)
    return flat[:n], flat[n : 2 * n], flat[2 * n : numel]


def paged_decode_attention(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Decode attention over the paged cache; returns ``out`` ``[B, H, D]`` in q's dtype.

    q: ``[B, H, D]``; kv_layer: ``[N, 2, Hkv, bs, D]``; block_tables: ``[B, max_blocks]``
    int32; context_lens: ``[B]`` int32, tokens attended including the new one (0 gives a
    zero output: a padding row of a CUDA-graph batch). ``num_splits`` in [1, MAX_SPLITS];
    None picks ``choose_num_splits``. It is a runtime kernel argument, so a new split
    count costs no recompilation (only the merge kernel's power-of-two padding varies).
    ``workspace`` is an optional float32 buffer of at least
    ``workspace_numel(B, H, D, num_splits)`` elements (unused when num_splits is 1).
    kv_layer may be ``torch.float8_e4m3fn`` with any q dtype: keys read as
    ``stored.float() * k_scale``, values as ``stored.float() * v_scale`` (Python floats);
    any other cache has q's dtype and ignores the scales.
    """
    _check_inputs(q, kv_layer, block_tables, context_lens, scale, k_scale, v_scale)
    kv_fp8 = kv_layer.dtype == FP8_KV_DTYPE
    qk_scale = scale * _LOG2E
    if kv_fp8:
        qk_scale *= k_scale
    else:
        v_scale = 1.0  # unused by the kernel
    batch, num_heads, head_dim = q.shape
    _, _, num_kv_heads, block_size, _ = kv_layer.shape
    max_blocks = block_tables.shape[1]
    if num_splits is None:
        num_splits = choose_num_splits(batch, num_kv_heads, max_blocks, block_size, q.device)
    elif not isinstance(num_splits, int) or isinstance(num_splits, bool) or not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be an int in [1, {MAX_SPLITS}], got {num_splits!r}")
    if out is None:
        out = torch.empty_like(q)
    else:
        _check_out(out, q)
    if batch == 0:
        return out

    group = num_heads // num_kv_heads
    if num_splits == 1:
        part_m = part_l = part_o = out  # never touched: the kernel writes out directly
    else:
        part_m, part_l, part_o = _partials(workspace, q, num_splits)
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, kv_layer, block_tables, context_lens,
        out, part_m, part_l, part_o,
        qk_scale, float(v_scale),
        q.stride(0), q.stride(1),
        kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3),
        block_tables.stride(0), max_blocks,
        out.stride(0), out.stride(1),
        num_splits,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, TILE=_tile_tokens(head_dim, q.dtype), IS_SPLIT=num_splits > 1,
        # fp32 inputs must not drop to tf32; fp16/bf16 ignore this (tf32 is the default).
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4, num_stages=2,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(batch, num_heads)](
            part_m, part_l, part_o, out,
            out.stride(0), out.stride(1), num_splits,
            HEAD_DIM=head_dim, SPLITS_PAD=triton.next_power_of_2(num_splits),
            num_warps=4,
        )
    return out
