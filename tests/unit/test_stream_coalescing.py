"""Merging the deltas a lagging reader missed: the engine side (``AsyncEngine``, one
delta per completion) and the gateway side (one SSE chunk per choice, one write)."""

from __future__ import annotations

import asyncio
import json

from pdserve.engine.async_engine import coalesce as coalesce_completions
from pdserve.engine.outputs import CompletionDelta
from pdserve.proto import pdserve_pb2 as pb
from pdserve.router.app import _SSEResponse
from pdserve.router.generation import Delta
from pdserve.router.generation import coalesce as coalesce_choices
from pdserve.router.responses import ResponseBuilder


def test_engine_deltas_merge_per_completion_in_order():
    lp = [{7: -0.1}, {8: -0.2}, {9: -0.3}]
    deltas = [
        CompletionDelta("r#0", 0, [7], "a", [lp[0]], None),
        CompletionDelta("r#1", 1, [5], "x", None, None),
        CompletionDelta("r#0", 0, [8], "", [lp[1]], None),  # text held back this step
        CompletionDelta("r#1", 1, [6], "y", None, "stop"),
        CompletionDelta("r#0", 0, [9], "bc", [lp[2]], None),
        CompletionDelta("r#0", 0, [], "", None, "error", "boom"),  # aborted: no token, no logprobs
    ]
    merged = coalesce_completions(deltas)
    assert merged == [
        CompletionDelta("r#0", 0, [7, 8, 9], "abc", lp, "error", "boom"),
        CompletionDelta("r#1", 1, [5, 6], "xy", None, "stop"),
    ]
    one_step = deltas[:2]
    assert coalesce_completions(one_step) == one_step


def test_engine_deltas_keep_the_final_deltas_cached_token_count():
    deltas = [CompletionDelta("r", 0, [7], "a", None, None),
              CompletionDelta("r", 0, [8], "b", None, "length", num_cached_tokens=32)]
    assert coalesce_completions(deltas) == [CompletionDelta("r", 0, [7, 8], "ab", None, "length",
                                                            num_cached_tokens=32)]


def test_gateway_deltas_merge_per_choice_in_order():
    lps = [pb.TokenLogprobs(token_ids=[t], logprobs=[-float(t)]) for t in range(4)]
    deltas = [Delta(1, [0], "a", [lps[0]], None), Delta(0, [1], "b", [lps[1]], None),
              Delta(1, [2], "c", [lps[2]], None), Delta(1, [3], "d", [lps[3]], "length")]
    assert coalesce_choices(deltas) == [Delta(1, [0, 2, 3], "acd", [lps[0], lps[2], lps[3]], "length"),
                                        Delta(0, [1], "b", [lps[1]], None)]


class _Arrivals:
    """A Generation stand-in: ``bursts`` are the deltas that arrive together."""

    request_id = "r"
    num_prompt_tokens = 2
    num_cached_tokens = 0

    def __init__(self, bursts: list[list[Delta]]) -> None:
        self.bursts = bursts
        self.pending: list[Delta] = []
        self.num_completion_tokens = sum(len(d.token_ids) for b in bursts for d in b)

    async def next(self) -> Delta | None:
        if not self.bursts:
            return None
        self.pending = self.bursts.pop(0)
        return self.pending.pop(0)

    def ready(self) -> list[Delta]:
        out, self.pending = self.pending, []
        return out

    def cancel(self) -> None:
        pass


def _writes(bursts: list[list[Delta]], *, chat: bool, num_choices: int) -> list[list[dict]]:
    builder = ResponseBuilder(chat=chat, request_id="r", model="m", num_choices=num_choices, num_top_logprobs=None,
                              token_text=str, include_usage=True)
    gen = _Arrivals(bursts)

    async def run() -> list[bytes]:
        first = await gen.next()
        response = _SSEResponse(None, gen, builder, first, "completions", headers={})
        return [chunk async for chunk in response.body_iterator]

    out = []
    for write in asyncio.run(run()):
        events = [e.removeprefix("data: ") for e in write.decode().split("\n\n") if e]
        out.append([e if e == "[DONE]" else json.loads(e) for e in events])
    return out


def test_a_lagging_stream_writes_one_chunk_per_choice_per_write():
    bursts = [[Delta(0, [1], "A", [], None)],
              [Delta(0, [2], "B", [], None), Delta(1, [3], "x", [], None), Delta(0, [4], "", [], None),
               Delta(0, [5], "C", [], None)],
              [Delta(1, [6], "y", [], "length"), Delta(0, [7], "D", [], "length")]]
    writes = _writes(bursts, chat=False, num_choices=2)
    texts = [[(e["choices"][0]["index"], e["choices"][0]["text"], e["choices"][0]["finish_reason"]) for e in w]
             for w in writes[:3]]
    assert texts == [[(0, "A", None)], [(0, "BC", None), (1, "x", None)], [(1, "y", "length"), (0, "D", "length")]]
    assert writes[3][0]["usage"]["completion_tokens"] == 7 and writes[4] == ["[DONE]"]


def test_chat_stream_opens_every_choice_in_the_first_write():
    writes = _writes([[Delta(0, [1], "A", [], None), Delta(0, [2], "B", [], "stop")]], chat=True, num_choices=1)
    first = writes[0]
    assert first[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [e["choices"][0]["delta"] for e in first[1:]] == [{"content": "AB"}]
    assert first[1]["choices"][0]["finish_reason"] == "stop"
