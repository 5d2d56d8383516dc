"""One streamed request against an OpenAI-compatible server, timed into a RequestRecord.

The body asks for streaming with ``stream_options.include_usage`` (exact token
counts), ``max_tokens`` = the planned output length and, by default, ``ignore_eos``
so the server generates exactly that many tokens. Every failure ends up as an error
*kind* on the record (see loadtest/metrics.py); nothing raises out of :func:`send`
except cancellation, which the runner turns into ``cancelled_at_end``.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx

from .config import LoadTestConfig
from .metrics import RequestRecord
from .sse import SSEParser


class TargetError(Exception):
    """The server cannot be used at all (unreachable, or it lists no model)."""


class _Failure(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def headers(config: LoadTestConfig) -> dict[str, str]:
    return {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}


def request_body(config: LoadTestConfig, model: str, prompt: Any, max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": config.temperature,
                            "stream": True, "stream_options": {"include_usage": True}}
    if config.endpoint == "chat":
        body["messages"] = prompt
    else:
        body["prompt"] = prompt
    if config.ignore_eos:
        body["ignore_eos"] = True
    body.update(dict(config.extra_body))
    return body


def error_kind(status: int, body: bytes) -> tuple[str, str]:
    """``http_<status>:<type or code>`` and a message from an OpenAI error envelope (or the raw body)."""
    text = body.decode("utf-8", errors="replace")
    try:
        err = json.loads(text).get("error")
    except (json.JSONDecodeError, AttributeError):
        err = None
    if isinstance(err, dict):
        label = err.get("type") or err.get("code")
        kind = f"http_{status}:{label}" if label else f"http_{status}"
        return kind, str(err.get("message", ""))[:300]
    if isinstance(err, str):
        return f"http_{status}", err[:300]
    return f"http_{status}", text[:300]


async def send(client: httpx.AsyncClient, config: LoadTestConfig, model: str, prompt: Any,
               record: RequestRecord, run_start: float) -> str:
    """Send one request and fill ``record``; returns the generated text ("" on failure)."""
    url = config.api_url + ("/chat/completions" if config.endpoint == "chat" else "/completions")
    body = request_body(config, model, prompt, record.output_len)
    t0 = time.perf_counter()
    record.start_s = t0 - run_start
    try:
        async with asyncio.timeout(config.timeout_s):
            return await _stream(client, url, body, config, record, t0)
    except _Failure as e:
        record.error, record.error_message = e.kind, e.message
    except (TimeoutError, httpx.TimeoutException):
        record.error, record.error_message = "timeout", f"no complete answer within {config.timeout_s} s"
    except (httpx.TransportError, httpx.StreamError) as e:
        record.error, record.error_message = "connection", f"{type(e).__name__}: {e}"[:300]
    except asyncio.CancelledError:
        record.error, record.error_message = "cancelled_at_end", "still running when the run ended"
        raise
    finally:
        record.end_s = time.perf_counter() - run_start
    return ""


async def _stream(client: httpx.AsyncClient, url: str, body: dict, config: LoadTestConfig, record: RequestRecord,
                  t0: float) -> str:
    parser = SSEParser()
    events = _EventReader(record, t0, chat=config.endpoint == "chat")
    async with client.stream("POST", url, json=body, headers=headers(config)) as response:
        if response.status_code != 200:
            raise _Failure(*error_kind(response.status_code, await response.aread()))
        async for chunk in response.aiter_bytes():
            now = time.perf_counter()
            for data in parser.feed(chunk):
                events.take(data, now)
        end = time.perf_counter()
        for data in parser.close():
            events.take(data, end)
    if events.num_events == 0:
        raise _Failure("bad_response", f"no server-sent events in the answer ({response.headers.get('content-type')})")
    if not (events.is_done or events.is_finished):
        raise _Failure("connection", "the stream ended before [DONE] or a finish_reason")
    record.e2e_s = end - t0
    if record.ttft_s is None:  # no visible text at all: the first token was seen at the end
        record.ttft_s = record.e2e_s
    if not record.is_usage_reported:
        record.num_output_tokens = events.num_text_chunks
    if record.num_prompt_tokens is None:
        record.num_prompt_tokens = record.input_len
    return "".join(events.parts)


class _EventReader:
    """Fills a record from a stream's events: TTFT and ITL from text-carrying chunks, token
    counts from ``usage``; raises _Failure on an error event or a malformed one."""

    def __init__(self, record: RequestRecord, t0: float, chat: bool) -> None:
        self.record, self.t0, self.chat = record, t0, chat
        self.parts: list[str] = []
        self.num_events = self.num_text_chunks = 0
        self.is_done = self.is_finished = False
        self._last_text_t: float | None = None

    def take(self, data: str, now: float) -> None:
        self.num_events += 1
        if data.strip() == "[DONE]":
            self.is_done = True
            return
        event = _decode(data)
        if "error" in event and not event.get("choices"):
            err = event["error"]
            label = (err.get("type") or err.get("code")) if isinstance(err, dict) else None
            raise _Failure("stream_error" + (f":{label}" if label else ""), str(err)[:300])
        record = self.record
        usage = event.get("usage")
        if isinstance(usage, dict):
            record.num_prompt_tokens = usage.get("prompt_tokens", record.num_prompt_tokens)
            record.num_output_tokens = int(usage.get("completion_tokens") or 0)
            record.is_usage_reported = True
        for choice in event.get("choices") or ():
            text = _choice_text(choice, self.chat)
            if choice.get("finish_reason") is not None:
                self.is_finished = True
            if not text:
                continue
            self.parts.append(text)
            self.num_text_chunks += 1
            if self._last_text_t is None:
                record.ttft_s = now - self.t0
            else:
                record.itl_s.append(now - self._last_text_t)
            self._last_text_t = now


def _decode(data: str) -> dict:
    try:
        event = json.loads(data)
    except json.JSONDecodeError:
        raise _Failure("bad_response", f"not JSON in the stream: {data[:200]!r}") from None
    if not isinstance(event, dict):
        raise _Failure("bad_response", f"a stream event is not a JSON object: {data[:200]!r}")
    return event


def _choice_text(choice: Any, chat: bool) -> str:
    if not isinstance(choice, dict):
        raise _Failure("bad_response", f"a choice is not a JSON object: {choice!r}"[:300])
    if not chat:
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    return (delta.get("content") or "") + (delta.get("reasoning_content") or "")


async def first_model(client: httpx.AsyncClient, config: LoadTestConfig) -> str:
    """The first id of GET /v1/models (TargetError with the server's answer when there is none)."""
    try:
        r = await client.get(config.api_url + "/models", headers=headers(config), timeout=30)
    except httpx.TransportError as e:
        raise TargetError(f"cannot reach {config.api_url}/models: {type(e).__name__}: {e}") from None
    if r.status_code != 200:
        kind, message = error_kind(r.status_code, r.content)
        raise TargetError(f"GET {config.api_url}/models failed ({kind}): {message}; pass the model name")
    data = r.json().get("data") or []
    if not data or not isinstance(data[0], dict) or "id" not in data[0]:
        raise TargetError(f"GET {config.api_url}/models lists no model; pass the model name")
    return str(data[0]["id"])
