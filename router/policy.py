"""Routing policies: which decode worker serves a request, and who prefills it.

Policies, chosen when the :class:`Router` is built: ``kv`` (default), ``round_robin``,
``random``, ``least_loaded``. Every policy makes two choices:

1. **Decode worker D** among the decode-capable workers (role DECODE or BOTH).
2. **Conditional disaggregation**: prefill on D itself (``prefill_worker_id`` None) or
   on a prefill worker P among the prefill-capable workers (PREFILL or BOTH; D itself
   is a candidate only when it is BOTH, and choosing it means a local prefill).

``kv``
    Uses the global :class:`~pdserve.router.index.PrefixIndex` (KV events, other
    gateways' placements, and the router's own recent decisions) to know how much of
    the prompt each worker holds, cached or still in flight. D = the cheapest decode
    candidate by ``cost.decode_costs``: the prompt tokens it lacks (cluster work), its
    load only past the decode imbalance thresholds, and a steep penalty once its free
    KV would drop below ``free_reserve_frac`` (the same function drives the planner's
    simulator). Then D prefills locally when the prompt tokens D lacks are fewer than
    ``disagg_threshold_tokens`` (moving a few blocks over the network costs more than
    computing them) or no prefill candidate exists; otherwise P = the cheapest by
    ``cost.prefill_costs`` (the prompt tokens P lacks; its queued prefill tokens only
    past the prefill imbalance thresholds). After deciding, the prompt's block hashes
    are inserted into the index as optimistic entries for P and D, so the next request
    of the same family follows before the workers' events arrive.
``round_robin`` / ``random``
    D and P in turn / uniformly at random (seeded). No cache knowledge: remote
    prefill whenever the prompt has at least ``disagg_threshold_tokens`` tokens.
``least_loaded``
    D with the fewest in-flight requests, P with the fewest in-flight prefills; ties
    by worker id. Same threshold rule as round_robin.

Exact cost ties are broken by the seeded RNG, so a run is deterministic given the
seed and the sequence of calls.

**Load estimates.** A worker's load is its last :meth:`Router.update_load` report plus
what this router changed since: requests routed there after the report, minus
requests finished (:meth:`Router.on_finished`). Each report resets the delta, so
several gateway replicas sharing workers each see the others' traffic through the
reports and their own traffic immediately. Prefill work leaves a queue when the
prefill ends, which the router never sees, so a request's prefill tokens count only
until the worker's next report (which includes them while they are queued) or until
the request finishes, whichever comes first.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from pdserve.engine.hashing import block_hashes as compute_block_hashes
from pdserve.proto import pdserve_pb2 as pb

from .cost import CostWeights, DecodeCandidate, PrefillCandidate, choose, decode_costs, prefill_costs
from .index import DEFAULT_OPTIMISTIC_TTL_S, PrefixIndex

__all__ = ["POLICIES", "NoWorkersError", "Router", "RoutingDecision"]

POLICIES = ("kv", "round_robin", "random", "least_loaded")
_DEFAULTS = CostWeights()

_DECODE_ROLES = (pb.DECODE, pb.BOTH)
_PREFILL_ROLES = (pb.PREFILL, pb.BOTH)


class NoWorkersError(RuntimeError):
    """No live decode-capable (DECODE or BOTH) worker: the request cannot be served."""


@dataclass(frozen=True)
class RoutingDecision:
    decode_worker_id: str
    #: None: the decode worker prefills locally.
    prefill_worker_id: str | None
    #: Prompt tokens the chosen prefill worker (or the decode worker, when local) is
    #: expected to have cached.
    cached_tokens_prefill: int
    #: Prompt tokens the decode worker is expected to have cached.
    cached_tokens_decode: int
    policy: str


class _Load:
    """What the router knows about one worker's load (see the module docstring)."""

    __slots__ = ("running", "waiting", "total_blocks", "free_blocks", "queued_prefill", "has_stats",
                 "gen", "dec_req", "dec_tok", "pf_req", "pf_tok", "inflight")

    def __init__(self) -> None:
        self.running = self.waiting = self.total_blocks = self.free_blocks = self.queued_prefill = 0
        self.has_stats = False
        self.gen = 0
        # decode side: routed minus finished since the last report
        self.dec_req = self.dec_tok = 0
        # prefill side: routed since the last report and not yet finished
        self.pf_req = self.pf_tok = 0
        self.inflight = 0  # this router's requests on the worker (either side), for metrics

    def requests(self) -> int:
        return max(0, self.running + self.waiting + self.dec_req)

    def used_tokens(self, block_size: int) -> int:
        if self.has_stats:
            return max(0, (self.total_blocks - self.free_blocks) * block_size + self.dec_tok)
        return max(0, self.dec_tok)

    def queued_prefill_tokens(self) -> int:
        return max(0, self.queued_prefill + self.pf_tok)

    def prefill_requests(self) -> int:
        base = self.running + self.waiting if self.has_stats else 0
        return max(0, base + self.pf_req)


