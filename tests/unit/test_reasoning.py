"""Tests for pdserve.router.reasoning: whole splits, and streams that agree with them."""

from __future__ import annotations

import random

import pytest

from pdserve.router.reasoning import REASONING_PARSERS, ReasoningParser, get_reasoning_parser


def stream_split(parser: ReasoningParser, deltas: list[str]) -> tuple[str, str]:
    stream = parser.stream()
    reasoning: list[str] = []
    content: list[str] = []
    for out in [stream.feed(d) for d in deltas] + [stream.finish()]:
        r, c = out
        assert isinstance(r, str) and isinstance(c, str)
        reasoning.append(r)
        content.append(c)
    return "".join(reasoning), "".join(content)


def splits(text: str, rng: random.Random) -> list[list[str]]:
    out = [[text], list(text)]
    for _ in range(4):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 8)))) if len(text) > 1 else []
        bounds = [0, *cuts, len(text)]
        out.append([text[a:b] for a, b in zip(bounds, bounds[1:])])
    return out


QWEN3 = [
    ("<think>\nLet me think.\n</think>\n\nThe answer is 4.", "Let me think.", "The answer is 4."),
    ("<think>\n\n</think>\n\nHi", None, "Hi"),  # thinking switched off but the model wrote the block
    ("Hi there", None, "Hi there"),  # enable_thinking false: the prompt had the empty block
    ("  \n<think>a\nb</think>c", "a\nb", "c"),
    ("<think>cut off by max_tokens\n", "cut off by max_tokens", None),
    ("<think>x</think>", "x", None),
    ("The <think> tag later is content", None, "The <think> tag later is content"),
    ("<thin", None, "<thin"),
    ("  ", None, "  "),
    ("", None, None),
    ("<think>a</think>\n\n  b </think> c\n", "a", "  b </think> c\n"),
    ("<think>\n</thinking> is not the end\n\n</think>\nok", "</thinking> is not the end", "ok"),
]

DEEPSEEK_R1 = [
    ("Let me think.\n</think>\n\nThe answer is 4.", "Let me think.", "The answer is 4."),
    ("<think>\nLet me think.\n</think>\n\n4", "Let me think.", "4"),
    ("still thinking when cut", "still thinking when cut", None),
    ("</think>direct", None, "direct"),
    ("\n\n</think>\n\n", None, None),
    ("<thin", "<thin", None),
    ("", None, None),
    ("a <think> b</think>c", "a <think> b", "c"),
]


@pytest.mark.parametrize("name, cases", [("qwen3", QWEN3), ("deepseek_r1", DEEPSEEK_R1)])
def test_split_and_stream(name: str, cases: list[tuple[str, str | None, str | None]]) -> None:
    parser = get_reasoning_parser(name)
    rng = random.Random(name)
    for text, reasoning, content in cases:
        assert parser.split(text) == (reasoning, content), text
        for deltas in splits(text, rng):
            assert stream_split(parser, deltas) == (reasoning or "", content or ""), deltas


def random_output(rng: random.Random) -> str:
    pieces = ["<think>", "</think>", "<think", "</th", "\n", "\n\n", " ", "<", "a", "thought", "answer", "🙂", ">"]
    head = rng.choice(["", "<think>", "<think>\n", " \n<think>", "\n"])
    return head + "".join(rng.choice(pieces) for _ in range(rng.randint(0, 14)))


@pytest.mark.parametrize("name", sorted(REASONING_PARSERS))
def test_streams_equal_whole_split_for_random_outputs(name: str) -> None:
    parser = get_reasoning_parser(name)
    rng = random.Random(f"random-{name}")
    for _ in range(300):
        text = random_output(rng)
        reasoning, content = parser.split(text)
        for deltas in splits(text, rng):
            assert stream_split(parser, deltas) == (reasoning or "", content or ""), deltas


def test_stream_holds_back_only_what_may_be_a_tag() -> None:
    stream = get_reasoning_parser("qwen3").stream()
    assert stream.feed("\n<thi") == ("", "")
    assert stream.feed("nk>\n\nHmm") == ("Hmm", "")
    assert stream.feed(", ok\n") == (", ok", "")  # a trailing newline waits: it may precede </think>
    assert stream.feed("more</") == ("\nmore", "")
    assert stream.feed("think>\n\nAns") == ("", "Ans")
    assert stream.feed("wer</think>") == ("", "wer</think>")
    assert stream.finish() == ("", "")
    plain = get_reasoning_parser("qwen3").stream()
    assert plain.feed("Hello") == ("", "Hello")  # no block: content at once
    r1 = get_reasoning_parser("deepseek_r1").stream()
    assert r1.feed("Hmm") == ("Hmm", "")
    assert r1.feed("</think>") == ("", "")
    assert r1.finish() == ("", "")


def test_unknown_parser_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="deepseek_r1.*qwen3"):
        get_reasoning_parser("granite")
    assert all(get_reasoning_parser(name).name == name for name in REASONING_PARSERS)
