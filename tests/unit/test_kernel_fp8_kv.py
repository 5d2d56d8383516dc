"""Triton kernels over an FP8 (float8_e4m3fn) paged KV cache with per-layer scales.

Runs through Triton's interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1),
so shapes are tiny. bfloat16 is left to tests/gpu (the interpreter computes through
numpy, which has no bfloat16).

The formulas (the twin's, engine/attention.py):
* store: ``stored = (x.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn)``,
  compared bit for bit (as bytes);
* read: ``x = stored.float() * scale``. The attention kernels fold ``k_scale`` into the
  softmax scale and ``v_scale`` into the output, so against a float32 reference on the
  dequantized cache only float32 rounding differs: the float32 tolerances of the
  existing kernel tests (1e-5). float16 queries: the kernels round the softmax weights
  to float16 for P @ V, as they do without fp8 (tolerance 1e-2 decode, 2e-3 prefill, as
  there).
"""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.attention import AttentionMetadata, paged_attention
from pdserve.engine.attention import store_kv as store_kv_twin
from pdserve.engine.kernels.decode_attention import paged_decode_attention
from pdserve.engine.kernels.kv_store import store_kv
from pdserve.engine.kernels.prefill_attention import PrefillTiles, paged_prefill_attention

FP8 = torch.float8_e4m3fn
K_SCALE, V_SCALE = 0.013, 0.0071  # != each other, != 1


def quantize(x: torch.Tensor, scale: float) -> torch.Tensor:
    return (x.float() / scale).clamp(-448.0, 448.0).to(FP8)


def dequantize(x8: torch.Tensor, scale: float) -> torch.Tensor:
    return x8.to(torch.float32) * scale


def random_fp8_cache(gen, num_blocks, num_kv_heads, block_size, head_dim, k_scale=K_SCALE, v_scale=V_SCALE):
    """An fp8 cache holding quantized ~N(0, 1) keys and values (a few keys saturate at 448)."""
    kv = torch.randn(num_blocks, 2, num_kv_heads, block_size, head_dim, generator=gen)
    kv8 = torch.empty(kv.shape, dtype=FP8)
    kv8.view(torch.uint8)[:, 0] = quantize(kv[:, 0] * 3, k_scale).view(torch.uint8)
    kv8.view(torch.uint8)[:, 1] = quantize(kv[:, 1], v_scale).view(torch.uint8)
    return kv8


def dequantize_cache(kv8, k_scale=K_SCALE, v_scale=V_SCALE):
    return torch.stack([dequantize(kv8[:, 0], k_scale), dequantize(kv8[:, 1], v_scale)], dim=1)


# ------------------------------------------------------------------------------- store


def expected_store(kv8, k, v, slots, k_scale, v_scale):
    """The twin's formula on a byte view; slots < 0 skipped."""
    out = kv8.view(torch.uint8).clone()
    block_size = kv8.shape[3]
    keep = slots >= 0
    blocks, offs = slots[keep] // block_size, slots[keep] % block_size
    out[blocks, 0, :, offs] = quantize(k[keep], k_scale).view(torch.uint8)
    out[blocks, 1, :, offs] = quantize(v[keep], v_scale).view(torch.uint8)
    return out


