"""The request bodies of the gateway's edge (OpenAI's API with vLLM's extensions), and
what the server does with each of their fields.

Untrusted JSON is bounded (``fields.check_json``: nesting depth, unpaired surrogates),
then validated with pydantic (strict types: ``"0.5"`` is not a number, ``true`` is not
an integer). Each model's ``FIELDS`` table says, for every field it declares, whether
the server honours it or refuses it at any value but its neutral one (``fields.py``);
a field no model declares is unknown, a 400 unless null. So internal fields
(``prefill_worker_id``, transfer parameters) can never come from a client, and no
OpenAI or vLLM feature the workers cannot honour (beam search, audio, tools, echo, ...)
is silently ignored. Sampling fields are only typed here; ``sampling.py`` bounds them
and builds the engine's parameters.

Accepted but with nothing to act on: ``user``, ``safety_identifier`` and
``prompt_cache_key`` (bounded strings, never logged nor used as metric labels) and
``metadata`` (OpenAI's bounds: 16 pairs, keys of 64 and values of 512 characters),
which only tags stored completions, and this server stores none.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationError

from .errors import APIError, invalid
from .fields import HONOURED, Body, Refused, check_json

MAX_ID_CHARS = 256
"""Length of ``user``, ``safety_identifier``, ``prompt_cache_key`` and ``cache_salt``."""

CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})



class StreamOptions(Body):
    include_usage: bool | None = False
    """A last chunk carries the usage of the whole request."""
    continuous_usage_stats: bool | None = False
    """vLLM: with ``include_usage``, every chunk also carries the usage so far."""
    include_obfuscation: bool | None = None
    """OpenAI pads chunks with random characters by default; this server does not."""

    FIELDS = {"include_usage": HONOURED, "continuous_usage_stats": HONOURED,
              "include_obfuscation": Refused(False, reason="is not supported: chunks are never padded")}


_SAMPLING_FIELDS = {name: HONOURED for name in (
    "model", "n", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stream", "stream_options",
    "ignore_eos", "user", "presence_penalty", "frequency_penalty", "logit_bias", "repetition_penalty",
    "min_tokens", "allowed_token_ids", "stop_token_ids", "skip_special_tokens", "spaces_between_special_tokens",
    "include_stop_str_in_output", "truncate_prompt_tokens", "cache_salt")}


class _SamplingRequest(Body):
    """Fields both endpoints share."""

    model: str
    n: int | None = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = False
    """vLLM: generate past EOS (``stop_token_ids`` still stop)."""
    user: str | None = Field(None, max_length=MAX_ID_CHARS)
    """Accepted; never logged nor used as a label."""
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    """OpenAI's form: token-id strings to biases ({"50256": -100})."""
    # vLLM extensions, with vLLM's names and meanings.
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    allowed_token_ids: list[int] | None = None
    stop_token_ids: list[int] | None = None
    """Token ids that end the completion (their text is left out unless include_stop_str_in_output)."""
    skip_special_tokens: bool | None = True
    spaces_between_special_tokens: bool | None = True
    """With skip_special_tokens false: added tokens are set off from the text by a space."""
    include_stop_str_in_output: bool | None = False
    truncate_prompt_tokens: int | None = None
    """Keep only the last k (>= 1) prompt tokens (of the templated chat)."""
    cache_salt: str | None = Field(None, min_length=1, max_length=MAX_ID_CHARS)
    """Prefix-cache blocks are shared only between requests with the same salt."""
    # Known, not honoured.
    use_beam_search: bool | None = False
    length_penalty: float | None = 1.0
    bad_words: list[str] | None = None
    logits_processors: list[Any] | None = None
    priority: int | None = 0
    request_id: str | None = None
    return_tokens_as_token_ids: bool | None = False
    return_token_ids: bool | None = False
    kv_transfer_params: dict[str, Any] | None = None
    vllm_xargs: dict[str, Any] | None = None
    # Being built: each becomes HONOURED when it is wired in.
    prompt_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structural_tag: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None

    FIELDS = {
        **_SAMPLING_FIELDS,
        "use_beam_search": Refused(False, reason="is not supported: beam search is not implemented"),
        "length_penalty": Refused(1.0, reason="only applies to beam search, which is not implemented"),
        "bad_words": Refused([]),
        "logits_processors": Refused([], reason="is not supported: no custom logits processors are loaded"),
        "priority": Refused(0, reason="is not supported: requests are served first come, first served"),
        "request_id": Refused(reason="cannot be chosen by the client: the server names requests"),
        "return_tokens_as_token_ids": Refused(False),
        "return_token_ids": Refused(False),
        "kv_transfer_params": Refused(reason="is internal to this server"),
        "vllm_xargs": Refused({}),
        "prompt_logprobs": HONOURED,
        "response_format": HONOURED,
        "structured_outputs": HONOURED,
        "guided_json": HONOURED,
        "guided_regex": HONOURED,
        "guided_choice": HONOURED,
        "guided_grammar": HONOURED,
        "structural_tag": Refused(reason="is not supported: use response_format, guided_* or structured_outputs"),
        "guided_decoding_backend": Refused(reason="is not supported: there is one structured-output backend"),
        "guided_whitespace_pattern": Refused(reason="is not supported: JSON is generated without whitespace"),
    }

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and bool(self.stream_options.continuous_usage_stats)

    def check_values(self, where: str) -> None:
        if self.stream_options is not None and not self.stream:
            raise invalid("stream_options is only allowed when stream is true", param="stream_options")


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    best_of: int | None = None
    """Honoured when it equals n (the n completions are the n best of n)."""
    add_special_tokens: bool | None = True
    """vLLM: add the tokenizer's special tokens (BOS) to text prompts."""
    echo: bool | None = False
    suffix: str | None = None
    prompt_embeds: Any = None

    FIELDS = {
        **_SamplingRequest.FIELDS,
        "prompt": HONOURED, "max_tokens": HONOURED, "logprobs": HONOURED, "best_of": HONOURED,
        "add_special_tokens": HONOURED,
        "echo": HONOURED,
        "suffix": Refused("", reason="is not supported: the model cannot insert text"),
        "prompt_embeds": Refused(reason="is not supported: prompts are text or token ids"),
    }

    def check_values(self, where: str) -> None:
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise invalid("best_of other than n is not supported by this server", param="best_of")
        super().check_values(where)


