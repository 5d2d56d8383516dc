"""Triton prefill attention: new tokens of several requests over their paged cached prefix.

Twin (the specification and the CPU path): the prefill half of
``engine.attention.paged_attention``. Query ``i`` of a request with ``q_len`` new tokens
and ``context_len`` tokens in all sits at position ``context_len - q_len + i`` and
attends causally to keys ``0..position``. A plain prefill is prefix 0; a prefix-cache
hit and a chunked prefill are a prefix of whole blocks or one ending mid-block. The new
tokens' keys and values must already be in the cache (``store_kv`` runs first).

Flash-attention style: one program per (query head, tile of ``block_m`` queries,
request); it walks the request's keys in tiles of ``block_n`` through its block table
with an online softmax in float32. Key tiles wholly below the tile's causal diagonal
run unmasked; tiles wholly above it are never visited. Grouped-query: query head ``h``
reads KV head ``h // (H // Hkv)``.

FP8 cache (``kv_layer.dtype == torch.float8_e4m3fn``): as in decode_attention.py, the
e4m3fn bytes are loaded as ``tl.float8e4nv`` and converted exactly to q's dtype;
``k_scale`` is folded into the softmax scale and ``v_scale`` into the output (equal to
the twin's ``stored.float() * scale`` up to float32 rounding). Works in Triton's
interpreter; compiled, it needs sm_89+ (checked by the wrapper).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .decode_attention import FP8_KV_DTYPE
from .kv_store import check_fp8_device, check_fp8_scales

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)
_MAX_GRID_YZ = 65535  # CUDA limit on grid axes 1 and 2


@dataclass(frozen=True)
class PrefillTiles:
    """Launch shape of the prefill kernel; ``default_tiles`` picks one per head_dim and dtype."""

    block_m: int
    """Queries per program (power of two, >= 16 for tl.dot)."""
    block_n: int
    """Keys per inner step (power of two, >= 16); independent of the cache's block size."""
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")


def default_tiles(head_dim: int, dtype: torch.dtype) -> PrefillTiles:
    # Sized like the Triton flash-attention tutorial's Hopper configs, halved where the
    # Q tile and K/V stages would not fit in shared memory (float32, head_dim 256). The benchmark
    # (benchmarks/bench_prefill_kernel.py --sweep) measures the alternatives.
    if dtype == torch.float32:
        if head_dim >= 256:
            return PrefillTiles(block_m=32, block_n=16, num_warps=4, num_stages=1)
        return PrefillTiles(block_m=64, block_n=32, num_warps=4, num_stages=2)
    if head_dim >= 256:
        return PrefillTiles(block_m=64, block_n=32, num_warps=4, num_stages=2)
    if head_dim >= 128:
        return PrefillTiles(block_m=128, block_n=64, num_warps=8, num_stages=3)
    return PrefillTiles(block_m=128, block_n=64, num_warps=4, num_stages=3)


