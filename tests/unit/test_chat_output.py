"""The gateway's answer assembly: reasoning, tool calls, echo and prompt logprobs in
OpenAI's shapes, streamed and whole alike (router/choices.py, router/responses.py)."""

from __future__ import annotations

import json
import random

import pytest

from pdserve.proto import pdserve_pb2 as pb
from pdserve.router.choices import ChatChoiceStream, ChatOutput, chat_message
from pdserve.router.generation import Delta
from pdserve.router.reasoning import get_reasoning_parser
from pdserve.router.responses import ResponseBuilder, prompt_logprobs_body
from pdserve.router.tool_parsers import get_tool_parser
from pdserve.router.tools import ChoiceMode, ToolChoice, parse_tools

TOOLS = parse_tools([{"type": "function", "function": {"name": "f", "parameters": {
    "type": "object", "properties": {"x": {"type": "integer"}}}}}])
AUTO = ChatOutput(TOOLS, ToolChoice(ChoiceMode.AUTO), get_tool_parser("hermes"), get_reasoning_parser("qwen3"))
TEXT = ('<think>\nLet me call f.\n</think>\n\nSure. <tool_call>\n{"name": "f", "arguments": {"x": 4}}\n</tool_call>'
        '<tool_call>\n{"name": "f", "arguments": {"x": 5}}\n</tool_call>')


def splits(text: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), rng.randrange(0, min(len(text) - 1, 40))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def gather(parts: list[dict]) -> dict:
    out = {"reasoning_content": "", "content": "", "calls": {}}
    for p in parts:
        out["reasoning_content"] += p.get("reasoning_content", "")
        out["content"] += p.get("content", "")
        for tc in p.get("tool_calls", []):
            call = out["calls"].setdefault(tc["index"], {"name": None, "arguments": ""})
            if "id" in tc:
                assert call["name"] is None  # id and name once, first
                call["name"] = tc["function"]["name"]
            call["arguments"] += tc["function"]["arguments"]
    return out


@pytest.mark.parametrize("seed", range(12))
def test_stream_and_whole_agree_for_any_split(seed):
    whole = chat_message(AUTO, TEXT)
    assert whole["reasoning_content"] == "Let me call f." and whole["content"] == "Sure. "
    assert [json.loads(c["function"]["arguments"]) for c in whole["tool_calls"]] == [{"x": 4}, {"x": 5}]
    stream = ChatChoiceStream(AUTO)
    parts = [p for piece in (splits(TEXT, seed) if seed else list(TEXT)) for p in stream.feed(piece)]
    parts += stream.finish()
    got = gather(parts)
    assert got["reasoning_content"] == whole["reasoning_content"] and got["content"] == whole["content"]
    assert [c["name"] for c in got["calls"].values()] == ["f", "f"]
    assert [json.loads(c["arguments"]) for c in got["calls"].values()] == [{"x": 4}, {"x": 5}]
    assert stream.has_tool_calls


def test_include_reasoning_false_drops_it_and_plain_output_is_untouched():
    spec = ChatOutput(reasoning=get_reasoning_parser("qwen3"), include_reasoning=False)
    assert chat_message(spec, "<think>x</think>hi") == {"role": "assistant", "content": "hi"}
    stream = ChatChoiceStream(spec)
    assert gather(stream.feed("<think>x</think>hi") + stream.finish())["reasoning_content"] == ""
    assert ChatOutput().is_plain and ChatOutput(TOOLS, ToolChoice(ChoiceMode.AUTO)).is_plain  # no parser


def deltas_of(text: str, index: int = 0, reason: str = "stop") -> list[Delta]:
    pieces = splits(text, 3)
    return [Delta(index, [1], p, [], reason if k == len(pieces) - 1 else None) for k, p in enumerate(pieces)]


