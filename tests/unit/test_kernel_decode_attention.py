"""Triton paged decode attention against its pure-torch twin (engine.attention.paged_attention).

Runs through Triton's interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1),
so shapes are small. bfloat16 is left to tests/gpu: the interpreter computes through
numpy, which has no bfloat16, and returns garbage for bf16 CPU tensors.

Tolerances: the reference runs in float32 on the same (upcast) inputs, so it is exact
up to float32 rounding. The output is a convex combination of values ~N(0, 1)
(|v| < ~5). float32 inputs: only summation order differs (online softmax over tiles
and splits vs one softmax; a few hundred terms, each rounding 2^-24) -> atol 1e-5
(measured <= 6e-7). float16 inputs: the kernel casts the softmax weights to float16
for the P @ V product (relative error 2^-11 on each weight, so at most ~2^-11 * max|v|
~ 3e-3 on the sum) and rounds the output to float16 (2^-11 relative, < 3e-3 at
|o| < 5); q @ k is exact in float32 -> atol 1e-2 (measured <= 5e-4).
"""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.attention import AttentionMetadata, paged_attention
from pdserve.engine.kernels.decode_attention import (
    choose_num_splits,
    paged_decode_attention,
    workspace_numel,
)

ATOL = {torch.float32: 1e-5, torch.float16: 1e-2}


