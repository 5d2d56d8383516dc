"""pdserve.loadtest: load generation against any OpenAI-compatible endpoint.

Data flow: ``LoadTestConfig`` -> ``WorkloadBuilder`` (what to send and when, built
without sending: prompts of exact token lengths from the target's tokenizer) ->
the runner (open or closed loop over HTTP/SSE, ``client.send`` per request) ->
``RequestRecord`` per request -> ``metrics.summarize`` (vLLM benchmark definitions)
-> ``report`` (summary.json, requests.jsonl, plots, the table) and ``sweep``
(the highest request rate meeting the SLOs). ``pdserve loadtest`` is ``cli``.

Proto-free and torch-free: it speaks HTTP only.
"""

from .config import LoadTestConfig
from .distributions import LengthDistribution
from .metrics import RequestRecord, summarize
from .prompts import PromptFactory
from .runner import LoadTestResult, arun_loadtest, run_loadtest
from .sweep import RateSearch, SweepResult, arun_sweep, run_sweep
from .workloads import RequestSpec, Session, WorkloadBuilder, read_trace

__all__ = [
    "LengthDistribution",
    "LoadTestConfig",
    "LoadTestResult",
    "PromptFactory",
    "RateSearch",
    "RequestRecord",
    "RequestSpec",
    "Session",
    "SweepResult",
    "WorkloadBuilder",
    "arun_loadtest",
    "arun_sweep",
    "read_trace",
    "run_loadtest",
    "run_sweep",
    "summarize",
]
