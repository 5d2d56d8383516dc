"""KV store in Triton: writes each new token's keys and values into its paged-cache
slot. The GPU twin of ``engine.attention.store_kv`` (the specification).

Layout as in engine/attention.py (the one the KV transfer ships): ``kv_layer`` is
``[num_blocks, 2, num_kv_heads, block_size, head_dim]``; slot ``s`` is block
``s // block_size`` at offset ``s % block_size``. One program per token copies all of
its KV heads (a ``[Hkv, D]`` tile each for K and V).

Padding: a slot < 0 is skipped. A CUDA graph is captured at a fixed token count, so
a smaller batch is padded up to it; padding tokens carry slot -1 and must not write.
Slots >= num_blocks * block_size are skipped as well (a caller bug, but one that
must not scribble over another layer's memory); the twin would raise instead, which
a kernel cannot do without a host sync.

FP8 cache (``kv_layer.dtype == torch.float8_e4m3fn``, ``--kv-cache-dtype fp8_e4m3``):
k and v may be any float dtype; each element is quantized exactly as the twin does,
``(x.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn)`` with ``k_scale`` for
keys and ``v_scale`` for values. The kernel divides with ``tl.math.div_rn`` (IEEE
round-to-nearest; Triton's ``/`` on float32 is not correctly rounded on CUDA) and
rounds to e4m3fn with integer bit operations (``_e4m3fn_bits``: round to nearest even,
subnormals, NaN -> 0x7F with its sign), then bitcasts the byte to ``tl.float8e4nv``
(Triton's e4m3fn) and stores it into the cache as passed. Why not ``x.to(tl.float8e4nv)``: Triton 3.x's interpreter (TRITON_INTERPRET=1)
converts float32 -> fp8 wrongly (it rounds half up and drops the carry of a mantissa
that rounds over, e.g. 31.13 -> 16.0 instead of 32.0: ~16% of random values differ
from torch). The integer path is bit-exact against torch's cast in the interpreter
(checked over every e4m3fn value, every midpoint and their float32 neighbours, scales
1, 0.37, 3 and 1/3, inf, NaN, float32 subnormals) and is plain integer arithmetic on
any GPU, so the code the CPU tests check is the code the GPU runs. Its cost (~20
integer ops an element, once per stored token) is negligible next to the layer.
NOTE: torch on CUDA computes ``tensor / python_float`` as ``tensor * (1 / scale)``
(BinaryDivTrueKernel.cu); on CPU it divides. This kernel divides on both, so it is
bit-exact with the twin run on CPU; against the twin run on CUDA a value within one
float32 ulp of an fp8 rounding midpoint may land one fp8 step apart.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _e4m3fn_bits(x, scale):
    """``(x.float() / scale).clamp(-448, 448)`` rounded to float8_e4m3fn, as its byte
    (uint8), bit-identical to torch's cast (round to nearest even)."""
    f = tl.math.div_rn(x.to(tl.float32), scale)
    # NOTE: comparisons, not tl.minimum/maximum, so a NaN stays NaN (as torch's clamp keeps it).
    f = tl.where(f > 448.0, 448.0, f)
    f = tl.where(f < -448.0, -448.0, f)
    bits = f.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = bits & 0x7FFFFFFF  # |f| as float32 bits, <= 448 or NaN
    # Normal (|f| >= 2^-6): rebias the exponent (127 -> 7) and round the 23-bit mantissa to
    # 3 bits, to nearest even (c10's fp8_e4m3fn_from_fp32_value). 448 gives 0x7E, never 0x7F.
    normal = (a - (120 << 23) + 0x7FFFF + ((a >> 20) & 1)) >> 20
    # Subnormal (|f| < 2^-6): the code is |f| / 2^-9 rounded to nearest even, i.e. the
    # significand m (implicit bit included) shifted right by 141 - exponent, at least 21
    # here. A code of 8 is the smallest normal, 2^-6, whose encoding is also 8. float32
    # subnormals (exponent 0) shift out entirely: they are far below 2^-10.
    e = a >> 23
    m = (a & 0x7FFFFF) | tl.where(e > 0, 0x800000, 0)
    shift = tl.minimum(tl.maximum(141 - e, 1), 31)  # clamped: no out-of-range shift in unused lanes
    q = m >> shift
    rem = m - (q << shift)
    half = 1 << (shift - 1)
    q += ((rem > half) | ((rem == half) & ((q & 1) == 1))).to(tl.int32)
    code = tl.where(a >= (121 << 23), normal, q)
    code = tl.where(a > 0x7F800000, 0x7F, code)  # NaN
    return (code | sign).to(tl.uint8)


