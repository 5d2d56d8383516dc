"""Workloads: what a load test sends and when, built without sending anything.

A workload is a stream of :class:`Session` objects. A session is one or more
requests (:class:`RequestSpec`) sent strictly one after another; sessions run
concurrently. Every workload but multi-turn has one request per session.

- ``fixed``: every prompt ``input_len`` tokens, every output ``output_len``.
- ``synthetic``: lengths drawn from ``input_dist`` / ``output_dist``.
- ``shared-prefix``: request ``i`` belongs to group ``i % G``; its prompt is the
  group's prefix of ``prefix_len`` words (one token each with a tokenizer) followed by
  its own random suffix, fitted so the whole prompt counts ``prefix_len + suffix_len``
  tokens on the server (BOS and chat-template tokens come out of the suffix's share).
- ``multi-turn``: conversations of ``num_turns`` turns. Turn ``k > 0``'s prompt is turn
  ``k-1``'s prompt, the answer actually received, then a new user message (for chat,
  the messages plus an assistant message and a user message). Its ``prompt`` here is
  the plan made with a placeholder answer of ``output_len`` words; the runner rebuilds
  it from the real answer with :func:`follow_up`.
- ``trace``: one request per JSONL line of a Mooncake trace. Hash id ``h`` stands for
  ``trace_block_size`` words drawn from a generator seeded by ``(seed, h)``, so lines
  sharing a hash id share that block's tokens exactly; the prompt is its blocks'
  words cut to ``input_length`` tokens; arrivals are the timestamps (ms) relative to
  the first line, times ``trace_time_scale``.

Open-loop arrivals (``rate``) are gamma/Poisson offsets from the start, one per
session (a conversation's later turns follow its previous turn's answer); without a
rate, ``arrival_s`` is None: closed loop (a session starts when a slot frees) or,
with neither rate nor concurrency, everything at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .config import LoadTestConfig
from .distributions import arrival_intervals
from .prompts import PromptFactory

Prompt = Any  # str for /v1/completions, list of {"role", "content"} for chat


@dataclass(frozen=True)
class RequestSpec:
    """One request as planned."""

    request_id: int
    arrival_s: float | None
    """Offset from the start of the run (open loop); None: when its session's slot allows."""
    prompt: Prompt
    input_len: int
    """Prompt tokens as the server will count them (exact with a tokenizer; for a
    multi-turn follow-up, the count with a placeholder answer)."""
    output_len: int
    session_id: int
    turn: int = 0
    group_id: int | None = None
    """shared-prefix: the group; trace: the line number."""
    new_message: str | None = None
    """multi-turn turns after the first: the user message appended to the context."""


@dataclass(frozen=True)
class Session:
    session_id: int
    arrival_s: float | None
    requests: tuple[RequestSpec, ...]


def follow_up(spec: RequestSpec, prev_prompt: Prompt, answer: str) -> Prompt:
    """The prompt of a multi-turn follow-up from the previous turn's prompt and real answer."""
    if spec.new_message is None:
        raise ValueError(f"request {spec.request_id} is not a follow-up turn")
    if isinstance(prev_prompt, str):
        return prev_prompt + answer + spec.new_message
    return [*prev_prompt, {"role": "assistant", "content": answer}, {"role": "user", "content": spec.new_message}]


