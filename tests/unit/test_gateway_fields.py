"""Every field of a request body is honoured or refused (router/fields.py, schemas.py):
the policy tables, refusals naming the field, unknown fields, the payloads real clients
send, the bounds on the decoded JSON, and the chat messages as the template gets them.

Pure: bodies go through the same models and checks the app uses, with no server (the
HTTP edge is tests/unit/test_gateway_edge.py).
"""

from __future__ import annotations

import json
import typing

import pytest
from pydantic import ValidationError

from pdserve.engine.hashing import block_hashes, cache_salt_keys
from pdserve.engine.request import Request
from pdserve.engine.sampling_params import SamplingParams
from pdserve.router.prepare import prepare_generation
from pdserve.router.fields import HONOURED, MAX_JSON_DEPTH, Body, Refused, check_json
from pdserve.router.schemas import (REQUEST_MODELS, APIError, ChatCompletionRequest, ChatMessage, CompletionRequest,
                                    StreamOptions, parse)

MESSAGES = [{"role": "user", "content": "hi"}]
BASE = {CompletionRequest: {"model": "m", "prompt": "x"}, ChatCompletionRequest: {"model": "m", "messages": MESSAGES}}
NESTED = {StreamOptions: ("stream_options", {"stream": True}), ChatMessage: ("messages[0]", {})}


def check(model, body):
    req = parse(model, body)
    req.check()
    return req


def refusal(model, body) -> APIError:
    with pytest.raises(APIError) as info:
        check(model, body)
    assert info.value.status == 400
    return info.value


def refused_fields(model):
    return [(n, p) for n, p in model.FIELDS.items() if isinstance(p, Refused)]


CANDIDATES = ["zzz", 7, 0.5, True, False, ["zzz"], [7], [{"k": "v"}], {"k": "v"}]


def non_neutral(model, name, policy):
    """A value of the field's type that its policy refuses."""
    for value in CANDIDATES:
        try:
            model.__pydantic_validator__.validate_assignment(model.model_construct(), name, value)
        except ValidationError:
            continue
        if not policy.accepts(value):
            return value
    return None


def with_field(model, name, value):
    """A body of ``model``'s endpoint with ``name`` set (nested models inside their parent)."""
    if model in NESTED:
        where, extra = NESTED[model]
        body = {**BASE[ChatCompletionRequest], **extra}
        if model is ChatMessage:
            body["messages"] = [{**MESSAGES[0], name: value}]
        else:
            body[where] = {name: value}
        return ChatCompletionRequest, body, f"{where}.{name}"
    return model, {**BASE[model], name: value}, name


TABLE = [(m, n, p) for m in (*BASE, *NESTED) for n, p in refused_fields(m)]


def test_every_field_of_every_model_has_a_policy():
    for model in (*REQUEST_MODELS, StreamOptions, ChatMessage):
        assert set(model.FIELDS) == set(model.model_fields)
        assert all(p is HONOURED or isinstance(p, Refused) for p in model.FIELDS.values())
    with pytest.raises(TypeError, match="without a policy"):
        class Forgotten(Body):  # noqa: F841
            x: int = 0
            FIELDS = {}


@pytest.mark.parametrize("model,name,policy", TABLE, ids=[f"{m.__name__}.{n}" for m, n, _ in TABLE])
def test_refused_fields_pass_at_their_neutral_values_and_are_400_otherwise(model, name, policy):
    for value in (None, *policy.neutral):
        check(*with_field(model, name, value)[:2])
    value = non_neutral(model, name, policy)
    if value is None:  # every value is neutral: it means nothing until tools are honoured
        assert name == "parallel_tool_calls"
        return
    endpoint, body, param = with_field(model, name, value)
    err = refusal(endpoint, body)
    assert err.param == param and err.code == "unsupported_parameter"
    assert err.message.startswith(f"'{param}' ") and "accepted: null" in err.message


@pytest.mark.parametrize("model", list(BASE), ids=lambda m: m.__name__)
def test_unknown_fields_are_400_unless_null(model):
    assert check(model, {**BASE[model], "frobnicate": None, "prefill_worker_id": None})
    for value in (0, False, "", [], {}):
        err = refusal(model, {**BASE[model], "frobnicate": value})
        assert (err.param, err.message, err.code) == ("frobnicate", "unknown field 'frobnicate'", "unknown_parameter")
    assert refusal(model, {**BASE[model], "stream": True, "stream_options": {"x": 1}}).param == "stream_options.x"
    # Internal fields and the other endpoint's fields are unknown too.
    assert refusal(model, {**BASE[model], "prefill_worker_id": "p0"}).param == "prefill_worker_id"
    other = "messages" if model is CompletionRequest else "prompt"
    assert refusal(model, {**BASE[model], other: "x"}).param == other


