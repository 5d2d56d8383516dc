"""``LoadTestConfig``: everything one load-test run needs, validated on construction.

Built by the CLI (``loadtest/cli.py``) or directly by Python callers (the planner).
Each field's docstring is its meaning; the workload fields that a workload does not
use are ignored by it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .distributions import LengthDistribution

WORKLOADS = ("fixed", "synthetic", "shared-prefix", "multi-turn", "trace")
ENDPOINTS = ("completions", "chat")


@dataclass(frozen=True)
class LoadTestConfig:
    """One load-test run against an OpenAI-compatible server."""

    base_url: str
    """Server root, e.g. ``http://127.0.0.1:8000`` (a trailing ``/v1`` is accepted)."""
    endpoint: str = "completions"
    """``completions`` (/v1/completions) or ``chat`` (/v1/chat/completions)."""
    model: str | None = None
    """Model name sent in requests; None: the first id of GET /v1/models."""
    api_key: str | None = None
    """Sent as ``Authorization: Bearer``; None sends no header."""
    ignore_eos: bool = True
    """Send ``ignore_eos: true`` (vLLM/pdserve extension) so output lengths are exact."""
    temperature: float = 0.0

    # -- workload --------------------------------------------------------------------------
    workload: str = "fixed"
    """One of fixed, synthetic, shared-prefix, multi-turn, trace."""
    input_len: int = 512
    """fixed: prompt tokens; multi-turn: tokens of each new user message (unless input_dist)."""
    output_len: int = 128
    """fixed / shared-prefix / multi-turn: output tokens (unless output_dist)."""
    input_dist: LengthDistribution | None = None
    """synthetic (and multi-turn user messages): prompt lengths; parse with LengthDistribution.parse."""
    output_dist: LengthDistribution | None = None
    """synthetic (and multi-turn, shared-prefix): output lengths."""
    num_prefix_groups: int = 4
    """shared-prefix: number of distinct prefixes G."""
    prefix_len: int = 256
    """shared-prefix: tokens P of each group's prefix."""
    suffix_len: int = 64
    """shared-prefix: tokens S after the prefix, distinct per request."""
    num_turns: int = 3
    """multi-turn: turns per conversation."""
    trace_path: str | None = None
    """trace: JSONL with timestamp (ms), input_length, output_length, hash_ids (Mooncake format)."""
    trace_block_size: int = 512
    """trace: tokens stood for by one hash id."""
    trace_time_scale: float = 1.0
    """trace: arrival offsets are timestamps times this (0.5 replays twice as fast)."""
    tokenizer_dir: str | None = None
    """Model directory whose tokenizer makes prompt lengths exact; None: approximate words."""
    seed: int = 0

    # -- arrivals and bounds -----------------------------------------------------------------
    rate: float | None = None
    """Open loop: mean requests/s (conversations/s for multi-turn). None with no concurrency: all at once."""
    burstiness: float = 1.0
    """Gamma shape of the inter-arrival times; 1 is Poisson."""
    concurrency: int | None = None
    """Closed loop: requests in flight (with ``rate``: a cap on the open loop)."""
    num_requests: int | None = None
    """Requests to send (turns, for multi-turn); trace default: every line."""
    duration_s: float | None = None
    """Stop sending after this many seconds; in-flight requests get up to ``drain_timeout_s`` more."""
    timeout_s: float = 300.0
    """Per-request limit, from send to the end of the stream."""
    drain_timeout_s: float | None = None
    """After ``duration_s``: how long in-flight requests may still run before they are
    cancelled (``cancelled_at_end``); None: ``timeout_s``."""

    # -- service-level objectives -------------------------------------------------------------
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    slo_e2e_ms: float | None = None

    show_progress: bool = False
    """A live progress line on stderr (the CLI turns it on when stderr is a TTY)."""
    extra_body: tuple[tuple[str, object], ...] = field(default=())
    """Extra JSON fields merged into every request body."""

    def __post_init__(self) -> None:
        if not isinstance(self.base_url, str) or not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {ENDPOINTS}, got {self.endpoint!r}")
        if self.workload not in WORKLOADS:
            raise ValueError(f"workload must be one of {WORKLOADS}, got {self.workload!r}")
        for name in ("input_len", "output_len", "num_prefix_groups", "prefix_len", "suffix_len", "num_turns",
                     "trace_block_size"):
            _positive_int(name, getattr(self, name))
        for name in ("input_dist", "output_dist"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, LengthDistribution):
                raise ValueError(f"{name} must be a LengthDistribution (use LengthDistribution.parse), got {value!r}")
        if self.workload == "synthetic" and (self.input_dist is None or self.output_dist is None):
            raise ValueError("the synthetic workload needs input_dist and output_dist")
        if self.workload == "trace":
            if self.trace_path is None:
                raise ValueError("the trace workload needs trace_path")
            if not Path(self.trace_path).is_file():
                raise ValueError(f"trace_path {self.trace_path!r} is not a file")
            if self.rate is not None:
                raise ValueError(f"the trace workload takes its arrivals from the trace; rate must be None, "
                                 f"got {self.rate}")
        if not (self.trace_time_scale > 0 and math.isfinite(self.trace_time_scale)):
            raise ValueError(f"trace_time_scale must be a finite number > 0, got {self.trace_time_scale}")
        if self.rate is not None and not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError(f"rate must be a finite number > 0, got {self.rate}")
        if not (self.burstiness > 0 and math.isfinite(self.burstiness)):
            raise ValueError(f"burstiness must be a finite number > 0, got {self.burstiness}")
        if self.concurrency is not None:
            _positive_int("concurrency", self.concurrency)
        if self.num_requests is not None:
            _positive_int("num_requests", self.num_requests)
        if self.duration_s is not None and not (self.duration_s > 0 and math.isfinite(self.duration_s)):
            raise ValueError(f"duration_s must be a finite number > 0, got {self.duration_s}")
        if self.num_requests is None and self.duration_s is None and self.workload != "trace":
            raise ValueError("give num_requests and/or duration_s: the run must be bounded")
        if self.duration_s is not None and self.rate is None and self.concurrency is None \
                and self.workload != "trace":
            raise ValueError("duration_s needs rate or concurrency (all-at-once sending has no duration)")
        if not (self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            raise ValueError(f"timeout_s must be a finite number > 0, got {self.timeout_s}")
        if self.drain_timeout_s is not None and not (self.drain_timeout_s >= 0 and math.isfinite(self.drain_timeout_s)):
            raise ValueError(f"drain_timeout_s must be a finite number >= 0, got {self.drain_timeout_s}")
        for name in ("slo_ttft_ms", "slo_tpot_ms", "slo_e2e_ms"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        if not isinstance(self.extra_body, tuple) or not all(
                isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in self.extra_body):
            raise ValueError(f"extra_body must be a tuple of (name, value) pairs, got {self.extra_body!r}")
        if not (0.0 <= self.temperature <= 2.0):
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an int, got {self.seed!r}")

    @property
    def api_url(self) -> str:
        """The ``.../v1`` root."""
        url = self.base_url.rstrip("/")
        return url if url.endswith("/v1") else url + "/v1"

    @property
    def drain_timeout(self) -> float:
        return self.timeout_s if self.drain_timeout_s is None else self.drain_timeout_s

    @property
    def has_slo(self) -> bool:
        return any(v is not None for v in (self.slo_ttft_ms, self.slo_tpot_ms, self.slo_e2e_ms))

    @property
    def is_closed_loop(self) -> bool:
        return self.concurrency is not None and self.rate is None and self.workload != "trace"

    def input_lengths(self) -> LengthDistribution:
        return self.input_dist or LengthDistribution.fixed(self.input_len)

    def output_lengths(self) -> LengthDistribution:
        return self.output_dist or LengthDistribution.fixed(self.output_len)


def _positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
