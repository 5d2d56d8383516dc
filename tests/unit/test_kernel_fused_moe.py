"""The Triton fused-MoE kernel against its torch twin (engine.moe.fused_experts_torch).

Runs through Triton's interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1
without CUDA); float32 only there (the interpreter computes through numpy, which has no
bfloat16). Shapes are small and deliberately not multiples of the tile sizes.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.kernels.fused_moe import align_by_expert, fused_experts
from pdserve.engine.moe import fused_experts_torch, select_experts


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _problem(T, H, I, E, k, seed):
    x = _randn(T, H, seed=seed)
    w13 = _randn(E, 2 * I, H, seed=seed + 1) * H**-0.5
    w2 = _randn(E, H, I, seed=seed + 2) * I**-0.5
    weights, ids = select_experts(_randn(T, E, seed=seed + 3) * 2, k, renormalize=False)
    return x, w13, w2, weights, ids


def test_align_by_expert_groups_pairs_into_single_expert_blocks():
    # pairs 0..7; experts 3..5 belong to another rank, local expert 2 gets no pair
    ids = torch.tensor([[3, 1], [1, 0], [5, 3], [1, 4]])
    sorted_ids, block_experts = align_by_expert(ids, first_expert=0, num_local_experts=3, block_m=4)
    num_pairs = ids.numel()
    assert sorted_ids.shape[0] == block_experts.shape[0] * 4 >= num_pairs
    blocks = sorted_ids.view(-1, 4)
    seen = []
    for b, e in enumerate(block_experts.tolist()):
        rows = [p for p in blocks[b].tolist() if p != num_pairs]
        if e < 0:
            assert rows == []
            continue
        assert rows and all(ids.view(-1)[p] == e for p in rows), (b, e, rows)
        seen += rows
    # every local pair exactly once, in pair order within its expert; no remote pair
    assert seen == [3, 1, 2, 6]
    assert block_experts.tolist() == [0, 1] + [-1] * (block_experts.shape[0] - 2)


@pytest.mark.parametrize(
    "T, H, I, E, k, first_expert, block_m",
    [
        (1, 64, 48, 4, 2, 0, 16),  # a decode step of one token
        (7, 96, 40, 6, 2, 0, 16),
        (29, 64, 48, 8, 3, 0, 32),  # several tokens per expert, runs longer than a block
        (13, 64, 72, 4, 4, 4, 16),  # this rank holds experts 4..7 of 8 (expert parallelism)
    ],
)
def test_fused_experts_matches_twin(T, H, I, E, k, first_expert, block_m):
    x, w13, w2, weights, ids = _problem(T, H, I, E + first_expert, k, seed=T)
    local_w13, local_w2 = w13[first_expert:].contiguous(), w2[first_expert:].contiguous()
    out = fused_experts(x, local_w13, local_w2, weights, ids, first_expert, block_m=block_m)
    ref = fused_experts_torch(x, local_w13, local_w2, weights, ids, first_expert)
    assert out.shape == ref.shape == (T, H) and out.dtype == ref.dtype
    if first_expert:
        assert (ids < first_expert).any()  # some pairs belong to the other rank and must not count
    # float32 throughout; the GEMMs sum in another order (tiles of 32 vs BLAS) and the
    # kernel rounds once fewer before the SiLU: a few units in the last place of values
    # of order 1.
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert out.abs().max() > 0.1  # not vacuous


def test_fused_experts_rejects_bad_shapes():
    x, w13, w2, weights, ids = _problem(3, 64, 48, 4, 2, seed=5)
    with pytest.raises(ValueError, match="w2 must be"):
        fused_experts(x, w13, w2.transpose(1, 2).contiguous(), weights, ids)
    with pytest.raises(ValueError, match="topk_weights must be float32"):
        fused_experts(x, w13, w2, weights.double(), ids)
