"""The OpenAI wire format at the gateway's edge: request models, errors, response bodies.

Untrusted JSON is validated here with pydantic (strict types: ``"0.5"`` is not a
number, ``true`` is not an integer). Unknown fields are ignored, because OpenAI
clients send fields this server does not know; that also means internal fields
(``prefill_worker_id``, ``request_id``, transfer parameters) can never come from a
client: no model below has them. Known OpenAI features the workers cannot honour
(tools, echo, suffix, non-text response formats, ...) are refused with 400 instead of
being silently ignored. Sampling fields (OpenAI's penalties and ``logit_bias``, vLLM's
``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens``, ``allowed_token_ids``)
are only typed here; ``sampling.py`` bounds them and builds the engine's parameters.

Every error leaves the gateway as :class:`APIError`, rendered in OpenAI's envelope
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from pdserve.proto import pdserve_pb2 as pb


class APIError(Exception):
    """An error answered to the client with ``status`` and the OpenAI envelope."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# -- requests -------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Model):
    include_usage: bool | None = False


class _SamplingRequest(_Model):
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
    ignore_eos: bool | None = False  # vLLM extension, handy for benchmarks
    user: str | None = None  # accepted and ignored
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    """OpenAI's form: token-id strings to biases ({"50256": -100})."""
    # vLLM extensions, with vLLM's names and meanings.
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    allowed_token_ids: list[int] | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def unsupported(self) -> APIError | None:
        if self.stream_options is not None and not self.stream:
            return invalid("stream_options is only allowed when stream is true", param="stream_options")
        return None


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None

    def unsupported(self) -> APIError | None:
        if self.echo:
            return invalid("echo is not supported by this server", param="echo")
        if self.suffix:
            return invalid("suffix is not supported by this server", param="suffix")
        if self.best_of is not None and self.best_of != (self.n or 1):
            return invalid("best_of other than n is not supported by this server", param="best_of")
        return super().unsupported()


class ContentPart(_Model):
    type: str
    text: str | None = None


class ChatMessage(_Model):
    role: str
    content: str | list[ContentPart] | None = None


CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> APIError | None:
        if self.tools or self.functions:
            param = "tools" if self.tools else "functions"
            return invalid("tool calling is not supported by this server", param=param)
        if self.response_format and self.response_format.get("type", "text") != "text":
            return invalid("only response_format type 'text' is supported", param="response_format")
        if self.top_logprobs is not None and not self.logprobs:
            return invalid("top_logprobs requires logprobs to be true", param="top_logprobs")
        return super().unsupported()

    def template_messages(self) -> list[dict[str, str]]:
        """Messages as the chat template takes them (text content only)."""
        out = []
        for i, m in enumerate(self.messages):
            if m.role not in CHAT_ROLES:
                raise invalid(f"messages[{i}].role must be one of {sorted(CHAT_ROLES)}, got {m.role!r}",
                              param=f"messages[{i}].role")
            if isinstance(m.content, str):
                text = m.content
            elif m.content is None:
                raise invalid(f"messages[{i}].content must be set", param=f"messages[{i}].content")
            else:
                bad = next((p.type for p in m.content if p.type != "text" or p.text is None), None)
                if bad is not None:
                    raise invalid(f"messages[{i}]: content parts of type {bad!r} are not supported",
                                  param=f"messages[{i}].content")
                text = "".join(p.text for p in m.content)
            out.append({"role": m.role, "content": text})
        return out


def parse(model: type[_Model], data: Any) -> Any:
    """Validate a decoded JSON body; a type error becomes 400 naming the field."""
    if not isinstance(data, dict):
        raise invalid(f"the request body must be a JSON object, got {type(data).__name__}")
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
        return invalid(f"'{param}' is a required property", param=param)
    if len({err["loc"][:1] for err in errors}) == 1 and len(errors) > 1:  # a union: every member failed
        return invalid(f"invalid type for '{param}': got {_describe(first.get('input'))}", param=param)
    where = ".".join(str(p) for p in loc)
    return invalid(f"invalid value for '{where}': {first['msg']}", param=param)


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# -- responses --------------------------------------------------------------------------

TokenText = Callable[[int], str]

def usage_body(num_prompt_tokens: int, num_completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_completion_tokens,
            "total_tokens": num_prompt_tokens + num_completion_tokens}


def _top(lp: pb.TokenLogprobs, num_top: int) -> list[tuple[int, float]]:
    """The ``num_top`` most likely tokens of one position (the sampled one first in lp)."""
    pairs = sorted(zip(lp.token_ids, lp.logprobs), key=lambda p: -p[1])
    return pairs[:num_top]


