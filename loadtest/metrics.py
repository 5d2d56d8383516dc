"""Per-request records and the metrics of a load test (vLLM ``benchmark_serving`` definitions).

Times are taken on the client with a monotonic clock. For one request:

- **TTFT** (time to first token): from sending the request to receiving the first
  streamed chunk that carries generated text (a chat stream's opening role-only chunk
  and empty chunks do not count). A stream that ends without any text (every token
  special or held back) gets TTFT = its end-to-end latency.
- **E2E** (end-to-end latency): from sending the request to the end of its stream
  (``data: [DONE]`` or the connection closing).
- **TPOT** (time per output token, excluding the first):
  ``(E2E - TTFT) / (output_tokens - 1)``; defined only for requests with at least 2
  output tokens, and only those enter the TPOT statistics.
- **ITL** (inter-token latency): every gap between two successive text-carrying chunks.
  As in vLLM, a chunk that carries k > 1 tokens (a server batching its stream) counts
  as ONE gap, so ITL then over-states the per-token latency while TPOT does not. The
  ITL statistics pool the gaps of all completed requests.
- **Output tokens** are ``usage.completion_tokens`` of the stream's final usage chunk
  (requested with ``stream_options.include_usage``); a server that sends no usage gets
  the number of text-carrying chunks instead (exact only if each chunk is one token).
  **Input tokens** are ``usage.prompt_tokens``, else the count planned by the workload.

Over a run:

- Statistics of TTFT, TPOT, ITL and E2E (milliseconds): mean and the 50th, 90th, 95th
  and 99th percentiles (numpy's linear interpolation), over completed requests.
- **Duration**: from the first request sent to the last one completed (a request that
  failed or was cancelled later, e.g. after the duration bound, does not stretch it).
- **Request throughput** = completed requests / duration; **input** and **output token
  throughput** = tokens of completed requests / duration.
- A request **meets the SLOs** when it completed and each SLO given holds:
  ``TTFT <= slo_ttft``, ``TPOT <= slo_tpot`` (a request with one output token has no
  TPOT and passes this one) and ``E2E <= slo_e2e``. With no SLO given, every completed
  request meets them.
- **Goodput** = requests meeting the SLOs / duration (requests/s).
- **SLO attainment** = requests meeting the SLOs / all requests (failed ones included).
- **Errors** by kind: ``http_<status>:<error.type or code>``, ``timeout`` (the
  per-request limit), ``connection`` (refused, reset, closed mid-stream),
  ``stream_error:<type or code>`` (an error object inside a 200 stream),
  ``bad_response`` (not OpenAI-shaped, or no event stream), ``cancelled_at_end``
  (still running when the duration bound and its drain period ran out, or still
  waiting for a concurrency slot at the duration bound), ``conversation_aborted``
  (a multi-turn turn not sent because an earlier turn of its conversation failed).

Choices where another benchmark may read a definition differently: TTFT waits for the
first chunk with text (stamping the first chunk of any kind would measure a chat
stream's role-only opening chunk); E2E runs to the end of the stream, so it includes
the final usage chunk; SLO attainment counts failed requests as missing the SLOs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

PERCENTILES = (50, 90, 95, 99)
LATENCY_KEYS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")


@dataclass
class RequestRecord:
    """What happened to one request (times in seconds)."""

    request_id: int
    session_id: int
    turn: int
    group_id: int | None
    input_len: int
    """Prompt tokens the workload planned."""
    output_len: int
    """max_tokens asked."""
    scheduled_s: float | None = None
    """Planned arrival offset (open loop), None otherwise."""
    start_s: float | None = None
    """When it was sent, from the start of the run; None if never sent."""
    end_s: float | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    num_prompt_tokens: int | None = None
    num_output_tokens: int = 0
    is_usage_reported: bool = False
    error: str | None = None
    error_message: str | None = None

    @property
    def is_ok(self) -> bool:
        return self.error is None and self.e2e_s is not None

    @property
    def tpot_s(self) -> float | None:
        if not self.is_ok or self.num_output_tokens < 2 or self.ttft_s is None:
            return None
        return (self.e2e_s - self.ttft_s) / (self.num_output_tokens - 1)

    def meets(self, slo_ttft_ms: float | None, slo_tpot_ms: float | None, slo_e2e_ms: float | None) -> bool:
        if not self.is_ok:
            return False
        if slo_ttft_ms is not None and self.ttft_s * 1e3 > slo_ttft_ms:
            return False
        tpot = self.tpot_s
        if slo_tpot_ms is not None and tpot is not None and tpot * 1e3 > slo_tpot_ms:
            return False
        return slo_e2e_ms is None or self.e2e_s * 1e3 <= slo_e2e_ms

    def to_json(self) -> dict:
        """The requests.jsonl line: latencies in milliseconds."""
        d = asdict(self)
        for key in ("ttft_s", "e2e_s"):
            value = d.pop(key)
            d[key[:-2] + "_ms"] = None if value is None else value * 1e3
        d["tpot_ms"] = None if self.tpot_s is None else self.tpot_s * 1e3
        d["itl_ms"] = [g * 1e3 for g in d.pop("itl_s")]
        return d


def stats(values_ms: Sequence[float]) -> dict[str, float | None]:
    """Mean and percentiles; every entry None when there are no values."""
    if len(values_ms) == 0:
        return {"mean": None, **{f"p{q}": None for q in PERCENTILES}}
    arr = np.asarray(values_ms, dtype=np.float64)
    return {"mean": float(arr.mean()), **{f"p{q}": float(np.percentile(arr, q)) for q in PERCENTILES}}


def duration_s(records: Sequence[RequestRecord]) -> float:
    """First send to last completion (to the last end of any request when none completed)."""
    starts = [r.start_s for r in records if r.start_s is not None]
    ends = [r.end_s for r in records if r.is_ok] or [r.end_s for r in records if r.end_s is not None]
    if not starts or not ends:
        return 0.0
    return max(max(ends) - min(starts), 0.0)


def summarize(records: Sequence[RequestRecord], slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None,
              slo_e2e_ms: float | None = None) -> dict:
    """The summary dict of a run (the stable keys of ``LoadTestResult.summary``)."""
    done = [r for r in records if r.is_ok]
    duration = duration_s(records)

    def per_s(x: float) -> float:
        return x / duration if duration > 0 else 0.0

    num_good = sum(r.meets(slo_ttft_ms, slo_tpot_ms, slo_e2e_ms) for r in records)
    input_tokens = sum(r.num_prompt_tokens or 0 for r in done)
    output_tokens = sum(r.num_output_tokens for r in done)
    errors = Counter(r.error for r in records if r.error is not None)
    return {
        "num_requests": len(records),
        "num_completed": len(done),
        "num_errors": sum(errors.values()),
        "errors": dict(sorted(errors.items())),
        "duration_s": duration,
        "request_throughput": per_s(len(done)),
        "input_throughput": per_s(input_tokens),
        "output_throughput": per_s(output_tokens),
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "goodput": per_s(num_good),
        "slo_attainment": num_good / len(records) if records else 0.0,
        "slo": {"ttft_ms": slo_ttft_ms, "tpot_ms": slo_tpot_ms, "e2e_ms": slo_e2e_ms},
        "ttft_ms": stats([r.ttft_s * 1e3 for r in done]),
        "tpot_ms": stats([r.tpot_s * 1e3 for r in done if r.tpot_s is not None]),
        "itl_ms": stats([g * 1e3 for r in done for g in r.itl_s]),
        "e2e_ms": stats([r.e2e_s * 1e3 for r in done]),
    }
