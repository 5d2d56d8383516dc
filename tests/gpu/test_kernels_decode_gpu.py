"""Decode attention and KV store kernels on a GPU at real shapes (Llama-3-8B: 32 query
heads, 8 KV heads, head_dim 128, 16-token blocks), against their pure-torch twins in
engine/attention.py. Skipped without CUDA.

Tolerances: the reference runs in float32 on the upcast inputs. The kernel rounds the
softmax weights to the input dtype for P @ V and rounds the output; with values ~N(0, 1)
(|v| < ~5) that is at most ~2^-9 * 5 ~ 1e-2 in bfloat16 (2^-11 in float16, plus weights
below 2^-24 flushing to zero over up to 32k keys), so atol 2e-2 for both. The KV store
moves bytes: compared exactly.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.attention import AttentionMetadata, paged_attention
from pdserve.engine.attention import store_kv as store_kv_ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
SCALE = HEAD_DIM**-0.5
ATOL = 2e-2


def make_case(seed, dtype, context_lens, max_blocks):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    batch = len(context_lens)
    num_blocks = batch * max_blocks + 3
    kv = torch.randn(num_blocks, 2, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM, generator=gen, device="cuda", dtype=dtype)
    q = torch.randn(batch, NUM_HEADS, HEAD_DIM, generator=gen, device="cuda", dtype=dtype)
    perm = torch.randperm(num_blocks, generator=gen, device="cuda")[: batch * max_blocks]
    block_tables = perm.view(batch, max_blocks).to(torch.int32)
    context_lens = torch.tensor(context_lens, dtype=torch.int32, device="cuda")
    return q, kv, block_tables, context_lens


def reference(q, kv, block_tables, context_lens):
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(q.shape[0], dtype=torch.long, device="cuda"), num_decodes=q.shape[0],
        decode_block_tables=block_tables.long(), decode_context_lens=context_lens.long(),
        prefill_query_lens=[], prefill_context_lens=[], prefill_block_ids=[],
    )
    meta.build_decode_mask(BLOCK_SIZE)
    return paged_attention(q.float(), kv.float(), meta, SCALE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_matches_reference_up_to_32k(dtype):
    from pdserve.engine.kernels.decode_attention import paged_decode_attention

    # 1 token, a block, a block + 1, and long contexts up to 32k in one ragged batch.
    context_lens = [1, 16, 17, 1000, 8191, 32768]
    q, kv, bt, cl = make_case(0, dtype, context_lens, max_blocks=32768 // BLOCK_SIZE)
    ref = reference(q, kv, bt, cl)
    for num_splits in (None, 1, 64):
        out = paged_decode_attention(q, kv, bt, cl, SCALE, num_splits=num_splits)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("batch", [1, 32, 128])
def test_decode_batches_at_2k(batch):
    from pdserve.engine.kernels.decode_attention import paged_decode_attention

    gen = torch.Generator().manual_seed(batch)
    context_lens = torch.randint(1, 2049, (batch,), generator=gen).tolist()
    q, kv, bt, cl = make_case(batch, torch.bfloat16, context_lens, max_blocks=2048 // BLOCK_SIZE)
    out = paged_decode_attention(q, kv, bt, cl, SCALE)
    torch.testing.assert_close(out.float(), reference(q, kv, bt, cl), atol=ATOL, rtol=0)


def test_decode_in_a_cuda_graph():
    from pdserve.engine.kernels.decode_attention import (
        choose_num_splits, paged_decode_attention, workspace_numel)

    batch, max_blocks = 8, 256
    q, kv, bt, cl = make_case(1, torch.bfloat16, [1] * batch, max_blocks)
    num_splits = choose_num_splits(batch, NUM_KV_HEADS, max_blocks, BLOCK_SIZE, q.device)
    out = torch.empty_like(q)
    workspace = torch.empty(workspace_numel(batch, NUM_HEADS, HEAD_DIM, num_splits), device="cuda")

    def step():
        paged_decode_attention(q, kv, bt, cl, SCALE, out=out, workspace=workspace)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    # New contents in the same buffers: the replay must follow them.
    gen = torch.Generator(device="cuda").manual_seed(2)
    for context_lens in ([5, 4096, 16, 17, 1, 3000, 0, 2048], [4096] * batch):
        q.copy_(torch.randn(q.shape, generator=gen, device="cuda"))
        cl.copy_(torch.tensor(context_lens, dtype=torch.int32))
        bt.copy_(bt[torch.randperm(batch, device="cuda")])
        graph.replay()
        torch.cuda.synchronize()
        real = cl > 0
        ref = reference(q[real], kv, bt[real], cl[real])
        torch.testing.assert_close(out[real].float(), ref, atol=ATOL, rtol=0)
        assert torch.equal(out[~real], torch.zeros_like(out[~real]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_store_kv_matches_reference(dtype):
    from pdserve.engine.kernels.kv_store import store_kv

    gen = torch.Generator(device="cuda").manual_seed(3)
    num_blocks, num_tokens = 4096, 8192
    kv = torch.randn(num_blocks, 2, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM, generator=gen, device="cuda", dtype=dtype)
    k = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, generator=gen, device="cuda", dtype=dtype)
    v = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, generator=gen, device="cuda", dtype=dtype)
    slots = torch.randperm(num_blocks * BLOCK_SIZE, generator=gen, device="cuda")[:num_tokens]
    is_padding = torch.rand(num_tokens, generator=gen, device="cuda") < 0.1
    expected = kv.clone()
    store_kv_ref(expected, k[~is_padding], v[~is_padding], slots[~is_padding])
    store_kv(kv, k, v, torch.where(is_padding, -1, slots).to(torch.int32))
    assert torch.equal(kv, expected)
