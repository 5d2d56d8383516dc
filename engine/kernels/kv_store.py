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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    kv_ptr, k_ptr, v_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kv_block, stride_kv_kv, stride_kv_head, stride_kv_tok,
    num_slots,
    NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
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
    tl.store(dst, k, mask=mask)
    v = tl.load(v_ptr + tok * stride_vt + heads * stride_vh + dims, mask=mask)
    tl.store(dst + stride_kv_kv, v, mask=mask)


def _check_inputs(kv_layer, k, v, slot_mapping) -> None:
    if kv_layer.dim() != 5 or kv_layer.shape[1] != 2:
        raise ValueError(f"kv_layer must be [num_blocks, 2, num_kv_heads, block_size, head_dim], got shape {tuple(kv_layer.shape)}")
    _, _, num_kv_heads, _, head_dim = kv_layer.shape
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 3 or t.shape[1:] != (num_kv_heads, head_dim):
            raise ValueError(f"{name} must be [num_tokens, {num_kv_heads}, {head_dim}], got shape {tuple(t.shape)}")
        if t.dtype != kv_layer.dtype:
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


def store_kv(kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write new keys/values into their slots. kv_layer: [N, 2, Hkv, bs, D]; k, v: [T, Hkv, D];
    slot_mapping: [T] int32/int64, entries < 0 are padding and skipped."""
    _check_inputs(kv_layer, k, v, slot_mapping)
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return
    num_blocks, _, num_kv_heads, block_size, head_dim = kv_layer.shape
    _store_kv_kernel[(num_tokens,)](
        kv_layer, k, v, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3),
        num_blocks * block_size,
        NUM_KV_HEADS=num_kv_heads, HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim, DIM_PAD=triton.next_power_of_2(head_dim), BLOCK_SIZE=block_size,
        num_warps=4,
    )