@triton.jit
def _store_kv_kernel(
    kv_ptr, k_ptr, v_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kv_block, stride_kv_kv, stride_kv_head, stride_kv_tok,
    num_slots, k_scale, v_scale,
    NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    # Compile-time, from the cache pointer's type (no extra constexpr: other dtypes compile as before).
    KV_FP8: tl.constexpr = kv_ptr.dtype.element_ty == tl.float8e4nv
    tok = tl.program_id(0)
    # int64: block * stride_kv_block overflows int32 in a large cache.
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    is_valid = (slot >= 0) & (slot < num_slots)
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE

    # NOTE: a padding slot writes zero heads. The scalar validity goes in as a count, not
    # as `is_valid & block_mask`: the interpreter broadcasts a scalar bool to an int block.
    num_heads_written = tl.where(is_valid, NUM_KV_HEADS, 0)
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, DIM_PAD)[None, :]
    mask = (heads < num_heads_written) & (dims < HEAD_DIM)
    dst = kv_ptr + block * stride_kv_block + heads * stride_kv_head + offset * stride_kv_tok + dims
    k = tl.load(k_ptr + tok * stride_kt + heads * stride_kh + dims, mask=mask)
    if KV_FP8:
        k = _e4m3fn_bits(k, k_scale).to(tl.float8e4nv, bitcast=True)
    tl.store(dst, k, mask=mask)
    v = tl.load(v_ptr + tok * stride_vt + heads * stride_vh + dims, mask=mask)
    if KV_FP8:
        v = _e4m3fn_bits(v, v_scale).to(tl.float8e4nv, bitcast=True)
    tl.store(dst + stride_kv_kv, v, mask=mask)


def _check_inputs(kv_layer, k, v, slot_mapping, k_scale, v_scale) -> None:
    if kv_layer.dim() != 5 or kv_layer.shape[1] != 2:
        raise ValueError(f"kv_layer must be [num_blocks, 2, num_kv_heads, block_size, head_dim], got shape {tuple(kv_layer.shape)}")
    _, _, num_kv_heads, _, head_dim = kv_layer.shape
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 3 or t.shape[1:] != (num_kv_heads, head_dim):
            raise ValueError(f"{name} must be [num_tokens, {num_kv_heads}, {head_dim}], got shape {tuple(t.shape)}")
        if kv_layer.dtype == torch.float8_e4m3fn:
            if not t.dtype.is_floating_point or t.dtype.itemsize == 1:
                raise ValueError(f"{name} dtype {t.dtype} cannot be quantized into an fp8 cache; use float32, bfloat16 or float16")
        elif t.dtype != kv_layer.dtype:
            raise ValueError(f"{name} dtype {t.dtype} differs from kv_layer dtype {kv_layer.dtype}")
        if t.device != kv_layer.device:
            raise ValueError(f"{name} is on {t.device}, kv_layer on {kv_layer.device}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name}'s last dimension must be contiguous, got strides {t.stride()}")
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"k has {k.shape[0]} tokens, v has {v.shape[0]}")
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] != k.shape[0]:
        raise ValueError(f"slot_mapping must be [num_tokens={k.shape[0]}], got shape {tuple(slot_mapping.shape)}")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be int32 or int64, got {slot_mapping.dtype}")
    if slot_mapping.device != kv_layer.device:
        raise ValueError(f"slot_mapping is on {slot_mapping.device}, kv_layer on {kv_layer.device}")
    if not slot_mapping.is_contiguous():
        raise ValueError(f"slot_mapping must be contiguous, got stride {slot_mapping.stride()}")
    if kv_layer.stride(-1) != 1:
        raise ValueError(f"kv_layer's last dimension must be contiguous, got strides {kv_layer.stride()}")
    if kv_layer.dtype == torch.float8_e4m3fn:
        check_fp8_scales(k_scale, v_scale)
        check_fp8_device(kv_layer.device)


def check_fp8_device(device: torch.device) -> None:
    """Compiled Triton has float8e4nv (e4m3fn) on sm_89+ only; the interpreter has it anywhere."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise ValueError(f"an fp8 (float8_e4m3fn) KV cache needs compute capability >= 8.9 (Ada, Hopper), "
                         f"{device} has {torch.cuda.get_device_capability(device)}")


def check_fp8_scales(k_scale: float, v_scale: float) -> None:
    """Scales of an fp8 cache: finite positive floats (the kernels read them as float32)."""
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not (math.isfinite(s) and s > 0):
            raise ValueError(f"{name} must be a finite float > 0, got {s!r}")
        if not 1.2e-38 < float(s) < 3.4e38:
            raise ValueError(f"{name} {s!r} is outside float32's normal range")


def store_kv(
    kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: float = 1.0, v_scale: float = 1.0,
) -> None:
    """Write new keys/values into their slots. kv_layer: [N, 2, Hkv, bs, D]; k, v: [T, Hkv, D];
    slot_mapping: [T] int32/int64, entries < 0 are padding and skipped.

    With an fp8 (``torch.float8_e4m3fn``) cache, k and v may be float32/bfloat16/float16 and
    are stored as ``(x.float() / scale).clamp(-448, 448)`` in e4m3fn (``k_scale`` for keys,
    ``v_scale`` for values; Python floats). Any other cache ignores the scales."""
    _check_inputs(kv_layer, k, v, slot_mapping, k_scale, v_scale)
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return
    num_blocks, _, num_kv_heads, block_size, head_dim = kv_layer.shape
    kv_fp8 = kv_layer.dtype == torch.float8_e4m3fn
    if not kv_fp8:
        k_scale = v_scale = 1.0  # unused by the kernel
    _store_kv_kernel[(num_tokens,)](
        kv_layer, k, v, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3),
        num_blocks * block_size, float(k_scale), float(v_scale),
        NUM_KV_HEADS=num_kv_heads, HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim, DIM_PAD=triton.next_power_of_2(head_dim), BLOCK_SIZE=block_size,
        num_warps=4,
    )
