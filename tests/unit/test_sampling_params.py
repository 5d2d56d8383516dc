"""SamplingParams validation (engine/sampling_params.py): bad values name themselves."""

from __future__ import annotations

import re

import pytest

from pdserve.engine.sampling_params import MAX_LOGPROBS, MAX_N, MAX_STOP_STRING_LEN, MAX_STOP_STRINGS, SamplingParams

BAD = [
    # (kwargs, text the message must contain)
    (dict(temperature=-1), "-1"),
    (dict(temperature=-0.5), "-0.5"),
    (dict(temperature=float("nan")), "nan"),
    (dict(top_p=0), "0"),
    (dict(top_p=0.0), "0.0"),
    (dict(top_p=1.5), "1.5"),
    (dict(top_p=-0.1), "-0.1"),
    (dict(top_k=-2), "-2"),
    (dict(top_k=2.5), "2.5"),
    (dict(min_p=2), "2"),
    (dict(min_p=-0.25), "-0.25"),
    (dict(max_tokens=0), "0"),
    (dict(max_tokens=-3), "-3"),
    (dict(max_tokens=1.5), "1.5"),
    (dict(n=0), "0"),
    (dict(n=MAX_N + 1), str(MAX_N + 1)),
    (dict(n=2.0), "2.0"),
    (dict(logprobs=MAX_LOGPROBS + 1), str(MAX_LOGPROBS + 1)),
    (dict(logprobs=-1), "-1"),
    (dict(seed="7"), "'7'"),
    (dict(seed=2**64), str(2**64)),
    (dict(stop=[""]), "''"),
    (dict(stop=["ok", 5]), "5"),
    (dict(stop="x" * (MAX_STOP_STRING_LEN + 1)), "x" * (MAX_STOP_STRING_LEN + 1)),
    (dict(stop=[f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]), str(MAX_STOP_STRINGS + 1)),
    (dict(stop=5), "5"),
    (dict(stop=None), "None"),
    (dict(stop_token_ids=[3, -1]), "-1"),
    (dict(stop_token_ids=["3"]), "'3'"),
    (dict(stop_token_ids=7), "7"),
]


@pytest.mark.parametrize("kwargs, shown", BAD, ids=[f"{k}={v!r}"[:40] for (kw, _) in BAD for k, v in kw.items()])
def test_bad_value_raises_value_error_naming_it(kwargs, shown):
    (name,) = kwargs
    with pytest.raises(ValueError) as exc:
        SamplingParams(**kwargs)
    msg = str(exc.value)
    assert shown in msg
    assert name in msg  # and says which parameter it is


def test_defaults_are_valid():
    p = SamplingParams()
    assert p.n == 1 and p.temperature == 1.0 and p.top_p == 1.0 and p.min_p == 0.0
    assert p.stop == () and p.stop_token_ids == () and p.seed is None and p.logprobs is None
    assert not p.is_greedy and p.effective_top_k == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=0.0),
        dict(top_p=1.0),
        dict(top_p=1e-9),
        dict(top_k=-1),
        dict(top_k=0),
        dict(top_k=1),
        dict(min_p=0.0),
        dict(min_p=1.0),
        dict(max_tokens=1),
        dict(n=1),
        dict(n=MAX_N),
        dict(logprobs=0),
        dict(logprobs=MAX_LOGPROBS),
        dict(seed=0),
        dict(seed=-1),
        dict(seed=2**63 - 1),
        dict(stop=["x" * MAX_STOP_STRING_LEN]),
        dict(stop=[f"s{i}" for i in range(MAX_STOP_STRINGS)]),
        dict(stop_token_ids=[0, 2]),
    ],
    ids=lambda kw: re.sub(r"\s+", "", repr(kw))[:40],
)
def test_edge_values_are_accepted(kwargs):
    SamplingParams(**kwargs)


def test_normalisation():
    assert SamplingParams(stop="END").stop == ("END",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop_token_ids=[1, 2]).stop_token_ids == (1, 2)
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(top_k=-1).effective_top_k == 0
    assert SamplingParams(top_k=5).effective_top_k == 5
    # Frozen and hashable-by-value once normalised.
    assert SamplingParams(stop=["a"]) == SamplingParams(stop=("a",))
    with pytest.raises(AttributeError):
        SamplingParams().n = 2  # type: ignore[misc]


def test_seed_range_leaves_room_for_sibling_offsets():
    # The engine seeds sibling i with seed + i * 1_000_003, wrapped to 64 bits for the generator.
    import torch

    from pdserve.engine import rng
    from pdserve.engine.request import Request

    for seed in (2**63 - 1, -(2**63)):
        p = SamplingParams(seed=seed, n=MAX_N)
        r = Request("r", [1], p, 4, seed=rng.wrap_seed(seed + (MAX_N - 1) * 1_000_003))
        assert -(2**63) <= r.seed < 2**63
        u = rng.uniforms(torch.tensor([r.seed]), torch.tensor([0]), 4)
        assert bool(((u >= 0) & (u < 1)).all())
