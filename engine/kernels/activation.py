"""Triton SiLU-and-multiply on the merged [gate, up] projection: one read, one write.

Twin (the specification and the CPU path): ``engine.models.llama.MLP.forward``'s
``gate, up = x.chunk(2, -1); F.silu(gate) * up``. As in the twin, SiLU is computed in
float32 and rounded to the dtype before the multiply, and the product is rounded once;
only the exp implementation differs, so results match within one unit in the last place.

Whether it measurably helps over the twin's two kernels is decided on GPU by
benchmarks/bench_prefill_kernel.py; the engine wires it in only where it does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(X, Out, width, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gate = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + width + cols, mask=mask, other=0.0).to(tl.float32)
    dtype = Out.dtype.element_ty
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(Out + row * stride_o + cols, (silu * up).to(dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2 * I], gate then up (the merged gate_up_proj output) -> silu(gate) * up, [..., I]."""
    if x.dtype not in _DTYPES:
        raise ValueError(f"x dtype must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 1 or x.numel() == 0 or x.shape[-1] % 2:
        raise ValueError(f"x must be a non-empty [..., 2 * I] tensor, got shape {tuple(x.shape)}")
    if x.stride(-1) != 1:
        raise ValueError(f"x needs a contiguous last dim, got strides {x.stride()}")
    width = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.empty(x2.shape[0], width, dtype=x.dtype, device=x.device)
    grid = (x2.shape[0], triton.cdiv(width, _BLOCK))
    if grid[1] > 65535:
        raise ValueError(f"intermediate size {width} too large (at most {65535 * _BLOCK})")
    _silu_and_mul_kernel[grid](x2, out, width, x2.stride(0), out.stride(0), BLOCK=_BLOCK, num_warps=4)
    return out.view(*x.shape[:-1], width)
