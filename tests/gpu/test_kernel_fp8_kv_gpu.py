"""The Triton KV store, decode and prefill kernels over an FP8 (float8_e4m3fn) cache on a
GPU at real shapes (Llama-3-8B: 32 query heads, 8 KV heads, head_dim 128, 16-token
blocks). Skipped without CUDA; the fp8 kernels need compute capability >= 8.9.

Store: bit-exact against ``(x.float() / scale).clamp(-448, 448).to(float8_e4m3fn)``
computed on the CPU. (Not against that formula on CUDA: torch computes ``cuda_tensor /
python_float`` as a multiply by the float32 reciprocal, which can differ by a float32
ulp and so, near an fp8 rounding midpoint, by one fp8 step; the kernel divides.)
Attention: against the twin in float32 over the dequantized cache (``stored.float() *
scale``), with the bf16/fp16 tolerances of the non-fp8 GPU tests (the kernels round the
softmax weights to q's dtype for P @ V and the output once).
"""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.attention import AttentionMetadata, paged_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
                       reason="fp8 (e4m3fn) kernels need compute capability >= 8.9"),
]

FP8 = torch.float8_e4m3fn
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
SCALE = HEAD_DIM**-0.5
K_SCALE, V_SCALE = 0.011, 0.0057
DTYPES = [torch.bfloat16, torch.float16]


def quantize_on_cpu(x: torch.Tensor, scale: float) -> torch.Tensor:
    return (x.cpu().float() / scale).clamp(-448.0, 448.0).to(FP8)


def random_fp8_cache(gen, num_blocks):
    kv = torch.randn(num_blocks, 2, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM, generator=gen, device="cuda")
    kv8 = torch.empty(kv.shape, dtype=FP8, device="cuda")
    kv8.view(torch.uint8)[:, 0] = (kv[:, 0] * 3 / K_SCALE).clamp(-448, 448).to(FP8).view(torch.uint8)
    kv8.view(torch.uint8)[:, 1] = (kv[:, 1] / V_SCALE).clamp(-448, 448).to(FP8).view(torch.uint8)
    return kv8


