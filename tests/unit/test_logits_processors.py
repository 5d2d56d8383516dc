"""The logits-processor stage (engine/logits_processors.py) against vLLM's definitions,
written out token by token below, and through the sampler; random logits, no model."""

from __future__ import annotations

import collections
import dataclasses
import itertools

import pytest
import torch

from pdserve.engine.logits_processors import LogitsProcessors, TokenConstraint, apply_token_bitmask, bitmask_words
from pdserve.engine.request import Request
from pdserve.engine import sampler as sampler_module
from pdserve.engine.sampler import Sampler
from pdserve.engine.sampling_params import SamplingParams

V = 50  # not a multiple of 32: the bitmask's last word is partly past the vocabulary
EOS = (2,)
_ids = itertools.count()


@pytest.fixture(autouse=True)
def _window_at_every_vocab(monkeypatch):
    # These tests use small vocabularies; the window path must be exercised there too.
    monkeypatch.setattr(sampler_module, "WINDOW_MIN_VOCAB", 0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Small tensors: extra intra-op threads only add contention on a busy CI box.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def req(prompt=(1, 2, 3), output=(), constraint=None, **params) -> Request:
    r = Request(f"r{next(_ids)}", list(prompt), SamplingParams(**params), 4, constraint=constraint)
    r.output_token_ids.extend(output)
    return r


def rand_logits(rows: int, vocab: int = V, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def reference(logits: torch.Tensor, requests: list[Request], eos_token_ids=EOS, scale=None) -> torch.Tensor:
    """vLLM's definitions, one request and one token at a time: masks, then logit_bias,
    then repetition (prompt and output tokens: a positive logit / p, a negative one * p),
    then frequency * count and presence * (count > 0) over output tokens. ``scale`` [R]
    multiplies the additive terms (bias, frequency, presence) only."""
    out = logits.clone()
    for i, r in enumerate(requests):
        p, row = r.sampling_params, out[i]
        s = 1.0 if scale is None else float(scale[i])
        if p.allowed_token_ids is not None:
            keep = torch.zeros(row.numel(), dtype=torch.bool)
            keep[list(p.allowed_token_ids)] = True
            row[~keep] = float("-inf")
        row[list(p.banned_token_ids)] = float("-inf")
        if len(r.output_token_ids) < p.min_tokens:
            row[list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_token_ids))] = float("-inf")
        for t, b in (p.logit_bias or {}).items():
            row[t] += b * s
        for t in set(r.prompt_token_ids) | set(r.output_token_ids):
            x = row[t].item()
            row[t] = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
        for t, c in collections.Counter(r.output_token_ids).items():
            row[t] -= (p.frequency_penalty * c + p.presence_penalty) * s
    return out


def mixed_batch() -> list[Request]:
    return [
        req(),  # no processors
        req(prompt=(5, 5, 9, 13), output=(13, 20, 20), repetition_penalty=1.5),
        req(output=(3, 3, 3, 8, 11), frequency_penalty=0.7, presence_penalty=-0.4),
        # The bias moves logits across zero before the repetition penalty sees them.
        req(prompt=(5, 9, 30), output=(40, 9), logit_bias={5: 4.0, 9: -3.0, 40: 2.5, 41: 1.0}, repetition_penalty=2.0),
        req(),
        req(prompt=(4, 6, 7), output=(10, 12), allowed_token_ids=tuple(range(0, V, 3)) + (7,), banned_token_ids=(6, 7),
            min_tokens=4, stop_token_ids=(9,), logit_bias={12: -5.0, 3: 1.5}, repetition_penalty=0.8,
            frequency_penalty=-1.0, presence_penalty=2.0, max_tokens=8),
        req(min_tokens=2, ignore_eos=True, stop_token_ids=(7,)),
        req(output=(1,), min_tokens=1, stop_token_ids=(7,)),  # min_tokens reached: nothing blocked
        req(banned_token_ids=(0, 49)),
    ]


@pytest.mark.parametrize("scaled", [False, True])
def test_processors_match_the_reference(scaled):
    requests = mixed_batch()
    logits = rand_logits(len(requests))
    scale = torch.rand(len(requests), generator=torch.Generator().manual_seed(1)) * 3 + 0.2 if scaled else None
    out = logits.clone()
    LogitsProcessors(V, EOS).apply(out, requests, scale)
    assert torch.allclose(out, reference(logits, requests, scale=scale), atol=1e-5)
    # Rows without processors are untouched, bit for bit.
    for i, r in enumerate(requests):
        if not LogitsProcessors.needed(r):
            assert torch.equal(out[i], logits[i])


