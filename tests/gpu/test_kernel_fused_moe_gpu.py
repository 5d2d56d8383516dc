"""The Triton fused-MoE kernel on a GPU at Qwen3-30B-A3B's layer shape (hidden 2048,
128 experts of intermediate 768, top-8), against the float32 torch twin
(engine.moe.fused_experts_torch) on the upcast inputs. Skipped without CUDA.

Tolerance: bfloat16 weights and activations, float32 accumulation; the kernel rounds the
SiLU-and-mul product and the down GEMM output to bfloat16 (2^-9 relative), and a
token's 8 pairs are added in bfloat16. With outputs of order 1 that is ~2e-2 at most.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.moe import fused_experts_torch, select_experts

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

H, I, E, K = 2048, 768, 128, 8


@pytest.mark.parametrize("num_tokens", [1, 16, 300])
@pytest.mark.parametrize("first_expert, num_local", [(0, 128), (64, 64)])
def test_fused_experts_bf16_matches_twin(num_tokens, first_expert, num_local):
    from pdserve.engine.kernels.fused_moe import fused_experts

    g = torch.Generator(device="cuda").manual_seed(num_tokens)
    x = torch.randn(num_tokens, H, device="cuda", generator=g)
    w13 = torch.randn(num_local, 2 * I, H, device="cuda", generator=g) * H**-0.5
    w2 = torch.randn(num_local, H, I, device="cuda", generator=g) * I**-0.5
    weights, ids = select_experts(torch.randn(num_tokens, E, device="cuda", generator=g), K, True)
    ref = fused_experts_torch(x, w13, w2, weights, ids, first_expert)
    out = fused_experts(x.bfloat16(), w13.bfloat16(), w2.bfloat16(), weights, ids, first_expert)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    f32 = fused_experts(x, w13, w2, weights, ids, first_expert)  # ieee float32 dots, no TF32
    torch.testing.assert_close(f32, ref, atol=1e-4, rtol=1e-4)