def dequantize_cache(kv8):
    return torch.stack([kv8[:, 0].float() * K_SCALE, kv8[:, 1].float() * V_SCALE], dim=1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_store_kv_fp8_matches_formula(dtype):
    from pdserve.engine.kernels.kv_store import store_kv

    gen = torch.Generator(device="cuda").manual_seed(3)
    num_blocks, num_tokens = 2048, 4096
    kv8 = random_fp8_cache(gen, num_blocks)
    k = (torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, generator=gen, device="cuda") * 2).to(dtype)
    v = (torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, generator=gen, device="cuda") * 2).to(dtype)
    k[:8, 0, 0] = 1e4  # saturates
    slots = torch.randperm(num_blocks * BLOCK_SIZE, generator=gen, device="cuda")[:num_tokens]
    is_padding = torch.rand(num_tokens, generator=gen, device="cuda") < 0.1
    expected = kv8.view(torch.uint8).cpu()
    keep = (~is_padding).cpu()
    s = slots.cpu()[keep]
    expected[s // BLOCK_SIZE, 0, :, s % BLOCK_SIZE] = quantize_on_cpu(k.cpu()[keep], K_SCALE).view(torch.uint8)
    expected[s // BLOCK_SIZE, 1, :, s % BLOCK_SIZE] = quantize_on_cpu(v.cpu()[keep], V_SCALE).view(torch.uint8)
    store_kv(kv8, k, v, torch.where(is_padding, -1, slots), k_scale=K_SCALE, v_scale=V_SCALE)
    assert torch.equal(kv8.view(torch.uint8).cpu(), expected)


@pytest.mark.parametrize("scale", [1.0, 0.37, 1 / 3])
def test_store_kv_fp8_rounding_boundaries(scale):
    # Every e4m3fn value, every midpoint (ties to even) and their float32 neighbours, then
    # saturation, inf, NaN, zeros, subnormals: the kernel's integer rounding on hardware.
    from pdserve.engine.kernels.kv_store import store_kv

    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8).float()
    codes = codes[codes.isfinite()].unique()
    base = torch.cat([codes, (codes[1:] + codes[:-1]) / 2])
    values = torch.cat([base, torch.nextafter(base, base + 1), torch.nextafter(base, base - 1)])
    extreme = torch.tensor([448.0 * 1.0001, 464.0, 1e6, float("inf"), float("nan"), 0.0, -0.0, 1e-45, 2.0**-10])
    values = torch.cat([values, extreme, -extreme]) * scale
    n = -(-values.numel() // HEAD_DIM)
    k = torch.zeros(n * HEAD_DIM)
    k[: values.numel()] = values
    k = k.view(n, 1, HEAD_DIM)
    kv8 = torch.zeros(n, 2, 1, 1, HEAD_DIM, dtype=FP8, device="cuda")
    store_kv(kv8, k.cuda(), k.cuda(), torch.arange(n, device="cuda"), k_scale=scale, v_scale=scale)
    expected = quantize_on_cpu(k, scale).view(torch.uint8)
    assert torch.equal(kv8.view(torch.uint8)[:, 0, :, 0].cpu(), expected)
    assert torch.equal(kv8.view(torch.uint8)[:, 1, :, 0].cpu(), expected)


def decode_case(seed, dtype, context_lens, max_blocks):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    batch = len(context_lens)
    num_blocks = batch * max_blocks + 3
    kv8 = random_fp8_cache(gen, num_blocks)
    q = torch.randn(batch, NUM_HEADS, HEAD_DIM, generator=gen, device="cuda", dtype=dtype)
    perm = torch.randperm(num_blocks, generator=gen, device="cuda")[: batch * max_blocks]
    return q, kv8, perm.view(batch, max_blocks).to(torch.int32), torch.tensor(context_lens, dtype=torch.int32, device="cuda")


def decode_reference(q, kv8, block_tables, context_lens):
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(q.shape[0], dtype=torch.long, device="cuda"), num_decodes=q.shape[0],
        decode_block_tables=block_tables.long(), decode_context_lens=context_lens.long(),
        prefill_query_lens=[], prefill_context_lens=[], prefill_block_ids=[],
    )
    meta.build_decode_mask(BLOCK_SIZE)
    return paged_attention(q.float(), dequantize_cache(kv8), meta, SCALE)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_fp8_up_to_32k(dtype):
    from pdserve.engine.kernels.decode_attention import paged_decode_attention

    q, kv8, bt, cl = decode_case(0, dtype, [1, 16, 17, 1000, 8191, 32768], max_blocks=32768 // BLOCK_SIZE)
    ref = decode_reference(q, kv8, bt, cl)
    for num_splits in (None, 1, 64):
        out = paged_decode_attention(q, kv8, bt, cl, SCALE, num_splits=num_splits, k_scale=K_SCALE, v_scale=V_SCALE)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=0)


def test_decode_fp8_in_a_cuda_graph():
    from pdserve.engine.kernels.decode_attention import (
        choose_num_splits, paged_decode_attention, workspace_numel)

    batch, max_blocks = 8, 256
    q, kv8, bt, cl = decode_case(1, torch.bfloat16, [5, 4096, 16, 17, 1, 3000, 0, 2048], max_blocks)
    num_splits = choose_num_splits(batch, NUM_KV_HEADS, max_blocks, BLOCK_SIZE, q.device)
    out = torch.empty_like(q)
    workspace = torch.empty(workspace_numel(batch, NUM_HEADS, HEAD_DIM, num_splits), device="cuda")

    def step():
        paged_decode_attention(q, kv8, bt, cl, SCALE, out=out, workspace=workspace, k_scale=K_SCALE, v_scale=V_SCALE)

    step()  # compile outside the capture
    eager = out.clone()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    real = cl > 0
    torch.testing.assert_close(out[real].float(), decode_reference(q[real], kv8, bt[real], cl[real]), atol=2e-2, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_fp8_matches_twin(dtype):
    from pdserve.engine.kernels.prefill_attention import paged_prefill_attention

    seqs = [(0, 1500), (1024, 1536), (777, 1060)]  # plain, prefix-cache hit, chunk mid-block
    gen = torch.Generator(device="cuda").manual_seed(0)
    context_lens = [p + q for p, q in seqs]
    blocks_per_seq = [-(-c // BLOCK_SIZE) for c in context_lens]
    num_blocks = sum(blocks_per_seq) + 8
    kv8 = random_fp8_cache(gen, num_blocks)
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
    out = paged_prefill_attention(q, kv8, cu, ctx, tables, SCALE, max_query_len=max(q_lens),
                                  k_scale=K_SCALE, v_scale=V_SCALE)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(len(q), dtype=torch.long, device="cuda"), num_decodes=0,
        decode_block_tables=torch.zeros(0, 1, dtype=torch.long, device="cuda"),
        decode_context_lens=torch.zeros(0, dtype=torch.long, device="cuda"),
        prefill_query_lens=q_lens, prefill_context_lens=context_lens, prefill_block_ids=block_ids,
    )
    expected = paged_attention(q.float(), dequantize_cache(kv8), meta, SCALE)
    tol = dict(atol=1.5e-2, rtol=1.5e-2) if dtype == torch.bfloat16 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(out.float(), expected, **tol)
