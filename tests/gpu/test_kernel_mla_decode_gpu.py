"""The Triton absorbed MLA decode kernel on a GPU at DeepSeek-V3's shape (kv_lora_rank
512, rope 64; 16 query heads = 128 / TP 8, and all 128), against the float32 torch twin
(engine.mla.mla_decode_attention) on the upcast inputs. Skipped without CUDA.

Tolerance: bfloat16 q and cache, float32 scores and accumulation; the kernel rounds the
softmax weights to bfloat16 for P @ c (2^-9 relative each) and the output to bfloat16
(2^-9 relative); the output is a convex combination of values ~N(0, 1), so ~2e-2 at most.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.mla import mla_decode_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

R, P, BLOCK = 512, 64, 16


@pytest.mark.parametrize("num_heads", [16, 128])
@pytest.mark.parametrize("context_lens", [[1, 17, 300], [4096] * 4])
def test_mla_decode_bf16_matches_twin(num_heads, context_lens):
    from pdserve.engine.kernels.mla_decode import mla_decode

    g = torch.Generator(device="cuda").manual_seed(num_heads + len(context_lens))
    batch = len(context_lens)
    max_blocks = max(-(-c // BLOCK) for c in context_lens)
    num_blocks = batch * max_blocks + 3
    cache = torch.randn(num_blocks, 1, 1, BLOCK, R + P, device="cuda", generator=g)
    q = torch.randn(batch, num_heads, R + P, device="cuda", generator=g)
    tables = torch.randperm(num_blocks, device="cuda", generator=g)[: batch * max_blocks].view(batch, max_blocks)
    lens = torch.tensor(context_lens, device="cuda")
    scale = (128 + 64) ** -0.5
    ref = mla_decode_attention(q, cache, tables, lens, scale, R)
    out = mla_decode(q.bfloat16(), cache.bfloat16(), tables.int(), lens.int(), scale, R)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    f32 = mla_decode(q, cache, tables.int(), lens.int(), scale, R)  # ieee float32 dots, no TF32
    torch.testing.assert_close(f32, ref, atol=1e-4, rtol=1e-4)
