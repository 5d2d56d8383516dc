"""Token sampling (engine/sampler.py) on random logits; no model."""

from __future__ import annotations

import collections
import itertools

import pytest
import torch

from pdserve.engine import rng
from pdserve.engine import sampler as sampler_module
from pdserve.engine.request import Request
from pdserve.engine.sampler import Sampler
from pdserve.engine.sampling_params import SamplingParams

V = 64
_ids = itertools.count()


@pytest.fixture(autouse=True)
def _window_at_every_vocab(monkeypatch):
    # These tests use small vocabularies; the window path must be exercised there too.
    monkeypatch.setattr(sampler_module, "WINDOW_MIN_VOCAB", 0)


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


# -- sampled frequencies on every path ----------------------------------------------------
#
# Each case draws 20,000 tokens (batches of identical unseeded rows, so each row gets its
# own seed; 2,000 on the rows wider than the real window, which cost more) and compares
# their counts with the filtered distribution computed here from the definitions. A spy on the sampler's path functions checks which path drew them,
# so a case cannot pass through a path it was not meant for.

NUM_DRAWS = 20_000
ROWS_PER_CALL = 5_000


def filtered_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   min_p: float = 0.0) -> torch.Tensor:
    """float64 [V]: softmax(logits / T), then top-k, then top-p on the renormalised top-k
    distribution (a token stays if the mass ranked strictly above it is < top_p), then
    min-p relative to the most likely token; renormalised."""
    p = torch.softmax(logits.double() / temperature, -1)
    order = p.argsort(descending=True)
    keep = torch.ones_like(p, dtype=torch.bool)
    if top_k > 0:
        keep[order[top_k:]] = False
    if top_p < 1.0:
        q = (p * keep)[order]
        q = q / q.sum()
        above = q.cumsum(0) - q
        # The case must not sit on a threshold: float32 in the sampler could go either way.
        assert not ((above - top_p).abs() < 1e-6).any(), "top_p too close to a cumulative mass"
        keep[order[above >= top_p]] = False
    if min_p > 0.0:
        ratio = p / p.max()
        assert not ((ratio - min_p).abs() < 1e-5).any(), "min_p too close to a probability ratio"
        keep &= ratio >= min_p
    out = p * keep
    return out / out.sum()


def _chi2_limit(df: int, z: float = 4.75) -> float:
    """Upper 1e-6 quantile of chi-square(df) (Wilson-Hilferty; no scipy here)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * a**0.5) ** 3


def assert_frequencies(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 50.0) -> None:
    """Nothing drawn outside the support, and a chi-square test passes at p = 1e-6.

    Tokens are binned in probability order until each bin expects >= ``min_expected``
    draws (so the chi-square approximation holds with thousands of tokens in the support);
    a likely token is a bin of its own."""
    counts, probs = counts.double(), probs.double()
    outside = ((probs == 0) & (counts > 0)).nonzero().squeeze(1).tolist()
    assert not outside, f"drew tokens outside the support: {outside}"
    n = counts.sum().item()
    support = (probs > 0).nonzero().squeeze(1)
    order = support[probs[support].argsort(descending=True)].tolist()
    observed, expected = [], []
    o = e = 0.0
    for t in order:
        o += counts[t].item()
        e += probs[t].item() * n
        if e >= min_expected:
            observed.append(o)
            expected.append(e)
            o = e = 0.0
    if e > 0:
        if expected:
            observed[-1] += o
            expected[-1] += e
        else:
            observed.append(o)
            expected.append(e)
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    df = len(expected) - 1
    if df > 0:
        assert stat < _chi2_limit(df), f"chi2 {stat:.1f} over {df} degrees of freedom (limit {_chi2_limit(df):.1f})"


class PathSpy:
    """Counts the rows each sampling path handled, by wrapping the sampler's path functions.

    Keys: ``sampled`` (rows in ``_sample``), ``window`` (resolved in the window),
    ``top_k`` (rows whose top-k is wider than the window: their k-th value becomes the
    floor of the rejection draw), ``rejection`` (rows given to ``_draw_by_rejection``),
    ``sort`` (the fallback sort), ``rejection_draws`` (proposals drawn while rejecting)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rows: collections.Counter = collections.Counter()
        self._window_done = self._in_rejection = self._in_sort = False
        real_sample, real_resolve = Sampler._sample, sampler_module._resolve
        real_rejection, real_sort = sampler_module._draw_by_rejection, sampler_module._draw_by_sort
        real_inverse_cdf = sampler_module._inverse_cdf
        real_mass_at_least = sampler_module._mass_at_least

        def mass_at_least(e, *args):
            self.rows["top_k"] += e.shape[0]
            return real_mass_at_least(e, *args)

        def sample(this, logits, rows, *args):
            self.rows["sampled"] += len(rows)
            self._window_done = False
            return real_sample(this, logits, rows, *args)

        def resolve(vals, *args):
            ok, token = real_resolve(vals, *args)
            if not self._in_sort:
                if self._window_done:
                    self.rows["top_k"] += vals.shape[0]
                else:
                    self._window_done = True
                    self.rows["window"] += int(ok.sum())
            return ok, token

        def rejection(e, *args):
            self.rows["rejection"] += e.shape[0]
            self._in_rejection = True
            try:
                return real_rejection(e, *args)
            finally:
                self._in_rejection = False

        def sort(e, *args):
            self.rows["sort"] += e.shape[0]
            self._in_sort = True
            try:
                return real_sort(e, *args)
            finally:
                self._in_sort = False

        def inverse_cdf(e, *args):
            if self._in_rejection:
                self.rows["rejection_draws"] += e.shape[0]
            return real_inverse_cdf(e, *args)

        monkeypatch.setattr(Sampler, "_sample", sample)
        monkeypatch.setattr(sampler_module, "_resolve", resolve)
        monkeypatch.setattr(sampler_module, "_draw_by_rejection", rejection)
        monkeypatch.setattr(sampler_module, "_draw_by_sort", sort)
        monkeypatch.setattr(sampler_module, "_inverse_cdf", inverse_cdf)
        monkeypatch.setattr(sampler_module, "_mass_at_least", mass_at_least)