def special_values(scale: float) -> torch.Tensor:
    """Every finite e4m3fn value, every midpoint between neighbours (ties: round to even)
    and the float32 numbers either side of each, all times ``scale``; then saturation
    (beyond 448 * scale, inf), NaN, signed zeros, float32 subnormals."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8).float()
    codes = codes[codes.isfinite()].unique()
    base = torch.cat([codes, (codes[1:] + codes[:-1]) / 2])
    up, down = torch.full_like(base, float("inf")), torch.full_like(base, -float("inf"))
    exact = torch.cat([base, torch.nextafter(base, up), torch.nextafter(base, down)]) * scale
    extreme = torch.tensor([448.0 * 1.0001, 460.0, 464.0, 500.0, 1e6, float("inf"), float("nan"),
                            0.0, -0.0, 1e-45, 1e-39, 2.0**-10, 2.0**-10 * 3]) * scale
    return torch.cat([exact, extreme, -extreme])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_store_matches_formula_bit_exactly(dtype):
    # Hkv 3 and head_dim 24: padded tiles; a few padding slots (-1) in between.
    gen = torch.Generator().manual_seed(1)
    num_blocks, hkv, bs, d, tokens = 4, 3, 8, 24, 11
    kv8 = random_fp8_cache(gen, num_blocks, hkv, bs, d)
    k = (torch.randn(tokens, hkv, d, generator=gen) * 0.5).to(dtype)
    v = (torch.randn(tokens, hkv, d, generator=gen) * 0.5).to(dtype)
    k[0, 0, :4] = torch.tensor([10.0, -10.0, 448 * K_SCALE * 1.01, -448 * K_SCALE * 1.01])  # saturate
    v[1, 2, :2] = torch.tensor([1e3, -1e3])
    slots = torch.randperm(num_blocks * bs, generator=gen)[:tokens]
    slots[[2, 5, 9]] = -1
    expected = expected_store(kv8, k, v, slots, K_SCALE, V_SCALE)
    store_kv(kv8, k, v, slots.to(torch.int32), k_scale=K_SCALE, v_scale=V_SCALE)
    assert torch.equal(kv8.view(torch.uint8), expected)
    assert (kv8.float().abs() <= 448).all() and kv8.float().abs().max() == 448


@pytest.mark.parametrize("scale", [1.0, 0.37, 3.0, 1 / 3])
def test_store_rounds_like_torch_on_every_fp8_boundary(scale):
    values = special_values(scale)
    hkv, d = 2, 128
    tokens = -(-values.numel() // (hkv * d))
    k = torch.zeros(tokens * hkv * d)
    k[: values.numel()] = values
    k = k.view(tokens, hkv, d)
    v = -k.flip(0)
    kv8 = torch.zeros(tokens, 2, hkv, 1, d, dtype=FP8)  # block size 1: one block a token
    store_kv(kv8, k, v, torch.arange(tokens), k_scale=scale, v_scale=scale)
    assert torch.equal(kv8.view(torch.uint8), expected_store(kv8, k, v, torch.arange(tokens), scale, scale))


def test_store_matches_twin():
    gen = torch.Generator().manual_seed(2)
    kv8 = random_fp8_cache(gen, 3, 2, 16, 32)
    k, v = torch.randn(2, 7, 2, 32, generator=gen)
    slots = torch.tensor([3, -1, 17, 40, 41, -1, 0])
    expected = kv8.clone()
    store_kv_twin(expected, k[slots >= 0], v[slots >= 0], slots[slots >= 0], k_scale=K_SCALE, v_scale=V_SCALE)
    store_kv(kv8, k, v, slots, k_scale=K_SCALE, v_scale=V_SCALE)
    assert torch.equal(kv8.view(torch.uint8), expected.view(torch.uint8))


def test_store_without_fp8_ignores_scales():
    gen = torch.Generator().manual_seed(3)
    kv = torch.randn(3, 2, 2, 8, 16, generator=gen)
    k, v = torch.randn(2, 5, 2, 16, generator=gen)
    slots = torch.tensor([0, 9, -1, 23, 4])
    plain, scaled = kv.clone(), kv.clone()
    store_kv(plain, k, v, slots)
    store_kv(scaled, k, v, slots, k_scale=5.0, v_scale=0.25)
    assert torch.equal(plain, scaled)


def test_store_rejects_bad_fp8_inputs():
    kv8 = torch.zeros(2, 2, 1, 8, 16, dtype=FP8)
    k = torch.zeros(3, 1, 16)
    slots = torch.arange(3)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="k_scale"):
            store_kv(kv8, k, k, slots, k_scale=bad)
    with pytest.raises(ValueError, match="fp8"):
        store_kv(kv8, k.to(FP8), k.to(FP8), slots)
    with pytest.raises(ValueError, match="dtype"):
        store_kv(torch.zeros(2, 2, 1, 8, 16), k.half(), k.half(), slots)  # non-fp8 cache: dtypes must match


# ------------------------------------------------------------------------------ decode


def decode_case(seed, q_dtype, *, block_size, num_heads, num_kv_heads, head_dim, context_lens):
    gen = torch.Generator().manual_seed(seed)
    batch = len(context_lens)
    max_blocks = max(-(-c // block_size) for c in context_lens) + 1
    num_blocks = batch * max_blocks + 3
    kv8 = random_fp8_cache(gen, num_blocks, num_kv_heads, block_size, head_dim)
    q = torch.randn(batch, num_heads, head_dim, generator=gen).to(q_dtype)
    block_ids = torch.randperm(num_blocks, generator=gen)[: batch * max_blocks].view(batch, max_blocks)
    for b, c in enumerate(context_lens):
        used = -(-c // block_size)
        block_ids[b, used:] = 0
        tail = used * block_size - c
        if tail:  # poison past the context: the largest fp8 value, visible only if masking fails
            kv8.view(torch.uint8)[block_ids[b, used - 1], :, :, block_size - tail :] = 0x7E
    return q, kv8, block_ids.to(torch.int32), torch.tensor(context_lens, dtype=torch.int32)


def decode_reference(q, kv8, block_tables, context_lens, scale, k_scale=K_SCALE, v_scale=V_SCALE):
    """The twin in float32: it dequantizes the fp8 cache as ``stored.float() * scale``."""
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(q.shape[0], dtype=torch.long), num_decodes=q.shape[0],
        decode_block_tables=block_tables.long(), decode_context_lens=context_lens.long(),
        prefill_query_lens=[], prefill_context_lens=[], prefill_block_ids=[],
    )
    meta.build_decode_mask(kv8.shape[3])
    return paged_attention(q.float(), kv8, meta, scale, k_scale, v_scale)


DECODE_ATOL = {torch.float32: 1e-5, torch.float16: 1e-2}


@pytest.mark.parametrize("q_dtype", [torch.float32, torch.float16])
def test_decode_over_fp8_cache(q_dtype):
    # GQA (4 query heads a KV head); 1 token, a block, a block + 1, and a context spanning
    # all 3 splits; a zero-length padding row.
    block_size, head_dim = 16, 32
    q, kv8, bt, cl = decode_case(10, q_dtype, block_size=block_size, num_heads=8, num_kv_heads=2,
                                 head_dim=head_dim, context_lens=[1, 16, 17, 150])
    scale = head_dim**-0.5
    ref = decode_reference(q, kv8, bt, cl, scale)
    # The twin reads exactly the dequantized cache: the reference is float32 attention over it.
    torch.testing.assert_close(ref, decode_reference(q, dequantize_cache(kv8), bt, cl, scale), atol=0, rtol=0)
    for num_splits in (1, 3):
        out = paged_decode_attention(q, kv8, bt, cl, scale, num_splits=num_splits, k_scale=K_SCALE, v_scale=V_SCALE)
        assert out.dtype == q_dtype
        torch.testing.assert_close(out.float(), ref, atol=DECODE_ATOL[q_dtype], rtol=1e-5)
    # Zero-length rows (CUDA-graph padding) stay zeros.
    out = paged_decode_attention(q[:2], kv8, bt[:2], torch.tensor([0, 3], dtype=torch.int32), scale,
                                 num_splits=2, k_scale=K_SCALE, v_scale=V_SCALE)
    assert torch.equal(out[0], torch.zeros_like(out[0]))


def test_decode_scales_matter():
    # Same bytes, other scales: the output follows the scales (the kernel does not ignore them).
    q, kv8, bt, cl = decode_case(11, torch.float32, block_size=8, num_heads=2, num_kv_heads=1,
                                 head_dim=16, context_lens=[9, 20])
    out = paged_decode_attention(q, kv8, bt, cl, 0.25, num_splits=1, k_scale=0.05, v_scale=2.0)
    ref = decode_reference(q, kv8, bt, cl, 0.25, 0.05, 2.0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_decode_without_fp8_ignores_scales():
    gen = torch.Generator().manual_seed(12)
    kv = torch.randn(6, 2, 1, 8, 16, generator=gen)
    q = torch.randn(2, 2, 16, generator=gen)
    bt = torch.tensor([[1, 2, 3], [4, 5, 0]], dtype=torch.int32)
    cl = torch.tensor([20, 11], dtype=torch.int32)
    for num_splits in (1, 2):
        plain = paged_decode_attention(q, kv, bt, cl, 0.25, num_splits=num_splits)
        scaled = paged_decode_attention(q, kv, bt, cl, 0.25, num_splits=num_splits, k_scale=3.0, v_scale=0.5)
        assert torch.equal(plain, scaled)


def test_decode_rejects_bad_fp8_inputs():
    q, kv8, bt, cl = decode_case(13, torch.float32, block_size=8, num_heads=2, num_kv_heads=1,
                                 head_dim=16, context_lens=[3])
    with pytest.raises(ValueError, match="v_scale"):
        paged_decode_attention(q, kv8, bt, cl, 0.25, v_scale=float("nan"))
    with pytest.raises(ValueError, match="dtype"):
        paged_decode_attention(q.double(), kv8, bt, cl, 0.25)


# ----------------------------------------------------------------------------- prefill

PREFILL_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3)}


def prefill_case(seqs, block_size, num_heads, num_kv_heads, head_dim, q_dtype, seed):
    """seqs: [(prefix_len, q_len)]; slots outside every context hold the largest fp8 value."""
    gen = torch.Generator().manual_seed(seed)
    context_lens = [p + q for p, q in seqs]
    blocks_per_seq = [-(-c // block_size) for c in context_lens]
    num_blocks = sum(blocks_per_seq) + 2
    kv8 = random_fp8_cache(gen, num_blocks, num_kv_heads, block_size, head_dim)
    perm = torch.randperm(num_blocks, generator=gen)
    owned = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    block_tables = torch.full((len(seqs), max(blocks_per_seq) + 1), int(perm[-1]), dtype=torch.int32)
    block_ids, used = [], 0
    for p, (ctx, nb) in enumerate(zip(context_lens, blocks_per_seq)):
        ids = perm[used : used + nb]
        used += nb
        block_tables[p, :nb] = ids.to(torch.int32)
        block_ids.append(ids)
        owned.view(-1)[(ids[:, None] * block_size + torch.arange(block_size)).flatten()[:ctx]] = True
    kv8.view(torch.uint8).permute(0, 3, 1, 2, 4)[~owned] = 0x7E
    q_lens = [q for _, q in seqs]
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen).to(q_dtype)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(len(q), dtype=torch.long), num_decodes=0,
        decode_block_tables=torch.zeros(0, 1, dtype=torch.long), decode_context_lens=torch.zeros(0, dtype=torch.long),
        prefill_query_lens=q_lens, prefill_context_lens=context_lens, prefill_block_ids=block_ids,
    )
    return q, kv8, cu, torch.tensor(context_lens, dtype=torch.int32), block_tables, meta


@pytest.mark.parametrize("q_dtype", [torch.float32, torch.float16])
def test_prefill_over_fp8_cache(q_dtype):
    # A plain prefill and a chunk whose prefix ends mid-block; GQA 2; 16-wide tiles so
    # both the unmasked and the diagonal key-tile paths run.
    seqs, block_size, head_dim = [(0, 21), (13, 9)], 8, 32
    q, kv8, cu, ctx, tables, meta = prefill_case(seqs, block_size, 4, 2, head_dim, q_dtype, seed=20)
    scale = head_dim**-0.5
    out = paged_prefill_attention(q, kv8, cu, ctx, tables, scale, tiles=PrefillTiles(16, 16),
                                  k_scale=K_SCALE, v_scale=V_SCALE)
    expected = paged_attention(q.float(), kv8, meta, scale, K_SCALE, V_SCALE)  # the twin, in float32
    assert out.dtype == q_dtype
    torch.testing.assert_close(out.float(), expected, **PREFILL_TOL[q_dtype])


def test_prefill_without_fp8_ignores_scales():
    gen = torch.Generator().manual_seed(21)
    kv = torch.randn(5, 2, 1, 8, 16, generator=gen)
    q = torch.randn(7, 2, 16, generator=gen)
    cu = torch.tensor([0, 4, 7], dtype=torch.int32)
    ctx = torch.tensor([4, 12], dtype=torch.int32)
    tables = torch.tensor([[3, 0], [1, 4]], dtype=torch.int32)
    tiles = PrefillTiles(16, 16)
    plain = paged_prefill_attention(q, kv, cu, ctx, tables, 0.25, tiles=tiles)
    scaled = paged_prefill_attention(q, kv, cu, ctx, tables, 0.25, tiles=tiles, k_scale=3.0, v_scale=0.5)
    assert torch.equal(plain, scaled)


def test_prefill_rejects_bad_fp8_inputs():
    q, kv8, cu, ctx, tables, _ = prefill_case([(0, 3)], 8, 2, 1, 16, torch.float32, seed=22)
    with pytest.raises(ValueError, match="k_scale"):
        paged_prefill_attention(q, kv8, cu, ctx, tables, 0.25, k_scale=0.0)
    with pytest.raises(ValueError, match="q dtype"):
        paged_prefill_attention(q.double(), kv8, cu, ctx, tables, 0.25)


# ----------------------------------------------------------------- compiled for Hopper

# Compiles the fp8 variants for an H100 (sm_90) without a GPU, through ptxas: catches what
# the interpreter lets through (fp8 conversions, bitcasts, dot operand types). A
# subprocess, because this process runs Triton interpreted. Half-precision queries only
# (plus a float32 store): float32 attention kernels take 10-40 s each to compile cold.
_COMPILE_FP8_FOR_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pdserve.engine.kernels import decode_attention as da, kv_store as ks, prefill_attention as pa

def compile_kernel(fn, types, consts, **options):
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32), options=options)
    assert k.asm["cubin"]

for dt in ("bf16", "fp32"):
    compile_kernel(ks._store_kv_kernel, dict(kv_ptr="*fp8e4nv", k_ptr="*" + dt, v_ptr="*" + dt, slot_ptr="*i64",
                   k_scale="fp32", v_scale="fp32"),
                   dict(NUM_KV_HEADS=8, HEADS_PAD=8, HEAD_DIM=128, DIM_PAD=128, BLOCK_SIZE=16), num_warps=4)
for dt, is_split in (("bf16", False), ("bf16", True), ("fp16", True)):
    compile_kernel(da._decode_split_kernel, dict(
        q_ptr="*" + dt, kv_ptr="*fp8e4nv", out_ptr="*" + dt, block_tables_ptr="*i32", context_lens_ptr="*i32",
        part_m_ptr="*fp32", part_l_ptr="*fp32", part_o_ptr="*fp32", qk_scale="fp32", v_scale="fp32"), dict(
        GROUP=4, GROUP_PAD=16, HEAD_DIM=128, BLOCK_SIZE=16, TILE=64, IS_SPLIT=is_split,
        DOT_PRECISION="ieee" if dt == "fp32" else "tf32"), num_warps=4, num_stages=2)
compile_kernel(pa._prefill_kernel, dict(
    Q="*bf16", KV="*fp8e4nv", Out="*bf16", CuQueryLens="*i32", ContextLens="*i32", BlockTables="*i32",
    scale_log2="fp32", v_scale="fp32"), dict(
    GROUP=4, BLOCK_SIZE=16, HEAD_DIM=128, BLOCK_M=128, BLOCK_N=64, PRECISION="tf32"), num_warps=8, num_stages=3)
print("compiled")
"""


@pytest.mark.slow
def test_fp8_kernels_compile_for_hopper():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_FP8_FOR_SM90], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
