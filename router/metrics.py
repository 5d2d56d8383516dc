"""The gateway's Prometheus metrics (served at ``GET /metrics``).

Each gateway owns a private registry, so several apps in one process (tests) never
collide. Names follow Prometheus conventions (``_total`` counters, ``_seconds``
histograms) under the ``pdserve_gateway_`` prefix; the planner and the load tests
read the same series the dashboards do.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PREFIX = "pdserve_gateway"
CONTENT_TYPE = CONTENT_TYPE_LATEST

# Latency buckets: sub-10 ms inter-token latencies up to minute-long requests.
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class GatewayMetrics:
    """Every series the gateway exports.

    Outcomes of ``requests_total``: ``success``, ``invalid`` (4xx: bad input, unknown
    model, too large), ``unauthorized``, ``overloaded``, ``no_workers``, ``timeout``,
    ``cancelled`` (the client went away), ``error`` (a worker failed the request),
    ``body_timeout`` (the body did not arrive within ``body_timeout_s``: 408),
    ``send_timeout`` (a stream's client stopped reading for ``send_timeout_s``).
    """

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter(f"{PREFIX}_requests", "HTTP API requests by endpoint and outcome",
                                ["endpoint", "outcome"], registry=r)
        self.running = Gauge(f"{PREFIX}_requests_running", "Generation requests in flight", registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Arrival to first generated token",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram(f"{PREFIX}_inter_token_latency_seconds", "Gap between successive tokens of a completion",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram(f"{PREFIX}_e2e_request_latency_seconds", "Arrival to last token",
                             buckets=_E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens of routed requests", registry=r)
        self.completion_tokens = Counter(f"{PREFIX}_completion_tokens", "Generated tokens", registry=r)
        self.routing = Counter(f"{PREFIX}_routing_decisions",
                               "Routing decisions: prefill on the decode worker (local) or a prefill worker (remote)",
                               ["prefill"], registry=r)
        self.kv_hit_tokens = Counter(f"{PREFIX}_routing_kv_hit_tokens",
                                     "Prompt tokens the chosen worker's prefix cache was expected to hold",
                                     ["worker_role"], registry=r)
        self.workers = Gauge(f"{PREFIX}_workers", "Registered workers by role that take new requests (not draining)",
                             ["role"], registry=r)
        self.retries = Counter(f"{PREFIX}_generate_retries",
                               "Prompts routed again because a decode worker refused them unstarted (UNAVAILABLE)",
                               registry=r)
        self.migrations = Counter(
            f"{PREFIX}_migrations",
            "Completions resumed on another decode worker after their stream broke mid-way, by reason "
            "(unavailable, cancelled, ended) and outcome (resumed; exhausted: past max_migrations; "
            "no_workers: nowhere to resume)", ["reason", "outcome"], registry=r)
        for outcome in ("success", "invalid", "unauthorized", "overloaded", "no_workers", "timeout", "cancelled",
                        "error", "body_timeout", "send_timeout"):
            for endpoint in ("completions", "chat_completions"):
                self.requests.labels(endpoint, outcome)  # export zeros, so rates exist from the start
        for prefill in ("local", "remote"):
            self.routing.labels(prefill)
        for role in ("prefill", "decode"):
            self.kv_hit_tokens.labels(role)
        for reason in ("unavailable", "cancelled", "ended"):
            for outcome in ("resumed", "exhausted", "no_workers"):
                self.migrations.labels(reason, outcome)

    def render(self) -> bytes:
        return generate_latest(self.registry)
