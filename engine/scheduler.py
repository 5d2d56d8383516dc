"""Continuous batching: which requests compute how many tokens this step.

One step mixes decodes (one token each) and prefill chunks under a token budget.
Running requests go first, in admission order; when one cannot get a block, the
most recently admitted running request is preempted: its blocks are freed and it
goes back to the head of the waiting queue, to be recomputed later (its full
blocks usually survive in the prefix cache, so recompute is often cheap). Waiting
requests are admitted only when no preemption happened this step and their
blocks fit.

Lifecycle: add_request -> WAITING -> (schedule) RUNNING -> [PREEMPTED -> RUNNING]*
-> finish_request / abort_request -> FINISHED_*, blocks freed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .config import SchedulerConfig
from .kv_cache_manager import KVCacheManager, PrefixHit
from .request import Request, RequestStatus

POOL_FETCH_MAX_BLOCKS = 64
"""Most blocks one request asks the KV pool for at once (host slots it reserves)."""
POOL_MAX_RESERVED_FRACTION = 0.5
"""Reads in flight hold at most this share of the host tier's slots, so a burst of cold
prompts (misses, mostly) cannot push every block the host tier holds out for them."""


@dataclass(frozen=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    """Tokens computed this step, starting at ``request.num_computed_tokens``."""

    @property
    def samples(self) -> bool:
        """This step completes the request's known tokens, so it yields logits to sample."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass(frozen=True)