def test_scale_is_the_temperature_applied_first():
    # What the sampler relies on: processing x / T with scale 1 / T is processing x, then / T.
    requests = mixed_batch()
    logits = rand_logits(len(requests), seed=3)
    t = torch.rand(len(requests), generator=torch.Generator().manual_seed(2)) + 0.3
    out = logits / t.unsqueeze(1)
    LogitsProcessors(V, EOS).apply(out, requests, 1.0 / t)
    assert torch.allclose(out, reference(logits, requests) / t.unsqueeze(1), atol=1e-5)


def test_state_catches_up_with_tokens_appended_between_calls():
    vocab = 200
    r = req(prompt=(7, 7, 8), repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.25,
            min_tokens=3, stop_token_ids=(11,), max_tokens=200)
    plain = req()
    processors = LogitsProcessors(vocab, EOS)
    appends = [[], [7], [2, 2], [], [50, 7], list(range(100, 190)), [150, 8]]  # 90 new ids outgrow the state
    for step, tokens in enumerate(appends):
        for i, t in enumerate(tokens):
            # Whoever appends: the request's own method or a plain list append.
            r.append_token(t) if i % 2 else r.output_token_ids.append(t)
        logits = rand_logits(2, vocab=vocab, seed=10 + step)
        out = logits.clone()
        processors.apply(out, [plain, r])
        assert torch.allclose(out, reference(logits, [plain, r]), atol=1e-5), f"step {step}"
    # A fresh processors object (another sampler) picks up the state the request carries.
    logits = rand_logits(1, vocab=vocab, seed=99)
    out = logits.clone()
    LogitsProcessors(vocab, EOS).apply(out, [r])
    assert torch.allclose(out, reference(logits, [r]), atol=1e-5)


def test_min_tokens_blocks_eos_and_stop_tokens_only_until_reached():
    eos = (2, 3)
    requests = [req(min_tokens=3, stop_token_ids=(7,)), req(min_tokens=3, stop_token_ids=(7,), ignore_eos=True),
                req(min_tokens=3, ignore_eos=True), req(stop_token_ids=(7,))]
    blocked_until_3 = [{2, 3, 7}, {7}, set(), set()]
    processors = LogitsProcessors(V, eos)
    for step in range(5):
        out = rand_logits(len(requests), seed=step)
        processors.apply(out, requests)
        for i, r in enumerate(requests):
            expect = blocked_until_3[i] if len(r.output_token_ids) < 3 else set()
            assert set(torch.isneginf(out[i]).nonzero().flatten().tolist()) == expect, (step, i)
            r.append_token(1)


def test_min_tokens_through_the_sampler_uses_its_eos_ids():
    logits = torch.zeros(2, V)
    logits[:, 2] = 10.0  # EOS would win every time
    logits[:, 5] = 5.0
    sampler = Sampler(vocab_size=V, eos_token_ids=EOS)
    greedy, sampled = req(temperature=0.0, min_tokens=3), req(min_tokens=3, top_k=1)
    for step in range(5):
        out = sampler(logits, [greedy, sampled]).token_ids
        assert out == ([5, 5] if step < 3 else [2, 2])
        greedy.append_token(out[0])
        sampled.append_token(out[1])


@pytest.mark.parametrize("vocab", [V, 1536], ids=["window", "wide"])
def test_sampled_tokens_respect_allowed_and_banned_ids_on_every_path(vocab):
    # On the wide vocabulary the allowed tokens spread over every chunk: top_p takes the
    # rejection path, top_k=2000 the torch.topk path.
    allowed = tuple(range(0, vocab, 5))
    params = [dict(), dict(top_k=3), dict(top_p=0.5), dict(min_p=0.2), dict(temperature=0.0), dict(top_k=2000)]
    rows = 60
    requests = [req(allowed_token_ids=allowed, banned_token_ids=(10, 11), **params[i % len(params)])
                for i in range(rows)]
    for step in range(3):
        logits = rand_logits(rows, vocab=vocab, seed=step, scale=0.3)
        out = Sampler(seed=step, vocab_size=vocab)(logits, requests).token_ids
        assert set(out) <= set(allowed) - {10}
        assert len(set(out)) > 3


@pytest.mark.parametrize("params, mixed", [(dict(), False), (dict(top_k=6), True)],
                         ids=["every_row_processed", "mixed_batch,top_k"])
