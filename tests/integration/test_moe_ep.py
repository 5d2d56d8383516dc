"""Expert parallelism: FusedMoE over 2 gloo ranks (4 experts each) returns, on every rank,
what one rank holding all 8 experts returns, with either dispatch, for token counts that
do not split evenly (1 token: one rank has none under all-to-all)."""

from __future__ import annotations

import multiprocessing
import socket

import pytest
import torch

pytestmark = pytest.mark.integration

E, H, I, K = 8, 32, 24, 2
TOKEN_COUNTS = (1, 3, 17)
DISPATCHES = ("all_reduce", "all_to_all")


def _problem(T: int):
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, H, generator=g)
    w13 = torch.randn(E, 2 * I, H, generator=g) / H**0.5
    w2 = torch.randn(E, H, I, generator=g) / I**0.5
    logits = torch.randn(T, E, generator=g)
    return x, w13, w2, logits


def _build(tp):
    from pdserve.engine.moe import FusedMoE

    moe = FusedMoE(E, H, I, tp)
    _, w13, w2, _ = _problem(1)
    for e in range(E):
        moe.w13.weight_loader(moe.w13, w13[e, :I], (e, "gate"))
        moe.w13.weight_loader(moe.w13, w13[e, I:], (e, "up"))
        moe.w2.weight_loader(moe.w2, w2[e], (e, "down"))
    return moe


def _rank(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    from pdserve.engine.moe import select_experts
    from pdserve.engine.parallel import TPGroup

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        moe = _build(TPGroup(rank, 2))
        out = {}
        for dispatch in DISPATCHES:
            moe.dispatch = dispatch
            for T in TOKEN_COUNTS:
                x, _, _, logits = _problem(T)
                weights, ids = select_experts(logits, K, renormalize=True)
                out[dispatch, T] = moe(x, weights, ids).tolist()
        results.put((rank, out))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_match_one():
    from pdserve.engine.moe import select_experts
    from pdserve.engine.parallel import TPGroup

    single = _build(TPGroup())
    expected = {}
    for T in TOKEN_COUNTS:
        x, _, _, logits = _problem(T)
        weights, ids = select_experts(logits, K, renormalize=True)
        expected[T] = single(x, weights, ids)
        assert (ids < E // 2).any() and (ids >= E // 2).any() or T == 1  # both ranks have work

    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = dict(results.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    for rank in range(2):
        for dispatch in DISPATCHES:
            for T in TOKEN_COUNTS:
                # Partial sums added across ranks (all-reduce) or a token's pairs added in
                # another order (all-to-all): float32 reassociation only.
                torch.testing.assert_close(
                    torch.tensor(got[rank][dispatch, T]), expected[T], atol=1e-6, rtol=1e-5,
                    msg=lambda m, r=rank, t=T, d=dispatch: f"rank {r}, {t} tokens, {d}: {m}")