def completion_logprobs(lps: Sequence[pb.TokenLogprobs], num_top: int, token_text: TokenText,
                        text_offset: int) -> dict[str, list]:
    """The legacy completions ``logprobs`` object for ``lps``, offsets from ``text_offset``."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for lp in lps:
        token = token_text(lp.token_ids[0])
        out["tokens"].append(token)
        out["token_logprobs"].append(lp.logprobs[0])
        out["top_logprobs"].append({token_text(t): v for t, v in _top(lp, num_top)})
        out["text_offset"].append(text_offset)
        text_offset += len(token)
    return out


def chat_logprobs(lps: Sequence[pb.TokenLogprobs], num_top: int, token_text: TokenText) -> list[dict[str, Any]]:
    """Entries of the chat ``logprobs.content`` list for ``lps``."""

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        token = token_text(token_id)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return [{**entry(lp.token_ids[0], lp.logprobs[0]),
             "top_logprobs": [entry(t, v) for t, v in _top(lp, num_top)]} for lp in lps]


class ResponseBuilder:
    """OpenAI bodies of one request built from its deltas (anything with ``index``,
    ``token_ids``, ``text``, ``logprobs``, ``finish_reason``): ``chunk`` per delta while
    streaming, or ``add`` per delta and one ``body`` at the end."""

    def __init__(self, *, chat: bool, request_id: str, model: str, num_choices: int, num_top_logprobs: int | None,
                 token_text: TokenText, include_usage: bool = False) -> None:
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{request_id}"
        self.model = model
        self.created = int(time.time())
        self.num_choices = num_choices
        self.num_top = num_top_logprobs
        self.token_text = token_text
        self.include_usage = include_usage
        self._text: list[list[str]] = [[] for _ in range(num_choices)]
        self._logprobs: list[Any] = [None] * num_choices
        self._text_offset = [0] * num_choices
        self._finish: list[str | None] = [None] * num_choices

    def _envelope(self, choices: list[dict[str, Any]], stream: bool) -> dict[str, Any]:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if stream and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def _logprobs_of(self, delta: Any) -> Any:
        if self.num_top is None:
            return None
        if self.chat:
            return {"content": chat_logprobs(delta.logprobs, self.num_top, self.token_text), "refusal": None}
        lp = completion_logprobs(delta.logprobs, self.num_top, self.token_text, self._text_offset[delta.index])
        self._text_offset[delta.index] += sum(len(t) for t in lp["tokens"])
        return lp

    # -- streaming ----------------------------------------------------------------

    def start_chunks(self) -> list[dict[str, Any]]:
        """Chat streams open every choice with the assistant role."""
        if not self.chat:
            return []
        return [self._chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}) for i in range(self.num_choices)]

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        body = self._envelope([choice], stream=True)
        if self.include_usage:
            body["usage"] = None
        return body

    def chunk(self, delta: Any) -> dict[str, Any] | None:
        """The chunk for ``delta``; None when it carries nothing to show (text held back)."""
        if not delta.text and delta.finish_reason is None and (self.num_top is None or not delta.logprobs):
            return None
        logprobs = self._logprobs_of(delta)
        if self.chat:
            choice = {"index": delta.index, "delta": {"content": delta.text} if delta.text else {},
                      "logprobs": logprobs, "finish_reason": delta.finish_reason}
        else:
            choice = {"index": delta.index, "text": delta.text, "logprobs": logprobs,
                      "finish_reason": delta.finish_reason}
        return self._chunk(choice)

    def usage_chunk(self, num_prompt_tokens: int, num_completion_tokens: int) -> dict[str, Any]:
        body = self._envelope([], stream=True)
        body["usage"] = usage_body(num_prompt_tokens, num_completion_tokens)
        return body

    # -- whole responses ------------------------------------------------------------

    def add(self, delta: Any) -> None:
        i = delta.index
        self._text[i].append(delta.text)
        if delta.finish_reason is not None:
            self._finish[i] = delta.finish_reason
        logprobs = self._logprobs_of(delta)
        if logprobs is None:
            return
        if self._logprobs[i] is None:
            self._logprobs[i] = logprobs
        elif self.chat:
            self._logprobs[i]["content"].extend(logprobs["content"])
        else:
            for key, values in logprobs.items():
                self._logprobs[i][key].extend(values)

    def body(self, num_prompt_tokens: int, num_completion_tokens: int) -> dict[str, Any]:
        choices = []
        for i in range(self.num_choices):
            text = "".join(self._text[i])
            logprobs = self._logprobs[i]
            if logprobs is None and self.num_top is not None:  # no tokens at all
                logprobs = {"content": [], "refusal": None} if self.chat else completion_logprobs([], 0, str, 0)
            choice: dict[str, Any] = {"index": i}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            choice.update(logprobs=logprobs, finish_reason=self._finish[i])
            choices.append(choice)
        body = self._envelope(choices, stream=False)
        body["usage"] = usage_body(num_prompt_tokens, num_completion_tokens)
        return body