def test_builder_streams_reasoning_and_tool_calls_and_finishes_with_tool_calls():
    b = ResponseBuilder(chat=True, request_id="r", model="m", num_choices=1, num_top_logprobs=None, token_text=str,
                        chat_output=AUTO)
    chunks = [c for d in deltas_of(TEXT) for c in b.chunks(d)]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    got = gather([c["choices"][0]["delta"] for c in chunks])
    assert got["reasoning_content"] == "Let me call f." and got["content"] == "Sure. " and len(got["calls"]) == 2
    whole = ResponseBuilder(chat=True, request_id="r", model="m", num_choices=1, num_top_logprobs=None,
                            token_text=str, chat_output=AUTO)
    for d in deltas_of(TEXT):
        whole.add(d)
    body = whole.body(5, 9)
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert body["choices"][0]["message"]["content"] == "Sure. "
    # Cut by max_tokens: "length" stays.
    cut = ResponseBuilder(chat=True, request_id="r", model="m", num_choices=1, num_top_logprobs=None,
                          token_text=str, chat_output=AUTO)
    for d in deltas_of(TEXT[:60], reason="length"):
        cut.add(d)
    assert cut.body(1, 1)["choices"][0]["finish_reason"] == "length"


def lps(actual: int, actual_lp: float, alternatives: dict[int, float]) -> pb.TokenLogprobs:
    return pb.TokenLogprobs(token_ids=[actual, *alternatives], logprobs=[actual_lp, *alternatives.values()])


def test_prompt_logprobs_body_ranks_only_what_it_knows():
    body = prompt_logprobs_body([lps(7, -0.5, {3: -0.1, 9: -2.0}),  # inside the top 3: rank 2
                                 lps(8, -5.0, {3: -0.1, 9: -2.0})], str)  # outside the top 2
    assert body[0] is None
    assert {k: v["rank"] for k, v in body[1].items()} == {"7": 2, "3": 1, "9": 3}
    assert {k: v["rank"] for k, v in body[2].items()} == {"8": None, "3": 1, "9": 2}
    assert body[1]["7"]["logprob"] == pytest.approx(-0.5) and body[1]["7"]["decoded_token"] == "7"


def echo_builder(prompt_lps, n=1, num_top=1):
    return ResponseBuilder(chat=False, request_id="r", model="m", num_choices=n, n=n, num_top_logprobs=num_top,
                           token_text=lambda t: f"<{t}>", echo=["PROMPT"], echo_token_ids=[[5, 6, 7]],
                           prompt_logprobs=prompt_lps.get)


def test_echo_whole_and_streamed_agree_and_streams_wait_for_the_prompt_logprobs():
    plp = {0: [lps(6, -1.0, {}), lps(7, -2.0, {})]}
    out = [pb.TokenLogprobs(token_ids=[9], logprobs=[-3.0])]
    whole = echo_builder(plp)
    whole.add(Delta(0, [9], "X", out, "length"))
    choice = whole.body(3, 1)["choices"][0]
    assert choice["text"] == "PROMPTX"
    assert choice["logprobs"]["tokens"] == ["<5>", "<6>", "<7>", "<9>"]
    assert choice["logprobs"]["token_logprobs"] == [None, -1.0, -2.0, -3.0]
    assert choice["logprobs"]["top_logprobs"][0] is None
    assert choice["logprobs"]["text_offset"] == [0, 3, 6, 6]  # the completion starts after the prompt text
    arrived: dict = {}
    streamed = echo_builder(arrived, n=2)
    assert streamed.chunks(Delta(1, [9], "Y", out, None)) == []  # held: its prompt's logprobs are not in yet
    arrived.update(plp)
    first = streamed.chunks(Delta(0, [9], "X", out, None))
    held = streamed.chunks(Delta(1, [4], "Z", out, "length"))
    assert [c["choices"][0]["text"] for c in first] == ["PROMPTX"]
    assert [c["choices"][0]["text"] for c in held] == ["PROMPTY", "Z"]
    assert held[0]["choices"][0]["logprobs"]["token_logprobs"] == [None, -1.0, -2.0, -3.0]
