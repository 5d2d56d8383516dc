"""vLLM's text options of a completion, on the tiny model's real tokenizer and engine:
``include_stop_str_in_output``, ``spaces_between_special_tokens`` and the text of a token
that ends the completion (EOS, ``stop_token_ids``), streamed and not, equal."""

from __future__ import annotations

import random

import pytest

from pdserve.engine import LLM, SamplingParams
from pdserve.engine.output_processor import CompletionText
from pdserve.engine.tiny_model import ensure_tiny_model
from pdserve.engine.tokenizer import Tokenizer

PROMPT = "def sort(items, key=None):"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return ensure_tiny_model(tmp_path_factory.getbasetemp() / "tiny_model")


@pytest.fixture(scope="module")
def tok(model_dir) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="module")
def llm(model_dir):
    with LLM(model_dir, num_kv_blocks=64) as engine:
        yield engine


def spaced(tok: Tokenizer, ids: list[int]) -> str:
    """Hugging Face's slow decode with spaces_between_special_tokens: runs of ordinary
    tokens decoded alone, added tokens as they are, the non-empty parts joined by spaces."""
    parts, run = [], []
    for t in ids + [None]:
        if t is None or t in tok.added_token_ids:
            text = tok.decode(run, skip_special_tokens=False)
            parts += [text] if text else []
            run = []
            if t is not None:
                parts.append(tok.decode([t], skip_special_tokens=False))
        else:
            run.append(t)
    return " ".join(parts)


def feed(text: CompletionText, ids: list[int]) -> tuple[list[str], str, int]:
    """Append ``ids`` (the last one finishing); (deltas, final text, tokens consumed)."""
    deltas = []
    for n, t in enumerate(ids, 1):
        stopped = text.append(t, finished=n == len(ids))
        deltas.append(text.take_delta())
        if stopped:
            return deltas, text.final_text(ids[:n]), n
    return deltas, text.final_text(ids), len(ids)


def mixed_ids(tok: Tokenizer, seed: int, n: int = 40) -> list[int]:
    rng = random.Random(seed)
    ordinary = tok.encode(" hello wörld 日本 x=1", add_special_tokens=False)
    added = sorted(tok.added_token_ids)
    return [rng.choice(added) if rng.random() < 0.3 else rng.choice(ordinary) for _ in range(n)]


@pytest.mark.parametrize("seed", range(6))
def test_spaces_between_special_tokens_streamed_and_not(tok, seed):
    ids = mixed_ids(tok, seed)
    for prompt in ([], tok.encode("Q: "), tok.encode("Q: ") + [sorted(tok.added_token_ids)[0]]):
        for stream in (True, False):
            on = CompletionText(tok, prompt, (), False, stream, spaces_between_special_tokens=True)
            off = CompletionText(tok, prompt, (), False, stream, spaces_between_special_tokens=False)
            deltas_on, final_on, _ = feed(on, ids)
            deltas_off, final_off, _ = feed(off, ids)
            assert final_on == spaced(tok, ids) and final_off == tok.decode(ids, skip_special_tokens=False)
            if stream:
                assert "".join(deltas_on) == final_on and "".join(deltas_off) == final_off


def test_spaces_only_matter_when_special_tokens_are_kept(tok):
    ids = mixed_ids(tok, 7)
    for spaces in (True, False):
        text = CompletionText(tok, [], (), True, True, spaces_between_special_tokens=spaces)
        assert feed(text, ids)[1] == tok.decode(ids)  # skipped: nothing to set apart


def test_include_stop_str_keeps_the_stop_and_streams_without_holding_back(tok):
    ids = tok.encode(" the quick brown fox jumps over the lazy dog", add_special_tokens=False)
    full = tok.decode(ids)
    for stop in ("brown f", "fox", " the lazy", "o"):
        cut = full.index(stop)
        plain = CompletionText(tok, [], [stop, "never"], True, True)
        kept = CompletionText(tok, [], [stop, "never"], True, True, include_stop_str_in_output=True)
        deltas, final, n = feed(plain, ids)
        assert final == full[:cut] == "".join(deltas)
        deltas, final, m = feed(kept, ids)
        assert final == full[: cut + len(stop)] == "".join(deltas) and m == n
        assert kept.stop_string == stop
        # Nothing is held back: after each token all the text so far is out.
        for k in range(1, m):
            assert "".join(deltas[:k]) == tok.decode(ids[:k])


def test_a_stop_token_adds_no_text_unless_included(tok):
    ids = tok.encode(" done", add_special_tokens=False) + tok.encode(" now", add_special_tokens=False)
    last = ids[-1]
    for stream in (True, False):
        dropped = CompletionText(tok, [], (), True, stream, stop_token_ids={last})
        kept = CompletionText(tok, [], (), True, stream, stop_token_ids={last}, include_stop_str_in_output=True)
        assert feed(dropped, ids)[1] == tok.decode(ids[:-1]) and feed(kept, ids)[1] == tok.decode(ids)


# -- the engine ----------------------------------------------------------------------------


def stream_text(llm: LLM, params: SamplingParams) -> tuple[str, list[int]]:
    """Run one request with a delta per token (as a worker does): (joined deltas, token ids)."""
    engine = llm.engine
    engine.add_request("streamed", PROMPT, params, stream=True)
    text, ids = "", []
    while engine.has_unfinished:
        for d in engine.step():
            text += d.text
            ids += d.token_ids
    engine.take_finished("streamed", [])
    return text, ids


def test_engine_include_stop_str_in_output(llm):
    base = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))[0].text
    stop = base[len(base) // 2 : len(base) // 2 + 3]
    cut = base.index(stop)
    for include in (False, True):
        p = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, stop=[stop],
                           include_stop_str_in_output=include)
        out = llm.generate(PROMPT, p)[0]
        expected = base[: cut + len(stop)] if include else base[:cut]
        assert out.text == expected and out.finish_reason == "stop" and out.outputs[0].stop_reason == stop
        assert stream_text(llm, p)[0] == expected


def test_engine_stop_token_text_and_special_token_spacing(llm, tok):
    added = sorted(tok.added_token_ids)
    ordinary = tok.encode(" a b", add_special_tokens=False)
    eos = sorted(llm.engine.eos_token_ids)
    specials = [t for t in added if t not in eos][:2]
    # Seeded sampling among a few tokens gives ordinary and special tokens mixed.
    mix = dict(temperature=1.0, seed=3, max_tokens=24, allowed_token_ids=ordinary + specials, ignore_eos=True)
    for spaces in (True, False):
        p = SamplingParams(skip_special_tokens=False, spaces_between_special_tokens=spaces, **mix)
        out = llm.generate(PROMPT, p)[0]
        assert set(out.token_ids) & set(specials) and set(out.token_ids) & set(ordinary)
        expected = spaced(tok, out.token_ids) if spaces else tok.decode(out.token_ids, skip_special_tokens=False)
        assert out.text == expected
        assert stream_text(llm, p) == (expected, out.token_ids)
    # A stop token ends the completion; its text is left out unless included.
    stop_id = specials[0]
    for include in (False, True):
        p = SamplingParams(skip_special_tokens=False, spaces_between_special_tokens=False, stop_token_ids=[stop_id],
                           include_stop_str_in_output=include, **mix)
        out = llm.generate(PROMPT, p)[0]
        assert out.finish_reason == "stop" and out.token_ids[-1] == stop_id
        kept = out.token_ids if include else out.token_ids[:-1]
        assert out.text == tok.decode(kept, skip_special_tokens=False)
        assert stream_text(llm, p)[0] == out.text