def test_sampled_frequencies_follow_the_processed_distribution(params, mixed):
    # Bias and penalties are scaled by 1 / T inside the sampler: the draws follow
    # softmax(processed(x) / T), not softmax(x / T + processed terms). 20,000 draws; in
    # the mixed batch every other row has no processors.
    vocab, n, temperature = 32, 5_000, 0.5
    logits = rand_logits(1, vocab=vocab, seed=4, scale=1.0)
    r = req(prompt=(0, 1), output=(1, 4, 4), logit_bias={9: 1.5, 4: 1.0}, repetition_penalty=1.4,
            frequency_penalty=0.3, presence_penalty=0.2, banned_token_ids=(3,), temperature=temperature, **params)
    probs = torch.softmax(reference(logits, [r])[0].double() / temperature, -1)
    if "top_k" in params:
        probs[probs.argsort(descending=True)[params["top_k"]:]] = 0
        probs /= probs.sum()
    batch = [r, req(temperature=temperature, **params)] * n if mixed else [r] * n
    sampler = Sampler(seed=7, vocab_size=vocab)
    counts = torch.zeros(vocab)
    for _ in range(4):
        tokens = sampler(logits.expand(len(batch), -1).contiguous(), batch).token_ids
        counts += torch.bincount(torch.tensor(tokens[:: 2 if mixed else 1]), minlength=vocab)
    assert counts[probs == 0].sum() == 0
    keep = probs * counts.sum() >= 5
    expected = probs[keep] * counts.sum()
    stat = ((counts[keep] - expected) ** 2 / expected).sum().item()
    assert stat < 90  # <= 31 degrees of freedom: p < 1e-6 under the null


# -- TokenConstraint ------------------------------------------------------------------------


def set_bits(bitmask: torch.Tensor, token_ids) -> None:
    """xgrammar's layout: bit j of int32 word i is token 32 * i + j."""
    words = [0] * bitmask.numel()
    for t in token_ids:
        words[t // 32] |= 1 << (t % 32)
    bitmask.copy_(torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32))


