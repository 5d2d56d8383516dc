"""Token sampling (engine/sampler.py) on random logits; no model."""

from __future__ import annotations

import itertools

import pytest
import torch

from pdserve.engine.request import Request
from pdserve.engine.sampler import Sampler
from pdserve.engine.sampling_params import SamplingParams

V = 64
_ids = itertools.count()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: extra intra-op threads only add contention on a busy CI box.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def req(**params) -> Request:
    return Request(f"r{next(_ids)}", [1, 2, 3], SamplingParams(**params), 4)


def rand_logits(rows: int, vocab: int = V, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def test_greedy_is_argmax():
    logits = rand_logits(6)
    out = Sampler()(logits, [req(temperature=0.0) for _ in range(6)])
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 6


def test_input_logits_are_not_modified():
    logits = rand_logits(4)
    before = logits.clone()
    Sampler()(logits, [req(temperature=0.0), req(temperature=0.5, top_k=3), req(top_p=0.5), req(min_p=0.2, logprobs=2)])
    assert torch.equal(logits, before)


def test_half_precision_logits_are_accepted():
    logits = rand_logits(3).to(torch.bfloat16)
    out = Sampler()(logits, [req(temperature=0.0), req(), req(logprobs=1)])
    assert out.token_ids[0] == logits.float().argmax(-1)[0].item()
    assert all(0 <= t < V for t in out.token_ids)


@pytest.mark.parametrize(
    "params",
    [dict(top_k=1), dict(top_k=1, temperature=5.0), dict(top_p=1e-6), dict(min_p=1.0), dict(min_p=1.0, temperature=3.0)],
    ids=["top_k=1", "top_k=1,hot", "top_p=tiny", "min_p=1", "min_p=1,hot"],
)
def test_filters_that_keep_only_the_top_token_are_greedy(params):
    logits = rand_logits(64, scale=0.5)  # flat: a sampler that ignores the filter would stray
    sampler = Sampler(seed=1)
    for _ in range(5):
        out = sampler(logits, [req(**params) for _ in range(64)])
        assert out.token_ids == logits.argmax(-1).tolist()


def test_top_k_only_draws_from_the_k_best():
    logits = rand_logits(256, scale=0.5)
    out = Sampler(seed=2)(logits, [req(top_k=3, temperature=2.0) for _ in range(256)])
    top3 = logits.topk(3, dim=-1).indices
    assert all(t in top3[i].tolist() for i, t in enumerate(out.token_ids))
    assert len({(i, t) for i, t in enumerate(out.token_ids)} - {(i, top3[i, 0].item()) for i in range(256)}) > 0


def _draw(logits_row: torch.Tensor, n: int, seed: int = 0, **params) -> torch.Tensor:
    """Counts of ``n`` independent draws from one row (one batch of n identical rows)."""
    sampler = Sampler(seed=seed)
    r = req(**params)
    out = sampler(logits_row.expand(n, -1).contiguous(), [r] * n)
    return torch.bincount(torch.tensor(out.token_ids), minlength=logits_row.numel()).float()


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    keep = probs > 0
    expected = probs * counts.sum()
    assert counts[~keep].sum() == 0, "drew a token with probability 0"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_temperature_sampling_matches_the_distribution(temperature):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    probs = torch.softmax(logits / temperature, -1)
    counts = _draw(logits, 8_000, temperature=temperature)
    # 5 degrees of freedom: chi2 > 30 has probability ~1e-5; the seed is fixed anyway.
    assert _chi2(counts, probs) < 30


def test_top_p_keeps_the_smallest_nucleus_and_renormalizes():
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    # Tokens whose better-ranked mass already reaches 0.5 are dropped: {0, 1} stay.
    counts = _draw(logits, 8_000, top_p=0.5)
    assert _chi2(counts, torch.tensor([4 / 7, 3 / 7, 0.0, 0.0])) < 25


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    counts = _draw(logits, 8_000, min_p=0.5)  # threshold 0.25: keeps 0 and 1
    assert _chi2(counts, torch.tensor([5 / 8, 3 / 8, 0.0, 0.0])) < 25


def _seeded_run(companions: list[dict], position: int, seed: int = 1234, steps: int = 8, sampler_seed: int = 0) -> list[int]:
    """Tokens of a seeded request sampled ``steps`` times inside a batch of companions."""
    target = req(seed=seed, temperature=1.0)
    others = [req(**c) for c in companions]
    sampler = Sampler(seed=sampler_seed)
    tokens = []
    for step in range(steps):
        batch = others[:position] + [target] + others[position:]
        logits = rand_logits(len(batch), vocab=1000, seed=100 + step, scale=0.1)
        # The target's row is the same every run wherever it sits; companions' rows differ.
        logits[position] = rand_logits(1, vocab=1000, seed=7 + step, scale=0.1)[0]
        tokens.append(sampler(logits, batch).token_ids[position])
    return tokens


def test_seeded_request_is_independent_of_its_batch():
    alone = _seeded_run([], 0)
    assert len(set(alone)) > 1
    mixes = [
        ([dict()], 0),
        ([dict(), dict(temperature=0.0)], 1),
        ([dict(temperature=0.0), dict(seed=99), dict(top_k=5)], 3),
        ([dict(seed=99), dict(top_p=0.3), dict(), dict(min_p=0.1, logprobs=3)], 2),
    ]
    for companions, position in mixes:
        assert _seeded_run(companions, position) == alone
        assert _seeded_run(companions[::-1], 0, sampler_seed=5) == alone


def test_different_seeds_give_different_tokens():
    a = _seeded_run([], 0, seed=1)
    b = _seeded_run([], 0, seed=2)
    assert a != b
    assert _seeded_run([], 0, seed=1) == a


def test_unseeded_requests_follow_the_sampler_seed():
    logits = rand_logits(16, vocab=1000, scale=0.1)
    reqs = [req() for _ in range(16)]
    assert Sampler(seed=3)(logits, reqs).token_ids == Sampler(seed=3)(logits, reqs).token_ids
    assert Sampler(seed=3)(logits, reqs).token_ids != Sampler(seed=4)(logits, reqs).token_ids


def test_logprobs_hold_the_sampled_token_and_the_top_n_of_the_raw_distribution():
    logits = rand_logits(200, scale=1.0)
    raw = torch.log_softmax(logits, -1)
    n = 3
    # Temperature and top-k change what is drawn, not the reported (raw) logprobs.
    reqs = [req(logprobs=n, temperature=3.0, top_k=10) for _ in range(200)]
    out = Sampler(seed=4)(logits, reqs)
    outside = 0
    for i, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        top = raw[i].topk(n).indices.tolist()
        assert set(lp) == set(top) | {tok}
        outside += tok not in top
        for t, v in lp.items():
            assert v == pytest.approx(raw[i, t].item(), abs=1e-5)
    assert outside > 0  # the sampled-token-outside-the-top-n case was exercised


def test_logprobs_zero_and_none():
    logits = rand_logits(3)
    raw = torch.log_softmax(logits, -1)
    out = Sampler()(logits, [req(logprobs=0), req(), req(temperature=0.0, logprobs=2)])
    (tok0, v0), = out.logprobs[0].items()
    assert tok0 == out.token_ids[0] and v0 == pytest.approx(raw[0, tok0].item(), abs=1e-5)
    assert out.logprobs[1] is None
    assert set(out.logprobs[2]) == set(raw[2].topk(2).indices.tolist())
    assert out.token_ids[2] == logits[2].argmax().item()
    assert max(out.logprobs[2].values()) == pytest.approx(raw[2].max().item(), abs=1e-5)
