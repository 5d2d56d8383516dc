"""Triton absorbed MLA decode (engine/kernels/mla_decode.py) against its torch twin
(engine.mla.mla_decode_attention), in Triton's interpreter on CPU (tests/conftest.py sets
TRITON_INTERPRET=1), so shapes are small; bfloat16 is left to tests/gpu (the interpreter
has no bfloat16).

Tolerances (same reasoning as test_kernel_decode_attention.py): the twin runs in float32
on the upcast inputs. The output is a convex combination of latent values ~N(0, 1).
float32: only the summation order differs (tiles, splits, two partial dots for the
score) -> atol 1e-5. float16: the kernel rounds the softmax weights to float16 for P @ c
(2^-11 relative each, ~3e-3 on the sum at |c| < 5) and the output to float16 -> 1e-2.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.kernels.mla_decode import mla_decode
from pdserve.engine.mla import mla_decode_attention

ATOL = {torch.float32: 1e-5, torch.float16: 1e-2}


def make_case(seed, dtype, *, block_size, num_heads, rank, rope, context_lens):
    """Random q and latent cache; shuffled block ids; slots past each context poisoned."""
    g = torch.Generator().manual_seed(seed)
    batch = len(context_lens)
    max_blocks = max(-(-c // block_size) for c in context_lens) + 1  # a spare column, padded with block 0
    num_blocks = batch * max_blocks + 5
    cache = torch.randn(num_blocks, 1, 1, block_size, rank + rope, generator=g)
    q = torch.randn(batch, num_heads, rank + rope, generator=g)
    tables = torch.randperm(num_blocks, generator=g)[: batch * max_blocks].view(batch, max_blocks)
    for b, c in enumerate(context_lens):
        used = -(-c // block_size)
        tables[b, used:] = 0
        tail = used * block_size - c
        if tail:  # visible only if masking fails
            cache[tables[b, used - 1], :, :, block_size - tail :] = 1e3
    return q.to(dtype), cache.to(dtype), tables.to(torch.int32), torch.tensor(context_lens, dtype=torch.int32)


# (block_size, num_heads, kv_lora_rank, rope_dim, block_h): one head; heads below and at the
# 16-row minimum tile; 20 heads in one 32-row tile (12 rows masked) and in two 16-head
# programs (the second partly masked); DeepSeek's R:P ratio of 4:1 at 128 + 32.
SHAPES = [(16, 1, 32, 16, None), (8, 4, 32, 16, None), (16, 16, 16, 16, None), (32, 20, 64, 16, None),
          (16, 20, 32, 16, 16), (16, 2, 128, 32, None)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "bs{}-h{}-r{}-p{}-bh{}".format(*s))
def test_matches_twin(dtype, shape):
    block_size, num_heads, rank, rope, block_h = shape
    context_lens = [1, block_size, block_size + 1, 3 * 64 + 5]
    seed = 2 * SHAPES.index(shape) + (dtype == torch.float16)
    q, cache, tables, lens = make_case(seed, dtype, block_size=block_size, num_heads=num_heads, rank=rank,
                                       rope=rope, context_lens=context_lens)
    scale = 0.3
    ref = mla_decode_attention(q.float(), cache.float(), tables.long(), lens.long(), scale, rank)
    for num_splits in (1, 3):
        got = mla_decode(q, cache, tables, lens, scale, rank, num_splits=num_splits, block_h=block_h)
        assert got.dtype == dtype and got.shape == (len(context_lens), num_heads, rank)
        torch.testing.assert_close(got.float(), ref, atol=ATOL[dtype], rtol=0,
                                   msg=lambda m: f"splits={num_splits}: {m}")


def test_empty_context_gives_zeros_and_bad_inputs_raise():
    q, cache, tables, lens = make_case(7, torch.float32, block_size=16, num_heads=2, rank=32, rope=16,
                                       context_lens=[5, 20])
    lens[0] = 0
    out = mla_decode(q, cache, tables, lens, 0.5, 32, num_splits=2)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    with pytest.raises(ValueError, match="powers of two"):
        mla_decode(q, cache, tables, lens, 0.5, 24)
    with pytest.raises(ValueError, match="int32"):
        mla_decode(q, cache, tables.long(), lens, 0.5, 32)
    with pytest.raises(ValueError, match="cache_layer must be"):
        mla_decode(q, cache.expand(-1, 2, -1, -1, -1), tables, lens, 0.5, 32)  # two planes: not a latent cache