class ContentPart(Body):
    type: str
    text: str | None = None

    FIELDS = {"type": HONOURED, "text": HONOURED}


class ChatMessage(Body):
    role: str
    content: str | list[ContentPart] | None = None
    """Text, or text parts (joined with newlines); null only with tool_calls."""
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    """Passed to the chat template as they are."""
    tool_call_id: str | None = None
    refusal: str | None = None
    function_call: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    reasoning_content: str | None = None

    FIELDS = {"role": HONOURED, "content": HONOURED, "name": HONOURED, "tool_calls": HONOURED,
              "tool_call_id": HONOURED, "refusal": Refused(), "function_call": Refused(reason="(deprecated by OpenAI) is not supported: use tool_calls"),
              "audio": Refused(), "reasoning_content": Refused(reason="is not sent back to the model: templates drop past reasoning")}

    def check_values(self, where: str) -> None:
        if self.role not in CHAT_ROLES:
            raise invalid(f"{where}role must be one of {sorted(CHAT_ROLES)}, got {_describe(self.role)}",
                          param=f"{where}role")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise invalid(f"{where}content must be set (null only for an assistant message with tool_calls)",
                          param=f"{where}content")
        if isinstance(self.content, list):
            bad = next((p.type for p in self.content if p.type != "text" or p.text is None), None)
            if bad is not None:
                raise invalid(f"{where.rstrip('.')}: content parts of type {_describe(bad)} are not supported",
                              param=f"{where}content")

    def template_message(self, developer_role: bool) -> dict[str, Any]:
        """This message as the chat template takes it (vLLM's conversion: text parts
        joined with newlines, ``developer`` as ``system`` for templates that do not know it)."""
        if isinstance(self.content, list):
            text = "\n".join(p.text for p in self.content)
        else:
            text = self.content or ""
        role = "system" if self.role == "developer" and not developer_role else self.role
        out: dict[str, Any] = {"role": role, "content": text}
        for key in ("name", "tool_calls", "tool_call_id"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


_CHAT_TEMPLATE_FIELDS = {
    "add_generation_prompt": HONOURED,
    "continue_final_message": Refused(False, reason="is not supported: every answer starts a new assistant turn"),
    "add_special_tokens": Refused(False, reason="is not supported: the chat template writes the special tokens"),
    "documents": HONOURED,
    "chat_template": Refused(reason="is not supported: the model's own template is used"),
    "chat_template_kwargs": HONOURED,
    "mm_processor_kwargs": Refused({}, reason="is not supported: the model takes text only"),
    "tools": HONOURED,
}


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    safety_identifier: str | None = Field(None, max_length=MAX_ID_CHARS)
    """Accepted; never logged nor used as a label."""
    prompt_cache_key: str | None = Field(None, max_length=MAX_ID_CHARS)
    """Accepted: prefix caching here needs no hint."""
    metadata: dict[str, str] | None = Field(None, max_length=16)
    """Accepted: it tags stored completions, and none are stored."""
    # Known to OpenAI, not honoured.
    store: bool | None = False
    service_tier: str | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    verbosity: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    moderation: dict[str, Any] | None = None
    best_of: int | None = None
    # Known to vLLM, not honoured yet (the chat template's inputs).
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    add_special_tokens: bool | None = False
    documents: list[dict[str, Any]] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    media_io_kwargs: dict[str, Any] | None = None
    # Being built: each becomes HONOURED when it is wired in.
    echo: bool | None = False
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    reasoning_effort: str | None = None
    include_reasoning: bool | None = True

    FIELDS = {
        **_SamplingRequest.FIELDS,
        **_CHAT_TEMPLATE_FIELDS,
        "messages": HONOURED, "max_tokens": HONOURED, "max_completion_tokens": HONOURED, "logprobs": HONOURED,
        "top_logprobs": HONOURED, "safety_identifier": HONOURED, "prompt_cache_key": HONOURED,
        "metadata": HONOURED,
        "store": Refused(False, reason="is not supported: completions are not stored"),
        "service_tier": Refused("auto", "default"),
        "modalities": Refused(["text"], reason="is not supported: the model answers in text only"),
        "audio": Refused(reason="is not supported: the model answers in text only"),
        "prediction": Refused(reason="is not supported: there is no speculative decoding"),
        "web_search_options": Refused(reason="is not supported: the server has no tools"),
        "verbosity": Refused("medium"),
        "prompt_cache_retention": Refused("in_memory"),
        "prompt_cache_options": Refused(),
        "moderation": Refused(),
        "best_of": Refused(1, reason="is not supported for chat"),
        "media_io_kwargs": Refused({}, reason="is not supported: the model takes text only"),
        "echo": Refused(False, reason="is not supported for chat (it is on /v1/completions)"),
        "tool_choice": HONOURED,
        "parallel_tool_calls": HONOURED,
        "functions": Refused([], reason="(deprecated by OpenAI) is not supported: use tools"),
        "function_call": Refused("none", "auto", reason="(deprecated by OpenAI) is not supported: use tool_choice"),
        "reasoning_effort": Refused(reason="is not supported: thinking is switched with chat_template_kwargs "
                                           "(e.g. enable_thinking)"),
        "include_reasoning": HONOURED,
    }

    def check_values(self, where: str) -> None:
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid("top_logprobs requires logprobs to be true", param="top_logprobs")
        for key, value in (self.metadata or {}).items():
            if len(key) > 64 or len(value) > 512:
                raise invalid("metadata keys must have at most 64 characters and values at most 512",
                              param="metadata")
        super().check_values(where)

    def template_messages(self, developer_role: bool = True) -> list[dict[str, Any]]:
        """Messages as the chat template takes them (``developer_role``: the template
        knows the developer role)."""
        return [m.template_message(developer_role) for m in self.messages]


# -- /tokenize and /detokenize (vLLM's shapes) ----------------------------------------------


class TokenizeCompletionRequest(Body):
    model: str | None = None
    prompt: str
    add_special_tokens: bool | None = True
    return_token_strs: bool | None = False
    """Also return each token's vocabulary string."""

    FIELDS = {"model": HONOURED, "prompt": HONOURED, "add_special_tokens": HONOURED, "return_token_strs": HONOURED}


class TokenizeChatRequest(Body):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    return_token_strs: bool | None = False
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    add_special_tokens: bool | None = False
    documents: list[dict[str, Any]] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    tools: list[Any] | None = None

    FIELDS = {"model": HONOURED, "messages": HONOURED, "return_token_strs": HONOURED, **_CHAT_TEMPLATE_FIELDS}

    def template_messages(self, developer_role: bool = True) -> list[dict[str, Any]]:
        return [m.template_message(developer_role) for m in self.messages]


class DetokenizeRequest(Body):
    model: str | None = None
    tokens: list[int]

    FIELDS = {"model": HONOURED, "tokens": HONOURED}


REQUEST_MODELS: tuple[type[Body], ...] = (CompletionRequest, ChatCompletionRequest, TokenizeCompletionRequest,
                                          TokenizeChatRequest, DetokenizeRequest)


def parse(model: type[Body], data: Any) -> Any:
    """Validate a decoded JSON body; a type error becomes 400 naming the field. Field
    policies are checked by ``check()`` on the result (after the model name's 404)."""
    if not isinstance(data, dict):
        raise invalid(f"the request body must be a JSON object, got {type(data).__name__}")
    check_json(data)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise invalid_from_validation(e) from None


def invalid_from_validation(e: ValidationError) -> APIError:
    errors = e.errors()
    first = errors[0]
    loc = first["loc"]
    param = str(loc[0]) if loc else None
    if first["type"] == "missing":
        where = _where(loc)
        return invalid(f"'{where}' is a required property", param=where if len(loc) > 1 else param)
    if len({err["loc"][:1] for err in errors}) == 1 and len(errors) > 1:  # a union: every member failed
        return invalid(f"invalid type for '{param}': got {_describe(first.get('input'))}", param=param)
    return invalid(f"invalid value for '{_where(loc)}': {first['msg']}", param=param)


def _where(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


__all__ = ["APIError", "ChatCompletionRequest", "CompletionRequest", "DetokenizeRequest", "REQUEST_MODELS",
           "TokenizeChatRequest", "TokenizeCompletionRequest", "invalid", "parse"]