def make_case(seed, dtype, *, block_size, num_heads, num_kv_heads, head_dim, context_lens, max_blocks=None):
    """Random q and cache; each sequence gets shuffled, non-contiguous block ids."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(context_lens)
    needed = max(-(-c // block_size) for c in context_lens)
    max_blocks = max_blocks or needed + 1  # one spare column: padding entries must be masked
    num_blocks = batch * max_blocks + 7
    kv = torch.randn(num_blocks, 2, num_kv_heads, block_size, head_dim, generator=gen)
    q = torch.randn(batch, num_heads, head_dim, generator=gen)
    block_ids = torch.randperm(num_blocks, generator=gen)[: batch * max_blocks].view(batch, max_blocks)
    for b, c in enumerate(context_lens):
        used = -(-c // block_size)
        block_ids[b, used:] = 0  # the engine's padding convention: unused entries point at block 0
        # Poison the slots past the context in the last used block: visible only if masking fails.
        tail = used * block_size - c
        if tail:
            kv[block_ids[b, used - 1], :, :, block_size - tail :] = 1e3
    return (q.to(dtype), kv.to(dtype), block_ids.to(torch.int32), torch.tensor(context_lens, dtype=torch.int32))


def reference(q, kv, block_tables, context_lens, scale):
    """The twin, in float32 on the upcast inputs."""
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(q.shape[0], dtype=torch.long), num_decodes=q.shape[0],
        decode_block_tables=block_tables.long(), decode_context_lens=context_lens.long(),
        prefill_query_lens=[], prefill_context_lens=[], prefill_block_ids=[],
    )
    meta.build_decode_mask(kv.shape[3])
    return paged_attention(q.float(), kv.float(), meta, scale)


# (block_size, num_heads, num_kv_heads, head_dim): MHA, GQA 2, 4 and 8, MQA (one KV head);
# block sizes 8..128 and head_dims 16..256 (tiles of 16 to 64 tokens, smaller or larger than a block).
SHAPES = [(8, 2, 2, 32), (16, 4, 2, 32), (32, 8, 2, 16), (16, 8, 1, 64), (64, 2, 1, 32), (128, 4, 2, 128), (8, 2, 1, 256)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "bs{}-h{}-kv{}-d{}".format(*s))
def test_matches_reference(dtype, shape):
    block_size, num_heads, num_kv_heads, head_dim = shape
    # 1 token, exactly a block, a block + 1, and a long one that puts tokens in all 3
    # splits (partitions are whole tiles of up to 64 tokens) and spans several blocks.
    context_lens = [1, block_size, block_size + 1, max(2 * block_size, 3 * 64) + 5]
    seed = 2 * SHAPES.index(shape) + (dtype == torch.float16)
    q, kv, bt, cl = make_case(seed, dtype, block_size=block_size, num_heads=num_heads,
                              num_kv_heads=num_kv_heads, head_dim=head_dim, context_lens=context_lens)
    scale = head_dim**-0.5
    ref = reference(q, kv, bt, cl, scale)
    for num_splits in (1, 3):
        out = paged_decode_attention(q, kv, bt, cl, scale, num_splits=num_splits)
        assert out.dtype == dtype and out.shape == q.shape
        torch.testing.assert_close(out.float(), ref, atol=ATOL[dtype], rtol=0)


def test_split_counts_agree():
    # float32 so the only difference between split counts is summation order (atol as above).
    q, kv, bt, cl = make_case(11, torch.float32, block_size=16, num_heads=4, num_kv_heads=2,
                              head_dim=32, context_lens=[5, 70, 200])
    results = [paged_decode_attention(q, kv, bt, cl, 0.3, num_splits=s) for s in (1, 2, 4)]
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(results[0], reference(q, kv, bt, cl, 0.3), atol=ATOL[torch.float32], rtol=0)


def test_more_splits_than_tiles_in_a_short_sequence():
    # 24 splits over contexts of 1 and 17 tokens: most partitions are empty and must merge
    # with weight 0 (a NaN or a wrong max would show up here).
    q, kv, bt, cl = make_case(12, torch.float32, block_size=8, num_heads=2, num_kv_heads=2,
                              head_dim=16, context_lens=[1, 17], max_blocks=40)
    out = paged_decode_attention(q, kv, bt, cl, 0.25, num_splits=24)
    torch.testing.assert_close(out, reference(q, kv, bt, cl, 0.25), atol=ATOL[torch.float32], rtol=0)


def test_automatic_splits_and_preallocated_buffers():
    q, kv, bt, cl = make_case(13, torch.float16, block_size=16, num_heads=4, num_kv_heads=2,
                              head_dim=32, context_lens=[3, 300], max_blocks=20)
    num_splits = choose_num_splits(2, 2, bt.shape[1], 16, q.device)
    assert num_splits > 1  # 320-token table at batch 2: short of programs, so it splits
    out = torch.empty_like(q)
    workspace = torch.empty(workspace_numel(2, 4, 32, num_splits) + 5)
    got = paged_decode_attention(q, kv, bt, cl, 0.2, out=out, workspace=workspace)
    assert got is out
    torch.testing.assert_close(out.float(), reference(q, kv, bt, cl, 0.2), atol=ATOL[torch.float16], rtol=0)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_zero_context_rows_are_zero(num_splits):
    # A padded CUDA-graph batch carries rows with context 0: they must come out finite
    # (zeros), and must not disturb the real rows.
    q, kv, bt, cl = make_case(14, torch.float32, block_size=8, num_heads=2, num_kv_heads=1,
                              head_dim=16, context_lens=[9, 30])
    cl_padded = torch.tensor([9, 0, 30], dtype=torch.int32)
    q3 = torch.cat([q[:1], torch.randn(1, 2, 16, generator=torch.Generator().manual_seed(1)), q[1:]])
    bt3 = torch.cat([bt[:1], torch.zeros_like(bt[:1]), bt[1:]])
    out = paged_decode_attention(q3, kv, bt3, cl_padded, 0.25, num_splits=num_splits)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out[[0, 2]], reference(q, kv, bt, cl, 0.25), atol=ATOL[torch.float32], rtol=0)


def test_choose_num_splits_depends_on_shapes_only():
    # Small batch, long table: split up to the cap; large batch: no split.
    assert choose_num_splits(1, 8, 2048, 16, "cpu") == 64
    assert choose_num_splits(256, 8, 2048, 16, "cpu") == 1
    # Never partitions shorter than 128 tokens of table capacity.
    assert choose_num_splits(1, 8, 4, 16, "cpu") == 1
    assert choose_num_splits(1, 8, 32, 16, "cpu") == 4
    counts = [choose_num_splits(b, 8, 512, 16, "cpu") for b in (1, 2, 4, 8, 16, 32, 64, 128)]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1] == 1


def _good():
    return make_case(15, torch.float32, block_size=8, num_heads=4, num_kv_heads=2,
                     head_dim=16, context_lens=[3, 10])


BAD_CASES = {
    "q 2-D": lambda q, kv, bt, cl: (q[0], kv, bt, cl, {}),
    "heads not a multiple": lambda q, kv, bt, cl: (q[:, :3], kv, bt, cl, {}),
    "dtype mismatch": lambda q, kv, bt, cl: (q.half(), kv, bt, cl, {}),
    "float64": lambda q, kv, bt, cl: (q.double(), kv.double(), bt, cl, {}),
    "head_dim 24": lambda q, kv, bt, cl: (torch.randn(2, 4, 24), torch.randn(*kv.shape[:-1], 24), bt, cl, {}),
    "block_size 6": lambda q, kv, bt, cl: (q, kv[:, :, :, :6].contiguous(), bt, cl, {}),
    "kv not 5-D": lambda q, kv, bt, cl: (q, kv[0], bt, cl, {}),
    "int64 block table": lambda q, kv, bt, cl: (q, kv, bt.long(), cl, {}),
    "int64 context lens": lambda q, kv, bt, cl: (q, kv, bt, cl.long(), {}),
    "batch mismatch": lambda q, kv, bt, cl: (q, kv, bt[:1], cl, {}),
    "empty block table": lambda q, kv, bt, cl: (q, kv, bt[:, :0], cl, {}),
    "strided q": lambda q, kv, bt, cl: (torch.randn(2, 4, 32)[..., ::2], kv, bt, cl, {}),
    "num_splits 0": lambda q, kv, bt, cl: (q, kv, bt, cl, {"num_splits": 0}),
    "num_splits 65": lambda q, kv, bt, cl: (q, kv, bt, cl, {"num_splits": 65}),
    "out wrong dtype": lambda q, kv, bt, cl: (q, kv, bt, cl, {"out": torch.empty_like(q).half()}),
    "workspace too small": lambda q, kv, bt, cl: (q, kv, bt, cl, {"num_splits": 2, "workspace": torch.empty(3)}),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_inputs_raise(case):
    q, kv, bt, cl, kwargs = BAD_CASES[case](*_good())
    with pytest.raises(ValueError):
        paged_decode_attention(q, kv, bt, cl, 0.25, **kwargs)


# Compiles the kernels for an H100 (sm_90) without a GPU, through ptxas: catches what the
# interpreter lets through (types, layouts, dot shapes). A subprocess, because this
# process runs Triton in interpreter mode.
_COMPILE_FOR_SM90 = """
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pdserve.engine.kernels import decode_attention as da

def compile_kernel(fn, types, consts):
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=4, num_stages=2))
    assert k.asm["cubin"]

for dt, torch_dt, is_split in (("bf16", torch.bfloat16, False), ("bf16", torch.bfloat16, True), ("fp32", torch.float32, True)):
    compile_kernel(da._decode_split_kernel, dict(
        q_ptr="*" + dt, kv_ptr="*" + dt, out_ptr="*" + dt, block_tables_ptr="*i32", context_lens_ptr="*i32",
        part_m_ptr="*fp32", part_l_ptr="*fp32", part_o_ptr="*fp32", qk_scale="fp32"), dict(
        GROUP=4, GROUP_PAD=16, HEAD_DIM=128, BLOCK_SIZE=16, TILE=da._tile_tokens(128, torch_dt),
        IS_SPLIT=is_split, DOT_PRECISION="ieee" if dt == "fp32" else "tf32"))
compile_kernel(da._decode_reduce_kernel, dict(
    part_m_ptr="*fp32", part_l_ptr="*fp32", part_o_ptr="*fp32", out_ptr="*bf16"),
    dict(HEAD_DIM=128, SPLITS_PAD=64))
print("compiled")
"""


@pytest.mark.slow
def test_kernels_compile_for_hopper():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
