"""Triton KV store against its pure-torch twin (engine.attention.store_kv).

Runs through Triton's interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1).
bfloat16 is left to tests/gpu: the interpreter goes through numpy, which has no
bfloat16. Tolerance: none. The kernel moves bytes without arithmetic, so the cache
must equal the twin's bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.attention import store_kv as store_kv_ref
from pdserve.engine.kernels.kv_store import store_kv


def make_case(seed, dtype, *, num_blocks, num_kv_heads, block_size, head_dim, num_tokens):
    gen = torch.Generator().manual_seed(seed)
    kv = torch.randn(num_blocks, 2, num_kv_heads, block_size, head_dim, generator=gen).to(dtype)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    # Distinct slots scattered over shuffled blocks, as a real batch's are.
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    return kv, k, v, slots


# (num_kv_heads, block_size, head_dim): non-power-of-two heads and head_dim are padded and masked.
SHAPES = [(2, 8, 32), (1, 16, 64), (3, 32, 24), (4, 128, 16)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "kv{}-bs{}-d{}".format(*s))
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
def test_matches_reference(dtype, shape, slot_dtype):
    num_kv_heads, block_size, head_dim = shape
    seed = 4 * SHAPES.index(shape) + 2 * (dtype == torch.float16) + (slot_dtype == torch.int32)
    kv, k, v, slots = make_case(seed, dtype, num_blocks=6, num_kv_heads=num_kv_heads,
                                block_size=block_size, head_dim=head_dim, num_tokens=13)
    expected = kv.clone()
    store_kv_ref(expected, k, v, slots)
    store_kv(kv, k, v, slots.to(slot_dtype))
    assert torch.equal(kv, expected)


def test_padding_slots_are_skipped():
    kv, k, v, slots = make_case(20, torch.float16, num_blocks=5, num_kv_heads=2,
                                block_size=16, head_dim=32, num_tokens=10)
    padded = slots.clone()
    is_padding = torch.tensor([False, True, False, False, True, True, False, False, False, True])
    padded[is_padding] = -1
    expected = kv.clone()
    store_kv_ref(expected, k[~is_padding], v[~is_padding], slots[~is_padding])
    store_kv(kv, k, v, padded)
    assert torch.equal(kv, expected)


def test_out_of_range_slots_write_nothing():
    kv, k, v, _ = make_case(21, torch.float32, num_blocks=2, num_kv_heads=2,
                            block_size=8, head_dim=16, num_tokens=2)
    before = kv.clone()
    store_kv(kv, k, v, torch.tensor([16, 1000]))  # 2 blocks of 8 hold slots 0..15
    assert torch.equal(kv, before)


def test_non_contiguous_token_views():
    # k and v as slices of a fused qkv output: token stride larger than Hkv * D.
    gen = torch.Generator().manual_seed(22)
    kv = torch.randn(4, 2, 2, 8, 16, generator=gen)
    qkv = torch.randn(7, 6, 16, generator=gen)
    k, v = qkv[:, 2:4], qkv[:, 4:6]
    slots = torch.randperm(32, generator=gen)[:7]
    expected = kv.clone()
    store_kv_ref(expected, k.contiguous(), v.contiguous(), slots)
    store_kv(kv, k, v, slots)
    assert torch.equal(kv, expected)


def test_empty_batch_is_a_no_op():
    kv, k, v, slots = make_case(23, torch.float32, num_blocks=2, num_kv_heads=1,
                                block_size=8, head_dim=16, num_tokens=0)
    before = kv.clone()
    store_kv(kv, k, v, slots)
    assert torch.equal(kv, before)


def _good():
    return make_case(24, torch.float32, num_blocks=3, num_kv_heads=2, block_size=8, head_dim=16, num_tokens=4)


BAD_CASES = {
    "kv not 5-D": lambda kv, k, v, s: (kv[0], k, v, s),
    "kv dim 1 not 2": lambda kv, k, v, s: (torch.cat([kv, kv], 1), k, v, s),
    "k heads": lambda kv, k, v, s: (kv, k[:, :1], v, s),
    "v head_dim": lambda kv, k, v, s: (kv, k, v[..., :8], s),
    "k dtype": lambda kv, k, v, s: (kv, k.half(), v, s),
    "token count": lambda kv, k, v, s: (kv, k, v[:3], s),
    "slot count": lambda kv, k, v, s: (kv, k, v, s[:3]),
    "float slots": lambda kv, k, v, s: (kv, k, v, s.float()),
    "strided k": lambda kv, k, v, s: (kv, torch.randn(4, 2, 32)[..., ::2], v, s),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_inputs_raise(case):
    with pytest.raises(ValueError):
        store_kv(*BAD_CASES[case](*_good()))


# Compiles the kernel for an H100 (sm_90) without a GPU, through ptxas: catches what the
# interpreter lets through. A subprocess, because this process runs Triton interpreted.
_COMPILE_FOR_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pdserve.engine.kernels.kv_store import _store_kv_kernel as fn

for dt, slot_dt, heads, dim in (("bf16", "i64", 8, 128), ("fp16", "i32", 3, 24)):
    consts = dict(NUM_KV_HEADS=heads, HEADS_PAD=triton.next_power_of_2(heads), HEAD_DIM=dim,
                  DIM_PAD=triton.next_power_of_2(dim), BLOCK_SIZE=16)
    types = dict(kv_ptr="*" + dt, k_ptr="*" + dt, v_ptr="*" + dt, slot_ptr="*" + slot_dt)
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
    assert k.asm["cubin"]
print("compiled")
"""


@pytest.mark.slow
def test_kernel_compiles_for_hopper():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
