"""A request body's sampling fields -> SamplingParams (router/sampling.py), both endpoints.

Pure: bodies go through the same pydantic models and translation the app uses, with no
server. The HTTP edge and the wire are covered in test_gateway_edge.py.
"""

from __future__ import annotations

import pytest

from pdserve.engine.sampling_params import SamplingParams
from pdserve.router.sampling import sampling_params
from pdserve.router.schemas import APIError, ChatCompletionRequest, CompletionRequest, parse

VOCAB = 261
MESSAGES = [{"role": "user", "content": "hi"}]


def completion(**fields) -> SamplingParams:
    req = parse(CompletionRequest, {"model": "m", "prompt": "x", **fields})
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    return sampling_params(req, vocab_size=VOCAB, max_n=16, max_logprobs=20, max_tokens=max_tokens,
                           max_tokens_param="max_tokens", logprobs=req.logprobs, logprobs_param="logprobs")


def chat(**fields) -> SamplingParams:
    """As app._prepare does it: max_completion_tokens wins; neither set: the context's room (100 here)."""
    req = parse(ChatCompletionRequest, {"model": "m", "messages": MESSAGES, **fields})
    max_tokens_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    return sampling_params(req, vocab_size=VOCAB, max_n=16, max_logprobs=20, max_tokens=max_tokens or 100,
                           max_tokens_param=max_tokens_param, logprobs=None, logprobs_param="top_logprobs")


def refused(build, **fields) -> APIError:
    with pytest.raises(APIError) as info:
        build(**fields)
    assert info.value.status == 400 and info.value.message
    return info.value


def test_defaults_and_nulls_mean_neutral():
    neutral = SamplingParams(max_tokens=16)
    assert completion() == neutral
    nulls = dict(presence_penalty=None, frequency_penalty=None, repetition_penalty=None, logit_bias=None,
                 min_tokens=None, allowed_token_ids=None)
    assert completion(**nulls) == neutral and not completion(**nulls).has_logits_processors
    assert completion(logit_bias={}) == neutral  # empty bias: nothing to add


@pytest.mark.parametrize("build", [completion, chat], ids=["completions", "chat"])
def test_every_field_reaches_sampling_params(build):
    p = build(presence_penalty=1.5, frequency_penalty=-2, repetition_penalty=1.2, min_tokens=3, max_tokens=8,
              logit_bias={"50": -100, "0": 100, "260": 2.5, "7": 0}, allowed_token_ids=[9, 3, 260])
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (1.5, -2.0, 1.2)
    assert p.logit_bias == {50: -100.0, 0: 100.0, 260: 2.5, 7: 0.0}
    assert all(type(k) is int and type(v) is float for k, v in p.logit_bias.items())
    assert p.min_tokens == 3 and p.max_tokens == 8 and p.allowed_token_ids == (9, 3, 260)
    assert p.banned_token_ids == () and p.has_penalties


def test_min_tokens_may_equal_the_limit():
    assert completion(min_tokens=16).min_tokens == 16  # the default max_tokens
    assert chat(min_tokens=5, max_completion_tokens=5).min_tokens == 5
    assert chat(min_tokens=100).min_tokens == 100  # the context's room


BAD = [
    # (fields, param)
    (dict(presence_penalty=2.01), "presence_penalty"),
    (dict(presence_penalty=-3), "presence_penalty"),
    (dict(frequency_penalty=2.5), "frequency_penalty"),
    (dict(frequency_penalty=-1e999), "frequency_penalty"),  # JSON's 1e999 parses as inf
    (dict(presence_penalty="0.5"), "presence_penalty"),  # strict: a string is not a number
    (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(repetition_penalty=1e999), "repetition_penalty"),
    (dict(repetition_penalty=True), "repetition_penalty"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(min_tokens=1.5), "min_tokens"),
    (dict(logit_bias={"abc": 1}), "logit_bias"),
    (dict(logit_bias={"5.0": 1}), "logit_bias"),
    (dict(logit_bias={" 5": 1}), "logit_bias"),
    (dict(logit_bias={"1_0": 1}), "logit_bias"),
    (dict(logit_bias={"٣": 1}), "logit_bias"),  # a digit to int(), not to OpenAI
    (dict(logit_bias={"": 1}), "logit_bias"),
    (dict(logit_bias={"9" * 5000: 1}), "logit_bias"),
    (dict(logit_bias={str(VOCAB): 1}), "logit_bias"),
    (dict(logit_bias={"-1": 1}), "logit_bias"),
    (dict(logit_bias={"5": 100.5}), "logit_bias"),
    (dict(logit_bias={"5": -101}), "logit_bias"),
    (dict(logit_bias={"5": "1"}), "logit_bias"),
    (dict(logit_bias={"5": None}), "logit_bias"),
    (dict(logit_bias={"5": 1, "05": 2}), "logit_bias"),
    (dict(logit_bias={str(i): 1 for i in range(1025)}), "logit_bias"),
    (dict(logit_bias=[1, 2]), "logit_bias"),
    (dict(allowed_token_ids=[]), "allowed_token_ids"),
    (dict(allowed_token_ids=[1, VOCAB]), "allowed_token_ids"),
    (dict(allowed_token_ids=[-1]), "allowed_token_ids"),
    (dict(allowed_token_ids=[1.0]), "allowed_token_ids"),
    (dict(allowed_token_ids=["1"]), "allowed_token_ids"),
    (dict(allowed_token_ids=list(range(VOCAB)) * 16 + [1]), "allowed_token_ids"),
]


@pytest.mark.parametrize("build", [completion, chat], ids=["completions", "chat"])
@pytest.mark.parametrize("fields,param", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_values_are_400_naming_the_field(build, fields, param):
    assert refused(build, **fields).param == param


def test_min_tokens_beyond_the_limit_names_the_limit():
    err = refused(completion, min_tokens=5, max_tokens=4)
    assert err.param == "min_tokens" and "max_tokens (4)" in err.message
    err = refused(completion, min_tokens=17)
    assert err.param == "min_tokens" and "max_tokens (16, its default here)" in err.message
    err = refused(chat, min_tokens=5, max_completion_tokens=4, max_tokens=50)
    assert err.param == "min_tokens" and "max_completion_tokens (4)" in err.message
    err = refused(chat, min_tokens=5, max_tokens=4)
    assert err.param == "min_tokens" and "max_tokens (4)" in err.message
    err = refused(chat, min_tokens=101)
    assert err.param == "min_tokens" and "max_tokens (100, its default here)" in err.message


def test_logit_bias_messages_name_the_offender():
    assert "outside the vocabulary [0, 261)" in refused(completion, logit_bias={"261": 1}).message
    assert "'abc'" in refused(completion, logit_bias={"abc": 1}).message
    assert "token id 5" in refused(completion, logit_bias={"5": 101}).message