class ParityConstraint(TokenConstraint):
    """Step s allows only the tokens whose id has the parity of s (a two-state machine);
    records every call so the test can check the stage's contract."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.accepted: list[int] = []
        self.num_fills = 0

    def allowed(self) -> list[int]:
        return list(range(len(self.accepted) % 2, self.vocab_size, 2))

    def fill_bitmask(self, bitmask: torch.Tensor) -> None:
        assert bitmask.dtype == torch.int32 and bitmask.device.type == "cpu"
        assert bitmask.shape == (bitmask_words(self.vocab_size),) and not bitmask.any()
        set_bits(bitmask, self.allowed())
        self.num_fills += 1

    def accept_token(self, token_id: int) -> None:
        assert token_id in self.allowed(), "a token the last bitmask did not allow"
        self.accepted.append(token_id)


class FixedConstraint(TokenConstraint):
    def __init__(self, token_ids) -> None:
        self.token_ids = list(token_ids)

    def fill_bitmask(self, bitmask: torch.Tensor) -> None:
        set_bits(bitmask, self.token_ids)

    def accept_token(self, token_id: int) -> None:
        pass


@pytest.mark.parametrize("vocab", [V, 64, 1500])
def test_bitmask_layout_is_xgrammars(vocab):
    # Bits 0, 31 (the sign bit), 32 and the last token of a partial word.
    allowed = sorted({0, 1, 31, 32, 33, 47, vocab - 1} | set(range(64, vocab, 97)))
    r = req(constraint=FixedConstraint(allowed))
    out = rand_logits(1, vocab=vocab)
    LogitsProcessors(vocab).apply(out, [r])
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == allowed


def test_bitmask_disallows_padded_logits_past_its_words():
    logits = rand_logits(2, vocab=70)  # 64 tokens in 2 words, 6 more columns of padding
    bitmask = torch.full((2, bitmask_words(V)), -1, dtype=torch.int32)
    apply_token_bitmask(logits, bitmask)
    assert torch.isfinite(logits[:, :64]).all() and torch.isneginf(logits[:, 64:]).all()


@pytest.mark.parametrize("params", [dict(temperature=0.0), dict(), dict(top_k=3, temperature=2.0), dict(top_p=0.4),
                                    dict(min_p=0.3), dict(logprobs=2, presence_penalty=1.0)],
                         ids=["greedy", "plain", "top_k", "top_p", "min_p", "penalty"])
def test_constrained_tokens_satisfy_the_constraint_and_each_is_accepted_once_in_order(params):
    padded = 64  # logits wider than the vocabulary, padding the most likely: the bitmask still holds
    sampler = Sampler(seed=1, vocab_size=V, eos_token_ids=EOS)
    constrained = [req(constraint=ParityConstraint(V), **params) for _ in range(3)]
    free = req(**params)
    batch = [constrained[0], free, constrained[1], constrained[2]]
    for step in range(12):
        logits = rand_logits(len(batch), vocab=padded, seed=step, scale=1.0)
        logits[:, V:] += 5.0
        out = sampler(logits, batch).token_ids
        for r, tok in zip(batch, out):
            if r.constraint is not None:
                assert 0 <= tok < V and tok % 2 == step % 2
            r.append_token(tok)
    sampler(rand_logits(len(batch), vocab=padded), batch)  # accepts the last token
    for r in constrained:
        assert r.constraint.accepted == r.output_token_ids
        assert r.constraint.num_fills == 13
    assert any(t % 2 != s % 2 for s, t in enumerate(free.output_token_ids))  # the free row was free


# -- rows with nothing left to sample --------------------------------------------------------


@pytest.mark.parametrize("vocab", [V, 1536], ids=["window", "wide"])
def test_rows_with_every_token_masked_return_minus_one_and_spare_the_others(vocab):
    kinds = [dict(temperature=0.0), dict(), dict(top_k=3), dict(top_k=1200), dict(top_p=0.5), dict(min_p=0.2),
             dict(top_p=0.7, min_p=0.1, logprobs=2)]
    dead = [req(allowed_token_ids=(3, 5), banned_token_ids=(3, 5, 9), **k) for k in kinds]
    dead += [req(constraint=FixedConstraint([]), **k) for k in kinds]
    live = [req(seed=40 + i, **k) for i, k in enumerate(kinds)]
    live.append(req(seed=50, logit_bias={4: 3.0}, top_p=0.9))
    logits_live = rand_logits(len(live), vocab=vocab, scale=0.5)
    logits_dead = rand_logits(len(dead), vocab=vocab, seed=1, scale=0.5)
    alone = Sampler(seed=0, vocab_size=vocab)(logits_live, live).token_ids
    assert all(t >= 0 for t in alone)
    # Dead and live rows interleaved, under another sampler seed (live rows are seeded).
    batch = [r for pair in itertools.zip_longest(live, dead) for r in pair if r is not None]
    rows = {id(r): row for r, row in zip(live + dead, torch.cat([logits_live, logits_dead]))}
    logits = torch.stack([rows[id(r)] for r in batch])
    out = Sampler(seed=9, vocab_size=vocab)(logits, batch)
    token = {id(r): t for r, t in zip(batch, out.token_ids)}
    assert [token[id(r)] for r in dead] == [-1] * len(dead)
    assert [token[id(r)] for r in live] == alone
    dead_ids = {id(r) for r in dead}
    for r, row, lp in zip(batch, logits, out.logprobs):
        if id(r) in dead_ids and r.sampling_params.logprobs:
            assert set(lp) == set(row.topk(2).indices.tolist())  # the raw top-2, no entry for -1


# -- greedy and logprobs ---------------------------------------------------------------------


def test_greedy_is_the_argmax_of_the_processed_logits_and_logprobs_stay_raw():
    requests = []
    for r in mixed_batch():
        params = dataclasses.replace(r.sampling_params, temperature=0.0, logprobs=3)
        requests.append(req(prompt=r.prompt_token_ids, output=r.output_token_ids, **vars(params)))
    logits = rand_logits(len(requests), seed=5)
    expected = reference(logits, requests).argmax(-1)
    out = Sampler(vocab_size=V, eos_token_ids=EOS)(logits, requests)
    assert out.token_ids == expected.tolist()
    assert out.token_ids != logits.argmax(-1).tolist()  # the processors changed some choices
    raw = torch.log_softmax(logits, -1)
    for i, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        assert set(lp) == set(raw[i].topk(3).indices.tolist()) | {tok}
        for t, v in lp.items():
            assert v == pytest.approx(raw[i, t].item(), abs=1e-5)


def test_greedy_without_processors_is_the_raw_argmax_beside_processed_rows():
    logits = rand_logits(6, seed=6)
    requests = [req(temperature=0.0), req(temperature=0.0, logit_bias={0: 100.0}), req(temperature=0.0),
                req(logit_bias={1: 100.0}, top_k=1), req(temperature=0.0, banned_token_ids=(0, 1)),
                req(temperature=0.0)]
    out = Sampler(vocab_size=V)(logits, requests).token_ids
    raw = logits.argmax(-1).tolist()
    assert [out[i] for i in (0, 2, 5)] == [raw[i] for i in (0, 2, 5)]
    assert out[1] == 0 and out[3] == 1
    masked = logits[4].clone()
    masked[[0, 1]] = float("-inf")
    assert out[4] == masked.argmax().item()


def test_sampled_logprobs_are_of_the_raw_distribution():
    logits = rand_logits(64, seed=8, scale=1.0)
    requests = [req(logprobs=2, temperature=1.7, logit_bias={7: 20.0}, repetition_penalty=1.5, top_p=0.9)
                for _ in range(64)]
    out = Sampler(seed=3, vocab_size=V)(logits, requests)
    raw = torch.log_softmax(logits, -1)
    assert set(out.token_ids) == {7}  # the bias decides the draw...
    for i, lp in enumerate(out.logprobs):  # ...but the reported logprobs are the model's
        assert set(lp) == set(raw[i].topk(2).indices.tolist()) | {7}
        assert lp[7] == pytest.approx(raw[i, 7].item(), abs=1e-5)
