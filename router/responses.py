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

from .choices import ChatChoiceStream, ChatOutput, chat_message

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


def prompt_logprobs_body(lps: Sequence[pb.TokenLogprobs], token_text: TokenText) -> list[Any]:
    """vLLM's ``prompt_logprobs``: null for the first prompt token, then per position
    ``{token id: {"logprob", "rank", "decoded_token"}}`` for the prompt token and the top
    alternatives. A rank is given where it is known: the alternatives' (1, 2, ...), and the
    prompt token's when it is among them (else null: it ranks below all of them)."""
    out: list[Any] = [None]
    for lp in lps:
        actual, actual_lp = lp.token_ids[0], lp.logprobs[0]
        alternatives = sorted(zip(lp.token_ids[1:], lp.logprobs[1:]), key=lambda p: -p[1])
        entry = {}
        rank_of_actual = 1 + sum(v > actual_lp for _, v in alternatives)
        # k alternatives when the prompt token is outside the top k, k - 1 when inside.
        in_top = rank_of_actual <= len(alternatives)
        entry[str(actual)] = {"logprob": actual_lp, "rank": rank_of_actual if in_top else None,
                              "decoded_token": token_text(actual)}
        for rank, (t, v) in enumerate(alternatives, 1):
            entry[str(t)] = {"logprob": v, "rank": rank + (in_top and rank >= rank_of_actual),
                             "decoded_token": token_text(t)}
        out.append(entry)
    return out


