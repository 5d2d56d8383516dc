"""Triton RMSNorm with the residual add fused: one read of x (and residual), one write of each output.

Twin (the specification and the CPU path): ``engine.layers.RMSNorm.forward``. Same
roundings as the twin: ``x + residual`` is rounded to the input dtype (it is the new
residual stream), the mean of squares and the rsqrt are float32, the normalised value
is rounded to the dtype before the weight multiply. Only the float32 summation order
differs, so results match the twin to within one unit in the last place.

Whether it measurably helps over the twin's eight small kernels is decided on GPU by
benchmarks/bench_prefill_kernel.py; the engine wires it in only where it does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HIDDEN = 65536  # one row per program, held in registers


@triton.jit
def _rms_norm_kernel(
    X, Residual, Weight, Out, ResidualOut, eps, hidden,
    stride_x, stride_r, stride_o, stride_ro,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(Residual + row * stride_r + cols, mask=mask, other=0.0)
        # Rounded to the dtype like the twin's ``x + residual``: it is the stored stream.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(ResidualOut + row * stride_ro + cols, x, mask=mask)
    h = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, 0) / hidden + eps)
    normed = (h * rstd).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(Weight + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_o + cols, (w * normed).to(Out.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor, name: str) -> torch.Tensor:
    """[..., hidden] as a [rows, hidden] view (a copy only if the leading dims do not flatten)."""
    if t.stride(-1) != 1:
        raise ValueError(f"{name} needs a contiguous last dim, got strides {t.stride()}")
    return t.reshape(-1, t.shape[-1])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm over the last dim of x [..., hidden] with weight [hidden].

    Without residual returns the normed tensor; with residual (same shape as x) returns
    ``(normed, new_residual)`` where ``new_residual = x + residual``, both new tensors
    shaped like x (the inputs are left untouched, as the twin leaves them).
    """
    if x.dtype not in _DTYPES:
        raise ValueError(f"x dtype must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 1 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty [..., hidden] tensor, got shape {tuple(x.shape)}")
    hidden = x.shape[-1]
    if hidden > _MAX_HIDDEN:
        raise ValueError(f"hidden size must be at most {_MAX_HIDDEN}, got {hidden}")
    if weight.shape != (hidden,) or weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(
            f"weight must be [{hidden}] {x.dtype} on {x.device}, got {tuple(weight.shape)} {weight.dtype} on {weight.device}"
        )
    if weight.stride(0) != 1:
        raise ValueError(f"weight must be contiguous, got stride {weight.stride()}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device):
        raise ValueError(
            f"residual must match x ({tuple(x.shape)} {x.dtype} on {x.device}), "
            f"got {tuple(residual.shape)} {residual.dtype} on {residual.device}"
        )
    x2 = _rows(x, "x")
    r2 = _rows(residual, "residual") if residual is not None else x2
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    r_out = torch.empty_like(out) if residual is not None else out
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(x2.shape[0],)](
        x2, r2, weight, out, r_out, float(eps), hidden,
        x2.stride(0), r2.stride(0), out.stride(0), r_out.stride(0),
        HAS_RESIDUAL=residual is not None, BLOCK=block,
        num_warps=min(max(block // 512, 1), 16),
    )
    if residual is None:
        return out.view(x.shape)
    return out.view(x.shape), r_out.view(x.shape)
