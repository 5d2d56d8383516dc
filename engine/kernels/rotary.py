"""Triton rotate-half rotary embedding of q and k in one launch, reading the model's cos/sin tables.

Twin (the specification and the CPU path): ``engine.layers.RotaryEmbedding.apply``
with ``cos_sin(positions)``: ``x * cos + rotate_half(x) * sin``. The kernel takes the
tables the model already builds (``RotaryEmbedding.cos`` / ``.sin``, [max_positions, D],
Llama 3.1 frequency scaling already baked in) and the token positions, so scaling is
never recomputed here. It rounds each product to the dtype before the add, as the
twin's elementwise ops do, so half-precision results are bit-identical to the twin.

Whether it measurably helps over the twin's elementwise ops is decided on GPU by
benchmarks/bench_prefill_kernel.py; the engine wires it in only where it does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _rotate_heads(
    X, Out, cos_lo, cos_hi, sin_lo, sin_hi, token, num_heads, stride_x_token, stride_x_head,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, HALF)
    mask = heads[:, None] < num_heads
    src = X + token * stride_x_token + heads[:, None] * stride_x_head + cols[None, :]
    x_lo = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x_hi = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dtype = Out.dtype.element_ty
    # rotate_half(x) = [-x_hi, x_lo]; each product rounded to the dtype, as in the twin.
    out_lo = (x_lo * cos_lo[None, :]).to(dtype).to(tl.float32) - (x_hi * sin_lo[None, :]).to(dtype).to(tl.float32)
    out_hi = (x_hi * cos_hi[None, :]).to(dtype).to(tl.float32) + (x_lo * sin_hi[None, :]).to(dtype).to(tl.float32)
    dst = Out + token * num_heads * (2 * HALF) + heads[:, None] * (2 * HALF) + cols[None, :]
    tl.store(dst, out_lo.to(dtype), mask=mask)
    tl.store(dst + HALF, out_hi.to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    Q, K, QOut, KOut, Positions, Cos, Sin, num_heads, num_kv_heads,
    stride_q_token, stride_q_head, stride_k_token, stride_k_head, stride_table,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HKV: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    row = tl.load(Positions + token).to(tl.int64) * stride_table
    cols = tl.arange(0, HALF)
    cos_lo = tl.load(Cos + row + cols).to(tl.float32)
    cos_hi = tl.load(Cos + row + HALF + cols).to(tl.float32)
    sin_lo = tl.load(Sin + row + cols).to(tl.float32)
    sin_hi = tl.load(Sin + row + HALF + cols).to(tl.float32)
    _rotate_heads(Q, QOut, cos_lo, cos_hi, sin_lo, sin_hi, token, num_heads, stride_q_token, stride_q_head, HALF, BLOCK_H)
    _rotate_heads(K, KOut, cos_lo, cos_hi, sin_lo, sin_hi, token, num_kv_heads, stride_k_token, stride_k_head, HALF, BLOCK_HKV)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated copies of q [T, H, D] and k [T, Hkv, D] (new contiguous tensors; inputs untouched).

    positions: [T] int32/int64 rows of the tables; cos, sin: [max_positions, D] in q's dtype
    (``RotaryEmbedding.cos`` / ``.sin``). Drop-in for ``RotaryEmbedding.apply(rope.cos_sin(positions), q, k)``.
    q and k may be strided views (e.g. of the fused qkv projection) with a contiguous last dim.
    Positions are not range-checked (that would sync the device); they must be < max_positions.
    """
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q must be [T, H, D] and k [T, Hkv, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    num_tokens, num_heads, head_dim = q.shape
    if q.dtype not in _DTYPES:
        raise ValueError(f"q dtype must be float16, bfloat16 or float32, got {q.dtype}")
    if head_dim < 2 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 2, got {head_dim}")
    for name, t in (("k", k), ("cos", cos), ("sin", sin)):
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} must be {q.dtype} on {q.device}, got {t.dtype} on {t.device}")
    if cos.dim() != 2 or cos.shape[1] != head_dim or sin.shape != cos.shape:
        raise ValueError(f"cos and sin must be [max_positions, {head_dim}], got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if cos.stride() != sin.stride() or cos.stride(1) != 1:
        raise ValueError(f"cos and sin need equal strides and a contiguous last dim, got {cos.stride()} and {sin.stride()}")
    if positions.shape != (num_tokens,) or positions.dtype not in (torch.int32, torch.int64) or positions.device != q.device:
        raise ValueError(
            f"positions must be [{num_tokens}] int32/int64 on {q.device}, got {tuple(positions.shape)} {positions.dtype} on {positions.device}"
        )
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError(f"q and k need a contiguous last dim, got strides {q.stride()} and {k.stride()}")
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens == 0:
        return q_out, k_out
    num_kv_heads = k.shape[1]
    _rotary_kernel[(num_tokens,)](
        q, k, q_out, k_out, positions, cos, sin, num_heads, num_kv_heads,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
        HALF=head_dim // 2, BLOCK_H=triton.next_power_of_2(num_heads), BLOCK_HKV=triton.next_power_of_2(num_kv_heads),
        num_warps=4,
    )
    return q_out, k_out