@triton.jit
def _attend_key_tile(
    acc, m_i, l_i, q, q_pos, k_base, v_base, table, n_start, context_len, scale_log2,
    stride_kv_block, stride_kv_token,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    ON_DIAGONAL: tl.constexpr, PRECISION: tl.constexpr, KV_FP8: tl.constexpr,
):
    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    if ON_DIAGONAL:
        n_valid = offs_n < context_len
        block_ids = tl.load(table + offs_n // BLOCK_SIZE, mask=n_valid, other=0)
    else:
        block_ids = tl.load(table + offs_n // BLOCK_SIZE)
    # NOTE: int64 because block_id * stride passes 2**31 elements in a large cache.
    rows = block_ids.to(tl.int64) * stride_kv_block + (offs_n % BLOCK_SIZE) * stride_kv_token
    ptrs = rows[:, None] + offs_d[None, :]
    if ON_DIAGONAL:
        k = tl.load(k_base + ptrs, mask=n_valid[:, None], other=0.0)
    else:
        k = tl.load(k_base + ptrs)
    if KV_FP8:  # exact; k_scale is in scale_log2
        k = k.to(q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
    if ON_DIAGONAL:
        visible = (offs_n[None, :] <= q_pos[:, None]) & n_valid[None, :]
        s = tl.where(visible, s, float("-inf"))
    # Every row sees key 0 in its first tile, so m_new is finite and no NaN arises below.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if ON_DIAGONAL:
        v = tl.load(v_base + ptrs, mask=n_valid[:, None], other=0.0)
    else:
        v = tl.load(v_base + ptrs)
    if KV_FP8:  # exact; v_scale is applied to the output
        v = v.to(q.dtype)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(
    Q, KV, Out, CuQueryLens, ContextLens, BlockTables, scale_log2, v_scale,
    stride_q_token, stride_q_head, stride_o_token, stride_o_head,
    stride_kv_block, stride_kv_kind, stride_kv_head, stride_kv_token, stride_table,
    GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    # Compile-time, from the cache pointer's type (no extra constexpr: other dtypes compile as before).
    KV_FP8: tl.constexpr = KV.dtype.element_ty == tl.float8e4nv
    head = tl.program_id(0)
    # Longest tiles (the last queries see the most keys) launch first.
    tile = tl.num_programs(1) - 1 - tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(CuQueryLens + seq).to(tl.int32)
    q_len = tl.load(CuQueryLens + seq + 1).to(tl.int32) - q_start
    m_start = tile * BLOCK_M
    if m_start >= q_len:
        return
    context_len = tl.load(ContextLens + seq).to(tl.int32)
    prefix_len = context_len - q_len

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_valid = offs_m < q_len
    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(Q + q_rows[:, None] * stride_q_token + head * stride_q_head + offs_d[None, :], mask=m_valid[:, None], other=0.0)
    q_pos = prefix_len + offs_m

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    k_base = KV + (head // GROUP) * stride_kv_head
    v_base = k_base + stride_kv_kind
    table = BlockTables + seq.to(tl.int64) * stride_table

    # Keys before the tile's first query position are visible to every query of the tile.
    unmasked_end = (prefix_len + m_start) // BLOCK_N * BLOCK_N
    # Keys past the tile's last query position are visible to none of them: never loaded.
    end = tl.minimum(context_len, prefix_len + m_start + BLOCK_M)
    for n_start in range(0, unmasked_end, BLOCK_N):
        acc, m_i, l_i = _attend_key_tile(
            acc, m_i, l_i, q, q_pos, k_base, v_base, table, n_start, context_len, scale_log2,
            stride_kv_block, stride_kv_token, BLOCK_SIZE, BLOCK_N, HEAD_DIM, False, PRECISION, KV_FP8,
        )
    for n_start in range(unmasked_end, end, BLOCK_N):
        acc, m_i, l_i = _attend_key_tile(
            acc, m_i, l_i, q, q_pos, k_base, v_base, table, n_start, context_len, scale_log2,
            stride_kv_block, stride_kv_token, BLOCK_SIZE, BLOCK_N, HEAD_DIM, True, PRECISION, KV_FP8,
        )
    if KV_FP8:
        acc = acc * v_scale
    acc = acc / l_i[:, None]
    o_ptrs = Out + q_rows[:, None] * stride_o_token + head * stride_o_head + offs_d[None, :]
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=m_valid[:, None])


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _check_inputs(q, kv_layer, cu_query_lens, context_lens, block_tables, out, k_scale, v_scale) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be [T, H, D], got shape {tuple(q.shape)}")
    if q.dtype not in _DTYPES:
        raise ValueError(f"q dtype must be float16, bfloat16 or float32, got {q.dtype}")
    num_tokens, num_heads, head_dim = q.shape
    if not _is_pow2(head_dim) or not 16 <= head_dim <= 256:
        raise ValueError(f"head_dim must be a power of two in [16, 256], got {head_dim}")
    if kv_layer.dim() != 5 or kv_layer.shape[1] != 2 or kv_layer.shape[4] != head_dim:
        raise ValueError(f"kv_layer must be [N, 2, Hkv, block_size, {head_dim}], got shape {tuple(kv_layer.shape)}")
    if kv_layer.dtype == FP8_KV_DTYPE:
        check_fp8_scales(k_scale, v_scale)
        check_fp8_device(kv_layer.device)
    elif kv_layer.dtype != q.dtype:
        raise ValueError(f"kv_layer dtype {kv_layer.dtype} differs from q dtype {q.dtype}")
    num_kv_heads, block_size = kv_layer.shape[2], kv_layer.shape[3]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if not _is_pow2(block_size):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    if q.stride(-1) != 1 or kv_layer.stride(-1) != 1:
        raise ValueError(f"q and kv_layer need a contiguous last dim, got strides {q.stride()} and {kv_layer.stride()}")
    if cu_query_lens.dim() != 1 or context_lens.dim() != 1 or cu_query_lens.shape[0] != context_lens.shape[0] + 1:
        raise ValueError(
            f"cu_query_lens must be [P + 1] and context_lens [P], got {tuple(cu_query_lens.shape)} and {tuple(context_lens.shape)}"
        )
    num_seqs = context_lens.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs or block_tables.shape[1] == 0:
        raise ValueError(f"block_tables must be [{num_seqs}, max_blocks >= 1], got shape {tuple(block_tables.shape)}")
    if block_tables.stride(1) != 1:
        raise ValueError(f"block_tables needs a contiguous last dim, got strides {block_tables.stride()}")
    for name, t in (("cu_query_lens", cu_query_lens), ("context_lens", context_lens), ("block_tables", block_tables)):
        if t.dtype not in _INDEX_DTYPES:
            raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")
    for name, t in (("kv_layer", kv_layer), ("cu_query_lens", cu_query_lens), ("context_lens", context_lens), ("block_tables", block_tables)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    if num_seqs > _MAX_GRID_YZ:
        raise ValueError(f"at most {_MAX_GRID_YZ} sequences per call, got {num_seqs}")
    if out is not None:
        if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
            raise ValueError(
                f"out must match q ({tuple(q.shape)}, {q.dtype}, {q.device}, contiguous last dim), "
                f"got {tuple(out.shape)}, {out.dtype}, {out.device}, strides {out.stride()}"
            )


def paged_prefill_attention(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    cu_query_lens: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    max_query_len: int | None = None,
    tiles: PrefillTiles | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Causal attention of P requests' new tokens over their paged KV (new keys already stored).

    q: [T, H, D], the requests' new tokens concatenated; request p owns rows
    ``cu_query_lens[p]:cu_query_lens[p + 1]``. kv_layer: [N, 2, Hkv, block_size, D].
    context_lens: [P], cached prefix plus new tokens. block_tables: [P, max_blocks].
    Index tensors are int32 or int64. Returns [T, H, D] in q's dtype (into ``out`` if given).

    ``max_query_len`` sizes the grid; pass it when known on the host, since computing it
    here reads ``cu_query_lens`` back (a device sync). ``tiles`` overrides the launch shape.
    Values (lengths within the block table, ``cu_query_lens[-1] == T``) are the caller's
    contract and are not checked: checking them would sync the device every layer.

    kv_layer may be ``torch.float8_e4m3fn`` with any q dtype: keys read as
    ``stored.float() * k_scale``, values as ``stored.float() * v_scale`` (Python floats);
    any other cache has q's dtype and ignores the scales.
    """
    _check_inputs(q, kv_layer, cu_query_lens, context_lens, block_tables, out, k_scale, v_scale)
    kv_fp8 = kv_layer.dtype == FP8_KV_DTYPE
    scale_log2 = scale * math.log2(math.e)
    if kv_fp8:
        scale_log2 *= k_scale
    else:
        v_scale = 1.0  # unused by the kernel
    if out is None:
        out = torch.empty_like(q)
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = context_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    if max_query_len is None:
        max_query_len = int((cu_query_lens[1:] - cu_query_lens[:-1]).max())
    if max_query_len < 1:
        raise ValueError(f"max_query_len must be >= 1, got {max_query_len}")
    tiles = tiles or default_tiles(head_dim, q.dtype)
    num_q_tiles = triton.cdiv(max_query_len, tiles.block_m)
    if num_q_tiles > _MAX_GRID_YZ:
        raise ValueError(f"max_query_len {max_query_len} needs {num_q_tiles} tiles of {tiles.block_m}; at most {_MAX_GRID_YZ}")
    grid = (num_heads, num_q_tiles, num_seqs)
    _prefill_kernel[grid](
        q, kv_layer, out, cu_query_lens, context_lens, block_tables, scale_log2, float(v_scale),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3), block_tables.stride(0),
        GROUP=num_heads // kv_layer.shape[2], BLOCK_SIZE=kv_layer.shape[3], HEAD_DIM=head_dim,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        # float32 inputs get true float32 products (the twin's); half types use the tensor cores.
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return out
