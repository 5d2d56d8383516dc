"""Triton prefill attention against its pure-torch twin (attention.paged_attention) on CPU.

Runs through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without
CUDA), so shapes are small. bfloat16 is covered only in tests/gpu: the interpreter
computes through numpy, which has no bfloat16, and returns garbage for it.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.attention import AttentionMetadata, paged_attention
from pdserve.engine.kernels.prefill_attention import PrefillTiles, paged_prefill_attention

HEAD_DIM = 32
NUM_KV_HEADS = 2
SMALL_TILES = PrefillTiles(block_m=16, block_n=16)  # several query and key tiles per request


def _tolerance(dtype: torch.dtype) -> dict:
    if dtype == torch.float32:
        # Same float32 math as the twin; only summation order and exp2 vs exp differ (~1e-6).
        return dict(atol=1e-5, rtol=1e-5)
    # The kernel rounds softmax weights to float16 before P @ V (2^-11 relative each) and
    # the output once (half an ulp, 2^-12 relative); outputs are O(1), so 2e-3 is a few ulps.
    return dict(atol=2e-3, rtol=2e-3)


def _build_case(seqs, block_size, num_heads, dtype, seed):
    """seqs: [(prefix_len, q_len)]. Returns kernel inputs and the twin's metadata.

    Block ids are a shuffled subset of the cache; every slot no request owns (free blocks,
    the tail of each last block) and every padding entry of the block tables is NaN, so
    a kernel that reads a key outside a request's context poisons its output.
    """
    gen = torch.Generator().manual_seed(seed)
    context_lens = [p + q for p, q in seqs]
    blocks_per_seq = [-(-c // block_size) for c in context_lens]
    num_blocks = sum(blocks_per_seq) + 3
    kv = torch.randn(num_blocks, 2, NUM_KV_HEADS, block_size, HEAD_DIM, generator=gen).to(dtype)
    perm = torch.randperm(num_blocks, generator=gen)
    poison = int(perm[-1])
    owned = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    max_blocks = max(blocks_per_seq) + 2
    block_tables = torch.full((len(seqs), max_blocks), poison, dtype=torch.int32)
    block_ids, used = [], 0
    for p, (ctx, nb) in enumerate(zip(context_lens, blocks_per_seq)):
        ids = perm[used : used + nb]
        used += nb
        block_tables[p, :nb] = ids.to(torch.int32)
        block_ids.append(ids)
        owned.view(-1)[(ids[:, None] * block_size + torch.arange(block_size)).flatten()[:ctx]] = True
    kv.permute(0, 3, 1, 2, 4)[~owned] = float("nan")
    q_lens = [q for _, q in seqs]
    q = torch.randn(sum(q_lens), num_heads, HEAD_DIM, generator=gen).to(dtype)
    cu_query_lens = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(len(q), dtype=torch.long), num_decodes=0,
        decode_block_tables=torch.zeros(0, 1, dtype=torch.long), decode_context_lens=torch.zeros(0, dtype=torch.long),
        prefill_query_lens=q_lens, prefill_context_lens=context_lens, prefill_block_ids=block_ids,
    )
    return q, kv, cu_query_lens, torch.tensor(context_lens, dtype=torch.int32), block_tables, meta


def _check(seqs, block_size, num_heads, dtype, tiles=None, seed=0):
    q, kv, cu, ctx, tables, meta = _build_case(seqs, block_size, num_heads, dtype, seed)
    scale = HEAD_DIM**-0.5
    out = paged_prefill_attention(q, kv, cu, ctx, tables, scale, tiles=tiles)
    # The twin runs on float32 copies: the exact answer for these inputs, not another rounding.
    expected = paged_attention(q.float(), kv.float(), meta, scale)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), expected, **_tolerance(dtype))


def _ragged(block_size):
    return [
        (0, 29),  # plain prefill
        (2 * block_size, 11),  # prefix-cache hit: the prefix is whole blocks
        (block_size + 5, 18),  # chunked prefill: the prefix ends mid-block
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("gqa", [1, 2, 4])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_matches_twin_on_ragged_requests(dtype, gqa, block_size):
    _check(_ragged(block_size), block_size, NUM_KV_HEADS * gqa, dtype, seed=gqa * 100 + block_size)


@pytest.mark.parametrize("gqa", [1, 2, 4])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_small_tiles_cross_the_diagonal(gqa, block_size):
    # Tiles of 16 split each request into several query tiles and its keys into unmasked,
    # diagonal and skipped tiles; tile logic is dtype-blind, so float16 alone is enough.
    _check(_ragged(block_size), block_size, NUM_KV_HEADS * gqa, torch.float16, SMALL_TILES, seed=gqa + block_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_single_query_requests(dtype):
    # A one-token prompt, a full prefix-cache hit recomputing the last token, a one-token chunk.
    _check([(0, 1), (32, 1), (21, 1)], 16, 4, dtype, SMALL_TILES, seed=7)


def test_long_prefix_crosses_many_key_tiles():
    # Prefix much longer than the new tokens: most key tiles take the unmasked path.
    _check([(150, 3), (97, 40)], 8, 4, torch.float16, SMALL_TILES, seed=11)


def test_strided_q_writes_into_out():
    q, kv, cu, ctx, tables, meta = _build_case([(0, 9), (16, 7)], 16, 4, torch.float32, seed=3)
    # q as the model produces it: a view into a wider fused qkv projection.
    wide = torch.randn(q.shape[0], q.shape[1] + 3, HEAD_DIM)
    wide[:, : q.shape[1]] = q
    q_view = wide[:, : q.shape[1]]
    out = torch.full_like(q, 7.0)
    result = paged_prefill_attention(q_view, kv, cu, ctx, tables.to(torch.int64), 0.2, out=out, max_query_len=9)
    assert result is out
    torch.testing.assert_close(out, paged_attention(q, kv, meta, 0.2), atol=1e-5, rtol=1e-5)


def _good_inputs():
    q, kv, cu, ctx, tables, _ = _build_case([(0, 5), (8, 3)], 8, 4, torch.float32, seed=5)
    return dict(q=q, kv_layer=kv, cu_query_lens=cu, context_lens=ctx, block_tables=tables, scale=0.1)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(q=a["q"][0]), "q must be"),
        (lambda a: a.update(q=a["q"].to(torch.int32)), "q dtype"),
        (lambda a: a.update(q=a["q"][..., :24], kv_layer=a["kv_layer"][..., :24]), "head_dim"),
        (lambda a: a.update(kv_layer=a["kv_layer"].half()), "kv_layer dtype"),
        (lambda a: a.update(kv_layer=a["kv_layer"][:, :, :, :6]), "block_size"),
        (lambda a: a.update(q=a["q"][:, :3]), "multiple of num_kv_heads"),
        (lambda a: a.update(kv_layer=a["kv_layer"][..., :16]), "kv_layer must be"),
        (lambda a: a.update(context_lens=a["context_lens"][:1]), "cu_query_lens must be"),
        (lambda a: a.update(block_tables=a["block_tables"][:1]), "block_tables must be"),
        (lambda a: a.update(context_lens=a["context_lens"].float()), "context_lens must be int32"),
        (lambda a: a.update(q=a["q"].transpose(1, 2).contiguous().transpose(1, 2)), "contiguous last dim"),
        (lambda a: a.update(out=torch.empty(3, 4, 32)), "out must match"),
    ],
)
def test_bad_inputs_raise(change, message):
    args = _good_inputs()
    change(args)
    with pytest.raises(ValueError, match=message):
        paged_prefill_attention(**args)


def test_bad_tiles_raise():
    with pytest.raises(ValueError, match="block_m"):
        PrefillTiles(block_m=24, block_n=16)
    with pytest.raises(ValueError, match="num_warps"):
        PrefillTiles(block_m=16, block_n=16, num_warps=3)
