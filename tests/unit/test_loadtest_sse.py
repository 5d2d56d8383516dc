"""The SSE parser on real OpenAI-style byte streams, whole and split at every byte."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pdserve.loadtest.sse import SSEParser

# As pdserve's gateway writes a streamed chat completion (captured), with a non-ASCII delta
# so splits fall inside multi-byte UTF-8 characters.
PDSERVE_CHAT = (
    b'data: {"id":"chatcmpl-773d","object":"chat.completion.chunk","created":1795345189,"model":"tiny",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],'
    b'"usage":null}\n\n'
    b'data: {"id":"chatcmpl-773d","object":"chat.completion.chunk","created":1795345189,"model":"tiny",'
    b'"choices":[{"index":0,"delta":{"content":" esc"},"logprobs":null,"finish_reason":null}],"usage":null}\n\n'
    + 'data: {"id":"chatcmpl-773d","object":"chat.completion.chunk","created":1795345189,"model":"tiny",'
    '"choices":[{"index":0,"delta":{"content":"Grüße 你好"},"logprobs":null,"finish_reason":"length"}],'
    '"usage":null}\n\n'.encode()
    + b'data: {"id":"chatcmpl-773d","object":"chat.completion.chunk","created":1795345189,"model":"tiny",'
    b'"choices":[],"usage":{"prompt_tokens":14,"completion_tokens":2,"total_tokens":16}}\n\n'
    b"data: [DONE]\n\n"
)

# CRLF line ends, a keep-alive comment, an event name and a two-line data field
# (servers behind proxies, sse-starlette style pings).
CRLF_STREAM = (
    b": ping - 2024-01-01 00:00:00\r\n\r\n"
    b'event: message\r\ndata: {"choices":[{"index":0,"text":"a"}]}\r\n\r\n'
    b'data: {"choices":\r\ndata: [{"index":0,"text":"b"}]}\r\n\r\n'
    b"data: [DONE]\r\n\r\n"
)


def parse_in_pieces(stream: bytes, cuts: list[int]) -> list[str]:
    parser = SSEParser()
    events = []
    bounds = [0, *sorted(cuts), len(stream)]
    for a, b in zip(bounds, bounds[1:]):
        events += parser.feed(stream[a:b])
    return events + parser.close()


def test_whole_pdserve_stream():
    events = parse_in_pieces(PDSERVE_CHAT, [])
    assert len(events) == 5 and events[-1] == "[DONE]"
    bodies = [json.loads(e) for e in events[:-1]]
    assert [b["choices"][0]["delta"].get("content") for b in bodies[:3]] == ["", " esc", "Grüße 你好"]
    assert bodies[3]["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("stream", [PDSERVE_CHAT, CRLF_STREAM], ids=["pdserve", "crlf"])
def test_every_single_split_gives_the_same_events(stream):
    whole = parse_in_pieces(stream, [])
    for cut in range(1, len(stream)):
        assert parse_in_pieces(stream, [cut]) == whole, cut


@pytest.mark.parametrize("stream", [PDSERVE_CHAT, CRLF_STREAM], ids=["pdserve", "crlf"])
def test_byte_by_byte_and_random_splits(stream):
    whole = parse_in_pieces(stream, [])
    assert parse_in_pieces(stream, list(range(1, len(stream)))) == whole
    rng = np.random.default_rng(0)
    for _ in range(50):
        cuts = rng.choice(np.arange(1, len(stream)), size=12, replace=False).tolist()
        assert parse_in_pieces(stream, cuts) == whole


def test_crlf_stream_fields():
    events = parse_in_pieces(CRLF_STREAM, [])
    assert events == ['{"choices":[{"index":0,"text":"a"}]}', '{"choices":\n[{"index":0,"text":"b"}]}', "[DONE]"]


def test_unterminated_last_event_is_returned_on_close():
    parser = SSEParser()
    assert parser.feed(b'data: {"a": 1}\n\ndata: [DONE]') == ['{"a": 1}']
    assert parser.close() == ["[DONE]"]
    parser = SSEParser()
    assert parser.feed(b"data: x\r") == []  # a \n may still follow
    assert parser.close() == ["x"]
