"""A completion resumed on another engine continues exactly (``Resume``).

The argument the gateway's migration rests on: an engine admitting a request with the
first k output tokens as ``Resume`` (and the number of characters the client has) rebuilds
the same state the first engine had after those tokens (positions, seeded draws,
penalties, ``min_tokens``, the detokenizer's window and held-back bytes, the stop-string
tail it held back) and streams exactly the rest. Each case cuts an uninterrupted stream
at several points and checks tokens + text + finish reason, token for token and
character for character, then that no block leaked. One case resumes through a remote
prefill (a second engine computes the prompt and the resumed tokens, its KV is copied
over, and its sampled token is dropped).
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from pdserve.engine import LLM, SamplingParams
from pdserve.engine.request import Resume, completion_seed
from pdserve.engine.rng import wrap_seed
from pdserve.engine.tiny_model import ensure_tiny_model

_ids = itertools.count()


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    with LLM(ensure_tiny_model(tmp_path_factory.getbasetemp() / "tiny_model"), num_kv_blocks=128) as engine:
        yield engine


def run(engine, prompt, params, resume=None, remote=None):
    """Stream one request; its deltas per completion index."""
    rid = f"r{next(_ids)}"
    engine.add_request(rid, prompt, params, resume=resume, remote_prefill=remote is not None)
    out: dict[int, list] = {}
    while engine.has_unfinished:
        for rp in engine.take_remote_prefills():
            remote(rp)
        for d in engine.step():
            out.setdefault(d.index, []).append(d)
    engine.take_finished(rid, [])
    return out


def check_cuts(llm, prompt, params, cuts, remote=None):
    """Resume every completion of ``params`` at each cut; each must equal the whole run."""
    whole = run(llm.engine, prompt, params)
    one = dataclasses.replace(params, n=1)
    for index, deltas in whole.items():
        assert all(len(d.token_ids) == 1 for d in deltas)
        tokens = [d.token_ids[0] for d in deltas]
        for k in cuts:
            sent = "".join(d.text for d in deltas[:k])
            rest = run(llm.engine, prompt, one, Resume(tuple(tokens[:k]), index, len(sent)), remote)[0]
            assert tokens[:k] + [t for d in rest for t in d.token_ids] == tokens, (index, k)
            assert sent + "".join(d.text for d in rest) == "".join(d.text for d in deltas), (index, k)
            assert rest[-1].finish_reason == deltas[-1].finish_reason
            if params.logprobs is not None:  # the same tokens; values to float error (the KV was prefilled)
                got, want = [lp for d in rest for lp in d.logprobs], [lp for d in deltas[k:] for lp in d.logprobs]
                assert [sorted(g) for g in got] == [sorted(w) for w in want]
                assert [v for g in got for v in g.values()] == pytest.approx([v for w in want for v in w.values()],
                                                                            abs=1e-4)
    s = llm.kv_cache_stats()
    assert s.num_free_blocks == s.num_total_blocks
    return whole


def test_seeded_siblings_with_penalties_continue_exactly(llm):
    prompt = llm.tokenizer.encode("The quick brown fox")
    params = SamplingParams(n=2, temperature=1.0, seed=11, max_tokens=12, ignore_eos=True, presence_penalty=0.5,
                            frequency_penalty=0.3, repetition_penalty=1.2, min_tokens=8, stop_token_ids=(70,),
                            logprobs=1)
    whole = check_cuts(llm, prompt, params, cuts=(0, 7))
    assert [d.token_ids for d in whole[0]] != [d.token_ids for d in whole[1]]
    assert completion_seed(2**63 - 1, 1) == wrap_seed(2**63 - 1 + 1_000_003)


def test_bytes_of_a_character_split_across_the_cut(llm):
    """Only the byte tokens of é € 😀 and two letters: the stream holds bytes back while
    a character is incomplete; cuts fall where something is held."""
    allowed = (127, 102, 158, 224, 105, 5464, 246, 222, 70, 71)
    prompt = llm.tokenizer.encode("The quick brown fox")
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=14, ignore_eos=True, allowed_token_ids=allowed)
    whole = run(llm.engine, prompt, params)[0]
    held = [k for k in range(1, len(whole)) if whole[k - 1].text == ""][:2]
    assert len(held) == 2, [d.text for d in whole]
    check_cuts(llm, prompt, params, cuts=held)


def test_stop_string_begun_before_the_cut_completes_after_it(llm):
    prompt = llm.tokenizer.encode("The quick brown fox")
    params = SamplingParams(temperature=1.0, seed=21, max_tokens=16, ignore_eos=True)
    tokens = [d.token_ids[0] for d in run(llm.engine, prompt, params)[0]]
    ends = [len(llm.tokenizer.decode(tokens[: k + 1])) for k in range(len(tokens))]
    text = llm.tokenizer.decode(tokens)
    start, end = ends[5] - 2, ends[8] + 1  # begins in token 5, completes in token 9
    stop = text[start:end]
    assert text.find(stop) == start
    stopped = dataclasses.replace(params, stop=(stop, "NEVER" + "~" * 20))
    whole = check_cuts(llm, prompt, stopped, cuts=(6, 7, 8, 9))
    assert whole[0][-1].finish_reason == "stop" and "".join(d.text for d in whole[0]) == text[:start]


def test_resumed_through_a_remote_prefill(llm, tmp_path_factory):
    """The decode engine admits the resumed request waiting for KV of prompt + resumed
    tokens; a prefill engine computes them; the decode engine drops the prefill's token and
    computes the last resumed token itself, so the seeded stream goes on exactly."""
    with LLM(ensure_tiny_model(tmp_path_factory.getbasetemp() / "tiny_model"), num_kv_blocks=128) as p:
        def remote(rp):
            rid = rp.request.request_id
            assert rp.request.is_resumed and len(rp.block_ids) * 16 >= rp.request.num_tokens - rp.first_block_index * 16
            p.engine.add_prefill_only(rid, rp.request.all_token_ids, rp.request.sampling_params)
            while not any(d.finish_reason for d in p.engine.step()):
                pass
            p.engine.take_finished(rid, [])
            src = p.engine.block_ids(rid)[rp.first_block_index:]
            llm.engine.executor.runner.kv_cache[:, rp.block_ids] = p.engine.executor.runner.kv_cache[:, src]
            assert p.engine.release(rid)
            assert llm.engine.complete_remote_prefill(rid, 0) is None  # the prefill's token is dropped

        prompt = llm.tokenizer.encode("Return a new list containing all items from the iterable")
        params = SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=10, ignore_eos=True, frequency_penalty=0.4)
        check_cuts(llm, prompt, params, cuts=(0, 6), remote=remote)
        s = p.kv_cache_stats()
        assert s.num_free_blocks == s.num_total_blocks


@pytest.mark.parametrize("change, message", [
    (dict(n=2), "n = 1"),
    (dict(prompt_logprobs=1), "prompt logprobs"),
    (dict(max_tokens=3), "nothing to generate"),
    (dict(stop_token_ids=(70,)), "ends the completion"),
])
def test_resumes_that_cannot_continue_are_refused(llm, change, message):
    params = dataclasses.replace(SamplingParams(max_tokens=8, ignore_eos=True), **change)
    with pytest.raises(ValueError, match=message):
        llm.engine.add_request(f"r{next(_ids)}", [5, 6, 7], params, resume=Resume((70, 71, 72)))
    assert not llm.engine.has_unfinished


def test_a_text_length_the_tokens_do_not_commit_is_refused(llm):
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    with pytest.raises(ValueError, match="characters"):
        llm.engine.add_request(f"r{next(_ids)}", [5, 6, 7], params, resume=Resume((70, 71), 0, text_len=5))
    with pytest.raises(ValueError, match="stop string"):
        stopped = dataclasses.replace(params, stop=(llm.tokenizer.decode([70, 71]),))
        llm.engine.add_request(f"r{next(_ids)}", [5, 6, 7], stopped, resume=Resume((70, 71)))
    assert not llm.engine.has_unfinished
