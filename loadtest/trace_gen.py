"""Synthetic Mooncake-format traces with shared prefixes and multi-turn sessions.

Writes JSONL that :func:`pdserve.loadtest.workloads.read_trace` reads: one line per
request, ``timestamp`` (ms), ``input_length``, ``output_length``, ``hash_ids``. As in
Mooncake's traces, a hash id stands for one ``block_size``-token block (512 by default,
the load test's ``trace_block_size``) *in its context*: two lines share a hash id only
when they share that block and everything before it. A prompt's last hash id may cover a
partial block; the load test and the simulator cut it to ``input_length``
(:mod:`.sim_workload`), so a later prompt holding the same id holds those tokens too.

The traffic (every draw from a seeded generator; the same spec writes the same file):

- **Sessions** start as a Poisson process at ``session_rate`` per second. Each opens with
  one of ``num_prefixes`` shared prefixes (system prompts, documents: whole blocks,
  ``prefix_blocks`` long), picked with Zipf popularity (rank ``r`` weighs ``r**-zipf_s``).
- **Turns.** Turn 0's prompt is the prefix plus a user message. Turn ``k`` extends turn
  ``k-1``'s whole prompt and its answer by a new message: its hash ids start with all of
  turn ``k-1``'s (the partial last one included: it now holds more of the same tokens)
  and continue with fresh ids. A session has a geometric number of turns (mean
  ``mean_turns``, at most ``max_turns``) and ends early when the next prompt would pass
  ``max_input_len``.
- **Timing.** Turn ``k`` arrives after turn ``k-1``'s estimated response time
  (``response_base_s + response_token_s * output_len``) plus an exponential think time
  (mean ``think_time_s``). Lines are written in timestamp order.
- **Lengths.** User messages and outputs are lognormal around their medians, clipped to
  their ranges; with the defaults prompts run from about 1k to 16k tokens and outputs
  from 50 to 500.

    python -m pdserve.loadtest.trace_gen OUT.jsonl [--duration-s 60] [--session-rate 10] [--seed 0]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

__all__ = ["TraceSpec", "generate_trace", "write_trace"]


@dataclass(frozen=True)
class TraceSpec:
    """One synthetic trace; every field has a default that gives a realistic chat/RAG mix."""

    duration_s: float = 60.0
    """Sessions start in ``[0, duration_s)``; their later turns may arrive after it."""
    session_rate: float = 10.0
    """Mean sessions started per second (Poisson)."""
    seed: int = 0
    block_size: int = 512
    """Tokens per hash id (Mooncake's 512; the load test's ``trace_block_size``)."""
    num_prefixes: int = 300
    """Distinct shared prefixes (system prompts, documents)."""
    zipf_s: float = 1.1
    """Popularity exponent of the prefixes: rank ``r`` is picked with weight ``r**-zipf_s``."""
    min_prefix_blocks: int = 2
    max_prefix_blocks: int = 16
    """A prefix's length in blocks, log-uniform in ``[min, max]`` (1k-8k tokens at 512)."""
    message_median: int = 1000
    message_sigma: float = 0.8
    min_message_len: int = 32
    max_message_len: int = 4096
    """A user message's tokens (question, retrieved passages, tool results): lognormal
    (median, sigma), clipped to ``[min, max]``."""
    output_median: int = 150
    output_sigma: float = 0.6
    min_output_len: int = 50
    max_output_len: int = 500
    """An answer's tokens: lognormal (median, sigma), clipped to ``[min, max]``."""
    mean_turns: float = 3.0
    max_turns: int = 8
    max_input_len: int = 16384
    """A session ends before a turn whose prompt would be longer."""
    think_time_s: float = 5.0
    """Mean pause between an answer and the next turn (exponential): agent loops and quick
    follow-ups; people chatting pause longer."""
    response_base_s: float = 1.0
    response_token_s: float = 0.03
    """The estimated response time of a turn: base plus per output token."""

    def __post_init__(self) -> None:
        for name in ("duration_s", "session_rate"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)!r}")
        for name in ("zipf_s", "message_sigma", "output_sigma", "think_time_s", "response_base_s",
                     "response_token_s"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        for name in ("block_size", "num_prefixes", "min_prefix_blocks", "min_message_len", "min_output_len",
                     "max_turns", "message_median", "output_median"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for low, high in (("min_prefix_blocks", "max_prefix_blocks"), ("min_message_len", "max_message_len"),
                          ("min_output_len", "max_output_len")):
            if getattr(self, high) < getattr(self, low):
                raise ValueError(f"{high} must be >= {low}, got {getattr(self, high)} < {getattr(self, low)}")
        if not 1 <= self.mean_turns <= self.max_turns:
            raise ValueError(f"mean_turns must be in [1, max_turns={self.max_turns}], got {self.mean_turns}")
        smallest = self.max_prefix_blocks * self.block_size + self.max_message_len
        if self.max_input_len < smallest:
            raise ValueError(f"max_input_len must hold the longest first turn ({smallest} tokens), "
                             f"got {self.max_input_len}")


class _Ids:
    """Fresh hash ids, never reused across contexts."""

    def __init__(self) -> None:
        self._next = itertools.count()

    def take(self, n: int) -> list[int]:
        return [next(self._next) for _ in range(n)]


def _lognormal_int(rng: np.random.Generator, median: int, sigma: float, low: int, high: int) -> int:
    return int(min(high, max(low, round(median * math.exp(sigma * rng.standard_normal())))))


def generate_trace(spec: TraceSpec) -> list[dict]:
    """The trace's lines in timestamp order (``timestamp`` in ms, rounded to 0.001)."""
    # Independent streams, so changing the rate or duration moves arrivals without
    # reshuffling what each session contains.
    prefix_rng, session_rng, arrival_rng = (np.random.default_rng(s)
                                            for s in np.random.SeedSequence(spec.seed).spawn(3))
    ids = _Ids()
    bs = spec.block_size
    log_lo, log_hi = math.log(spec.min_prefix_blocks), math.log(spec.max_prefix_blocks + 1)
    prefixes = [ids.take(min(spec.max_prefix_blocks, int(math.exp(prefix_rng.uniform(log_lo, log_hi)))))
                for _ in range(spec.num_prefixes)]
    weights = np.arange(1, spec.num_prefixes + 1, dtype=float) ** -spec.zipf_s
    weights /= weights.sum()
    stop_p = 1.0 / spec.mean_turns  # geometric number of turns with this mean

    lines = []
    start_s = float(arrival_rng.exponential(1.0 / spec.session_rate))
    while start_s < spec.duration_s:
        prefix = prefixes[int(session_rng.choice(spec.num_prefixes, p=weights))]
        hash_ids = list(prefix)
        context_len = len(prefix) * bs  # tokens the next prompt starts with
        time_s = start_s
        for turn in range(spec.max_turns):
            message_len = _lognormal_int(session_rng, spec.message_median, spec.message_sigma,
                                         spec.min_message_len, spec.max_message_len)
            output_len = _lognormal_int(session_rng, spec.output_median, spec.output_sigma,
                                        spec.min_output_len, spec.max_output_len)
            input_len = context_len + message_len
            if input_len > spec.max_input_len:
                break
            # The partial last block (if any) keeps its id; blocks past it are new.
            hash_ids += ids.take(-(-input_len // bs) - len(hash_ids))
            lines.append({"timestamp": round(time_s * 1e3, 3), "input_length": input_len,
                          "output_length": output_len, "hash_ids": list(hash_ids)})
            if session_rng.random() < stop_p:
                break
            context_len = input_len + output_len
            hash_ids += ids.take(-(-context_len // bs) - len(hash_ids))
            time_s += (spec.response_base_s + spec.response_token_s * output_len
                       + float(session_rng.exponential(spec.think_time_s)))
        start_s += float(arrival_rng.exponential(1.0 / spec.session_rate))
    lines.sort(key=lambda line: line["timestamp"])  # stable: a session's turns keep their order
    return lines


def write_trace(spec: TraceSpec, path: str | Path) -> int:
    """Write the trace of ``spec`` as JSONL; returns the number of lines."""
    lines = generate_trace(spec)
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line, separators=(",", ":")) + "\n")
    return len(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="JSONL file to write")
    defaults = TraceSpec()
    for f in fields(TraceSpec):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)),
                            default=getattr(defaults, f.name))
    args = parser.parse_args(argv)
    spec = TraceSpec(**{f.name: getattr(args, f.name) for f in fields(TraceSpec)})
    n = write_trace(spec, args.out)
    print(f"wrote {n} requests to {args.out}")


if __name__ == "__main__":
    main()