class WorkloadBuilder:
    """Sessions of one config; deterministic for a given seed and tokenizer."""

    def __init__(self, config: LoadTestConfig, factory: PromptFactory | None = None) -> None:
        self.config = config
        self.factory = factory if factory is not None else PromptFactory.from_dir(config.tokenizer_dir)
        seeds = np.random.SeedSequence(config.seed).spawn(3)
        self._length_rng, self._word_rng, self._arrival_rng = (np.random.default_rng(s) for s in seeds)
        self._chat = config.endpoint == "chat"
        # Read (and validate) the whole trace now, so a bad line fails before anything is sent.
        self._trace_entries = list(read_trace(config.trace_path)) if config.workload == "trace" else []

    # -- public --------------------------------------------------------------------------

    def sessions(self) -> Iterator[Session]:
        """Sessions in arrival order, up to ``num_requests`` requests (unbounded without it,
        except for a trace, which ends with its file)."""
        limit = self.config.num_requests
        num_sent = 0
        arrival = 0.0
        for session in self._raw_sessions():
            if limit is not None and num_sent >= limit:
                return
            requests = session.requests
            if limit is not None:
                requests = requests[: limit - num_sent]
            num_sent += len(requests)
            if self.config.rate is not None:
                offset: float | None = arrival
                arrival += float(arrival_intervals(self._arrival_rng, 1, self.config.rate, self.config.burstiness)[0])
            else:
                offset = session.arrival_s  # trace timestamps, else None
            head = replace(requests[0], arrival_s=offset)
            yield Session(session.session_id, offset, (head, *requests[1:]))

    def requests(self, max_requests: int | None = None) -> list[RequestSpec]:
        """The flat list of planned requests (at most ``max_requests``): with ``duration_s``,
        only the open-loop arrivals before it; a closed loop bounded only by duration
        needs ``max_requests``."""
        cfg = self.config
        if cfg.num_requests is None and max_requests is None and cfg.workload != "trace" and cfg.rate is None:
            raise ValueError("this run is bounded only by duration; pass max_requests")
        out: list[RequestSpec] = []
        for session in self.sessions():
            if cfg.duration_s is not None and session.arrival_s is not None and session.arrival_s >= cfg.duration_s:
                break  # arrives after the end: the run would not send it
            for spec in session.requests:
                if max_requests is not None and len(out) >= max_requests:
                    return out
                out.append(spec)
        return out

    # -- per workload ---------------------------------------------------------------------

    def _raw_sessions(self) -> Iterator[Session]:
        kind = self.config.workload
        if kind == "trace":
            yield from self._trace()
            return
        if kind == "multi-turn":
            yield from self._conversations()
            return
        index = 0
        while True:
            yield Session(index, None, (self._single(index),))
            index += 1

    def _single(self, index: int) -> RequestSpec:
        cfg = self.config
        if cfg.workload == "shared-prefix":
            group = index % cfg.num_prefix_groups
            group_rng = np.random.default_rng([cfg.seed, 1, group])
            prefix = self.factory.random_words(group_rng, cfg.prefix_len)
            input_len = cfg.prefix_len + cfg.suffix_len
            words = prefix + self.factory.random_words(self._word_rng, cfg.suffix_len)
        else:
            group = None
            input_len = int(cfg.input_lengths().sample(self._length_rng, 1)[0])
            words = self.factory.random_words(self._word_rng, input_len)
        output_len = int(cfg.output_lengths().sample(self._length_rng, 1)[0])
        prompt, counted = self._prompt(words, input_len)
        return RequestSpec(index, None, prompt, counted, output_len, session_id=index, group_id=group)

    def _prompt(self, words: list[str], target_len: int) -> tuple[Prompt, int]:
        if self._chat:
            return self.factory.chat_messages([], words, target_len)
        return self.factory.completion_prompt(words, target_len)

    def _conversations(self) -> Iterator[Session]:
        cfg = self.config
        request_id = 0
        conversation = 0
        while True:
            specs = []
            prompt: Prompt = None
            for turn in range(cfg.num_turns):
                message_len = int(cfg.input_lengths().sample(self._length_rng, 1)[0])
                output_len = int(cfg.output_lengths().sample(self._length_rng, 1)[0])
                words = self.factory.random_words(self._word_rng, message_len)
                if turn == 0:
                    prompt, counted = self._prompt(words, None) if self._chat else self._first_text(words)
                    new_message = None
                else:
                    new_message = self.factory.text(words)
                    placeholder = self.factory.text(self.factory.words[:1] * specs[-1].output_len)
                    prompt = follow_up(replace(specs[-1], new_message=new_message), prompt, placeholder)
                    counted = self._count(prompt)
                specs.append(RequestSpec(request_id, None, prompt, counted, output_len, session_id=conversation,
                                         turn=turn, new_message=new_message))
                request_id += 1
            yield Session(conversation, None, tuple(specs))
            conversation += 1

    def _first_text(self, words: list[str]) -> tuple[str, int]:
        text = self.factory.text(words)
        return text, self.factory.count_completion(text)

    def _count(self, prompt: Prompt) -> int:
        return self.factory.count_chat(prompt) if self._chat else self.factory.count_completion(prompt)

    def _trace(self) -> Iterator[Session]:
        cfg = self.config
        first_ms: float | None = None
        for index, entry in enumerate(self._trace_entries):
            if first_ms is None:
                first_ms = entry["timestamp"]
            words: list[str] = []
            for hash_id in entry["hash_ids"]:
                words += self.factory.random_words(np.random.default_rng([cfg.seed, 2, hash_id]),
                                                   cfg.trace_block_size)
            if len(words) < entry["input_length"]:  # a trace whose blocks do not cover the prompt
                words += self.factory.random_words(self._word_rng, entry["input_length"] - len(words))
            prompt, counted = self._prompt(words, entry["input_length"])
            arrival = (entry["timestamp"] - first_ms) / 1000.0 * cfg.trace_time_scale
            spec = RequestSpec(index, arrival, prompt, counted, entry["output_length"], session_id=index,
                               group_id=index)
            yield Session(index, arrival, (spec,))


def read_trace(path: str | Path) -> Iterator[dict[str, Any]]:
    """Validated entries of a Mooncake-style JSONL trace, in file order (timestamps must not decrease)."""
    last_ms = None
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not JSON: {e}") from None
            if not isinstance(entry, dict):
                raise ValueError(f"{path}:{line_no}: each line must be a JSON object")
            for key in ("input_length", "output_length"):
                value = entry.get(key)
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise ValueError(f"{path}:{line_no}: {key} must be an integer >= 1, got {value!r}")
            ts = entry.get("timestamp", 0)
            if not isinstance(ts, (int, float)) or isinstance(ts, bool) or ts < 0:
                raise ValueError(f"{path}:{line_no}: timestamp must be a number of ms >= 0, got {ts!r}")
            if last_ms is not None and ts < last_ms:
                raise ValueError(f"{path}:{line_no}: timestamp {ts} is before the previous line's {last_ms}")
            hash_ids = entry.get("hash_ids", [])
            if not isinstance(hash_ids, list) or not all(isinstance(h, int) and not isinstance(h, bool)
                                                         and h >= 0 for h in hash_ids):
                raise ValueError(f"{path}:{line_no}: hash_ids must be a list of integers >= 0, got {hash_ids!r}")
            last_ms = ts
            yield {"timestamp": float(ts), "input_length": entry["input_length"],
                   "output_length": entry["output_length"], "hash_ids": hash_ids}
