"""The gateway's honoured vLLM fields, usage, /tokenize, /detokenize, /v1/models/{id},
the OpenAPI document, and bodies that must never be a 500, over HTTP against the fake
decode worker of test_gateway_edge.py (its fixtures, reused)."""

from __future__ import annotations

import json
import random

import httpx
import pytest
from test_gateway_edge import BOS, CONTEXT_LEN, KEY, cached_tokens, check_error, cluster, post, sse_events, url  # noqa: F401

from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.tokenizer import Tokenizer as EngineTokenizer
from pdserve.proto import convert

MESSAGES = [{"role": "user", "content": "x"}]


def sent_params(fake) -> SamplingParams:
    return SamplingParams(**convert.sampling_kwargs(fake.requests[-1].sampling_params))


def test_vllm_text_fields_and_cache_salt_reach_the_worker(cluster, url):
    fake = cluster[0]
    extra = {"stop_token_ids": [65, 260], "skip_special_tokens": False, "spaces_between_special_tokens": False,
             "include_stop_str_in_output": True, "cache_salt": "tenant-1", "user": "someone"}
    expected = SamplingParams(max_tokens=2, stop_token_ids=(65, 260), skip_special_tokens=False,
                              spaces_between_special_tokens=False, include_stop_str_in_output=True,
                              cache_salt="tenant-1")
    assert post(url, "/v1/completions", {"model": "fake", "prompt": "x", "max_tokens": 2, **extra}).status_code == 200
    assert sent_params(fake) == expected
    body = {"model": "fake", "messages": MESSAGES, "max_completion_tokens": 2, **extra}
    assert post(url, "/v1/chat/completions", body).status_code == 200
    assert sent_params(fake) == expected
    nulls = {k: None for k in extra}
    assert post(url, "/v1/completions", {"model": "fake", "prompt": "x", "max_tokens": 2, **nulls}).status_code == 200
    assert sent_params(fake) == SamplingParams(max_tokens=2)
    for fields, param in (({"stop_token_ids": [261]}, "stop_token_ids"), ({"stop_token_ids": [-1]}, "stop_token_ids"),
                          ({"cache_salt": ""}, "cache_salt"), ({"skip_special_tokens": 1}, "skip_special_tokens")):
        check_error(post(url, "/v1/completions", {"model": "fake", "prompt": "x", **fields}), 400, param)