def _merge_deltas(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One chunk ``delta`` from a choice's delta objects (strings joined, calls listed)."""
    out: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            out[key] = out[key] + value if key in out else value
    return out


class ResponseBuilder:
    """OpenAI bodies of one request built from its deltas (anything with ``index``,
    ``token_ids``, ``text``, ``logprobs``, ``finish_reason``): ``chunks`` per delta while
    streaming, or ``add`` per delta and one ``body`` at the end.

    ``continuous_usage``: every chunk carries the usage so far (``num_prompt_tokens`` and
    the completion tokens of the chunks built until then). ``chat_output``: how chat
    choices are read (reasoning, tool calls; ``choices.py``). ``echo``: completions
    prepend prompt ``i``'s text (``echo[i]``) and, with logprobs, its tokens' logprobs
    to choice ``i * n + j``. ``prompt_logprobs``: prompt ``i``'s logprobs as the workers
    sent them (positions 1..), once they arrived, else None; ``num_prompt_logprobs``: the
    request asked for vLLM's ``prompt_logprobs`` field in the answer."""

    def __init__(self, *, chat: bool, request_id: str, model: str, num_choices: int, num_top_logprobs: int | None,
                 token_text: TokenText, include_usage: bool = False, continuous_usage: bool = False,
                 num_prompt_tokens: int = 0, n: int = 1, chat_output: ChatOutput | None = None,
                 echo: Sequence[str] | None = None, echo_token_ids: Sequence[Sequence[int]] | None = None,
                 prompt_logprobs: Callable[[int], list | None] | None = None,
                 num_prompt_logprobs: int | None = None) -> None:
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{request_id}"
        self.model = model
        self.created = int(time.time())
        self.num_choices = num_choices
        self.n = n
        self.num_top = num_top_logprobs
        self.token_text = token_text
        self.include_usage = include_usage
        self.continuous_usage = continuous_usage
        self.num_prompt_tokens = num_prompt_tokens
        self.chat_output = chat_output if chat_output is not None and not chat_output.is_plain else None
        self.echo = echo
        self.echo_token_ids = echo_token_ids
        self.prompt_logprobs = prompt_logprobs or (lambda i: None)
        self.num_prompt_logprobs = num_prompt_logprobs
        self._num_completion_tokens = 0
        """Completion tokens of the deltas built into chunks so far."""
        self._text: list[list[str]] = [[] for _ in range(num_choices)]
        self._logprobs: list[Any] = [None] * num_choices
        self._text_offset = [0] * num_choices
        self._finish: list[str | None] = [None] * num_choices
        self._streams = ([ChatChoiceStream(self.chat_output) for _ in range(num_choices)]
                         if self.chat_output is not None else None)
        self._started = [False] * num_choices
        """Streaming: the choice's first chunk (echo, prompt logprobs) went out."""
        self._held: list[list[Any]] = [[] for _ in range(num_choices)]
        """Streaming: deltas waiting for their prompt's logprobs (echo with logprobs)."""

    @property
    def _needs_prompt_logprobs(self) -> bool:
        return (self.echo is not None and self.num_top is not None) or self.num_prompt_logprobs is not None

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

    def _echo_logprobs(self, index: int) -> dict[str, list]:
        """The prompt's part of an echoed choice's legacy logprobs (first token: null)."""
        prompt = index // self.n
        lps = self.prompt_logprobs(prompt) or []
        token_ids = self.echo_token_ids[prompt]
        out = completion_logprobs(lps, self.num_top, self.token_text, len(self.token_text(token_ids[0])))
        first = self.token_text(token_ids[0])
        out["tokens"].insert(0, first)
        out["token_logprobs"].insert(0, None)
        out["top_logprobs"].insert(0, None)
        out["text_offset"].insert(0, 0)
        self._text_offset[index] = len(self.echo[prompt])
        return out

    def _finish_reason(self, index: int, reason: str | None) -> str | None:
        if reason == "stop" and self._streams is not None and self._streams[index].has_tool_calls:
            return "tool_calls"
        return reason

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

    def chunks(self, delta: Any) -> list[dict[str, Any]]:
        """The chunks ``delta`` makes (none when it carries nothing to show: text held back,
        or its prompt's logprobs, which its first chunk needs, have not arrived yet)."""
        i = delta.index
        if not self._started[i] and self._needs_prompt_logprobs and self.prompt_logprobs(i // self.n) is None:
            self._held[i].append(delta)
            return []
        out = []
        for d in [*self._held[i], delta]:
            chunk = self._chunk_of(d)
            if chunk is not None:
                out.append(chunk)
        self._held[i].clear()
        return out

    def _chunk_of(self, delta: Any) -> dict[str, Any] | None:
        i = delta.index
        self._num_completion_tokens += len(delta.token_ids)
        first = not self._started[i]
        self._started[i] = True
        echoed = self._echo_logprobs(i) if first and self.echo is not None and self.num_top is not None else None
        logprobs = self._logprobs_of(delta) if self.num_top is not None and delta.logprobs else None
        if self.chat:
            parts = self._streams[i].feed(delta.text) if self._streams is not None else (
                [{"content": delta.text}] if delta.text else [])
            if self._streams is not None and delta.finish_reason is not None:
                parts += self._streams[i].finish()
            if not parts and delta.finish_reason is None and logprobs is None:
                return None
            choice = {"index": i, "delta": _merge_deltas(parts), "logprobs": logprobs,
                      "finish_reason": self._finish_reason(i, delta.finish_reason)}
            chunk = self._chunk(choice)
            if first and self.num_prompt_logprobs is not None and i == 0:
                chunk["prompt_logprobs"] = prompt_logprobs_body(self.prompt_logprobs(0) or [], self.token_text)
            return chunk
        text = delta.text
        if first and self.echo is not None:
            text = self.echo[i // self.n] + text
            if echoed is not None:
                for key, values in (logprobs or {}).items():
                    echoed[key].extend(values)
                logprobs = echoed
        if not text and delta.finish_reason is None and logprobs is None and not first:
            return None
        choice = {"index": i, "text": text, "logprobs": logprobs, "finish_reason": delta.finish_reason}
        if first and self.num_prompt_logprobs is not None:
            choice["prompt_logprobs"] = prompt_logprobs_body(self.prompt_logprobs(i // self.n) or [],
                                                             self.token_text)
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
        if self.num_top is None or not delta.logprobs:
            return
        logprobs = self._logprobs_of(delta)
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
            finish = self._finish[i]
            if self.chat:
                if self.chat_output is not None:
                    choice["message"] = chat_message(self.chat_output, text)
                    if finish == "stop" and choice["message"].get("tool_calls"):
                        finish = "tool_calls"
                else:
                    choice["message"] = {"role": "assistant", "content": text}
            elif self.echo is not None:
                prompt = i // self.n
                choice["text"] = self.echo[prompt] + text
                if logprobs is not None:
                    echoed = self._echo_logprobs_whole(i, logprobs)
                    logprobs = echoed
            else:
                choice["text"] = text
            choice.update(logprobs=logprobs, finish_reason=finish)
            if not self.chat and self.num_prompt_logprobs is not None:
                choice["prompt_logprobs"] = prompt_logprobs_body(self.prompt_logprobs(i // self.n) or [],
                                                                 self.token_text)
            choices.append(choice)
        body = self._envelope(choices, stream=False)
        if self.chat and self.num_prompt_logprobs is not None:
            body["prompt_logprobs"] = prompt_logprobs_body(self.prompt_logprobs(0) or [], self.token_text)
        body["usage"] = usage_body(num_prompt_tokens, num_completion_tokens, num_cached_tokens)
        return body

    def _echo_logprobs_whole(self, index: int, completion: dict[str, list]) -> dict[str, list]:
        """An echoed choice's legacy logprobs: the prompt's, then the completion's with its
        offsets moved past the prompt text."""
        out = self._echo_logprobs(index)
        shift = len(self.echo[index // self.n])
        for key in ("tokens", "token_logprobs", "top_logprobs"):
            out[key].extend(completion[key])
        out["text_offset"].extend(o + shift for o in completion["text_offset"])
        return out


__all__ = ["ResponseBuilder", "chat_logprobs", "completion_logprobs", "prompt_logprobs_body", "usage_body"]
