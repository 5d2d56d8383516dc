"""Fused RMSNorm+residual, rotary and SiLU-and-mul kernels against their pure-torch twins on CPU.

Runs through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without
CUDA). bfloat16 is covered only in tests/gpu: the interpreter computes through numpy,
which has no bfloat16, and returns garbage for it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pdserve.engine.config import RopeScaling
from pdserve.engine.kernels.activation import silu_and_mul
from pdserve.engine.kernels.norm import rms_norm
from pdserve.engine.kernels.rotary import apply_rotary
from pdserve.engine.layers import RMSNorm, RotaryEmbedding

DTYPES = [torch.float32, torch.float16]


def _ulp_tolerance(dtype: torch.dtype) -> dict:
    # The kernels round where the twin rounds, so the only differences are float32
    # summation order (RMSNorm) and the exp implementation (SiLU); either can flip one
    # rounding of the result, i.e. one or two units in the last place of the dtype.
    # atol covers float16 subnormals, where a unit is larger than 2 eps relative.
    if dtype == torch.float32:
        return dict(atol=1e-6, rtol=1e-5)
    return dict(atol=1e-5, rtol=2 * torch.finfo(dtype).eps)


def _randn(*shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 64), (3, 5, 96), (2, 1000)])
def test_rms_norm_matches_twin(dtype, shape):
    norm = RMSNorm(shape[-1], 1e-5).to(dtype)
    norm.weight.data.copy_(_randn(shape[-1], dtype=dtype, seed=1) * 0.5 + 1)
    x, residual = _randn(*shape, dtype=dtype, seed=2) * 3, _randn(*shape, dtype=dtype, seed=3)
    out, new_residual = rms_norm(x, norm.weight, 1e-5, residual)
    expected_out, expected_residual = norm(x, residual)
    # The new residual is x + residual rounded once, exactly as the twin rounds it.
    assert torch.equal(new_residual, expected_residual)
    torch.testing.assert_close(out, expected_out, **_ulp_tolerance(dtype))
    torch.testing.assert_close(rms_norm(x, norm.weight, 1e-5), norm(x), **_ulp_tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "head_dim, num_heads, num_kv_heads, scaling",
    [
        (32, 4, 2, None),
        (64, 6, 2, RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)),
        (16, 3, 3, None),
    ],
)
def test_rotary_matches_twin(dtype, head_dim, num_heads, num_kv_heads, scaling):
    rope = RotaryEmbedding(head_dim, 512, 500000.0, scaling, dtype)
    num_tokens = 9
    # q and k as the model makes them: strided views into the fused qkv projection.
    qkv = _randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, seed=4)
    q, k, _ = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q, k = q.view(num_tokens, num_heads, head_dim), k.view(num_tokens, num_kv_heads, head_dim)
    positions = torch.randperm(512, generator=torch.Generator().manual_seed(5))[:num_tokens]
    q_out, k_out = apply_rotary(q, k, positions, rope.cos, rope.sin)
    q_ref, k_ref = RotaryEmbedding.apply(rope.cos_sin(positions), q, k)
    # Each product is rounded to the dtype before the add, as the twin's elementwise ops
    # do, and two rounded products add exactly in float32: bit-identical in half precision.
    # In float32 the products and the sum round identically too.
    assert torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref)
    assert torch.equal(qkv[:, : num_heads * head_dim].view_as(q), q)  # inputs untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 2 * 48), (2, 3, 2 * 1100), (1, 2 * 4096)])
def test_silu_and_mul_matches_twin(dtype, shape):
    x = _randn(*shape, dtype=dtype, seed=6) * 4
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(silu_and_mul(x), F.silu(gate) * up, **_ulp_tolerance(dtype))


def test_bad_inputs_raise():
    x = _randn(4, 64, dtype=torch.float32, seed=7)
    w = torch.ones(64)
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(x, torch.ones(32), 1e-5)
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(x, w.half(), 1e-5)
    with pytest.raises(ValueError, match="residual must match"):
        rms_norm(x, w, 1e-5, residual=x[:2])
    with pytest.raises(ValueError, match="eps"):
        rms_norm(x, w, 0.0)
    with pytest.raises(ValueError, match="dtype"):
        rms_norm(x.to(torch.int32), w, 1e-5)
    with pytest.raises(ValueError, match="contiguous last dim"):
        rms_norm(x.t(), torch.ones(4), 1e-5)

    rope = RotaryEmbedding(16, 32, 10000.0, None, torch.float32)
    q, k, pos = _randn(3, 2, 16, dtype=torch.float32, seed=8), _randn(3, 1, 16, dtype=torch.float32, seed=9), torch.arange(3)
    with pytest.raises(ValueError, match="q must be"):
        apply_rotary(q[0], k, pos, rope.cos, rope.sin)
    with pytest.raises(ValueError, match="cos and sin must be"):
        apply_rotary(q, k, pos, rope.cos[:, :8], rope.sin[:, :8])
    with pytest.raises(ValueError, match="positions must be"):
        apply_rotary(q, k, pos.float(), rope.cos, rope.sin)
    with pytest.raises(ValueError, match="k must be"):
        apply_rotary(q, k.half(), pos, rope.cos, rope.sin)
    with pytest.raises(ValueError, match="head_dim"):
        apply_rotary(q[..., :12], k[..., :12], pos, rope.cos[:, :12], rope.sin[:, :12])

    with pytest.raises(ValueError, match="2 \\* I"):
        silu_and_mul(_randn(3, 7, dtype=torch.float32, seed=10))
    with pytest.raises(ValueError, match="contiguous last dim"):
        silu_and_mul(_randn(8, 4, dtype=torch.float32, seed=11).t())