def test_nested_unknown_fields_are_named_in_full():
    part = {"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}}
    body = {**BASE[ChatCompletionRequest], "messages": [MESSAGES[0], {"role": "user", "content": [part]}]}
    assert refusal(ChatCompletionRequest, body).param == "messages[1].content[0].cache_control"
    # A part of another type is refused as such, before its other keys.
    body["messages"][1]["content"] = [{"type": "image_url", "image_url": {"url": "x"}}]
    err = refusal(ChatCompletionRequest, body)
    assert err.param == "messages[1].content" and "'image_url'" in err.message


# Payloads of real clients, every field at its default or a value this server honours.
GUIDELLM_COMPLETIONS = {"model": "m", "prompt": "a b c", "max_tokens": 8, "stop": None, "ignore_eos": True,
                        "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
GUIDELLM_CHAT = {"model": "m", "max_completion_tokens": 8, "stop": None, "ignore_eos": True, "stream": True,
                 "stream_options": {"include_usage": True, "continuous_usage_stats": True},
                 "messages": [{"role": "system", "content": "prefix"},
                              {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                              {"role": "assistant", "content": None,
                               "tool_calls": [{"id": "c1", "type": "function",
                                               "function": {"name": "f", "arguments": "{}"}}]},
                              {"role": "tool", "tool_call_id": "c1", "content": '{"status": "ok"}'}]}
AIPERF_COMPLETIONS = {"prompt": ["p1", "p2"], "model": "m", "stream": True, "max_tokens": 8,
                      "stream_options": {"include_usage": True}, "ignore_eos": True, "min_tokens": 8}
AIPERF_CHAT = {"messages": MESSAGES, "model": "m", "stream": True, "max_completion_tokens": 8,
               "stream_options": {"include_usage": True, "continuous_usage_stats": True}, "ignore_eos": True,
               "min_tokens": 8}
OPENAI_CHAT_DEFAULTS = {
    "model": "m", "messages": [{"role": "developer", "content": "be brief", "name": "dev"}, *MESSAGES],
    "frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}, "logprobs": False, "max_completion_tokens": 8,
    "n": 1, "seed": 1, "stop": [], "store": False, "temperature": 1, "top_p": 1, "user": "u-1", "metadata": {"a": "b"},
    "service_tier": "auto", "modalities": ["text"], "parallel_tool_calls": True, "tool_choice": "none",
    "response_format": {"type": "text"}, "verbosity": "medium", "prompt_cache_key": "k", "safety_identifier": "s",
    "audio": None, "prediction": None, "reasoning_effort": None, "web_search_options": None,
    "stream": True, "stream_options": {"include_usage": True, "include_obfuscation": False}}
VLLM_DEFAULTS = {"use_beam_search": False, "length_penalty": 1.0, "stop_token_ids": [], "include_stop_str_in_output": False,
                 "skip_special_tokens": True, "spaces_between_special_tokens": True, "priority": 0, "bad_words": [],
                 "echo": False, "return_tokens_as_token_ids": False, "min_tokens": 0, "ignore_eos": False,
                 "prompt_logprobs": None, "guided_json": None, "truncate_prompt_tokens": None}
VLLM_CHAT_DEFAULTS = {"add_generation_prompt": True, "continue_final_message": False, "add_special_tokens": False,
                      "chat_template": None, "chat_template_kwargs": {}, "documents": None, "include_reasoning": True}


@pytest.mark.parametrize("model,body", [
    (CompletionRequest, GUIDELLM_COMPLETIONS), (ChatCompletionRequest, GUIDELLM_CHAT),
    (CompletionRequest, AIPERF_COMPLETIONS), (ChatCompletionRequest, AIPERF_CHAT),
    (ChatCompletionRequest, OPENAI_CHAT_DEFAULTS),
    (CompletionRequest, {**BASE[CompletionRequest], **VLLM_DEFAULTS, "add_special_tokens": True, "best_of": 1,
                         "suffix": None, "logprobs": None}),
    (ChatCompletionRequest, {**BASE[ChatCompletionRequest], **VLLM_DEFAULTS, **VLLM_CHAT_DEFAULTS}),
], ids=["guidellm-completions", "guidellm-chat", "aiperf-completions", "aiperf-chat", "openai-chat", "vllm-completions",
        "vllm-chat"])
def test_what_real_clients_send_is_accepted(model, body):
    check(model, body)


BOUNDED = [
    ({"user": "u" * 257}, "user"), ({"safety_identifier": "s" * 257}, "safety_identifier"),
    ({"prompt_cache_key": "k" * 257}, "prompt_cache_key"), ({"user": 5}, "user"),
    ({"cache_salt": ""}, "cache_salt"), ({"cache_salt": "s" * 257}, "cache_salt"), ({"cache_salt": 1}, "cache_salt"),
    ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"), ({"metadata": {"k" * 65: "v"}}, "metadata"),
    ({"metadata": {"k": "v" * 513}}, "metadata"), ({"metadata": {"k": 1}}, "metadata"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
    ({"top_logprobs": 2}, "top_logprobs"),
]


@pytest.mark.parametrize("fields,param", BOUNDED, ids=[str(i) for i in range(len(BOUNDED))])
def test_accepted_strings_are_bounded(fields, param):
    assert refusal(ChatCompletionRequest, {**BASE[ChatCompletionRequest], **fields}).param == param


def test_json_depth_and_text_are_bounded():
    def nested(depth):  # ``depth`` objects and arrays inside each other
        value = 1
        for i in range(depth):
            value = [value] if i % 2 else {"k": value}
        return value

    check_json(nested(MAX_JSON_DEPTH))
    for bad in (nested(MAX_JSON_DEPTH + 1), nested(100_000)):
        with pytest.raises(APIError, match="deeper than 64"):
            check_json(bad)
    for bad in ("\ud800", {"\udfff": 1}, ["ok", {"x": ["a\ud83dz"]}]):
        with pytest.raises(APIError, match="surrogate"):
            check_json(bad)
    check_json(json.loads('["\\ud83d\\ude00", "日本", {"é": null}]'))  # JSON's escaped pair is one character
    body = {**BASE[ChatCompletionRequest], "tools": nested(80)}
    assert "deeper" in refusal(ChatCompletionRequest, body).message


WEIRD = [
    {"model": "fake", "prompt": "x", "n": 10**300},
    {"model": "fake", "prompt": "x", "max_tokens": 1e400},
    {"model": "fake", "prompt": "x", "temperature": float("inf")},
    {"model": "fake", "prompt": "x", "top_p": float("nan")},
    {"model": "fake", "prompt": "x", "logit_bias": {"1": float("-inf")}},
    {"model": "fake", "prompt": "x", "stop_token_ids": [2**70]},
    {"model": "fake", "prompt": "x", "seed": -(2**80)},
    {"model": "fake", "prompt": "x", "truncate_prompt_tokens": 2**70},
    {"model": "fake", "prompt": "x", "truncate_prompt_tokens": 0},
    {"model": "fake", "prompt": [[1, 2], [3, [4]]]},
    {"model": "fake", "prompt": [2**64]},
    {"model": "fake", "prompt": "x", "model_config": 1},
    {"model": "fake", "prompt": "x", "__class__": 1, "__dict__": {}},
    {"model": ["fake"], "prompt": "x"},
    {"model": "fake", "prompt": {"a": 1}},
    {"model": "fake", "prompt": "x", "stream_options": [1]},
    {"model": "fake\ud800", "prompt": "x"},
    {"model": "fake", "prompt": "\udc00"},
    {"model": "fake", "messages": [None]},
    {"model": "fake", "messages": [{"role": "user", "content": [{"type": 1}]}]},
    {"model": "fake", "messages": [{"role": "user", "content": "{{ raise_exception('no') }}"}], "n": 0},
]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    from test_gateway_edge import make_model_dir

    from pdserve.router.gateway import Gateway, GatewayConfig

    model_dir = make_model_dir(tmp_path_factory.mktemp("fields") / "fake")
    return Gateway(GatewayConfig(store_url="grpc://127.0.0.1:1", model_dir=str(model_dir)))


@pytest.mark.parametrize("body", WEIRD, ids=[str(i) for i in range(len(WEIRD))])
def test_weird_bodies_are_400_not_a_crash(gateway, body):
    with pytest.raises(APIError) as info:
        prepare_generation(gateway, json.loads(json.dumps(body)), chat="messages" in body)
    assert info.value.status in (400, 404)
    json.dumps(info.value.body(), ensure_ascii=False).encode()  # renders as UTF-8


def test_chat_messages_as_the_template_gets_them():
    parts = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    req = check(ChatCompletionRequest, {"model": "m", "messages": [
        {"role": "developer", "content": "rules"}, {"role": "user", "content": parts, "name": "ann"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "42", "tool_call_id": "c1"}]})
    expected = [{"role": "system", "content": "rules"}, {"role": "user", "content": "one\ntwo", "name": "ann"},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "content": "42", "tool_call_id": "c1"}]
    assert req.template_messages(developer_role=False) == expected
    assert req.template_messages(developer_role=True)[0] == {"role": "developer", "content": "rules"}
    for message, param in (({"role": "assistant", "content": None}, "messages[0].content"),
                           ({"role": "user", "content": None, "tool_calls": [call]}, "messages[0].content"),
                           ({"role": "wizard", "content": "x"}, "messages[0].role"),
                           ({"role": "user"}, "messages[0].content"),
                           ({"content": "x"}, "messages[0].role")):
        assert refusal(ChatCompletionRequest, {"model": "m", "messages": [message]}).param == param


def test_the_router_salts_block_hashes_as_the_engine_does():
    ids = list(range(100, 150))
    for salt in (None, "tenant-a", "tenant-b", "ünï"):
        engine = Request("r", ids, SamplingParams(cache_salt=salt), 16).block_hashes
        assert block_hashes(ids, 16, cache_salt_keys(salt)) == engine and len(engine) == 3
    a, b = (block_hashes(ids, 16, cache_salt_keys(s)) for s in ("tenant-a", "tenant-b"))
    assert not set(a) & set(b) and not set(a) & set(block_hashes(ids, 16))


def test_field_docs_reach_the_json_schema():
    schema = ChatCompletionRequest.model_json_schema()
    assert "salt" in schema["properties"]["cache_salt"]["description"]
    assert schema["additionalProperties"] is False
    assert typing.get_origin(ChatCompletionRequest.model_fields["tools"].annotation) is not None