class RemotePrefill:
    """A request admitted to wait for its prompt's KV: prompt blocks from ``first_block_index``
    on must be written into ``block_ids`` (the earlier ones were prefix-cache hits here).
    Where from, and under which lease, is ``request.kv_transfer``."""

    request: Request
    first_block_index: int
    block_ids: list[int]


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)
    remote_prefills: list[RemotePrefill] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._forks_pending: dict[str, list[Request]] = {}
        """Siblings (n > 1) waiting for their parent's prompt, keyed by the parent's id."""
        self.awaiting_kv: dict[str, Request] = {}
        """Admitted with blocks, waiting for a prefill worker to write their prompt's KV."""
        self.loading: dict[str, tuple[Request, PrefixHit, int]] = {}
        """Admitted with blocks, waiting for the host tier's blocks of their prefix to be
        copied in: (request, its hit, the step that started the copies). They run from
        the next step on (its forward runs after the copies land: ``kv_tiers``)."""
        self._step = 0
        self.num_preemptions = 0
        self.num_prefix_hit_tokens = 0
        self.num_prefix_query_tokens = 0
        self.num_host_hit_tokens = 0
        """Of the hits, prompt tokens loaded from the host tier."""
        """Prompt tokens found in / looked up in the prefix cache at first admission."""
        self.held: dict[str, Request] = {}
        """Finished prefill-side requests whose blocks stay allocated until released."""
        self.quarantined: dict[str, Request] = {}
        """Decode side: requests that ended while waiting for KV whose lease is not settled:
        a write may still land in their blocks, so no other request may have them yet."""
        self.pool_fetching: dict[str, tuple[Request, int]] = {}
        """Waiting for blocks of their prefix to be read from the KV pool into reserved
        host slots (``kv_pool_tier``): (request, job id). Back at the head of the queue
        once every rank's read ended (``pool_results``)."""
        self._pool_jobs: dict[int, tuple[Request, list[int], list[int], RequestStatus, PrefixHit]] = {}
        """Job id -> (request, reserved host slots, their block hashes, the request's status
        before, its hit, whose tier entries stay pinned); kept until the ranks' reads end,
        even if the request ended meanwhile."""
        self._pool_asked: set[str] = set()
        """Requests that asked the pool in this admission (at most once: no loop on a miss)."""
        self._pool_pinned: dict[str, tuple[PrefixHit, list[int]]] = {}
        """Tier entries of a request's prefix (its hit's, and those its pool read filled),
        pinned until its next lookup finds them."""
        self._next_pool_job = 0
        self.num_pool_hit_tokens = 0
        """Prompt tokens read from the KV pool into the host tier."""

    # -- intake --------------------------------------------------------------------

    def add_request(self, request: Request, siblings: list[Request] = ()) -> None:
        """Queue a request; ``siblings`` fork from it once its prompt is computed.

        Prompt logprobs, if asked, are collected on ``request`` only: siblings share them.
        """
        for r in (request, *siblings):
            if r.request_id in self.requests:
                raise ValueError(f"duplicate request_id {r.request_id!r}")
        if request.sampling_params.prompt_logprobs is not None and request.prompt_logprobs is None:
            request.prompt_logprobs = [None]
        self.requests[request.request_id] = request
        self.waiting.append(request)
        if siblings:
            self._forks_pending[request.request_id] = list(siblings)
            for s in siblings:
                self.requests[s.request_id] = s

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_seqs(self) -> int:
        return len(self.running) + len(self.awaiting_kv) + len(self.loading) + len(self.pool_fetching)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + sum(len(v) for v in self._forks_pending.values())

    # -- one step ------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self._step += 1
        if self.loading:
            self._promote_loaded()
        budget = self.config.max_num_batched_tokens
        chunk = self.config.chunk_size
        scheduled_ids: set[str] = set()

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, chunk, budget)
            while not self.kv.allocate_slots(req, num_new):
                # Blocks parked by waiting forked siblings go before any running request.
                if self._release_waiting_blocks(keep=None):
                    continue
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted_ids.append(victim.request_id)
                if victim is req:
                    break
            else:
                out.scheduled.append(ScheduledRequest(req, num_new))
                scheduled_ids.add(req.request_id)
                budget -= num_new
                i += 1
                continue
            break  # the request preempted itself: nothing after it can run either

        if not out.preempted_ids:
            self._admit_waiting(out, budget, chunk)
        return out

    def _admit_waiting(self, out: SchedulerOutput, budget: int, chunk: int) -> None:
        deferred: list[Request] = []
        in_flight: set[int] | None = None  # built on first need
        while self.waiting and budget > 0 and self.num_seqs < self.config.max_num_seqs:
            req = self.waiting[0]
            holds_blocks = bool(self.kv.block_ids(req.request_id))
            hit = self._find_prefix(req) if not holds_blocks else None
            if self._pool_pinned:
                self._unpin_pool(req.request_id)
            num_computed = req.num_computed_tokens if holds_blocks else hit.num_tokens
            # A remote prefill needs blocks for the whole prompt at once, and no compute here.
            is_remote = req.remote_prefill and not holds_blocks
            if (hit is not None and not is_remote and self.kv.pool_enabled and req.prompt_logprobs_position is None
                    and req.request_id not in self._pool_asked):
                if in_flight is None:
                    in_flight = self._prefixes_in_flight()
                if self._ask_pool(req, hit, in_flight):
                    continue
            if hit is not None and hit.num_tier_blocks and not is_remote:
                if not self._admit_loading(req, hit):
                    if self._release_waiting_blocks(keep=req):
                        continue
                    break
                continue
            if not holds_blocks and not is_remote and self.kv.enable_prefix_caching:
                if in_flight is None:
                    in_flight = self._prefixes_in_flight()
                if self._waits_for_prefix(req, hit, in_flight):
                    deferred.append(self.waiting.popleft())
                    continue
            num_new = req.num_tokens - num_computed if is_remote else min(req.num_tokens - num_computed, chunk, budget)
            ok = self.kv.allocate_slots(req, num_new) if holds_blocks else self.kv.allocate_slots(req, num_new, hit)
            if not ok:
                if self._release_waiting_blocks(keep=req):
                    continue
                break
            self.waiting.popleft()
            if not holds_blocks:
                req.num_computed_tokens = num_computed
                if req.num_preemptions == 0:
                    req.num_cached_tokens = num_computed
                    self.num_prefix_hit_tokens += num_computed
                    self.num_prefix_query_tokens += req.num_prompt_tokens
            if is_remote:
                req.status = RequestStatus.WAITING_FOR_KV
                self.awaiting_kv[req.request_id] = req
                if in_flight is not None:
                    in_flight.update(self._uncomputed_prompt_hashes(req))
                first = num_computed // self.kv.block_size
                out.remote_prefills.append(RemotePrefill(req, first, self.kv.block_ids(req.request_id)[first:]))
                continue
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, num_new))
            budget -= num_new
            if in_flight is not None:
                in_flight.update(self._uncomputed_prompt_hashes(req))
        self.waiting.extendleft(reversed(deferred))  # back at the head, in their order

    def queued_prefill_tokens(self) -> int:
        """Prompt tokens still to compute here, for the router's load view: the rest of
        every prefilling request, and of every waiting one net of what the prefix cache
        and the host tier hold and of blocks a running prefill is computing now (they
        will be hits: ``_waits_for_prefix``). Counting whole prompts instead made a worker
        that holds a group's prefix look busy with the group's followers' prefixes."""
        bs = self.kv.block_size
        total = sum(r.num_tokens - r.num_computed_tokens for r in self.running if r.is_prefilling)
        in_flight = self._prefixes_in_flight() if self.waiting and self.kv.enable_prefix_caching else set()
        for r in self.waiting:
            if self.kv.block_ids(r.request_id):
                total += r.num_tokens - r.num_computed_tokens
                continue
            hit = self.kv.find_prefix(r, use_host=not r.remote_prefill, touch=False)
            i = len(hit.blocks) + hit.num_tier_blocks
            while i < len(r.block_hashes) and r.block_hashes[i] in in_flight:
                i += 1
            total += r.num_tokens - min(i * bs, r.num_tokens - 1)
        for r, job in self.pool_fetching.values():  # net of what they read from the pool
            hit = self.kv.find_prefix(r, touch=False)
            i = len(hit.blocks) + hit.num_tier_blocks + len(self._pool_jobs[job][1])
            total += r.num_tokens - min(i * bs, r.num_tokens - 1)
        return total

    # -- prefixes in flight ----------------------------------------------------------
    #
    # A request whose prompt continues with a block that a running request is computing
    # right now (its prefill is in progress, e.g. the first request of a group that
    # shares a long system prompt), or that a prefill worker is writing here for a remote
    # prefill, waits for it instead of computing the same prefix a second time beside it:
    # once the block is there it is a prefix-cache hit. The wait lasts as long as the
    # other prefill (which runs, or lands, or fails over to a local prefill that runs, or
    # is preempted, which ends the wait); the requests behind it are admitted meanwhile.

    def _uncomputed_prompt_hashes(self, req: Request) -> list[int]:
        """Hashes of ``req``'s full prompt blocks not computed yet."""
        bs = self.kv.block_size
        return req.block_hashes[req.num_computed_tokens // bs: req.num_prompt_tokens // bs]

    def _prefixes_in_flight(self) -> set[int]:
        """Prompt blocks being computed here, or written here by a prefill worker (a
        remote prefill's KV in flight: its blocks are cached when it lands)."""
        out: set[int] = set()
        for r in self.running:
            if r.num_computed_tokens < r.num_prompt_tokens:
                out.update(self._uncomputed_prompt_hashes(r))
        for r in self.awaiting_kv.values():
            out.update(self._uncomputed_prompt_hashes(r))
        for job in self._pool_jobs.values():
            out.update(job[2])  # being read from the KV pool
        return out

    def _waits_for_prefix(self, req: Request, hit: PrefixHit, in_flight: set[int]) -> bool:
        if not in_flight or req.prompt_logprobs_position is not None:
            return False
        i = hit.num_tokens // self.kv.block_size  # the first block it would compute
        return i < (req.num_tokens - 1) // self.kv.block_size and req.block_hashes[i] in in_flight

    def _find_prefix(self, req: Request) -> PrefixHit:
        """The prefix-cache hit, cut to the blocks before the first position whose prompt
        logprobs are still missing: cached KV yields no logits (vLLM skips the cache for
        such prompts too). Their blocks are still cached once computed. The host tier
        continues the hit, except for remote prefills (their KV comes from the prefill
        worker) and prompts that want logprobs."""
        position = req.prompt_logprobs_position
        hit = self.kv.find_prefix(req, use_host=position is None and not req.remote_prefill)
        if position is None or hit.num_tokens <= position:
            return hit
        num_blocks = position // self.kv.block_size
        return PrefixHit(hit.blocks[:num_blocks], num_blocks * self.kv.block_size)

    # -- the host tier -----------------------------------------------------------------

    def _admit_loading(self, req: Request, hit: PrefixHit) -> bool:
        """Admit ``req`` with region blocks for its cached and host-tier prefix; the host
        blocks are copied in before it runs (next step). False when blocks are short."""
        num_host_tokens = hit.num_tier_blocks * self.kv.block_size
        self.kv.pin(hit)
        if not self.kv.allocate_slots(req, num_host_tokens, hit):
            self.kv.end_load(hit)
            return False
        self.waiting.popleft()
        self.kv.start_load(req, hit)
        req.num_computed_tokens = hit.num_tokens
        if req.num_preemptions == 0:
            req.num_cached_tokens = hit.num_tokens + num_host_tokens
            self.num_prefix_hit_tokens += hit.num_tokens + num_host_tokens
            self.num_prefix_query_tokens += req.num_prompt_tokens
        self.num_host_hit_tokens += num_host_tokens
        req.status = RequestStatus.WAITING_FOR_KV
        self.loading[req.request_id] = (req, hit, self._step)
        return True

    def _promote_loaded(self) -> None:
        """Requests whose copies started in an earlier step join the running batch: the
        loaded blocks are theirs and cached (this step's forward runs after the copies)."""
        for rid, (req, hit, step) in list(self.loading.items()):
            if step >= self._step:
                continue
            del self.loading[rid]
            self.kv.end_load(hit)
            req.num_computed_tokens = hit.num_tokens + hit.num_tier_blocks * self.kv.block_size
            self.kv.cache_computed_blocks(req)
            req.status = RequestStatus.RUNNING
            self.running.append(req)

    # -- the KV pool (``kv_pool_tier``) ---------------------------------------------------

    def _ask_pool(self, req: Request, hit: PrefixHit, in_flight: set[int]) -> bool:
        """The lookup stopped before the prompt's last full block: reserve host slots for
        the next blocks and read them from the KV pool (the request waits in
        ``pool_fetching``). False when there is nothing to ask (the request goes on as
        usual); a request asks once per admission."""
        bs = self.kv.block_size
        first = len(hit.blocks) + hit.num_tier_blocks
        room = int(self.kv.host.num_slots * POOL_MAX_RESERVED_FRACTION) - self.kv.host.num_reserved
        end = min((req.num_tokens - 1) // bs, len(req.block_hashes), first + min(POOL_FETCH_MAX_BLOCKS, room))
        if first >= end or req.block_hashes[first] in in_flight:
            return False  # nothing to fetch, or computed / fetched by another request right now
        self._pool_asked.add(req.request_id)
        job = self._next_pool_job
        # Reserving evicts LRU host entries: not the ones this request found, now or while
        # it waits (the blocks read from the pool continue them).
        self.kv.pin(hit)
        slots = self.kv.reserve_pool_fetch(job, req, first, end - first)
        if not slots:
            self.kv.end_load(hit)
            return False
        self._next_pool_job += 1
        self.waiting.popleft()
        hashes = req.block_hashes[first:first + len(slots)]
        self._pool_jobs[job] = (req, slots, hashes, req.status, hit)
        in_flight.update(hashes)
        req.status = RequestStatus.WAITING_FOR_KV
        self.pool_fetching[req.request_id] = (req, job)
        return True

    def pool_results(self, fetched: list[tuple[int, int]]) -> None:
        """Pool reads every rank finished: ``(job id, leading blocks read)``. Those blocks
        become host-tier entries, the other slots are freed, and each request goes back to
        the head of the queue (its next lookup finds the blocks in the host tier)."""
        back = []
        for job, n in fetched:
            req, slots, _, status, hit = self._pool_jobs.pop(job)
            filled = self.kv.end_pool_fetch(slots, n)
            self.num_pool_hit_tokens += len(filled) * self.kv.block_size
            rid = req.request_id
            if self.pool_fetching.get(rid, (None, None))[1] == job:
                del self.pool_fetching[rid]
                req.status = status
                self._pool_pinned[rid] = (hit, filled)
                back.append(req)
            else:  # the request ended meanwhile
                self.kv.end_load(hit)
                self.kv.unpin_blocks(filled)
        self.waiting.extendleft(reversed(back))

    def _unpin_pool(self, request_id: str) -> None:
        pinned = self._pool_pinned.pop(request_id, None)
        if pinned is not None:
            self.kv.end_load(pinned[0])
            self.kv.unpin_blocks(pinned[1])

    @property
    def num_pool_reserved(self) -> int:
        """Host slots reserved for pool reads not finished yet."""
        return sum(len(job[1]) for job in self._pool_jobs.values())

    def complete_remote_prefill(self, request_id: str) -> Request:
        """The prompt's KV has arrived: the request joins the running batch to decode."""
        req = self.awaiting_kv.pop(request_id, None)
        if req is None:
            raise ValueError(f"request {request_id!r} is not waiting for KV")
        req.remote_prefill = False  # a later preemption recomputes locally
        req.num_computed_tokens = req.num_tokens
        self.kv.cache_computed_blocks(req)
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        if request_id in self._forks_pending:
            self._fork_siblings(req)
        return req

    def prefill_locally(self, request_id: str) -> Request:
        """The remote prefill will not happen (the prefill worker refused or left): the
        request goes back to the head of the queue and this worker computes its prompt.

        NOTE: it keeps its blocks and computes into them, so call it only once no write can
        land in them any more (the decode worker's lease rules, ``kvtransfer.lease``): a late
        write could overwrite what is computed here, including decoded tokens' KV in the
        prompt's last block.
        """
        req = self.awaiting_kv.pop(request_id, None)
        if req is None:
            raise ValueError(f"request {request_id!r} is not waiting for KV")
        req.remote_prefill = False
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        return req

    def _release_waiting_blocks(self, keep: Request | None) -> bool:
        """Free the blocks that forked siblings hold while they wait (last first).

        Without this, siblings parked on shared blocks could starve the request at
        the head of the queue forever. They recompute (or re-hit the cache) later.
        """
        for req in reversed(self.waiting):
            if (req is not keep or not self.running) and self.kv.block_ids(req.request_id):
                self.kv.free(req)
                req.num_computed_tokens = 0
                return True
        return False

    def _preempt(self, req: Request) -> None:
        self._pool_asked.discard(req.request_id)  # a new admission may ask the pool again
        self.running.remove(req)
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    # -- after the model ran -------------------------------------------------------

    def update_after_step(self, out: SchedulerOutput) -> None:
        """Advance computed-token counts and fork siblings whose parent's prompt is done.

        Sampled tokens are appended by the engine (``Request.append_token``) before
        it decides whether a request finished.
        """
        for s in out.scheduled:
            req = s.request
            req.num_computed_tokens += s.num_new_tokens
            self.kv.cache_computed_blocks(req)
            if req.request_id in self._forks_pending and req.num_computed_tokens >= req.num_prompt_tokens:
                self._fork_siblings(req)

    def _fork_siblings(self, parent: Request) -> None:
        """Siblings share the parent's full prompt blocks and compute only the tail.

        At least one prompt token is left to each sibling so it samples its own
        first token (with its own seed).
        """
        bs = self.kv.block_size
        num_shared = (parent.num_prompt_tokens - 1) // bs
        for child in self._forks_pending.pop(parent.request_id):
            self.kv.fork(parent, child, num_shared)
            child.num_computed_tokens = num_shared * bs
            child.num_cached_tokens = parent.num_cached_tokens
            self.waiting.append(child)

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """End a request (finished or aborted) at any point; frees all its blocks, unless it
        asked to hold them (prefill side) and did not fail: then they wait for ``release``."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        req.status = status
        was_awaiting_kv = self.awaiting_kv.pop(request_id, None) is not None
        loading = self.loading.pop(request_id, None)
        if loading is not None:
            # Its blocks may still be being written: they are only reused from the next
            # step on, whose forward runs after every copy landed.
            self.kv.end_load(loading[1])
        # A pool read in flight keeps its reserved slots until every rank ended it.
        fetching = self.pool_fetching.pop(request_id, None) is not None
        self._pool_asked.discard(request_id)
        self._unpin_pool(request_id)
        if req in self.running:
            self.running.remove(req)
        elif not was_awaiting_kv and loading is None and not fetching:
            try:
                self.waiting.remove(req)
            except ValueError:
                # A sibling still waiting for its parent's prompt: it must not be forked later.
                for pending in self._forks_pending.values():
                    pending[:] = [c for c in pending if c is not req]
        if req.hold_blocks and status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH):
            self.held[request_id] = req
        elif was_awaiting_kv and req.kv_transfer is not None and not req.kv_transfer.is_settled:
            self.quarantined[request_id] = req  # until settle_remote_prefill
        else:
            self.kv.free(req)
        # Siblings still waiting for this request's prompt cannot start without it.
        for child in self._forks_pending.pop(request_id, ()):
            self.requests.pop(child.request_id, None)
            child.status = RequestStatus.FINISHED_ABORTED
        return req

    def settle_remote_prefill(self, request_id: str, transfer_id: str) -> bool:
        """The lease ``transfer_id`` of a remote prefill is settled: no write can land in the
        request's blocks any more. Frees them if the request ended meanwhile (True), else
        lets a later end free them at once. A request whose lease is another is untouched."""
        req = self.quarantined.get(request_id)
        if req is not None and req.kv_transfer.transfer_id == transfer_id:
            del self.quarantined[request_id]
            self.kv.free(req)
            return True
        req = self.requests.get(request_id)
        if req is not None and req.kv_transfer is not None and req.kv_transfer.transfer_id == transfer_id:
            req.kv_transfer.is_settled = True
        return False

    def release(self, request_id: str) -> bool:
        """Free the blocks a finished prefill-side request held; False if it held none."""
        req = self.held.pop(request_id, None)
        if req is None:
            return False
        self.kv.free(req)
        return True