@pytest.fixture
def paths(monkeypatch) -> PathSpy:
    return PathSpy(monkeypatch)


@pytest.fixture
def small_window(monkeypatch):
    """Chunks of 8 tokens, a window of 4 chunks (32 tokens): the wide-row paths then run on
    a vocabulary of 128 with the same code, fast enough for 20,000 draws per case."""
    monkeypatch.setattr(sampler_module, "CHUNK", 8)
    monkeypatch.setattr(sampler_module, "WINDOW_CHUNKS", 4)


def draw_counts(logits_row: torch.Tensor, params: dict, seed: int = 0, num: int = NUM_DRAWS,
                rows_per_call: int = ROWS_PER_CALL) -> torch.Tensor:
    """Counts of ``num`` draws from one row: calls of ``rows_per_call`` identical rows."""
    sampler = Sampler(seed=seed)
    r = req(**params)
    batch = logits_row.expand(rows_per_call, -1).contiguous()
    counts = torch.zeros(logits_row.numel(), dtype=torch.int64)
    for _ in range(num // rows_per_call):
        tokens = torch.tensor(sampler(batch, [r] * rows_per_call).token_ids)
        assert tokens.min() >= 0
        counts += torch.bincount(tokens, minlength=logits_row.numel())
    return counts


def peaked_logits(vocab: int, num_heavy_chunks: int, chunk: int, per_chunk: int = 1, seed: int = 0,
                  heavy=(3.0, 4.0), light=(-1.0, 0.5)) -> torch.Tensor:
    """Light noise (mean, std) everywhere, and ``per_chunk`` heavy tokens with distinct
    values spread over ``heavy`` in each of ``num_heavy_chunks`` random chunks."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(vocab, generator=g) * light[1] + light[0]
    chunks = torch.randperm(vocab // chunk, generator=g)[:num_heavy_chunks]
    offsets = torch.stack([torch.randperm(chunk, generator=g)[:per_chunk] for _ in range(num_heavy_chunks)])
    heavy_ids = (chunks.unsqueeze(1) * chunk + offsets).flatten()
    x[heavy_ids] = torch.linspace(*heavy, heavy_ids.numel())
    return x


SMALL_V = 128  # 16 chunks of 8 under small_window


@pytest.mark.parametrize(
    "params",
    [dict(top_k=5), dict(top_p=0.7), dict(min_p=0.1), dict(top_k=10, top_p=0.8), dict(top_p=0.9, min_p=0.05),
     dict(temperature=0.6, top_k=8, top_p=0.85, min_p=0.02), dict(temperature=1.7, top_p=0.6),
     dict(temperature=1.3, top_k=20)],
    ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()),
)
def test_window_path_frequencies(params, paths):
    # V <= CHUNK * WINDOW_CHUNKS: the window is the whole row.
    logits = rand_logits(1, vocab=V, seed=11, scale=1.5)[0]
    counts = draw_counts(logits, params)
    assert paths.rows == {"sampled": NUM_DRAWS, "window": NUM_DRAWS}
    assert_frequencies(counts, filtered_probs(logits, **params))


@pytest.mark.parametrize("params", [dict(top_p=0.85), dict(min_p=0.2), dict(top_k=4, temperature=0.8)],
                         ids=["top_p", "min_p", "top_k"])
def test_window_path_frequencies_on_a_peaked_row_wider_than_the_window(params, small_window, paths):
    # Six heavy tokens in three chunks: the support fits the window though the row does not.
    logits = peaked_logits(SMALL_V, 3, chunk=8, per_chunk=2, heavy=(4.0, 5.0), light=(-2.0, 0.5))
    counts = draw_counts(logits, params)
    assert paths.rows == {"sampled": NUM_DRAWS, "window": NUM_DRAWS}
    assert_frequencies(counts, filtered_probs(logits, **params))


@pytest.mark.parametrize(
    "params",
    [dict(top_p=0.8), dict(min_p=0.3), dict(top_p=0.9, min_p=0.2), dict(temperature=1.5, top_p=0.7),
     dict(min_p=0.003)],
    ids=["top_p", "min_p", "top_p+min_p", "hot,top_p", "min_p,light_tokens_in_support"],
)
def test_rejection_path_frequencies(params, small_window, paths):
    # Twelve heavy tokens in twelve of the sixteen chunks: the support spreads past the window's four.
    logits = peaked_logits(SMALL_V, 12, chunk=8)
    counts = draw_counts(logits, params)
    assert paths.rows["rejection"] == NUM_DRAWS and paths.rows["window"] == 0
    assert paths.rows["sort"] == paths.rows["top_k"] == 0
    assert_frequencies(counts, filtered_probs(logits, **params))


@pytest.mark.parametrize("params", [dict(top_p=0.3), dict(top_p=0.6, min_p=0.3)], ids=["top_p", "top_p+min_p"])
def test_rejection_path_frequencies_on_a_flat_row_over_several_rounds(params, small_window, paths):
    logits = rand_logits(1, vocab=SMALL_V, seed=12, scale=0.4)[0]
    counts = draw_counts(logits, params)
    assert paths.rows["rejection"] == NUM_DRAWS and paths.rows["window"] == 0
    assert paths.rows["rejection_draws"] > 1.3 * NUM_DRAWS  # many rows were rejected at least once
    assert_frequencies(counts, filtered_probs(logits, **params))


@pytest.mark.parametrize("max_rounds", [1, 2])
def test_sort_fallback_frequencies(max_rounds, small_window, paths, monkeypatch):
    # One round: every wide row settles by the sort; two: a mix of accepted and sorted rows.
    monkeypatch.setattr(sampler_module, "MAX_ROUNDS", max_rounds)
    logits = rand_logits(1, vocab=SMALL_V, seed=13, scale=0.4)[0]
    params = dict(top_p=0.4, min_p=0.4)
    counts = draw_counts(logits, params)
    assert paths.rows["rejection"] == NUM_DRAWS
    if max_rounds == 1:
        assert paths.rows["sort"] == NUM_DRAWS
    else:
        assert 0 < paths.rows["sort"] < NUM_DRAWS
    assert_frequencies(counts, filtered_probs(logits, **params))


@pytest.mark.parametrize(
    "params",
    [dict(top_k=80), dict(top_k=80, top_p=0.8), dict(top_k=100, min_p=0.3), dict(top_k=40, temperature=0.8),
     dict(top_k=200)],
    ids=["top_k", "top_k+top_p", "top_k+min_p", "cold,top_k", "top_k>V"],
)
def test_large_top_k_path_frequencies(params, small_window, paths):
    # top_k above the window's 32 tokens on a flat-ish row: torch.topk of k.
    logits = rand_logits(1, vocab=SMALL_V, seed=14, scale=0.5)[0]
    counts = draw_counts(logits, params)
    assert paths.rows["top_k"] == NUM_DRAWS and paths.rows["window"] == 0 and paths.rows["rejection"] == NUM_DRAWS
    assert_frequencies(counts, filtered_probs(logits, **params))


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.5])
def test_plain_temperature_frequencies_on_a_wide_row(temperature, small_window, paths):
    logits = rand_logits(1, vocab=SMALL_V, seed=15, scale=1.0)[0]
    counts = draw_counts(logits, dict(temperature=temperature))
    assert paths.rows == {"sampled": NUM_DRAWS}  # one draw over the chunk sums, no window
    assert_frequencies(counts, filtered_probs(logits, temperature=temperature))


WIDE_V = 1536  # 24 chunks under the module's own CHUNK = 64: wider than its 16-chunk window


def wide_row(path: str, seed: int = 0) -> torch.Tensor:
    """A row that samples through ``path`` with WIDE_PARAMS[path] and the real window."""
    if path == "rejection":  # heavy tokens in 20 of the 24 chunks
        return peaked_logits(WIDE_V, 20, chunk=sampler_module.CHUNK, seed=seed, heavy=(6.0, 7.0), light=(0.0, 0.5))
    return rand_logits(1, vocab=WIDE_V, seed=seed, scale=0.5)[0]


WIDE_PARAMS = {"rejection": dict(top_p=0.8), "top_k": dict(top_k=1100)}


@pytest.mark.parametrize("params, path", [(dict(top_p=0.8), "rejection"), (dict(min_p=0.25, top_p=0.95), "rejection"),
                                          (dict(top_k=1100), "top_k")], ids=["top_p", "min_p+top_p", "top_k"])
def test_wide_paths_with_the_real_window(params, path, paths):
    # The module's own CHUNK and WINDOW_CHUNKS (fewer draws: a wide row costs more).
    logits = wide_row(path)
    counts = draw_counts(logits, params, num=2_000, rows_per_call=1_000)
    assert paths.rows[path] == 2_000 and paths.rows["window"] == 0
    assert_frequencies(counts, filtered_probs(logits, **params), min_expected=40.0)


@pytest.mark.parametrize("vocab", [1024, 1088])
def test_top_k_keeps_every_token_tied_with_the_kth(vocab):
    # The module docstring: "top-k and top-p keep every token equal to the threshold value"
    # (vLLM's masking too). Three leaders, then vocab - 3 tokens tied at the 5th place.
    row = torch.zeros(vocab)
    row[:3] = 1.0
    counts = draw_counts(row, dict(top_k=5), num=2_000, rows_per_call=2_000)
    assert (counts > 0).sum() > 600  # about 880 expected when the ties stay, 5 when they do not


# -- seeds and positions ------------------------------------------------------------------


def _seeded_wide_run(path: str, companions: list[tuple[str, dict]], position: int, sampler_seed: int = 0,
                     steps: int = 6) -> list[int]:
    """Tokens of a seeded request on a wide row, decoding ``steps`` tokens (each appended,
    so its position advances) inside a batch of (row kind, params) companions."""
    target = req(seed=4321, **WIDE_PARAMS[path])
    others = [(kind, req(**c)) for kind, c in companions]
    sampler = Sampler(seed=sampler_seed)
    for step in range(steps):
        rows = [wide_row(kind, seed=200 + 10 * step + i) for i, (kind, _) in enumerate(others)]
        rows.insert(position, wide_row(path, seed=step))
        batch = [r for _, r in others]
        batch.insert(position, target)
        token = sampler(torch.stack(rows), batch).token_ids[position]
        target.append_token(token)
    return target.output_token_ids


@pytest.mark.parametrize("path", ["rejection", "top_k"])
def test_seeded_request_on_a_wide_path_is_independent_of_its_batch(path, monkeypatch):
    spy = PathSpy(monkeypatch)
    alone = _seeded_wide_run(path, [], 0)
    assert spy.rows[path] == len(alone) and len(set(alone)) > 1
    mixes = [
        ([("flat", dict())], 0),
        ([("flat", dict(temperature=0.0)), ("rejection", dict(top_p=0.8))], 1),
        ([("flat", dict(top_k=1100)), ("rejection", dict(seed=9, min_p=0.5)), ("flat", dict(top_k=5))], 3),
        ([("rejection", dict(top_p=0.5, logit_bias={3: 4.0})), ("flat", dict(top_p=0.2)), ("flat", dict(min_p=0.1)),
          ("rejection", dict(temperature=0.0, repetition_penalty=1.3))], 2),
    ]
    for companions, position in mixes:
        assert _seeded_wide_run(path, companions, position) == alone
        assert _seeded_wide_run(path, companions[::-1], 0, sampler_seed=5) == alone


@pytest.mark.parametrize("path", ["window", "plain", "rejection", "top_k"])
def test_same_seed_at_the_same_position_gives_the_same_token(path):
    params = {"window": dict(top_p=0.9), "plain": dict(temperature=1.3)}.get(path) or WIDE_PARAMS[path]
    row = wide_row(path) if path in WIDE_PARAMS else rand_logits(1, vocab=V, scale=0.5)[0]
    for position in range(6):
        # Same seed and output length, different output tokens and batch places: same draw.
        a, b, other = req(seed=77, **params), req(seed=77, **params), req(**params)
        a.output_token_ids.extend([1] * position)
        b.output_token_ids.extend(range(position))
        first = Sampler(seed=1)(row.expand(3, -1).contiguous(), [a, other, b]).token_ids
        again = Sampler(seed=2)(row.expand(2, -1).contiguous(), [other, b]).token_ids
        assert first[0] == first[2] == again[1]


@pytest.mark.parametrize("path", ["plain", "rejection"])
def test_each_output_position_gets_fresh_draws(path):
    params = dict(temperature=1.0) if path == "plain" else WIDE_PARAMS[path]
    row = rand_logits(1, vocab=1000, scale=0.1)[0] if path == "plain" else wide_row(path)

    def decode(sampler_seed: int) -> list[int]:
        r, sampler = req(seed=5, **params), Sampler(seed=sampler_seed)
        for _ in range(24):
            r.append_token(sampler(row.unsqueeze(0), [r]).token_ids[0])
        return r.output_token_ids

    tokens = decode(0)
    # The same row every step: only the position changes the draw.
    assert len(set(tokens)) >= 12
    assert decode(1) == tokens


def test_uniforms_are_in_range_deterministic_and_uniform():
    seeds = torch.arange(-500, 500, dtype=torch.int64).repeat_interleave(10)
    positions = torch.arange(10, dtype=torch.int64).repeat(1000)
    u = rng.uniforms(seeds, positions, 10)  # 100,000 values
    assert u.dtype == torch.float64 and u.shape == (10_000, 10)
    assert bool((u >= 0).all()) and bool((u < 1).all())
    assert torch.equal(u, rng.uniforms(seeds.clone(), positions.clone(), 10))
    # A row depends only on its own (seed, position), draw i not on how many are asked for.
    assert torch.equal(rng.uniforms(seeds[123:125], positions[123:125], 10), u[123:125])
    assert torch.equal(rng.uniforms(seeds, positions, 3), u[:, :3])
    extreme = torch.tensor([rng.wrap_seed(2**64 - 1), rng.wrap_seed(2**63), -(2**63), 2**63 - 1])
    e = rng.uniforms(extreme, torch.tensor([0, 1, 2**40, 7]), 4)
    assert bool((e >= 0).all()) and bool((e < 1).all())
    flat = u.flatten().sort().values
    n = flat.numel()
    assert flat.unique().numel() == n
    assert abs(flat.mean().item() - 0.5) < 0.005  # the mean's standard deviation is 0.0009
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = torch.maximum(grid - flat, flat - (grid - 1 / n)).max().item()
    assert ks < 1.95 / n**0.5  # Kolmogorov-Smirnov at p ~ 0.001
    # Neighbouring draws, positions and seeds are uncorrelated.
    for a, b in [(u[:, 0], u[:, 1]), (u[:-1, 0], u[1:, 0]), (u[:-10, 0], u[10:, 0])]:
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.05


def test_small_vocabularies_skip_the_window_and_stay_exact(monkeypatch, paths):
    """Below WINDOW_MIN_VOCAB every filtered row takes the rejection draw (a pass over a
    small row is cheaper than sorting the window); the frequencies stay exact."""
    monkeypatch.setattr(sampler_module, "WINDOW_MIN_VOCAB", 16384)
    logits = rand_logits(1, vocab=1000, seed=11, scale=2.0)[0]
    params = dict(temperature=0.8, top_p=0.7, min_p=0.02)
    counts = torch.zeros(1000)
    sampler = Sampler(seed=3)
    for _ in range(10):
        r = [req(**params) for _ in range(2000)]
        out = sampler(logits.expand(2000, -1).contiguous(), r)
        counts += torch.bincount(torch.tensor(out.token_ids), minlength=1000).float()
    assert paths.rows["window"] == 0 and paths.rows["rejection"] == 20_000
    assert_frequencies(counts, filtered_probs(logits, **params), min_expected=40.0)
