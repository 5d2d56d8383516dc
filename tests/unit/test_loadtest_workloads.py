"""Workload generators of loadtest/workloads.py, with the tiny model's real tokenizer.

Lengths are checked by tokenizing the built prompts again, independently of the
builder: what the server's ``usage.prompt_tokens`` will say.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from pdserve.engine.tiny_model import make_tiny_model
from pdserve.engine.tokenizer import Tokenizer
from pdserve.loadtest import LengthDistribution, LoadTestConfig, PromptFactory, WorkloadBuilder, read_trace
from pdserve.loadtest.workloads import follow_up

URL = "http://127.0.0.1:1"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("loadtest") / "tiny")


@pytest.fixture(scope="module")
def tok(model_dir):
    return Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="module")
def factory(tok):
    return PromptFactory(tok)


def build(factory, **kw):
    kw.setdefault("num_requests", 8)
    return WorkloadBuilder(LoadTestConfig(base_url=URL, **kw), factory).requests()


def n_tokens(tok, prompt):
    return len(tok.encode(prompt)) if isinstance(prompt, str) else len(tok.encode_chat(prompt))


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_fixed_lengths_are_exact(factory, tok, endpoint):
    reqs = build(factory, endpoint=endpoint, input_len=300, output_len=17)
    assert len(reqs) == 8
    for r in reqs:
        assert n_tokens(tok, r.prompt) == r.input_len == 300
        assert r.output_len == 17 and r.arrival_s is None
    assert len({str(r.prompt) for r in reqs}) == 8  # random words: no accidental sharing


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_synthetic_lengths_follow_the_distributions_exactly(factory, tok, endpoint):
    cfg = dict(workload="synthetic", endpoint=endpoint, num_requests=20,
               input_dist=LengthDistribution.parse("uniform:min=40,max=400"),
               output_dist=LengthDistribution.parse("lognormal:mean=20,sigma=0.5"))
    reqs = build(factory, **cfg)
    assert all(n_tokens(tok, r.prompt) == r.input_len for r in reqs)
    assert all(40 <= r.input_len <= 400 for r in reqs) and len({r.input_len for r in reqs}) > 10
    assert all(r.output_len >= 1 for r in reqs) and len({r.output_len for r in reqs}) > 3
    assert build(factory, **cfg) == reqs  # seeded: the same workload again
    assert build(factory, seed=1, **cfg) != reqs


def test_shared_prefix_groups_share_exactly_their_prefix(factory, tok):
    P, S = 64, 16
    reqs = build(factory, workload="shared-prefix", num_prefix_groups=3, prefix_len=P, suffix_len=S, num_requests=9)
    ids = [tok.encode(r.prompt) for r in reqs]
    assert all(len(x) == P + S == r.input_len for x, r in zip(ids, reqs))
    assert [r.group_id for r in reqs] == [0, 1, 2] * 3
    for g in range(3):
        members = [x for x, r in zip(ids, reqs) if r.group_id == g]
        # BOS + P prefix words are identical token ids within the group...
        assert all(m[: P + 1] == members[0][: P + 1] for m in members)
        # ... and the suffixes differ.
        assert len({tuple(m[P + 1:]) for m in members}) == len(members)
    # Different groups differ from their first word.
    assert len({x[1] for x in ids[:3]}) == 3


def test_shared_prefix_with_chat_shares_the_templated_prefix(factory, tok):
    reqs = build(factory, workload="shared-prefix", endpoint="chat", num_prefix_groups=2, prefix_len=40,
                 suffix_len=20, num_requests=4)
    ids = [tok.encode_chat(r.prompt) for r in reqs]
    assert all(len(x) == 60 for x in ids)
    assert ids[0][:40] == ids[2][:40] and ids[0][40:] != ids[2][40:]


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_multi_turn_contexts_extend(factory, tok, endpoint):
    reqs = build(factory, workload="multi-turn", endpoint=endpoint, num_turns=3, input_len=20, output_len=5,
                 num_requests=7)
    assert [(r.session_id, r.turn) for r in reqs] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]
    for prev, cur in zip(reqs, reqs[1:]):
        if cur.turn == 0:
            assert cur.new_message is None
            continue
        assert cur.new_message is not None and cur.input_len > prev.input_len + 20
        if endpoint == "chat":
            assert cur.prompt[: len(prev.prompt)] == prev.prompt
            assert [m["role"] for m in cur.prompt[len(prev.prompt):]] == ["assistant", "user"]
        else:
            assert cur.prompt.startswith(prev.prompt) and cur.prompt.endswith(cur.new_message)
        assert n_tokens(tok, cur.prompt) == cur.input_len
    # At run time the real answer replaces the placeholder.
    real = follow_up(reqs[1], reqs[0].prompt, " the real answer")
    if endpoint == "chat":
        assert real[-2] == {"role": "assistant", "content": " the real answer"}
    else:
        assert real == reqs[0].prompt + " the real answer" + reqs[1].new_message


def write_trace(path, lines):
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(path)


def test_trace_shared_hash_ids_give_identical_blocks(factory, tok, tmp_path):
    B = 16
    trace = write_trace(tmp_path / "t.jsonl", [
        {"timestamp": 1000, "input_length": 40, "output_length": 5, "hash_ids": [7, 8, 9]},
        {"timestamp": 1250, "input_length": 48, "output_length": 6, "hash_ids": [7, 8, 3]},
        {"timestamp": 3000, "input_length": 20, "output_length": 7, "hash_ids": [5, 8]},
    ])
    cfg = dict(workload="trace", trace_path=trace, trace_block_size=B, num_requests=None)
    reqs = build(factory, **cfg)
    ids = [tok.encode(r.prompt) for r in reqs]
    assert [len(x) for x in ids] == [r.input_len for r in reqs] == [40, 48, 20]
    assert [r.output_len for r in reqs] == [5, 6, 7]
    assert [r.arrival_s for r in reqs] == pytest.approx([0.0, 0.25, 2.0])
    # Token 0 is BOS; block k is tokens 1 + k*B .. 1 + (k+1)*B.
    assert ids[0][1: 1 + 2 * B] == ids[1][1: 1 + 2 * B]  # hash ids 7, 8 shared
    assert ids[0][1 + 2 * B:] != ids[1][1 + 2 * B: 40]    # 9 vs 3
    assert ids[2][1: 1 + B] != ids[0][1: 1 + B]           # 5 vs 7
    half = build(factory, trace_time_scale=0.5, **cfg)
    assert [r.arrival_s for r in half] == pytest.approx([0.0, 0.125, 1.0])
    assert len(build(factory, **{**cfg, "num_requests": 2})) == 2


@pytest.mark.parametrize("line, message", [
    ('{"timestamp": 0, "input_length": 0, "output_length": 5}', "input_length"),
    ('{"timestamp": 0, "input_length": 4, "output_length": 5, "hash_ids": [-1]}', "hash_ids"),
    ('{"timestamp": -3, "input_length": 4, "output_length": 5}', "timestamp"),
    ("[1, 2]", "JSON object"),
    ("{oops", "not JSON"),
])
def test_bad_trace_lines_name_the_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 4, "output_length": 5}\n' + line + "\n")
    with pytest.raises(ValueError, match=f"bad.jsonl:2: .*{message}"):
        list(read_trace(path))


def test_open_loop_arrivals_are_seeded_offsets(factory):
    reqs = build(factory, rate=5.0, num_requests=200, input_len=8, output_len=2)
    offsets = np.array([r.arrival_s for r in reqs])
    assert offsets[0] == 0.0 and (np.diff(offsets) >= 0).all()
    # 199 exponential gaps of mean 0.2 s: standard error 0.2/sqrt(199) ~ 0.014; 0.06 is four.
    assert np.diff(offsets).mean() == pytest.approx(0.2, abs=0.06)
    assert [r.arrival_s for r in build(factory, rate=5.0, num_requests=200, input_len=8, output_len=2)] \
        == offsets.tolist()
    # Bounded by duration only: the arrivals before it.
    timed = build(factory, rate=5.0, num_requests=None, duration_s=3.0, input_len=8, output_len=2)
    assert timed and all(r.arrival_s < 3.0 for r in timed) and len(timed) == (offsets < 3.0).sum()


def test_multi_turn_open_loop_arrivals_are_per_conversation(factory):
    reqs = build(factory, workload="multi-turn", rate=2.0, num_turns=2, input_len=8, output_len=2, num_requests=6)
    assert [r.arrival_s is None for r in reqs] == [False, True] * 3


def test_without_a_tokenizer_lengths_are_word_counts():
    reqs = build(PromptFactory(None), input_len=50, output_len=3)
    assert all(len(r.prompt.split()) == 50 == r.input_len for r in reqs)
    assert not PromptFactory(None).is_exact


def test_fit_reaches_the_closest_length_with_multi_token_words():
    # Pure search on a count function: 3 tokens per word after a 2-token framing.
    words = ["w"] * 100
    assert PromptFactory._fit(words, 50, lambda k: 3 * k + 2) == 16  # 50 exactly
    assert PromptFactory._fit(words, 51, lambda k: 3 * k + 2) == 16  # 50 is closer than 53
    assert PromptFactory._fit(words, 1, lambda k: 3 * k + 2) == 1    # below the framing: the least
    assert PromptFactory._fit(words, 10_000, lambda k: 3 * k + 2) == 100  # more than the words give
    # Uneven words: counts are prefix sums of 1..3 tokens per word.
    sizes = np.random.default_rng(0).integers(1, 4, size=200)
    sums = np.concatenate([[0], np.cumsum(sizes)]) + 1
    for target in (7, 50, 123, 301):
        k = PromptFactory._fit(["w"] * 200, target, lambda k: int(sums[k]))
        assert abs(sums[k] - target) == min(abs(sums[1:] - target))


def test_vocab_words_are_one_token_each(factory, tok):
    assert len(factory.words) > 1000 and len(set(factory.words)) == len(factory.words)
    text = PromptFactory.text(factory.words[:500])
    assert len(tok.encode(text, add_special_tokens=False)) == 500
