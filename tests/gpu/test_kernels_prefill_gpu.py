"""Prefill attention and fused-op kernels against their pure-torch twins at real shapes on CUDA.

Llama-3-8B attention shape (32 query heads, 8 KV heads, head_dim 128, block 16) with a
4k-token batch; bfloat16 and float16 (bfloat16 cannot be checked on CPU). Skipped
without CUDA.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pdserve.engine.attention import AttentionMetadata, paged_attention
from pdserve.engine.config import RopeScaling
from pdserve.engine.kernels.activation import silu_and_mul
from pdserve.engine.kernels.norm import rms_norm
from pdserve.engine.kernels.prefill_attention import paged_prefill_attention
from pdserve.engine.kernels.rotary import apply_rotary
from pdserve.engine.layers import RMSNorm, RotaryEmbedding

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPES = [torch.bfloat16, torch.float16]


def _attention_tolerance(dtype: torch.dtype) -> dict:
    # Softmax weights are rounded to the dtype before P @ V and the output once; bfloat16
    # keeps 8 mantissa bits (2^-9 relative per rounding), float16 11 bits. Outputs are
    # averages of O(1) values, so a few units in the last place of O(1): 1.5e-2 / 2e-3.
    return dict(atol=1.5e-2, rtol=1.5e-2) if dtype == torch.bfloat16 else dict(atol=2e-3, rtol=2e-3)


def _ulp_tolerance(dtype: torch.dtype) -> dict:
    # The fused ops round where their twins round; float32 summation order or the exp
    # implementation can flip one rounding: two units in the last place.
    return dict(atol=1e-5, rtol=2 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "seqs",
    [
        [(0, 4096)],  # one 4k-token prompt
        [(0, 1500), (1024, 1536), (777, 1060)],  # plain, prefix-cache hit (whole blocks), chunk mid-block
        [(8000, 512), (31000, 1), (16384, 2048)],  # long cached prefixes, up to 32k context
    ],
    ids=["prefill_4k", "mixed_4k", "long_prefix"],
)
def test_prefill_attention_matches_twin(dtype, seqs):
    gen = torch.Generator(device="cuda").manual_seed(0)
    context_lens = [p + q for p, q in seqs]
    blocks_per_seq = [-(-c // BLOCK_SIZE) for c in context_lens]
    num_blocks = sum(blocks_per_seq) + 8
    kv = torch.randn(num_blocks, 2, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM, device="cuda", dtype=dtype, generator=gen)
    perm = torch.randperm(num_blocks, device="cuda", generator=gen)
    tables = torch.zeros(len(seqs), max(blocks_per_seq), dtype=torch.int32, device="cuda")
    block_ids, used = [], 0
    for p, nb in enumerate(blocks_per_seq):
        block_ids.append(perm[used : used + nb])
        tables[p, :nb] = block_ids[-1].to(torch.int32)
        used += nb
    q_lens = [q for _, q in seqs]
    q = torch.randn(sum(q_lens), NUM_HEADS, HEAD_DIM, device="cuda", dtype=dtype, generator=gen)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    ctx = torch.tensor(context_lens, dtype=torch.int32, device="cuda")
    scale = HEAD_DIM**-0.5
    out = paged_prefill_attention(q, kv, cu, ctx, tables, scale, max_query_len=max(q_lens))
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(len(q), dtype=torch.long, device="cuda"), num_decodes=0,
        decode_block_tables=torch.zeros(0, 1, dtype=torch.long, device="cuda"),
        decode_context_lens=torch.zeros(0, dtype=torch.long, device="cuda"),
        prefill_query_lens=q_lens, prefill_context_lens=context_lens, prefill_block_ids=block_ids,
    )
    # The twin on float32 copies: the exact answer for these inputs.
    expected = paged_attention(q.float(), kv.float(), meta, scale)
    torch.testing.assert_close(out.float(), expected, **_attention_tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_twin(dtype):
    norm = RMSNorm(4096, 1e-5).to(device="cuda", dtype=dtype)
    norm.weight.data.normal_(1.0, 0.2)
    x = torch.randn(4096, 4096, device="cuda", dtype=dtype)
    residual = torch.randn_like(x)
    out, new_residual = rms_norm(x, norm.weight, 1e-5, residual)
    expected_out, expected_residual = norm(x, residual)
    assert torch.equal(new_residual, expected_residual)  # one rounding of an exact sum
    torch.testing.assert_close(out, expected_out, **_ulp_tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_matches_twin(dtype):
    scaling = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    rope = RotaryEmbedding(HEAD_DIM, 32768, 500000.0, scaling, dtype).to("cuda")
    qkv = torch.randn(4096, (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM, device="cuda", dtype=dtype)
    q, k, _ = qkv.split([NUM_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM], dim=-1)
    q, k = q.view(4096, NUM_HEADS, HEAD_DIM), k.view(4096, NUM_KV_HEADS, HEAD_DIM)
    positions = torch.randint(0, 32768, (4096,), device="cuda")
    q_out, k_out = apply_rotary(q, k, positions, rope.cos, rope.sin)
    q_ref, k_ref = RotaryEmbedding.apply(rope.cos_sin(positions), q, k)
    # Bit-identical on CPU; on GPU the twin's elementwise kernels also round each product
    # once, but allow the ulp tolerance in case a backend contracts differently.
    torch.testing.assert_close(q_out, q_ref, **_ulp_tolerance(dtype))
    torch.testing.assert_close(k_out, k_ref, **_ulp_tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_twin(dtype):
    x = torch.randn(4096, 2 * 14336, device="cuda", dtype=dtype) * 3
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(silu_and_mul(x), F.silu(gate) * up, **_ulp_tolerance(dtype))
