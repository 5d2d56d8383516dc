"""OpenAI response bodies built from a request's deltas: whole responses, stream chunks,
usage and logprobs.

Usage is OpenAI's ``{"prompt_tokens", "completion_tokens", "total_tokens",
"prompt_tokens_details": {"cached_tokens"}}``; the cached count is the prompt tokens the
workers served from their prefix caches (as they report it in their final message). With
``stream_options.continuous_usage_stats`` (vLLM) every chunk carries the request's usage
so far (counted from the chunks written, so it never runs ahead of them); the last usage
chunk carries the whole, cached tokens included.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from pdserve.proto import pdserve_pb2 as pb

TokenText = Callable[[int], str]


def usage_body(num_prompt_tokens: int, num_completion_tokens: int,
               num_cached_tokens: int | None = None) -> dict[str, Any]:
    """OpenAI's usage object (``prompt_tokens_details`` when the cached count is known)."""
    body: dict[str, Any] = {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_completion_tokens,
                            "total_tokens": num_prompt_tokens + num_completion_tokens}
    if num_cached_tokens is not None:
        body["prompt_tokens_details"] = {"cached_tokens": num_cached_tokens}
    return body


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
    streaming, or ``add`` per delta and one ``body`` at the end.

    ``continuous_usage``: every chunk carries the usage so far (``num_prompt_tokens`` and
    the completion tokens of the chunks built until then)."""

    def __init__(self, *, chat: bool, request_id: str, model: str, num_choices: int, num_top_logprobs: int | None,
                 token_text: TokenText, include_usage: bool = False, continuous_usage: bool = False,
                 num_prompt_tokens: int = 0) -> None:
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{request_id}"
        self.model = model
        self.created = int(time.time())
        self.num_choices = num_choices
        self.num_top = num_top_logprobs
        self.token_text = token_text
        self.include_usage = include_usage
        self.continuous_usage = continuous_usage
        self.num_prompt_tokens = num_prompt_tokens
        self._num_completion_tokens = 0
        """Completion tokens of the deltas built into chunks so far."""
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
        if self.continuous_usage:
            body["usage"] = usage_body(self.num_prompt_tokens, self._num_completion_tokens)
        elif self.include_usage:
            body["usage"] = None
        return body

    def chunk(self, delta: Any) -> dict[str, Any] | None:
        """The chunk for ``delta``; None when it carries nothing to show (text held back)."""
        self._num_completion_tokens += len(delta.token_ids)
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

    def usage_chunk(self, num_prompt_tokens: int, num_completion_tokens: int,
                    num_cached_tokens: int | None = None) -> dict[str, Any]:
        body = self._envelope([], stream=True)
        body["usage"] = usage_body(num_prompt_tokens, num_completion_tokens, num_cached_tokens)
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

    def body(self, num_prompt_tokens: int, num_completion_tokens: int,
             num_cached_tokens: int | None = None) -> dict[str, Any]:
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
        body["usage"] = usage_body(num_prompt_tokens, num_completion_tokens, num_cached_tokens)
        return body


__all__ = ["ResponseBuilder", "chat_logprobs", "completion_logprobs", "usage_body"]
