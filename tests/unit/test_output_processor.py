"""A completion's text (engine/output_processor.py) with the tiny model's real tokenizer:
bounded stop-string search and hold-back, and the one-shot decode of offline requests."""

from __future__ import annotations

import random

import pytest

from pdserve.engine.output_processor import CompletionText
from pdserve.engine.tiny_model import ensure_tiny_model
from pdserve.engine.tokenizer import IncrementalDetokenizer, Tokenizer

TEXT = "Emoji: 🙂🚀 日本語, def f(x): return x ** 2 </answer> and more text after the end."


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    t = Tokenizer.from_dir(ensure_tiny_model(tmp_path_factory.getbasetemp() / "tiny_model"))
    assert t is not None
    return t


def _incremental(tok, prompt, ids) -> str:
    detok = IncrementalDetokenizer(tok, prompt)
    return "".join(detok.append(t) for t in ids) + detok.flush()


def test_one_decode_at_finish_equals_the_incremental_text(tok):
    rng = random.Random(0)
    prompts = [tok.encode("Prompt: "), tok.encode("日本"), [], tok.encode(TEXT)[:7]]
    outputs = [tok.encode(TEXT, add_special_tokens=False)]
    outputs += [[rng.randrange(tok.vocab_size) for _ in range(n)] for n in (1, 5, 40, 200)]
    for prompt in prompts:
        for ids in outputs:
            text = CompletionText(tok, prompt, (), True, stream=False)
            assert not text.incremental
            assert text.final_text(ids) == _incremental(tok, prompt, ids)


def _run(tok, ids, stop, stream=True):
    """Feed ``ids``; returns (streamed deltas, final text, stop string, tokens consumed)."""
    text = CompletionText(tok, tok.encode("Q: "), stop, True, stream=stream)
    deltas = []
    for n, t in enumerate(ids, 1):
        stopped = text.append(t, finished=n == len(ids))
        deltas.append(text.take_delta())
        if stopped:
            return deltas, text.final_text(ids[:n]), text.stop_string, n
    return deltas, text.final_text(ids), None, len(ids)


def test_stop_string_cut_and_hold_back_is_bounded(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    full = _incremental(tok, tok.encode("Q: "), ids)
    stops = ["</answer>", "never-appears", "zz"]
    hold = max(len(s) for s in stops) - 1
    deltas, final, which, n = _run(tok, ids, stops)
    assert which == "</answer>" and final == full[: full.index("</answer>")]
    assert "".join(deltas) == final  # nothing streamed that the cut took back
    # While running, at most len(longest stop) - 1 characters are held back.
    seen = ""
    for k in range(1, n):
        seen += deltas[k - 1]
        decoded = _incremental(tok, tok.encode("Q: "), ids[:k])
        assert len(decoded) - len(seen) <= hold + 3  # + a split UTF-8 character the detokenizer holds
    assert n < len(ids)


def test_stop_string_split_across_many_tokens_and_earliest_wins(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    full = _incremental(tok, tok.encode("Q: "), ids)
    for stops in (["x ** 2 </ans", "return"], ["return", "x ** 2 </ans"], ["ore text after the end."]):
        _, final, which, _ = _run(tok, ids, stops)
        first = min((full.find(s), s) for s in stops if s in full)
        assert which == first[1] and final == full[: first[0]]


def test_no_stop_strings_stream_everything_at_once(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    deltas, final, which, n = _run(tok, ids, ())
    assert which is None and n == len(ids)
    assert "".join(deltas) == final == _incremental(tok, tok.encode("Q: "), ids)


def test_per_token_work_does_not_grow_with_the_output(tok, monkeypatch):
    """The stop search only ever sees the held-back tail plus the new text."""
    from pdserve.engine import tokenizer as tokenizer_module

    seen_lengths = []
    real_check = tokenizer_module.StopStringMatcher.check

    def check(self, text, num_new):
        seen_lengths.append(len(text))
        return real_check(self, text, num_new)

    monkeypatch.setattr(tokenizer_module.StopStringMatcher, "check", check)
    ids = tok.encode(TEXT * 20, add_special_tokens=False)
    _run(tok, ids, ["never-appears-anywhere"])
    assert max(seen_lengths) < len("never-appears-anywhere") + 64
