"""Triton fused mixture-of-experts: grouped expert GEMMs over (token, expert) pairs sorted
by expert.

Twin (the specification and the CPU path): ``engine.moe.fused_experts_torch``. Same
contract: the weighted sum over a token's local experts of
``down(silu(gate(x)) * up(x))``, [T, H] in x's dtype.

How: ``align_by_expert`` (torch, no host sync, so a CUDA graph could hold it) sorts the
T*k pairs by local expert and pads each expert's run to a multiple of BLOCK_M; every
block of BLOCK_M slots then belongs to one expert. Kernel 1 runs, per block and per
BLOCK_N columns of the intermediate, the gate and up GEMMs of the block's rows against
that expert's w13 and writes ``silu(gate) * up`` [pairs, I]; kernel 2 runs the down GEMM
against w2, scales each row by its routing weight and writes one [H] row per pair; the
k rows of a token are summed at the end. Pairs of experts on other ranks are never
written and stay zero.

Roundings: accumulation is float32 (``input_precision="ieee"`` for float32 inputs, so
no TF32), SiLU-and-mul is computed on the float32 accumulators and rounded once, and the
down GEMM's output is rounded to the dtype before the float32 weight multiply, and a
token's k rows are added in top-k order, as in the twin. The twin rounds the gate/up
GEMM outputs before the SiLU and its GEMMs sum in BLAS order, so in float32 results agree
to a few units in the last place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def align_by_expert(
    topk_ids: torch.Tensor, first_expert: int, num_local_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group the pairs of ``topk_ids`` [T, k] (pair p = token p // k, choice p % k) by
    local expert, each expert's run padded to a multiple of ``block_m``.

    Returns ``sorted_pair_ids`` [S] (a pair id per slot; T*k marks padding) and
    ``block_experts`` [S // block_m] (the local expert of each block; -1 for blocks past
    the last expert's run). S = T*k + E*(block_m - 1) rounded up to block_m: the most the
    padding can need, so no size depends on the routing (no host sync)."""
    num_pairs = topk_ids.numel()
    E, device = num_local_experts, topk_ids.device
    local = topk_ids.reshape(-1) - first_expert
    key = torch.where((local >= 0) & (local < E), local, E)  # E: another rank's expert
    counts = torch.bincount(key, minlength=E + 1)  # [E + 1]
    padded = (counts[:E] + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    num_slots = -(-(num_pairs + E * (block_m - 1)) // block_m) * block_m
    # Slot of each pair: its expert's padded start plus its rank among that expert's pairs.
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    run_start = torch.cumsum(counts, 0) - counts
    slot_start = torch.cat([padded_end - padded, torch.full((1,), num_slots, device=device, dtype=padded.dtype)])
    slot = slot_start[sorted_key] + torch.arange(num_pairs, device=device) - run_start[sorted_key]
    slot = torch.where(sorted_key < E, slot, num_slots)  # non-local pairs go to a dropped extra slot
    sorted_ids = torch.full((num_slots + 1,), num_pairs, dtype=torch.int64, device=device)
    sorted_ids.scatter_(0, slot, order)
    starts = torch.arange(0, num_slots, block_m, device=device)
    block_experts = torch.searchsorted(padded_end, starts, right=True)
    block_experts = torch.where(block_experts < E, block_experts, -1)
    return sorted_ids[:num_slots], block_experts


@triton.jit
def _gate_up_kernel(
    X, W13, SortedIds, BlockExperts, Inter, num_pairs, top_k, hidden, inter,
    stride_xt, stride_we, stride_wn, stride_it,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(BlockExperts + pid_m)
    if e >= 0:
        pair = tl.load(SortedIds + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        row_ok = pair < num_pairs
        token = pair // top_k
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < inter
        w_base = W13 + e * stride_we
        acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < hidden
            x = tl.load(X + token[:, None] * stride_xt + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w_mask = k_ok[:, None] & col_ok[None, :]
            w_gate = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None], mask=w_mask, other=0.0)  # [K, N]
            w_up = tl.load(w_base + (cols[None, :] + inter) * stride_wn + ks[:, None], mask=w_mask, other=0.0)
            acc_gate += tl.dot(x, w_gate, input_precision=PRECISION)
            acc_up += tl.dot(x, w_up, input_precision=PRECISION)
        act = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up
        out_mask = row_ok[:, None] & col_ok[None, :]
        tl.store(Inter + pair[:, None] * stride_it + cols[None, :], act.to(Inter.dtype.element_ty), mask=out_mask)


@triton.jit
def _down_kernel(
    Inter, W2, SortedIds, BlockExperts, TopkWeights, Out, num_pairs, hidden, inter,
    stride_it, stride_we, stride_wn, stride_ot,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(BlockExperts + pid_m)
    if e >= 0:
        pair = tl.load(SortedIds + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        row_ok = pair < num_pairs
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < hidden
        w_base = W2 + e * stride_we
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, inter, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < inter
            a = tl.load(Inter + pair[:, None] * stride_it + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc += tl.dot(a, w, input_precision=PRECISION)
        weight = tl.load(TopkWeights + pair, mask=row_ok, other=0.0)
        dtype = Out.dtype.element_ty
        out = acc.to(dtype).to(tl.float32) * weight[:, None]
        tl.store(Out + pair[:, None] * stride_ot + cols[None, :], out.to(dtype), mask=row_ok[:, None] & col_ok[None, :])


def _check(x, w13, w2, topk_weights, topk_ids) -> None:
    if x.dtype not in _DTYPES:
        raise ValueError(f"x dtype must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be [T, H] with a contiguous last dim, got shape {tuple(x.shape)} strides {x.stride()}")
    T, H = x.shape
    if w13.dim() != 3 or w13.shape[2] != H or w13.shape[1] % 2 or not w13.is_contiguous() or w13.dtype != x.dtype:
        raise ValueError(f"w13 must be a contiguous {x.dtype} [E, 2I, {H}], got {w13.dtype} {tuple(w13.shape)}")
    E, I = w13.shape[0], w13.shape[1] // 2
    if tuple(w2.shape) != (E, H, I) or not w2.is_contiguous() or w2.dtype != x.dtype:
        raise ValueError(f"w2 must be a contiguous {x.dtype} [{E}, {H}, {I}], got {w2.dtype} {tuple(w2.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T:
        raise ValueError(f"topk_ids must be [{T}, k], got {tuple(topk_ids.shape)}")
    if topk_weights.shape != topk_ids.shape or topk_weights.dtype != torch.float32:
        raise ValueError(f"topk_weights must be float32 {tuple(topk_ids.shape)}, got {topk_weights.dtype} "
                         f"{tuple(topk_weights.shape)}")


def fused_experts(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
    first_expert: int = 0, block_m: int | None = None,
) -> torch.Tensor:
    """Same arguments and result as ``engine.moe.fused_experts_torch``; ``block_m`` (16,
    32 or 64; None picks by the number of pairs) is the rows per GEMM tile."""
    _check(x, w13, w2, topk_weights, topk_ids)
    T, H = x.shape
    k = topk_ids.shape[1]
    E, I = w13.shape[0], w13.shape[1] // 2
    num_pairs = T * k
    out = torch.zeros(T, k, H, dtype=x.dtype, device=x.device)
    if num_pairs == 0:
        return out.sum(1)
    if block_m is None:
        block_m = 16 if num_pairs <= 16 * E else 64
    sorted_ids, block_experts = align_by_expert(topk_ids, first_expert, E, block_m)
    inter = torch.empty(num_pairs, I, dtype=x.dtype, device=x.device)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    block_n, block_k = 64, 32
    num_blocks = block_experts.shape[0]
    _gate_up_kernel[(num_blocks, triton.cdiv(I, block_n))](
        x, w13, sorted_ids, block_experts, inter, num_pairs, k, H, I,
        x.stride(0), w13.stride(0), w13.stride(1), inter.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=precision,
    )
    flat_out = out.view(num_pairs, H)
    _down_kernel[(num_blocks, triton.cdiv(H, block_n))](
        inter, w2, sorted_ids, block_experts, topk_weights.contiguous().view(-1), flat_out, num_pairs, H, I,
        inter.stride(0), w2.stride(0), w2.stride(1), flat_out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=precision,
    )
    return out.sum(1)
