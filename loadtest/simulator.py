"""Discrete-event simulation of a disaggregated cluster under a workload.

Input: a :class:`~pdserve.loadtest.profile.Profile` (the cost model), a
:class:`ClusterConfig` (pool sizes, TP sizes, routing policy) and a list of
:class:`SimRequest` (arrival time, prompt and output lengths, optional block hashes for
prefix caching). Output: a :class:`SimResult` with every request's TTFT, TPOT and E2E
and a summary in the load test's shape (percentiles, throughput, goodput under SLOs,
goodput per GPU).

Life of a simulated request (see :mod:`.sim_workers` for the queues):

1. At its arrival the router (:mod:`.sim_router`) picks the decode worker D and, when
   the prompt is long enough, a prefill worker P.
2. It reaches D after the per-request overhead of its path (``remote_overhead_s`` or
   ``local_overhead_s`` of the profile: gateway, RPCs, hop setup).
3. D admits it when its prompt's KV blocks are free; remote: P prefills it (batched,
   chunked), the KV moves, D emits the first token at its next iteration boundary;
   local: D prefills it in chunks beside its decodes.
4. One token per D iteration until ``output_len`` tokens; then its blocks are freed.

Open loop: requests arrive at their ``arrival_s``. Closed loop (``concurrency=C``): the
first C start at 0 and each completion starts the next request at once; the arrival
times in the list are ignored.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field, replace
from typing import Sequence

from pdserve.router.cost import CostWeights

from .profile import Profile
from .sim_costs import WorkerCosts
from .sim_router import POLICIES, SimRouter
from .sim_stats import SLO, RequestResult, summarize
from .sim_workers import DecodeWorker, PrefillWorker, Seq

__all__ = ["SLO", "ClusterConfig", "RequestResult", "SimRequest", "SimResult", "simulate"]


@dataclass(frozen=True)
class SimRequest:
    request_id: int
    arrival_s: float
    input_len: int
    output_len: int
    #: The prompt's chained full-block hashes (``pdserve.engine.hashing.block_hashes``);
    #: empty: a unique prompt that never hits a prefix cache.
    block_hashes: tuple[int, ...] = ()
    #: Another request's id: this one starts when that one finishes (a conversation's
    #: next turn); its ``arrival_s`` is then ignored.
    follows: int | None = None

    def __post_init__(self) -> None:
        if self.input_len < 1 or self.output_len < 1:
            raise ValueError(f"request {self.request_id}: input_len and output_len must be >= 1, "
                             f"got {self.input_len} and {self.output_len}")
        if not self.arrival_s >= 0:
            raise ValueError(f"request {self.request_id}: arrival_s must be >= 0, got {self.arrival_s}")


@dataclass(frozen=True)
class ClusterConfig:
    """One candidate deployment. ``None`` fields come from the profile's deployment."""

    num_prefill: int
    num_decode: int
    prefill_tp: int = 1
    decode_tp: int = 1
    policy: str = "kv"
    #: Per TP doubling; see :mod:`.sim_costs` for the scaling model.
    tp_efficiency: float = 0.9
    disagg_threshold_tokens: int | None = None
    max_num_batched_tokens: int | None = None
    #: Largest prompt chunk in one iteration; default: the token budget (no chunking beyond it).
    prefill_chunk_size: int | None = None
    #: KV blocks of one decode worker; default: the profile's, scaled by decode_tp / profiled TP.
    kv_blocks_per_decode_worker: int | None = None
    max_num_seqs: int | None = None
    #: Workers sharing this many processors (a CPU test bed; None: each worker owns its
    #: device). Then an iteration that starts while ``n`` workers compute (itself
    #: included) takes ``max(1, n / shared_cpus)`` times longer, and
    #: ``1 + <role>_colocation_slowdown`` (from the profile) times longer again while a
    #: worker of the other role computes. Judged when the iteration starts.
    shared_cpus: int | None = None
    seed: int = 0
    #: The kv policy's imbalance thresholds (``pdserve.router.cost.CostWeights``); None:
    #: the router's defaults. 0 and 1.0 everywhere: the old, always-balancing cost.
    balance_abs_tokens: int | None = None
    balance_rel: float | None = None
    decode_balance_abs_tokens: int | None = None
    decode_balance_rel: float | None = None

    @property
    def cost_weights(self) -> CostWeights:
        given = {k: getattr(self, k) for k in ("balance_abs_tokens", "balance_rel", "decode_balance_abs_tokens",
                                               "decode_balance_rel") if getattr(self, k) is not None}
        return replace(CostWeights(), **given)  # validates

    def __post_init__(self) -> None:
        if self.num_prefill < 0:
            raise ValueError(f"num_prefill must be >= 0, got {self.num_prefill}")
        if self.num_decode < 1:
            raise ValueError(f"num_decode must be >= 1, got {self.num_decode}")
        for name in ("prefill_tp", "decode_tp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown routing policy {self.policy!r}: choose one of {', '.join(POLICIES)}")
        if not 0 < self.tp_efficiency <= 1:
            raise ValueError(f"tp_efficiency must be in (0, 1], got {self.tp_efficiency}")
        for name in ("max_num_batched_tokens", "prefill_chunk_size", "kv_blocks_per_decode_worker", "max_num_seqs",
                     "shared_cpus"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.disagg_threshold_tokens is not None and self.disagg_threshold_tokens < 0:
            raise ValueError(f"disagg_threshold_tokens must be >= 0, got {self.disagg_threshold_tokens}")
        self.cost_weights  # noqa: B018 - raises ValueError on a bad threshold

    @property
    def num_gpus(self) -> int:
        return self.num_prefill * self.prefill_tp + self.num_decode * self.decode_tp

    @property
    def label(self) -> str:
        tp = lambda t: f"(tp{t})" if t > 1 else ""  # noqa: E731
        return f"{self.num_prefill}P{tp(self.prefill_tp)}:{self.num_decode}D{tp(self.decode_tp)}"


@dataclass
class SimResult:
    config: ClusterConfig
    results: list[RequestResult]
    slo: SLO
    #: Counters: local/remote prefills, preemptions, prompt tokens computed and found cached.
    stats: dict = field(default_factory=dict)

    @property
    def summary(self) -> dict:
        out = summarize(self.results, self.slo, self.config.num_gpus)
        out.update(self.stats)
        return out


class _Simulation:
    def __init__(self, profile: Profile, config: ClusterConfig) -> None:
        dep = profile.deployment
        fit = profile.fit
        self._events: list = []
        self._counter = itertools.count()
        self.fit = fit
        self.block_size = dep.block_size
        budget = config.max_num_batched_tokens or dep.max_num_batched_tokens
        chunk = min(config.prefill_chunk_size or budget, budget)
        kv_blocks = config.kv_blocks_per_decode_worker or max(
            1, dep.kv_blocks_per_decode_worker * config.decode_tp // dep.decode_tp)
        prefill_cache = max(1, dep.kv_blocks_per_prefill_worker * config.prefill_tp // dep.prefill_tp)
        eff = config.tp_efficiency
        p_costs = WorkerCosts.for_worker(fit, config.prefill_tp, dep.prefill_tp, eff)
        d_costs = WorkerCosts.for_worker(fit, config.decode_tp, dep.decode_tp, eff)
        # pdserve runs KV transfer calls beside the engine loop when a worker has one rank.
        self.prefill = [PrefillWorker(f"prefill-{i}", self, p_costs, prefill_cache, dep.block_size, budget, chunk,
                                      fit.transfer_token_s, direct_transfer=config.prefill_tp == 1)
                        for i in range(config.num_prefill)]
        self.decode = [DecodeWorker(f"decode-{i}", self, d_costs, kv_blocks, dep.block_size, budget, chunk,
                                    config.max_num_seqs or dep.max_num_seqs, direct_transfer=config.decode_tp == 1)
                       for i in range(config.num_decode)]
        threshold = dep.disagg_threshold_tokens if config.disagg_threshold_tokens is None \
            else config.disagg_threshold_tokens
        self.router = SimRouter(config.policy, self.decode, self.prefill, dep.block_size, threshold, config.seed,
                                weights=config.cost_weights)
        self.results: list[RequestResult] = []
        self.on_done = None
        self.followers: dict[int, list[SimRequest]] = {}
        self.last_had_followers = False
        self.kv_blocks = kv_blocks
        self.shared_cpus = config.shared_cpus

    # -- the Clock protocol the workers use
    def host_factor(self, worker) -> float:
        if self.shared_cpus is None:
            return 1.0
        is_prefill = isinstance(worker, PrefillWorker)
        others = self.decode if is_prefill else self.prefill
        num_computing = 1 + sum(w.is_computing for w in (*self.prefill, *self.decode) if w is not worker)
        factor = max(1.0, num_computing / self.shared_cpus)
        if any(w.is_computing for w in others):
            factor *= 1 + (self.fit.prefill_colocation_slowdown if is_prefill else self.fit.decode_colocation_slowdown)
        return factor

    def at(self, time_s: float, fn, *args) -> None:
        heapq.heappush(self._events, (time_s, next(self._counter), fn, args))

    def on_token(self, seq: Seq, time_s: float) -> None:
        if seq.first_token_s is None:
            seq.first_token_s = time_s
        seq.last_token_s = time_s

    def on_finished(self, seq: Seq, time_s: float) -> None:
        r = seq.request
        tpot = (time_s - seq.first_token_s) / (r.output_len - 1) if r.output_len > 1 else None
        self.results.append(RequestResult(
            request_id=r.request_id, arrival_s=seq.enter_s, input_len=r.input_len, output_len=r.output_len,
            ttft_s=seq.first_token_s - seq.enter_s, tpot_s=tpot, e2e_s=time_s - seq.enter_s,
            is_remote_prefill=seq.prefill is not None, cached_tokens=seq.prefill_cached_tokens,
            num_preemptions=seq.num_preemptions,
            prefill_wait_s=None if seq.prefill_started_s is None else seq.prefill_started_s - seq.prefill_queued_s))
        followers = self.followers.pop(r.request_id, ())
        self.last_had_followers = bool(followers)
        for nxt in followers:
            self.arrive(time_s, nxt)
        if self.on_done is not None:
            self.on_done(time_s)

    def arrive(self, now: float, request: SimRequest) -> None:
        hashes = request.block_hashes
        d, p = self.router.route(request.input_len, hashes, now)
        seq = Seq(request, d, p)
        seq.enter_s = now
        if request.input_len + request.output_len > d.num_total_blocks * self.block_size:
            raise ValueError(f"request {request.request_id}: {request.input_len} + {request.output_len} tokens "
                             f"exceed a decode worker's KV capacity ({d.num_total_blocks} blocks)")
        if p is not None:
            # What the router expects p to compute (its engine reports queues net of hits).
            seq.queued_estimate = request.input_len - self.router.last_prefill_hit_tokens
            p.num_queued_tokens += seq.queued_estimate
            p.num_inflight += 1
            overhead = self.fit.remote_overhead_s
        else:
            overhead = self.fit.local_overhead_s
        self.at(now + overhead, d.submit, seq)

    def run(self) -> None:
        events = self._events
        while events:
            t, _, fn, args = heapq.heappop(events)
            fn(t, *args)


def simulate(profile: Profile, config: ClusterConfig, requests: Sequence[SimRequest], *,
             slo: SLO | None = None, concurrency: int | None = None) -> SimResult:
    """Run the workload to completion (every request finishes) and return the results."""
    if not requests:
        raise ValueError("simulate needs at least one request")
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    sim = _Simulation(profile, config)
    ids = {r.request_id for r in requests}
    if len(ids) != len(requests):
        raise ValueError("request ids must be unique")
    heads = []
    for r in requests:
        if r.follows is None:
            heads.append(r)
        elif r.follows not in ids:
            raise ValueError(f"request {r.request_id} follows {r.follows}, which is not in the workload")
        else:
            sim.followers.setdefault(r.follows, []).append(r)
    if concurrency is None:
        for r in heads:
            sim.at(r.arrival_s, sim.arrive, r)
    else:
        # A closed-loop slot runs a whole conversation: the next head starts when a
        # request without followers finishes.
        pending = iter(heads)

        def start_next(now: float) -> None:
            if sim.last_had_followers:
                return
            r = next(pending, None)
            if r is not None:
                sim.arrive(now, r)

        sim.on_done = start_next
        for r in itertools.islice(pending, concurrency):
            sim.at(0.0, sim.arrive, r)
    sim.run()
    if len(sim.results) != len(requests):
        raise RuntimeError(f"simulation ended with {len(requests) - len(sim.results)} requests unfinished")
    stats = {
        "num_local_prefill": sim.router.num_local,
        "num_remote_prefill": sim.router.num_remote,
        "num_preemptions": sum(d.num_preemptions for d in sim.decode),
        "prefill_tokens_computed": sum(p.num_computed_tokens for p in sim.prefill)
        + sum(d.num_computed_tokens for d in sim.decode),
        "prefill_tokens_computed_per_worker": [p.num_computed_tokens for p in sim.prefill],
        "prefix_hit_tokens": sum(r.cached_tokens for r in sim.results),
        "max_decode_waiting": max(d.max_waiting for d in sim.decode),
        "kv_blocks_per_decode_worker": sim.kv_blocks,
        # Every request finished, so every block must be free again.
        "num_leaked_blocks": sum(d.num_total_blocks - d.num_free_blocks for d in sim.decode),
    }
    sim.results.sort(key=lambda r: r.request_id)
    return SimResult(config, sim.results, slo or SLO(), stats)