def test_truncate_prompt_tokens_keeps_the_last_tokens(cluster, url):
    fake = cluster[0]
    r = post(url, "/v1/completions", {"model": "fake", "prompt": "abcdef", "max_tokens": 1, "truncate_prompt_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 3
    assert list(fake.requests[-1].prompt_token_ids) == [ord("d"), ord("e"), ord("f")]
    r = post(url, "/v1/completions", {"model": "fake", "prompt": "ab", "max_tokens": 1, "truncate_prompt_tokens": 9})
    assert list(fake.requests[-1].prompt_token_ids) == [BOS, ord("a"), ord("b")]  # shorter: kept whole
    # Chat: after templating, so the end of the template stays.
    r = post(url, "/v1/chat/completions", {"model": "fake", "messages": MESSAGES, "max_tokens": 1,
                                           "truncate_prompt_tokens": 4})
    tok = EngineTokenizer.from_dir(cluster[3])
    assert list(fake.requests[-1].prompt_token_ids) == tok.encode("<|start_header_id|>assistant<|end_header_id|>",
                                                                   add_special_tokens=False)[-4:]
    assert r.json()["usage"]["prompt_tokens"] == 4
    # A prompt beyond the limit fits once cut.
    long = {"model": "fake", "prompt": "y" * 200, "max_tokens": 1}
    check_error(post(url, "/v1/completions", long), 400, "prompt")
    assert post(url, "/v1/completions", {**long, "truncate_prompt_tokens": 100}).status_code == 200
    for k in (0, -1, CONTEXT_LEN + 1):
        check_error(post(url, "/v1/completions", {**long, "truncate_prompt_tokens": k}), 400, "truncate_prompt_tokens")


def test_chat_messages_reach_the_template_as_vllm_renders_them(cluster, url):
    fake = cluster[0]
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [{"role": "developer", "content": "d"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "content": "ok", "tool_call_id": "c1"}]
    r = post(url, "/v1/chat/completions", {"model": "fake", "messages": messages, "max_tokens": 1})
    assert r.status_code == 200, r.text
    # The fake's template knows no developer role: it becomes system.
    rendered = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>d<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>a\nb<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|><|eot_id|>"
                "<|start_header_id|>tool<|end_header_id|>ok<|eot_id|><|start_header_id|>assistant<|end_header_id|>")
    tok = EngineTokenizer.from_dir(cluster[3])
    assert list(fake.requests[-1].prompt_token_ids) == tok.encode(rendered, add_special_tokens=False)


def test_usage_continuous_and_cached_tokens(cluster, url):
    prompt = list(range(10, 50))  # 40 tokens: the fake reports 32 of them cached
    body = {"model": "fake", "prompt": prompt, "max_tokens": 5, "n": 2}
    usage = post(url, "/v1/completions", body).json()["usage"]
    assert usage == {"prompt_tokens": 40, "completion_tokens": 10, "total_tokens": 50,
                     "prompt_tokens_details": {"cached_tokens": cached_tokens(40)}} and cached_tokens(40) == 32
    stream = {**body, "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    events = sse_events(post(url, "/v1/completions", stream).text)
    counts = [e["usage"]["completion_tokens"] for e in events[:-1]]
    assert all(e["usage"]["prompt_tokens"] == 40 and e["usage"]["total_tokens"] == 40 + e["usage"]["completion_tokens"]
               for e in events[:-1])
    assert counts == sorted(counts) and counts[-1] == 10 and 1 <= counts[0]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 32}
    # Chat: the opening role chunks carry the usage too (nothing generated yet).
    chat = {"model": "fake", "messages": MESSAGES, "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    events = sse_events(post(url, "/v1/chat/completions", chat).text)
    assert events[0]["usage"]["completion_tokens"] == 0 and events[-2]["usage"]["completion_tokens"] == 3
    # Without include_usage it is vLLM's no-op; plain include_usage keeps usage null on chunks.
    for options in ({"continuous_usage_stats": True}, {"include_usage": True}):
        events = sse_events(post(url, "/v1/completions", {**stream, "stream_options": options}).text)
        assert all(e.get("usage") is None for e in events if e["choices"])


def test_tokenize_and_detokenize(cluster, url):
    tok = EngineTokenizer.from_dir(cluster[3])
    r = post(url, "/tokenize", {"model": "fake", "prompt": "hi"})
    assert r.json() == {"count": 3, "max_model_len": CONTEXT_LEN, "tokens": [BOS, ord("h"), ord("i")],
                        "token_strs": None}
    r = post(url, "/tokenize", {"prompt": "hi", "add_special_tokens": False, "return_token_strs": True})
    assert r.json()["tokens"] == [ord("h"), ord("i")] and r.json()["token_strs"] == ["h", "i"]
    r = post(url, "/tokenize", {"model": "fake", "messages": MESSAGES})
    chat = post(url, "/v1/chat/completions", {"model": "fake", "messages": MESSAGES, "max_tokens": 1})
    assert r.json()["tokens"] == list(cluster[0].requests[-1].prompt_token_ids)
    assert r.json()["count"] == chat.json()["usage"]["prompt_tokens"]
    ids = tok.encode("round <|eot_id|> trip")
    assert post(url, "/detokenize", {"model": "fake", "tokens": ids}).json() == {
        "prompt": "<|begin_of_text|>round <|eot_id|> trip"}
    assert post(url, "/detokenize", {"tokens": []}).json() == {"prompt": ""}
    check_error(post(url, "/detokenize", {"tokens": [261]}), 400, "tokens")
    check_error(post(url, "/detokenize", {"tokens": ["1"]}), 400, "tokens")
    check_error(post(url, "/tokenize", {"model": "other", "prompt": "x"}), 404, "model")
    check_error(post(url, "/tokenize", {"prompt": "x", "extra": 1}), 400, "extra")
    without = post(url, "/tokenize", {"messages": MESSAGES, "add_generation_prompt": False}).json()
    assert without["count"] < r.json()["count"] and r.json()["tokens"][: without["count"]] == without["tokens"]
    check_error(post(url, "/tokenize", {"messages": MESSAGES, "continue_final_message": True}), 400,
                "continue_final_message")
    check_error(post(url, "/tokenize", {"messages": [{"role": "user", "content": "x", "bad": 1}]}), 400,
                "messages[0].bad")
    check_error(post(url, "/tokenize", {"prompt": 5}), 400, "prompt")
    check_error(httpx.post(url + "/tokenize", content=b"[" * 100_000, timeout=10), 400, None)
    check_error(post(url, "/detokenize", {"tokens": list(range(200))} | {"x": "y" * (2 << 20)}), 413, None)


def test_model_by_id(url):
    card = httpx.get(url + "/v1/models/fake").json()
    assert card["id"] == "fake" and card["object"] == "model" and card["max_model_len"] == CONTEXT_LEN
    for other in ("gpt-4", "org/fake", "fake/"):
        err = check_error(httpx.get(url + f"/v1/models/{other}"), 404, "model")
        assert err["code"] == "model_not_found" and err["type"] == "invalid_request_error"


def test_openapi_describes_the_real_request_bodies(url):
    doc = httpx.get(url + "/openapi.json").json()
    schemas = doc["components"]["schemas"]
    completion, chat = schemas["CompletionRequest"]["properties"], schemas["ChatCompletionRequest"]["properties"]
    for name in ("model", "prompt", "max_tokens", "stop_token_ids", "cache_salt", "truncate_prompt_tokens", "echo"):
        assert name in completion, name
    for name in ("messages", "max_completion_tokens", "top_logprobs", "stream_options", "tools", "store"):
        assert name in chat, name
    assert "Not supported" in chat["store"]["description"] and "salt" in chat["cache_salt"]["description"]
    assert schemas["ChatCompletionRequest"]["required"] == ["model", "messages"]
    assert "ChatMessage" in schemas and "StreamOptions" in schemas
    body = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    assert {"/tokenize", "/detokenize", "/v1/models/{model_id}"} <= set(doc["paths"])
    docs = httpx.get(url + "/docs")
    assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
    assert "/openapi.json" in docs.text and "swagger" in docs.text.lower()


def test_the_api_key_guards_the_new_routes(cluster):
    gw = cluster[1](api_key=KEY)
    auth = {"Authorization": f"Bearer {KEY}"}
    for method, path, body in (("POST", "/tokenize", {"prompt": "x"}), ("POST", "/detokenize", {"tokens": [1]}),
                               ("GET", "/v1/models/fake", None), ("GET", "/openapi.json", None), ("GET", "/docs", None)):
        check_error(httpx.request(method, gw + path, json=body), 401, None)
        assert httpx.request(method, gw + path, json=body, headers=auth).status_code == 200, path
    text = httpx.get(gw + "/metrics").text
    assert 'endpoint="models"' in text and "fake" not in text.split('endpoint="models"')[0][-200:]


RAW = [
    b'{"model": "fake", "prompt": "x", "temperature": NaN}',
    b'{"model": "fake", "prompt": "x", "temperature": Infinity}',
    b'{"model": "fake", "prompt": "x", "top_p": -Infinity}',
    b'{"model": "fake", "prompt": "x", "temperature": 1e999}',
    b'{"model": "fake", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}",
    b'{"model": "fake", "prompt": "\\ud800"}',
    b'{"model": "fake", "prompt": "x", "\\udfff": 1}',
    b'{"model": "fake", "prompt": "x", "stop": ["\\ud83d"]}',
    b'{"model": "fake", "prompt": "\xed\xa0\x80"}',  # a surrogate in raw UTF-8
    b'{"model": "fake", "prompt": "\xff"}',
    b"[" * 100_000 + b"]" * 100_000,
    b'{"model": "fake", "prompt": "x", "logit_bias": ' + b'{"a": ' * 65 + b"1" + b"}" * 66,
    b'{"model": "fake", "prompt": "x", "tools": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b"\x00", b"", b"null", b"1", b'"x"',
]


@pytest.mark.parametrize("raw", RAW, ids=[str(i) for i in range(len(RAW))])
def test_weird_bytes_are_400(url, raw):
    check_error(httpx.post(url + "/v1/completions", content=raw, headers={"content-type": "application/json"},
                           timeout=10), 400, None)


def test_duplicate_keys_take_the_last(cluster, url):
    raw = b'{"model": "fake", "prompt": "x", "max_tokens": 9, "max_tokens": 2}'
    r = httpx.post(url + "/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 200 and cluster[0].requests[-1].sampling_params.max_tokens == 2


def test_fuzzed_bodies_are_never_a_server_error(url):
    rng = random.Random(1234)
    names = ["model", "prompt", "messages", "max_tokens", "n", "temperature", "stop", "stream", "stream_options",
             "logit_bias", "tools", "metadata", "cache_salt", "truncate_prompt_tokens", "stop_token_ids", "echo",
             "role", "content", "user", "best_of", "x"]

    def value(depth: int):
        kind = rng.randrange(9 if depth < 4 else 6)
        return [lambda: None, lambda: rng.choice([True, False]), lambda: rng.choice([0, 1, -1, 2**63, 10**30]),
                lambda: rng.choice([0.5, -1e308, 1e-320, 2.0]), lambda: rng.choice(["", "fake", "é", "a" * 300]),
                lambda: rng.randrange(300),
                lambda: [value(depth + 1) for _ in range(rng.randrange(4))],
                lambda: {rng.choice(names): value(depth + 1) for _ in range(rng.randrange(4))},
                lambda: {"role": "user", "content": value(depth + 1)}][kind]()

    for i in range(60):
        endpoint = rng.choice(["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"])
        body = {"model": "fake", "prompt": "x", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        for _ in range(rng.randrange(1, 4)):
            body[rng.choice(names)] = value(0)
        if rng.random() < 0.5:
            body.pop(rng.choice(["prompt", "messages"]))
        r = httpx.post(url + endpoint, content=json.dumps(body), headers={"content-type": "application/json"},
                       timeout=10)
        assert r.status_code < 500, (endpoint, body, r.text)
        if r.status_code >= 400:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
