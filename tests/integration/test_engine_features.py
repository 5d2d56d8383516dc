"""End-to-end features of the offline engine on the embedded tiny model.

Covers prompts (strings vs token ids), stop strings / stop token ids / EOS,
max_tokens, seeds, n > 1 with shared prompt blocks, logprobs, streaming deltas,
input validation, abort in every phase, preemption, chat templates and KV events.
Every test ends with the whole KV pool free again.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from pdserve.engine import LLM, SamplingParams
from pdserve.engine.block_pool import BlockStored
from pdserve.engine.hashing import block_hashes
from pdserve.engine.tiny_model import make_tiny_model

BLOCK_SIZE = 16
MAX_MODEL_LEN = 512
PROMPT = "Hello, my name is"
OTHER_PROMPTS = ["The capital of France is", "def foo(x):", "In the beginning"]
CODE_PROMPT = OTHER_PROMPTS[1]  # its greedy output changes token after a few steps
GREEDY = SamplingParams(temperature=0.0, max_tokens=8)
# A prompt long enough to span several KV blocks (and several 16-token prefill chunks).
LONG_TEXT = (
    "Return a new list containing all items from the iterable in ascending order. "
    "A custom key function can be supplied to customize the sort order, and the "
    "reverse flag can be set to request the result in descending order."
)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The embedded tiny Llama, written once per session."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_model") / "tiny-llama")


def _make_llm(model_dir, **kw) -> LLM:
    kw.setdefault("num_kv_blocks", 128)
    kw.setdefault("max_model_len", MAX_MODEL_LEN)
    kw.setdefault("block_size", BLOCK_SIZE)
    return LLM(model_dir, **kw)


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    with _make_llm(tiny_model_dir) as engine:
        yield engine


def assert_all_free(llm: LLM) -> None:
    stats = llm.kv_cache_stats()
    assert stats.num_free_blocks == stats.num_total_blocks, stats
    assert not llm.engine.has_unfinished


def _first_new_substring(text: str, length: int, start: int) -> tuple[int, str]:
    """(i, text[i:i+length]) for the first i >= start where that substring occurs for the first time."""
    for i in list(range(start, len(text) - length)) + list(range(1, start)):
        sub = text[i : i + length]
        if text.find(sub) == i and sub.strip():
            return i, sub
    raise AssertionError(f"no fresh substring in {text!r}")


def _first_new_token(token_ids: list[int], start: int) -> int:
    """Index >= start of a token that does not occur earlier in token_ids."""
    for k in range(start, len(token_ids)):
        if token_ids[k] not in token_ids[:k]:
            return k
    for k in range(1, start):
        if token_ids[k] not in token_ids[:k]:
            return k
    raise AssertionError(f"no fresh token in {token_ids}")


# -- prompts --------------------------------------------------------------------------


def test_string_and_token_id_prompts_agree(llm):
    prompts = [PROMPT, OTHER_PROMPTS[0]]
    ids = [llm.tokenizer.encode(p) for p in prompts]
    by_text = llm.generate(prompts, GREEDY)
    by_ids = llm.generate(ids, GREEDY)
    assert len(by_text) == len(by_ids) == 2
    for t, i, prompt_ids in zip(by_text, by_ids, ids):
        assert t.prompt_token_ids == i.prompt_token_ids == prompt_ids
        assert t.token_ids == i.token_ids
        assert len(t.token_ids) == GREEDY.max_tokens
        assert t.text == i.text == llm.tokenizer.decode(t.token_ids)
        assert t.finished and t.finish_reason == "length"
    # A single token-id list is one prompt, not a batch of ints.
    single = llm.generate(ids[0], GREEDY)
    assert len(single) == 1 and single[0].token_ids == by_text[0].token_ids
    assert llm.generate([], GREEDY) == []
    assert_all_free(llm)


# -- stopping ---------------------------------------------------------------------------


def test_stop_strings(llm):
    # A stop string that never appears changes nothing: this is the un-stopped output.
    base = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=32, stop="never-appears-xyz"))[0]
    assert base.finish_reason == "length" and base.outputs[0].stop_reason is None
    text = base.text
    assert text == llm.tokenizer.decode(base.token_ids)
    i, stop = _first_new_substring(text, 4, len(text) // 3)
    assert 0 < i < len(text) - len(stop)

    out = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=32, stop=stop))[0]
    assert out.finish_reason == "stop"
    assert out.outputs[0].stop_reason == stop
    assert out.text == text[:i]
    assert stop not in out.text
    assert out.token_ids == base.token_ids[: len(out.token_ids)]
    assert len(out.token_ids) < len(base.token_ids)
    # The token that completed the stop string is kept in token_ids.
    assert stop in llm.tokenizer.decode(out.token_ids)

    # Several stop strings: the earliest occurrence wins, whatever the list order.
    j, later = _first_new_substring(text, 3, i + len(stop) + 1)
    assert j > i and text.find(later) == j
    out2 = llm.generate(
        PROMPT, SamplingParams(temperature=0.0, max_tokens=32, stop=["never-appears-xyz", later, stop])
    )[0]
    assert out2.finish_reason == "stop"
    assert out2.outputs[0].stop_reason == stop
    assert out2.text == text[:i]
    assert_all_free(llm)


def test_stop_token_ids(llm):
    base = llm.generate(CODE_PROMPT, SamplingParams(temperature=0.0, max_tokens=12))[0]
    k = _first_new_token(base.token_ids, 3)
    assert k >= 3
    tok = base.token_ids[k]
    out = llm.generate(CODE_PROMPT, SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[tok]))[0]
    assert out.finish_reason == "stop"
    assert out.outputs[0].stop_reason == tok
    assert out.token_ids == base.token_ids[: k + 1]
    assert base.text.startswith(out.text)
    assert_all_free(llm)


def test_eos_respected_unless_ignore_eos(llm):
    eng = llm.engine
    assert {8188, 8191} <= set(eng.eos_token_ids)
    base = llm.generate(CODE_PROMPT, SamplingParams(temperature=0.0, max_tokens=12))[0]
    # The random model never emits its real EOS; declare one of its greedy tokens EOS.
    k = _first_new_token(base.token_ids, 2)
    assert k >= 2
    tok = base.token_ids[k]
    saved = eng.eos_token_ids
    eng.eos_token_ids = frozenset(saved | {tok})
    try:
        out = llm.generate(CODE_PROMPT, SamplingParams(temperature=0.0, max_tokens=12))[0]
        assert out.finish_reason == "stop" and out.outputs[0].stop_reason == tok
        assert out.token_ids == base.token_ids[: k + 1]
        ignored = llm.generate(CODE_PROMPT, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0]
        assert ignored.finish_reason == "length"
        assert ignored.token_ids == base.token_ids
        # ignore_eos does not disable explicit stop_token_ids.
        both = llm.generate(
            CODE_PROMPT, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop_token_ids=[tok])
        )[0]
        assert both.finish_reason == "stop" and both.token_ids == base.token_ids[: k + 1]
    finally:
        eng.eos_token_ids = saved
    assert_all_free(llm)


def test_max_tokens_length(llm):
    for n in (1, 5):
        out = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=n))[0]
        assert out.finish_reason == "length"
        assert len(out.token_ids) == n
        assert out.outputs[0].stop_reason is None
    assert_all_free(llm)


# -- sampling ----------------------------------------------------------------------------


def test_seeded_sampling_is_batch_independent(llm):
    seeded = SamplingParams(temperature=0.8, seed=1234, max_tokens=8)
    noise_a = SamplingParams(temperature=1.0, max_tokens=6)
    noise_b = SamplingParams(temperature=0.9, top_p=0.9, seed=99, max_tokens=14)
    alone = llm.generate(PROMPT, seeded)[0].token_ids
    assert len(alone) == 8
    again = llm.generate(PROMPT, seeded)[0].token_ids
    batch1 = llm.generate([OTHER_PROMPTS[0], PROMPT, OTHER_PROMPTS[1]], [noise_a, seeded, noise_b])[1]
    batch2 = llm.generate([PROMPT, OTHER_PROMPTS[1], OTHER_PROMPTS[0]], [seeded, noise_b, noise_a])[0]
    assert again == alone
    assert batch1.token_ids == alone
    assert batch2.token_ids == alone

    other_seed = SamplingParams(temperature=0.8, seed=1235, max_tokens=8)
    unseeded = SamplingParams(temperature=0.8, max_tokens=8, ignore_eos=True)  # EOS by chance is not the point
    o, u1, u2 = llm.generate([PROMPT] * 3, [other_seed, unseeded, unseeded])
    assert o.token_ids != alone
    for u in (u1, u2):
        assert u.finish_reason == "length" and len(u.token_ids) == 8
        assert all(0 <= t < 8192 for t in u.token_ids)
    assert u1.token_ids != u2.token_ids  # unseeded rows draw different noise
    assert_all_free(llm)


def test_n_greater_than_one_shares_prompt_blocks(llm):
    eng = llm.engine
    prompt_ids = llm.tokenizer.encode(LONG_TEXT)
    assert len(prompt_ids) > 2 * BLOCK_SIZE + 1
    num_shared = (len(prompt_ids) - 1) // BLOCK_SIZE
    params = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=8)
    eng.add_request("nshare", prompt_ids, params)
    rids = [f"nshare#{i}" for i in range(4)]
    saw_shared = False
    while eng.has_unfinished:
        eng.step()
        tables = [eng.kv.block_ids(r) for r in rids]
        if all(len(t) > num_shared for t in tables):
            # Every sibling maps the prompt's full blocks onto the same physical blocks ...
            assert all(t[:num_shared] == tables[0][:num_shared] for t in tables)
            # ... but owns its own tail.
            tails = [t[num_shared:] for t in tables]
            assert len({b for tail in tails for b in tail}) == sum(len(tail) for tail in tails)
            used = eng.kv_cache_stats().num_total_blocks - eng.kv_cache_stats().num_free_blocks
            assert used == num_shared + sum(len(tail) for tail in tails)
            assert used < 4 * len(tables[0])
            saw_shared = True
    assert saw_shared
    out = eng.take_finished("nshare", prompt_ids)
    assert out is not None and len(out.outputs) == 4
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    for c in out.outputs:
        assert c.finish_reason == "length" and len(c.token_ids) == 8
        assert c.text == llm.tokenizer.decode(c.token_ids)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert_all_free(llm)

    # Same seed again: the same four completions.
    again = llm.generate([prompt_ids], params)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]

    greedy = llm.generate(PROMPT, SamplingParams(n=4, temperature=0.0, max_tokens=8))[0]
    assert len(greedy.outputs) == 4
    assert all(c.token_ids == greedy.outputs[0].token_ids for c in greedy.outputs)
    assert all(c.text == greedy.outputs[0].text for c in greedy.outputs)
    single = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=8))[0]
    assert greedy.outputs[0].token_ids == single.token_ids
    assert_all_free(llm)


def test_logprobs(llm):
    out = llm.generate(PROMPT, SamplingParams(logprobs=3, temperature=0.0, max_tokens=6))[0]
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids) == 6
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert tok in lp
        # Greedy: the sampled token is the top-1, so it is one of the 3 alternatives.
        assert len(lp) == 3
        assert lp[tok] == max(lp.values())
        assert all(v <= 0.0 for v in lp.values())

    ref = torch.log_softmax(llm.next_token_logits([PROMPT])[0].float(), dim=-1)
    top = ref.topk(3)
    first = out.logprobs[0]
    assert set(first) == set(top.indices.tolist())
    assert out.token_ids[0] == int(ref.argmax())
    for t, v in first.items():
        assert v == pytest.approx(float(ref[t]), abs=1e-4)

    # Sampling: the sampled token is always present, plus the top 3.
    sampled = llm.generate(PROMPT, SamplingParams(logprobs=3, temperature=1.0, seed=11, max_tokens=8))[0]
    assert len(sampled.logprobs) == 8
    for tok, lp in zip(sampled.token_ids, sampled.logprobs):
        assert tok in lp
        top3 = sorted(lp.values(), reverse=True)[:3]
        if len(lp) == 4:
            assert lp[tok] < top3[-1]
        else:
            assert len(lp) == 3 and lp[tok] >= top3[-1]

    only = llm.generate(PROMPT, SamplingParams(logprobs=0, temperature=0.0, max_tokens=3))[0]
    assert [list(lp) for lp in only.logprobs] == [[t] for t in only.token_ids]
    assert llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=2))[0].logprobs is None
    assert_all_free(llm)


# -- streaming ---------------------------------------------------------------------------


def test_streaming_deltas_match_final_output(llm):
    eng = llm.engine
    base = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=24))[0]
    i, stop = _first_new_substring(base.text, 4, len(base.text) // 3)
    requests = {
        "s-plain": (OTHER_PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=12)),
        "s-stop": (PROMPT, SamplingParams(temperature=0.0, max_tokens=24, stop=[stop])),
        "s-seeded": (OTHER_PROMPTS[1], SamplingParams(temperature=0.9, seed=5, max_tokens=12)),
        "s-n2": (OTHER_PROMPTS[2], SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=10)),
    }
    prompt_ids = {rid: eng.add_request(rid, p, sp) for rid, (p, sp) in requests.items()}
    streamed: dict[str, str] = defaultdict(str)
    finish: dict[str, str] = {}
    num_deltas: dict[str, int] = defaultdict(int)
    while eng.has_unfinished:
        for d in eng.step():
            assert d.request_id not in finish, f"delta after finish for {d.request_id}"
            streamed[d.request_id] += d.text
            num_deltas[d.request_id] += 1
            assert len(d.token_ids) == 1
            if "s-stop" == d.request_id:
                assert stop not in streamed[d.request_id]
            if d.finish_reason is not None:
                finish[d.request_id] = d.finish_reason
    results = {rid: eng.take_finished(rid, ids) for rid, ids in prompt_ids.items()}
    for rid, res in results.items():
        assert res is not None and res.finished
        for c in res.outputs:
            cid = rid if len(res.outputs) == 1 else f"{rid}#{c.index}"
            assert streamed[cid] == c.text
            assert finish[cid] == c.finish_reason
            assert num_deltas[cid] == len(c.token_ids)
    assert results["s-stop"].text == base.text[:i]
    assert results["s-stop"].finish_reason == "stop"
    assert results["s-plain"].finish_reason == "length"
    assert len(results["s-n2"].outputs) == 2
    assert_all_free(llm)


# -- validation ---------------------------------------------------------------------------


def test_validation_errors_leave_engine_usable(llm):
    short = SamplingParams(temperature=0.0, max_tokens=3)
    good = llm.generate(PROMPT, short)[0]
    prompt_ids = llm.tokenizer.encode(PROMPT)
    vocab = llm.engine.config.model.vocab_size
    cases = [
        (lambda: SamplingParams(temperature=-0.5), "-0.5"),
        (lambda: SamplingParams(top_p=0.0), "0.0"),
        (lambda: SamplingParams(max_tokens=0), "got 0"),
        (lambda: llm.generate(PROMPT, SamplingParams(max_tokens=MAX_MODEL_LEN)), str(MAX_MODEL_LEN)),
        (lambda: llm.generate([[]], GREEDY), "empty"),
        (lambda: llm.generate([prompt_ids + [vocab]], GREEDY), str(vocab)),
        (lambda: llm.generate([prompt_ids + [vocab + 1000]], GREEDY), str(vocab + 1000)),
        (lambda: llm.generate([[-3] + prompt_ids], GREEDY), "-3"),
        (lambda: llm.generate(PROMPT, SamplingParams(stop_token_ids=[vocab])), str(vocab)),
        (lambda: llm.generate([PROMPT, PROMPT], [GREEDY]), "2 prompts"),
    ]
    for make, needle in cases:
        with pytest.raises(ValueError) as info:
            make()
        assert needle in str(info.value), (needle, str(info.value))
        assert_all_free(llm)
        again = llm.generate(PROMPT, short)[0]
        assert again.token_ids == good.token_ids and again.text == good.text
        assert_all_free(llm)

    # prompt + max_tokens exactly at the context length is accepted (queued, then aborted).
    llm.engine.add_request("at-limit", prompt_ids, SamplingParams(max_tokens=MAX_MODEL_LEN - len(prompt_ids)))
    assert llm.engine.has_unfinished
    llm.engine.abort_request("at-limit")
    assert_all_free(llm)


def test_invalid_prompt_in_batch_queues_nothing(llm):
    eng = llm.engine
    vocab = eng.config.model.vocab_size
    batch = [PROMPT, OTHER_PROMPTS[0], [1, 2, vocab + 7], OTHER_PROMPTS[1]]
    with pytest.raises(ValueError, match=str(vocab + 7)):
        llm.generate(batch, GREEDY)
    assert not eng.has_unfinished
    assert not eng.scheduler.waiting and not eng.scheduler.running
    assert_all_free(llm)
    out = llm.generate(PROMPT, GREEDY)[0]
    assert out.finish_reason == "length" and len(out.token_ids) == GREEDY.max_tokens
    assert_all_free(llm)


def test_bad_processor_parameters_raise_and_serving_goes_on(llm):
    vocab = llm.engine.config.model.vocab_size
    bad = [
        (dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=-3), "frequency_penalty"),
        (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(logit_bias={5: 101}), "logit_bias"),
        (dict(min_tokens=9, max_tokens=4), "min_tokens"),
    ]
    for kw, name in bad:
        with pytest.raises(ValueError, match=name):
            SamplingParams(**kw)
    for kw, name in [(dict(logit_bias={vocab: 1.0}), "logit_bias"), (dict(allowed_token_ids=[vocab + 2]), "allowed"),
                     (dict(allowed_token_ids=[3], banned_token_ids=[3]), "no token could be sampled")]:
        with pytest.raises(ValueError, match=name):
            llm.generate(PROMPT, SamplingParams(max_tokens=2, **kw))
    assert_all_free(llm)
    # min_tokens holds EOS back; allowed_token_ids and logit_bias steer every token.
    eos = min(llm.engine.eos_token_ids)
    out = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=8, min_tokens=5, logit_bias={eos: 100.0}))[0]
    assert out.token_ids == [*out.token_ids[:5], eos] and eos not in out.token_ids[:5]
    out = llm.generate(PROMPT, SamplingParams(temperature=1.0, seed=1, max_tokens=16, allowed_token_ids=[7, 9, 11],
                                              ignore_eos=True))[0]
    assert set(out.token_ids) <= {7, 9, 11}
    assert_all_free(llm)


def test_request_id_collisions_and_api_misuse(llm):
    eng = llm.engine
    short = SamplingParams(temperature=0.0, max_tokens=2)
    ids = eng.add_request("dup", PROMPT, SamplingParams(n=2, temperature=0.0, max_tokens=2))
    # Neither the group id nor a completion id ("dup#0") may be reused while it is live.
    for rid in ("dup", "dup#0", "dup#1"):
        with pytest.raises(ValueError, match="duplicate request_id"):
            eng.add_request(rid, OTHER_PROMPTS[0], short)
    eng.add_request("solo#1", OTHER_PROMPTS[0], short)
    with pytest.raises(ValueError, match="duplicate request_id"):
        eng.add_request("solo", OTHER_PROMPTS[0], SamplingParams(n=2, max_tokens=2))
    while eng.has_unfinished:
        eng.step()
    assert eng.take_finished("dup#0", []) is None
    dup = eng.take_finished("dup", ids)
    solo = eng.take_finished("solo#1", [])
    ref_dup, ref_solo = llm.generate([PROMPT, OTHER_PROMPTS[0]], short)
    assert [c.token_ids for c in dup.outputs] == [ref_dup.token_ids] * 2
    assert [c.text for c in dup.outputs] == [ref_dup.text] * 2
    assert solo.token_ids == ref_solo.token_ids and solo.text == ref_solo.text
    assert_all_free(llm)

    # Sampling params list shorter than the prompts (even empty) is an error, not a default.
    with pytest.raises(ValueError, match="2 prompts but 0 sampling params"):
        llm.generate([PROMPT, PROMPT], [])
    # next_token_logits with one bad prompt leaves nothing queued.
    with pytest.raises(ValueError, match=str(eng.config.model.vocab_size)):
        llm.next_token_logits([PROMPT, [eng.config.model.vocab_size]])
    assert_all_free(llm)
    assert len(llm.next_token_logits([PROMPT])) == 1
    assert_all_free(llm)


# -- abort -------------------------------------------------------------------------------


def test_abort_in_every_phase(tiny_model_dir, llm):
    tok = llm.tokenizer
    long_ids = tok.encode(LONG_TEXT)
    short_ids = tok.encode(PROMPT)
    fork_ids = tok.encode("Forked completions: " + LONG_TEXT)  # no prefix-cache hit on long_ids
    params = SamplingParams(temperature=0.0, max_tokens=6)
    reference = llm.generate([short_ids, long_ids], params)
    assert_all_free(llm)

    with _make_llm(tiny_model_dir, num_kv_blocks=64, prefill_chunk_size=16, max_num_seqs=2) as small:
        eng = small.engine
        sched = eng.scheduler
        eng.add_request("decoding", short_ids, params)
        eng.add_request("prefilling", long_ids, params)
        eng.add_request("waiting", long_ids, params)
        eng.add_request("later", short_ids, params)
        eng.add_request("forks", fork_ids, SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=4))
        for _ in range(2):
            eng.step()
        reqs = sched.requests
        assert reqs["decoding"] in sched.running and not reqs["decoding"].is_prefilling
        assert reqs["decoding"].output_token_ids
        assert reqs["prefilling"] in sched.running and reqs["prefilling"].is_prefilling
        assert 0 < reqs["prefilling"].num_computed_tokens < len(long_ids)
        assert reqs["waiting"] in sched.waiting and not eng.kv.block_ids("waiting")

        eng.abort_request("prefilling")
        eng.abort_request("decoding")
        eng.abort_request("waiting")
        eng.abort_request("no-such-request")  # unknown ids are ignored
        assert not any(r in sched.requests for r in ("prefilling", "decoding", "waiting"))

        # "later" and the n=3 parent are admitted now; abort the n=3 request mid-prefill,
        # while its siblings are still waiting to fork.
        for _ in range(2):
            eng.step()
        assert sched.requests["forks#0"].is_prefilling
        assert 0 < sched.requests["forks#0"].num_computed_tokens < len(fork_ids)
        eng.abort_request("forks")
        assert not any(r.startswith("forks") for r in sched.requests)

        while eng.has_unfinished:
            eng.step()
        later = eng.take_finished("later", short_ids)
        assert later is not None and later.token_ids == reference[0].token_ids
        for rid in ("prefilling", "decoding", "waiting", "forks"):
            assert eng.take_finished(rid, []) is None
        assert_all_free(small)

        # The engine still serves new requests correctly.
        fresh = small.generate([short_ids, long_ids], params)
        assert [o.token_ids for o in fresh] == [o.token_ids for o in reference]
        assert_all_free(small)


# -- preemption ----------------------------------------------------------------------------


def test_preemption_with_sampling_matches_roomy_pool(tiny_model_dir):
    prompts = [PROMPT, *OTHER_PROMPTS]
    params = [
        SamplingParams(n=2, temperature=0.8, seed=100, max_tokens=24),
        SamplingParams(temperature=0.8, seed=101, max_tokens=24),
        SamplingParams(temperature=1.0, top_k=50, seed=102, max_tokens=24),
        SamplingParams(temperature=0.0, max_tokens=24),
    ]

    with _make_llm(tiny_model_dir, num_kv_blocks=64) as roomy:
        expected = roomy.generate(prompts, params)
        assert_all_free(roomy)

    with _make_llm(tiny_model_dir, num_kv_blocks=5) as tight:
        preempted: list[str] = []
        schedule = tight.engine.scheduler.schedule

        def spy():
            out = schedule()
            preempted.extend(out.preempted_ids)
            return out

        tight.engine.scheduler.schedule = spy
        got = tight.generate(prompts, params)
        assert preempted, "the tight pool should have forced preemption"
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert len(g.outputs) == len(e.outputs)
            for gc, ec in zip(g.outputs, e.outputs):
                assert gc.finish_reason == "length" and len(gc.token_ids) == 24
                assert gc.token_ids == ec.token_ids
                assert gc.text == ec.text
        assert len({tuple(c.token_ids) for c in got[0].outputs}) == 2
        assert_all_free(tight)


# -- chat ----------------------------------------------------------------------------------


def test_chat_template_generate(llm):
    tok = llm.tokenizer
    messages = [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is a list?"},
    ]
    text = tok.apply_chat_template(messages)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tok.encode_chat(messages)
    assert ids == tok.encode(text, add_special_tokens=False)
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    out = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=8))[0]
    assert out.prompt_token_ids == ids
    assert out.finish_reason == "length" and len(out.token_ids) == 8
    assert out.text == tok.decode(out.token_ids)
    assert_all_free(llm)


# -- KV events -----------------------------------------------------------------------------


def test_kv_events_match_prompt_block_hashes(llm):
    kv = llm.engine.kv
    kv.take_events()  # drop whatever earlier tests left
    prompt = "Unique prompt for kv events: " + LONG_TEXT
    prompt_ids = llm.tokenizer.encode(prompt)
    expected = block_hashes(prompt_ids, BLOCK_SIZE)
    assert len(expected) >= 2

    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=4))[0]
    assert out.num_cached_tokens == 0
    stored = [e for e in kv.take_events() if isinstance(e, BlockStored)]
    assert stored
    hashes = [h for e in stored for h in e.block_hashes]
    tokens = [t for e in stored for t in e.token_ids]
    assert hashes[: len(expected)] == expected
    assert tokens[: len(expected) * BLOCK_SIZE] == prompt_ids[: len(expected) * BLOCK_SIZE]
    assert stored[0].parent_block_hash is None and stored[0].block_size == BLOCK_SIZE
    for prev, ev in zip(stored, stored[1:]):
        assert ev.parent_block_hash == prev.block_hashes[-1]

    # The same prompt again hits the cache and stores nothing new for the prompt.
    again = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=4))[0]
    assert again.token_ids == out.token_ids
    num_hit = (len(prompt_ids) - 1) // BLOCK_SIZE
    assert again.num_cached_tokens == num_hit * BLOCK_SIZE
    restored = {h for e in kv.take_events() if isinstance(e, BlockStored) for h in e.block_hashes}
    assert not restored & set(expected[:num_hit])

    # A cache salt changes the hashes (tenants do not share blocks).
    salted = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=4, cache_salt="tenant-a"))[0]
    assert salted.num_cached_tokens == 0 and salted.token_ids == out.token_ids
    salted_hashes = [h for e in kv.take_events() if isinstance(e, BlockStored) for h in e.block_hashes]
    assert salted_hashes[: len(expected)] == block_hashes(prompt_ids, BLOCK_SIZE, extra_keys=b"tenant-a")
    assert_all_free(llm)


def test_final_deltas_carry_the_prefix_cache_hit(llm):
    """Each completion's final delta says how many prompt tokens the prefix cache served
    (what the decode worker reports as usage); every other delta says 0."""
    eng = llm.engine
    prompt_ids = llm.tokenizer.encode("Cached-token deltas: " + LONG_TEXT)
    num_hit = (len(prompt_ids) - 1) // BLOCK_SIZE * BLOCK_SIZE
    assert num_hit >= 2 * BLOCK_SIZE

    def run(rid: str, params: SamplingParams, stream: bool) -> dict[str, list]:
        eng.add_request(rid, prompt_ids, params, stream=stream)
        deltas: dict[str, list] = defaultdict(list)
        while eng.has_unfinished:
            for d in eng.step():
                deltas[d.request_id].append(d)
        assert eng.take_finished(rid, prompt_ids) is not None
        return deltas

    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    (first,) = run("cached-0", params, stream=True).values()
    assert [d.num_cached_tokens for d in first] == [0] * 4
    (again,) = run("cached-1", params, stream=True).values()
    assert [d.num_cached_tokens for d in again] == [0, 0, 0, num_hit] and again[-1].finish_reason == "length"
    (whole,) = run("cached-2", params, stream=False).values()  # one delta: the final one
    assert len(whole) == 1 and whole[0].num_cached_tokens == num_hit
    forks = run("cached-n3", SamplingParams(n=3, temperature=1.0, seed=2, max_tokens=3), stream=True)
    assert sorted(forks) == ["cached-n3#0", "cached-n3#1", "cached-n3#2"]
    assert all([d.num_cached_tokens for d in ds] == [0, 0, num_hit] for ds in forks.values())
    assert_all_free(llm)


# -- output processing next to the forward ----------------------------------------------


def _stream(llm: LLM, prompts, params) -> dict[str, tuple[str, list[int], str, object]]:
    """Run requests through engine.step() with streamed text; per request: the concatenated
    text deltas, tokens, finish reason and stop reason."""
    eng = llm.engine
    text: dict[str, list[str]] = defaultdict(list)
    ids = []
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        rid = f"s{i}"
        eng.add_request(rid, prompt, p, stream=True)
        ids.append(rid)
    results = {}
    while eng.has_unfinished:
        for d in eng.step():
            text[d.request_id].append(d.text)
        for rid in ids:
            if rid not in results:
                out = eng.take_finished(rid, [])
                if out is not None:
                    o = out.outputs[0]
                    assert "".join(text[rid]) == o.text  # streamed deltas add up to the text
                    results[rid] = (o.text, o.token_ids, o.finish_reason, o.stop_reason)
    return results


def test_text_next_to_the_forward_is_exact(tiny_model_dir, llm):
    """With the previous step's text processed during the next forward, a stop string found
    there drops the token already computed after it: outputs equal the sequential engine's."""
    base = llm.generate(OTHER_PROMPTS, SamplingParams(temperature=0.0, max_tokens=24))
    prompts, params = [], []
    for prompt, b in zip(OTHER_PROMPTS, base):
        _, stop = _first_new_substring(b.text, 3, len(b.text) // 2)
        prompts += [prompt, prompt]
        params += [SamplingParams(temperature=0.0, max_tokens=24, stop=[stop, "never-xyz"]),
                   SamplingParams(temperature=0.7, seed=5, max_tokens=20)]
    overlapped = _stream(llm, prompts, params)
    with _make_llm(tiny_model_dir, overlap_output_processing=False) as sequential:
        expected = _stream(sequential, prompts, params)
        assert_all_free(sequential)
    assert overlapped == expected
    assert sum(r[2] == "stop" for r in overlapped.values()) >= 3
    assert_all_free(llm)