class _Tracked:
    """A decision awaiting on_finished. Holds the load objects themselves: if the worker
    left (or restarted) meanwhile, finishing updates the discarded object, not the new one."""

    __slots__ = ("decision", "decode", "prompt_tokens", "prefill", "prefill_gen", "prefill_tokens")

    def __init__(self, decision, decode: _Load, prompt_tokens, prefill: _Load, prefill_gen, prefill_tokens):
        self.decision = decision
        self.decode = decode
        self.prompt_tokens = prompt_tokens
        self.prefill = prefill  # who prefills: P, or D for a local prefill
        self.prefill_gen = prefill_gen
        self.prefill_tokens = prefill_tokens


class Router:
    """Routes prompts to (decode worker, optional prefill worker).

    Thread-safe. The gateway keeps it fed: :meth:`update_workers` with the live
    registry, :meth:`update_load` with each worker's ``Stats``, and
    :meth:`on_finished` once per request routed. ``index`` is the prefix index an
    :class:`~pdserve.router.events.EventFollower` should feed.

    ``balance_abs_tokens`` / ``balance_rel`` (prefill) and ``decode_balance_abs_tokens`` /
    ``decode_balance_rel`` (decode): the imbalance thresholds past which load counts
    against locality (``cost.CostWeights``).

    Keyword knobs beyond the gateway's: ``decode_request_tokens`` (the cost of one
    running request on a decode worker, in tokens), ``free_reserve_frac`` (free-KV
    fraction below which a decode worker is penalised), ``optimistic_ttl_s``,
    ``index`` (share an existing index), ``origin`` (this gateway's id among several:
    decisions are queued as ``pending`` KV events, :meth:`take_placements`), ``clock``, ``max_tracked`` (bound on
    decisions awaiting :meth:`on_finished`; past it the oldest is treated as finished).
    """

    def __init__(
        self,
        policy: str = "kv",
        *,
        block_size: int = 16,
        disagg_threshold_tokens: int = 256,
        overlap_weight: float = 1.0,
        seed: int = 0,
        decode_request_tokens: int = 256,
        free_reserve_frac: float = 0.05,
        optimistic_ttl_s: float = DEFAULT_OPTIMISTIC_TTL_S,
        index: PrefixIndex | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_tracked: int = 100_000,
        balance_abs_tokens: int = _DEFAULTS.balance_abs_tokens,
        balance_rel: float = _DEFAULTS.balance_rel,
        decode_balance_abs_tokens: int = _DEFAULTS.decode_balance_abs_tokens,
        decode_balance_rel: float = _DEFAULTS.decode_balance_rel,
        origin: str | None = None,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}: choose one of {', '.join(POLICIES)}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if disagg_threshold_tokens < 0:
            raise ValueError(f"disagg_threshold_tokens must be >= 0, got {disagg_threshold_tokens}")
        self.policy = policy
        self.block_size = int(block_size)
        self.disagg_threshold_tokens = int(disagg_threshold_tokens)
        self.overlap_weight = float(overlap_weight)
        self.decode_request_tokens = int(decode_request_tokens)
        self.free_reserve_frac = float(free_reserve_frac)
        self.weights = CostWeights(self.overlap_weight, self.decode_request_tokens, self.free_reserve_frac,
                                   int(balance_abs_tokens), float(balance_rel), int(decode_balance_abs_tokens),
                                   float(decode_balance_rel))  # validates
        self.seed = seed
        self.index = index if index is not None else PrefixIndex(optimistic_ttl_s=optimistic_ttl_s, clock=clock)
        self._rng = random.Random(seed)
        self._lock = threading.RLock()
        self._workers: dict[str, pb.WorkerInfo] = {}
        self._decode_ids: list[str] = []
        self._prefill_ids: list[str] = []
        self._both: set[str] = set()
        self._load: dict[str, _Load] = {}
        self._rr_decode = 0
        self._rr_prefill = 0
        self._tracked: dict[int, _Tracked] = {}
        self._max_tracked = max(1, int(max_tracked))
        self.origin = origin
        self._placements: list[pb.KVEvent] = []
        self.placements_ready = threading.Event()
        self._counts = {"decisions": 0, "local_prefill": 0, "remote_prefill": 0, "predicted_cached_tokens": 0,
                        "prompt_tokens": 0, "untracked_finishes": 0, "tracked_evicted": 0}

    # ---------------------------------------------------------------- the registry

    def update_workers(self, workers: list[pb.WorkerInfo]) -> None:
        """Replace the set of live workers (the gateway refreshes it from the store).

        Workers that left, and workers whose ``started_at_ms`` changed (a restart:
        their cache is gone), lose their prefix-index entries and load state.
        Workers with an unspecified role are ignored.
        """
        with self._lock:
            new: dict[str, pb.WorkerInfo] = {}
            for w in workers:
                if w.role in _DECODE_ROLES or w.role in _PREFILL_ROLES:
                    new[w.worker_id] = w
            for wid, old in self._workers.items():
                cur = new.get(wid)
                if cur is None or cur.started_at_ms != old.started_at_ms:
                    self.index.remove_worker(wid)
                    self._load.pop(wid, None)
            for wid in list(self._load):
                if wid not in new:
                    del self._load[wid]
            self._workers = new
            self._decode_ids = sorted(w for w, info in new.items() if info.role in _DECODE_ROLES)
            self._prefill_ids = sorted(w for w, info in new.items() if info.role in _PREFILL_ROLES)
            self._both = {w for w, info in new.items() if info.role == pb.BOTH}

    @property
    def workers(self) -> dict[str, pb.WorkerInfo]:
        """The live workers by id (a copy)."""
        with self._lock:
            return dict(self._workers)

    def update_load(self, worker_id: str, stats: pb.StatsResponse) -> None:
        """Record a worker's ``Stats`` report (queue depth, running, free blocks, queued
        prefill tokens); resets the router's own delta for that worker."""
        with self._lock:
            ld = self._load_of(worker_id)
            ld.running = stats.num_running
            ld.waiting = stats.num_waiting
            ld.total_blocks = stats.num_kv_blocks_total
            ld.free_blocks = stats.num_kv_blocks_free
            ld.queued_prefill = stats.num_queued_prefill_tokens
            ld.has_stats = True
            ld.gen += 1
            ld.dec_req = ld.dec_tok = ld.pf_req = ld.pf_tok = 0

    def _load_of(self, worker_id: str) -> _Load:
        ld = self._load.get(worker_id)
        if ld is None:
            ld = self._load[worker_id] = _Load()
        return ld

    # --------------------------------------------------------------------- routing

    def route(self, prompt_token_ids: Sequence[int], block_hashes: Sequence[int] | None = None) -> RoutingDecision:
        """Pick the decode worker and, if worth it, a remote prefill worker.

        ``block_hashes``: the prompt's chained full-block hashes when the caller has
        them (with the request's cache salt); computed here otherwise (kv policy only).
        Raises :class:`NoWorkersError` when no decode-capable worker is live and
        ``ValueError`` for an empty prompt. Call :meth:`on_finished` with the returned
        object when the request ends.
        """
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("cannot route an empty prompt")
        with self._lock:
            if not self._decode_ids:
                raise NoWorkersError("no live decode worker (role DECODE or BOTH) is registered")
            if self.policy == "kv":
                if block_hashes is None:
                    block_hashes = compute_block_hashes(prompt_token_ids, self.block_size)
                decision, prefill_tokens = self._route_kv(n, block_hashes)
            else:
                decision, prefill_tokens = self._route_simple(n)
            self._account(decision, n, prefill_tokens)
            return decision

    def _route_kv(self, n: int, hashes: Sequence[int]) -> tuple[RoutingDecision, int]:
        bs = self.block_size
        # The engine always computes at least the prompt's last token.
        max_hit_blocks = min(len(hashes), (n - 1) // bs)
        matches = self.index.match(hashes[:max_hit_blocks]) if max_hit_blocks else {}
        tiers = self.index.match_tiers(hashes[:max_hit_blocks], matches) if max_hit_blocks else {}
        # The KV pool's blocks after each worker's own (every worker reads the one pool).
        pool = self.index.match_pool(
            hashes[:max_hit_blocks], {w: matches.get(w, 0) + tiers.get(w, 0) for w in (*matches, *tiers)},
            (*self._decode_ids, *self._prefill_ids)) if max_hit_blocks else {}

        w = self.weights
        cands = []
        for wid in self._decode_ids:
            ld = self._load.get(wid) or _EMPTY_LOAD
            total = ld.total_blocks if ld.has_stats else self._workers[wid].num_kv_blocks
            free = (ld.free_blocks if ld.has_stats else total) - (-(-ld.dec_tok // bs) if ld.dec_tok > 0 else 0)
            cands.append(DecodeCandidate(hit_blocks=matches.get(wid, 0), used_tokens=ld.used_tokens(bs),
                                         requests=ld.requests(), queued_prefill_tokens=ld.queued_prefill_tokens(),
                                         free_blocks=free, total_blocks=total, tier_blocks=tiers.get(wid, 0),
                                         pool_blocks=pool.get(wid, 0)))
        d = choose(decode_costs(w, n, bs, cands), self._decode_ids, self._rng)
        cached_d = (matches.get(d, 0) + tiers.get(d, 0) + pool.get(d, 0)) * bs

        p = None
        cached_p = cached_d
        if n - cached_d >= self.disagg_threshold_tokens:
            ids = [wid for wid in self._prefill_ids if wid != d or wid in self._both]
            if ids:
                pcands = [PrefillCandidate(matches.get(wid, 0),
                                           (self._load.get(wid) or _EMPTY_LOAD).queued_prefill_tokens(),
                                           tiers.get(wid, 0), pool.get(wid, 0))
                          for wid in ids]
                choice = choose(prefill_costs(w, n, bs, pcands), ids, self._rng)
                if choice != d:
                    p = choice
                    cached_p = (matches.get(p, 0) + tiers.get(p, 0) + pool.get(p, 0)) * bs

        full_hashes = hashes if len(hashes) <= n // bs else hashes[: n // bs]
        self.index.add_optimistic(d, full_hashes)
        if p is not None:
            self.index.add_optimistic(p, full_hashes)
        decision = RoutingDecision(d, p, cached_p, cached_d, "kv")
        if self.origin is not None:
            self._queue_placements(decision, n, full_hashes, n - cached_p)
        return decision, n - cached_p

    # ------------------------------------------------------- several gateways

    def _queue_placements(self, decision: RoutingDecision, n: int, hashes: Sequence[int], prefill_tokens: int) -> None:
        d, p = decision.decode_worker_id, decision.prefill_worker_id
        self._placements.append(pb.KVEvent(worker_id=d, pending=pb.BlocksPending(
            block_hashes=hashes, prefill_tokens=0 if p else prefill_tokens, origin=self.origin, decode=True,
            prompt_tokens=n)))
        if p is not None:
            self._placements.append(pb.KVEvent(worker_id=p, pending=pb.BlocksPending(
                block_hashes=hashes, prefill_tokens=prefill_tokens, origin=self.origin, prompt_tokens=n)))
        self.placements_ready.set()

    def take_placements(self) -> list[pb.KVEvent]:
        """This router's decisions since the last call, as ``pending`` KV events for the
        store (only with ``origin`` set: a gateway among several)."""
        with self._lock:
            out, self._placements = self._placements, []
            self.placements_ready.clear()
            return out

    def note_placement(self, event: pb.KVEvent) -> None:
        """Another gateway's decision (a ``pending`` event): count its load on the worker
        until that worker's next Stats report, as this router counts its own. (Its
        prefix goes to the index through ``PrefixIndex.apply_event``.)"""
        pending = event.pending
        with self._lock:
            if event.worker_id not in self._workers:
                return
            ld = self._load_of(event.worker_id)
            if pending.decode:
                ld.dec_req += 1
                ld.dec_tok += pending.prompt_tokens
            if pending.prefill_tokens:
                ld.pf_req += 1
                ld.pf_tok += pending.prefill_tokens

    def _route_simple(self, n: int) -> tuple[RoutingDecision, int]:
        decode_ids = self._decode_ids
        policy = self.policy
        if policy == "round_robin":
            d = decode_ids[self._rr_decode % len(decode_ids)]
            self._rr_decode += 1
        elif policy == "random":
            d = self._rng.choice(decode_ids)
        else:  # least_loaded
            d = min(decode_ids, key=lambda w: (self._requests_of(w), w))
        p = None
        if n >= self.disagg_threshold_tokens:
            cands = [w for w in self._prefill_ids if w != d or w in self._both]
            if cands:
                if policy == "round_robin":
                    choice = cands[self._rr_prefill % len(cands)]
                    self._rr_prefill += 1
                elif policy == "random":
                    choice = self._rng.choice(cands)
                else:
                    choice = min(cands, key=lambda w: (self._prefill_requests_of(w), w))
                if choice != d:
                    p = choice
        return RoutingDecision(d, p, 0, 0, policy), n

    def _requests_of(self, wid: str) -> int:
        ld = self._load.get(wid)
        return ld.requests() if ld is not None else 0

    def _prefill_requests_of(self, wid: str) -> int:
        ld = self._load.get(wid)
        return ld.prefill_requests() if ld is not None else 0

    # ------------------------------------------------------------------ bookkeeping

    def _account(self, decision: RoutingDecision, n: int, prefill_tokens: int) -> None:
        d = self._load_of(decision.decode_worker_id)
        d.dec_req += 1
        d.dec_tok += n
        d.inflight += 1
        pid = decision.prefill_worker_id or decision.decode_worker_id
        p = self._load_of(pid)
        p.pf_req += 1
        p.pf_tok += prefill_tokens
        if pid != decision.decode_worker_id:
            p.inflight += 1
        tracked = self._tracked
        if len(tracked) >= self._max_tracked:
            oldest = next(iter(tracked))
            self._finish(tracked.pop(oldest))
            self._counts["tracked_evicted"] += 1
        tracked[id(decision)] = _Tracked(decision, d, n, p, p.gen, prefill_tokens)
        c = self._counts
        c["decisions"] += 1
        c["local_prefill" if decision.prefill_worker_id is None else "remote_prefill"] += 1
        c["predicted_cached_tokens"] += decision.cached_tokens_prefill
        c["prompt_tokens"] += n

    def on_finished(self, decision: RoutingDecision, prompt_token_ids: Sequence[int] | None = None) -> None:
        """The request routed by ``decision`` ended (any outcome): release its load.

        Pass the very object :meth:`route` returned. Idempotent: a second call, or a
        decision this router did not make, changes nothing.
        """
        with self._lock:
            t = self._tracked.get(id(decision))
            if t is None or t.decision is not decision:
                self._counts["untracked_finishes"] += 1
                return
            del self._tracked[id(decision)]
            self._finish(t)

    def _finish(self, t: _Tracked) -> None:
        d = t.decode
        # The worker's report counted it if it was running then; it is gone now.
        d.dec_req -= 1
        d.dec_tok -= t.prompt_tokens
        d.inflight -= 1
        p = t.prefill
        if p.gen == t.prefill_gen:  # no report since routing: only our delta has it
            p.pf_req -= 1
            p.pf_tok -= t.prefill_tokens
        if p is not d:
            p.inflight -= 1

    # ---------------------------------------------------------------------- metrics

    def inflight(self) -> dict[str, int]:
        """This router's unfinished requests per worker (decode or prefill side)."""
        with self._lock:
            return {w: ld.inflight for w, ld in self._load.items() if ld.inflight}

    def stats(self) -> dict:
        """Counters for metrics: decisions, local/remote prefill, predicted cached tokens,
        tracked in-flight decisions, and the index's sizes."""
        with self._lock:
            out = dict(self._counts)
            out["policy"] = self.policy
            out["tracked_inflight"] = len(self._tracked)
            out["workers"] = len(self._workers)
        out["index"] = self.index.stats()
        return out


_EMPTY_LOAD = _Load()
