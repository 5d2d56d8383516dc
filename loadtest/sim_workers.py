"""Simulated prefill and decode workers: queues, iterations, KV blocks.

Both follow the engine loop (``docs/architecture.md``, lifecycle; engine/async_engine.py):
one engine thread steps back to back while there is work, and every call from the
server's event loop (add a request, post or poll a KV transfer, complete a remote
prefill) is a *command* that thread runs between steps: at once when it is idle,
else when the running step ends. It drains its queue and then starts the next step,
so a command the event loop issues in reaction to a step's output waits for the next
step too when there is more work. KV transfer calls (a finished prefill's write, its
poll, a decode worker's ``expect`` and poll) are such commands only with
``direct_transfer`` off; pdserve runs them beside the engine loop at TP 1, and the
simulator does the same for TP-1 workers. An iteration's duration is
:class:`WorkerCosts.iteration_s` of what it computes.

Prefill worker: FIFO queue of prompts; an iteration takes chunks of at most
``chunk_size`` tokens from the head under the ``token_budget``; a prompt's prefix-cache
hit is looked up when it first enters an iteration. A finished prompt's KV write is a
command; the transfer then takes ``transfer_token_s`` per prompt token, and its
completion is seen by a poll command, after which the decode worker has its answer.

Decode worker, the decode-first flow of the real one:

1. A routed request waits in ``waiting`` until its whole prompt's blocks are free
   (head of line: FIFO, as the engine's scheduler) and fewer than ``max_num_seqs``
   run. Admitted remote requests wait for KV; the engine hands out their
   ``RemotePrefill`` after the admitting step, then the ``expect`` command runs and
   the Prefill call leaves.
2. When the prefill worker answers, a poll command confirms the KV and a
   ``complete_remote_prefill`` command emits the first token; the request decodes
   from the next step on.
3. Each iteration decodes every running request (one token each) plus local prompt
   chunks under the token budget. A decode that needs a new block when none is free
   preempts the most recently admitted running request (blocks freed, back to the
   head of the queue, recomputed locally later); no request is admitted in that
   iteration, as in the engine.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import Protocol

from .sim_cache import PrefixCache, RouterView
from .sim_costs import WorkerCosts


class Phase(enum.Enum):
    QUEUED = "queued"
    WAITING_FOR_KV = "waiting_for_kv"
    PREFILLING = "prefilling"
    DECODING = "decoding"
    FINISHED = "finished"


class Seq:
    """One request inside the simulated cluster."""

    __slots__ = ("request", "decode", "prefill", "phase", "num_generated", "num_computed", "num_cached",
                 "num_blocks", "prompt_len", "first_token_s", "last_token_s", "finished_s", "num_preemptions",
                 "prefill_cached_tokens", "enter_s", "prefill_queued_s", "prefill_started_s", "queued_estimate")

    def __init__(self, request, decode: "DecodeWorker", prefill: "PrefillWorker | None") -> None:
        self.request = request
        self.decode = decode
        self.prefill = prefill  # None: prefilled on the decode worker
        self.phase = Phase.QUEUED
        self.num_generated = 0
        self.num_computed = 0  # prompt tokens computed (local prefill / recompute)
        self.num_cached = 0
        self.num_blocks = 0
        self.prompt_len = request.input_len  # grows on preemption: prompt + generated get recomputed
        self.first_token_s: float | None = None
        self.last_token_s: float | None = None
        self.finished_s: float | None = None
        self.num_preemptions = 0
        self.prefill_cached_tokens = 0  # prompt tokens the prefill found cached (its worker's or D's)
        self.queued_estimate = 0  # tokens added to the prefill worker's queue at routing (the router's view)
        self.enter_s = 0.0
        self.prefill_queued_s: float | None = None  # reached the worker that prefills it
        self.prefill_started_s: float | None = None  # its first prompt chunk began


class Clock(Protocol):
    def at(self, time_s: float, fn, *args) -> None: ...
    def on_token(self, seq: Seq, time_s: float) -> None: ...
    def on_finished(self, seq: Seq, time_s: float) -> None: ...
    def host_factor(self, worker) -> float: ...


def _blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class _EngineLoop:
    """One worker's engine thread: steps, and commands between them (module docstring)."""

    def __init__(self, sim: Clock, direct_transfer: bool = False) -> None:
        self.sim = sim
        #: KV transfer calls run beside the engine loop, not as commands between steps
        #: (pdserve does this at TP 1: ``EngineTransport.attach``).
        self.direct_transfer = direct_transfer
        self.is_busy = False  # a step runs or is about to start
        self.is_computing = False  # a step runs
        self._commands: list = []
        self._is_draining = False

    def issue(self, now: float, fn, *args) -> None:
        """The event loop hands the engine thread ``fn(now, *args)``."""
        if self.is_computing or self._is_draining:
            self._commands.append((fn, args))
        else:
            fn(now, *args)

    def _wake(self, now: float) -> None:
        # Step at the end of this instant, so work arriving together shares a step.
        if not self.is_busy:
            self.is_busy = True
            self.sim.at(now, self._boundary)

    def _boundary(self, now: float, posts: tuple = ()) -> None:
        """Between steps: drain the queued commands, start the next step, then take the
        event loop's reactions (``posts``) to the step that just ended."""
        self.is_computing = False
        self._is_draining = True
        queued, self._commands = self._commands, []
        for fn, args in queued:
            fn(now, *args)
        self._is_draining = False
        self.is_busy = True
        self._iterate(now)
        for fn, *args in posts:
            self.issue(now, fn, *args)
        while self._commands and not self.is_computing:  # idle: commands run at once
            queued, self._commands = self._commands, []
            for fn, args in queued:
                fn(now, *args)

    def _run_for(self, now: float, duration_s: float, *args) -> None:
        self.is_computing = True
        self.sim.at(now + duration_s * self.sim.host_factor(self), self._finish, *args)

    def _iterate(self, now: float) -> None:
        raise NotImplementedError

    def _finish(self, now: float, *args) -> None:
        raise NotImplementedError


class PrefillWorker(_EngineLoop):
    def __init__(self, name: str, sim: Clock, costs: WorkerCosts, cache_blocks: int, block_size: int,
                 token_budget: int, chunk_size: int, transfer_token_s: float, direct_transfer: bool = False) -> None:
        super().__init__(sim, direct_transfer)
        self.name = name
        self.costs = costs
        self.cache = PrefixCache(cache_blocks)
        self.view = RouterView(self.cache)
        self.block_size = block_size
        self.token_budget = token_budget
        self.chunk_size = chunk_size
        self.transfer_token_s = transfer_token_s
        self.queue: deque[Seq] = deque()
        self.num_queued_tokens = 0  # routed here and not yet computed, for the router
        self.num_inflight = 0  # routed here and not yet prefilled
        self.num_computed_tokens = 0
        self.num_iterations = 0

    def submit(self, now: float, seq: Seq) -> None:
        """The Prefill call arrived (``add_prefill_only``: a command)."""
        seq.prefill_queued_s = now
        self.issue(now, self._add, seq)

    def _add(self, now: float, seq: Seq) -> None:
        seq.num_computed = -1  # not looked up in the cache yet
        self.queue.append(seq)
        self._wake(now)

    def _iterate(self, now: float) -> None:
        budget = self.token_budget
        chunks: list[tuple[Seq, int]] = []
        in_flight = None
        bs = self.block_size
        for seq in self.queue:
            if budget <= 0:
                break
            if seq.num_computed < 0:
                hashes = seq.request.block_hashes
                hit = self.cache.match(hashes, (seq.prompt_len - 1) // bs) if hashes else 0
                if hashes and hit < (seq.prompt_len - 1) // bs:
                    # The engine's scheduler: wait for a prefix block a running prefill computes.
                    if in_flight is None:
                        in_flight = {h for q in self.queue if q.num_computed >= 0
                                     for h in q.request.block_hashes[q.num_computed // bs: q.prompt_len // bs]}
                    if hashes[hit] in in_flight:
                        continue
                seq.num_computed = seq.num_cached = hit * bs
                seq.prefill_cached_tokens = seq.num_cached
                seq.prefill_started_s = now
                # the router's estimate becomes what is really left to compute
                self.num_queued_tokens += (seq.prompt_len - seq.num_cached) - seq.queued_estimate
                if in_flight is not None:
                    in_flight.update(hashes[hit: seq.prompt_len // bs])
            take = min(seq.prompt_len - seq.num_computed, self.chunk_size, budget)
            chunks.append((seq, take))
            budget -= take
        if not chunks:
            self.is_busy = False
            return
        self.num_iterations += 1
        self._run_for(now, self.costs.iteration_s([(take, seq.num_computed) for seq, take in chunks]), chunks)

    def _finish(self, now: float, chunks: list[tuple[Seq, int]]) -> None:
        posts = []
        for seq, take in chunks:
            seq.num_computed += take
            self.num_queued_tokens -= take
            self.num_computed_tokens += take
            if seq.num_computed >= seq.prompt_len:
                self.queue.remove(seq)
                self.num_inflight -= 1
                if seq.request.block_hashes:
                    self.view.insert(seq.request.block_hashes[: seq.prompt_len // self.block_size])
                if self.direct_transfer:
                    self._write(now, seq)  # the write starts while the next step runs
                else:
                    posts.append((self._write, seq))
        self._boundary(now, posts)

    def _write(self, now: float, seq: Seq) -> None:
        """The KV write command: the bytes move while the engine goes on."""
        self.sim.at(now + self.transfer_token_s * (seq.prompt_len - seq.num_cached), self._transferred, seq)

    def _transferred(self, now: float, seq: Seq) -> None:
        if self.direct_transfer:
            self._answer(now, seq)
        else:
            self.issue(now, self._answer, seq)  # the poll that sees DONE

    def _answer(self, now: float, seq: Seq) -> None:
        seq.decode.kv_arrived(now, seq)


class DecodeWorker(_EngineLoop):
    def __init__(self, name: str, sim: Clock, costs: WorkerCosts, num_blocks: int, block_size: int,
                 token_budget: int, chunk_size: int, max_num_seqs: int, direct_transfer: bool = False) -> None:
        super().__init__(sim, direct_transfer)
        self.name = name
        self.costs = costs
        self.num_total_blocks = num_blocks
        self.num_free_blocks = num_blocks
        self.cache = PrefixCache(num_blocks)
        self.view = RouterView(self.cache)
        self.block_size = block_size
        self.token_budget = token_budget
        self.chunk_size = chunk_size
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []  # admission order
        self.num_preemptions = 0
        self.num_computed_tokens = 0  # local prompt tokens
        self.max_waiting = 0  # longest queue left after an admission pass

    # ------------------------------------------------------------------ load, for the router

    def num_requests(self) -> int:
        return len(self.running) + len(self.waiting)

    def num_queued_prefill_tokens(self) -> int:
        pending = [s for s in self.running if s.phase is Phase.PREFILLING]
        return sum(s.prompt_len - s.num_computed for s in pending) + sum(
            s.prompt_len for s in self.waiting if s.prefill is None)

    # ------------------------------------------------------------------ commands

    def submit(self, now: float, seq: Seq) -> None:
        """The Generate call arrived (``add_request``: a command)."""
        if seq.prefill is None:
            seq.prefill_queued_s = now
        self.issue(now, self._add, seq)

    def _add(self, now: float, seq: Seq) -> None:
        self.waiting.append(seq)
        self._wake(now)

    def _expect(self, now: float, seq: Seq) -> None:
        """The receiver's ``expect`` command; then the Prefill call leaves."""
        seq.prefill.submit(now, seq)

    def kv_arrived(self, now: float, seq: Seq) -> None:
        """The Prefill call answered: a poll confirms the KV, then completion (a command)."""
        if self.direct_transfer:
            self.issue(now, self._complete, seq)
        else:
            self.issue(now, lambda t: self.issue(t, self._complete, seq))

    def _complete(self, now: float, seq: Seq) -> None:
        """``complete_remote_prefill``: the first token now; decoding from the next step."""
        seq.phase = Phase.DECODING
        if seq.request.block_hashes:
            self.view.insert(seq.request.block_hashes[: seq.request.input_len // self.block_size])
        self._emit(seq, now)
        self._wake(now)

    # ------------------------------------------------------------------ the loop

    def _iterate(self, now: float) -> None:
        decodes = [s for s in self.running if s.phase is Phase.DECODING]
        preempted = False
        for seq in decodes:
            # After this step the KV holds the prompt and every sampled token.
            need = _blocks_for(seq.request.input_len + seq.num_generated, self.block_size)
            while seq.num_blocks < need and seq.phase is Phase.DECODING:
                if self.num_free_blocks > 0:
                    self.num_free_blocks -= 1
                    seq.num_blocks += 1
                else:
                    self._preempt_last()
                    preempted = True
        decodes = [s for s in self.running if s.phase is Phase.DECODING]

        budget = self.token_budget - len(decodes)
        chunks: list[tuple[Seq, int]] = []
        for seq in self.running:
            if seq.phase is Phase.PREFILLING and budget > 0:
                take = min(seq.prompt_len - seq.num_computed, self.chunk_size, budget)
                chunks.append((seq, take))
                budget -= take

        dispatch: list[Seq] = []
        while not preempted and self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            need = _blocks_for(seq.prompt_len, self.block_size)
            if need > self.num_free_blocks:
                break
            self.waiting.popleft()
            self.num_free_blocks -= need
            seq.num_blocks = need
            self.running.append(seq)
            if seq.prefill is not None and seq.num_preemptions == 0:
                seq.phase = Phase.WAITING_FOR_KV
                dispatch.append(seq)
                continue
            seq.phase = Phase.PREFILLING
            hashes = seq.request.block_hashes
            hit = self.cache.match(hashes, (seq.prompt_len - 1) // self.block_size) if hashes else 0
            seq.num_computed = seq.num_cached = hit * self.block_size
            if seq.num_preemptions == 0:
                seq.prefill_cached_tokens = seq.num_cached
                seq.prefill_started_s = now
            if budget > 0:
                take = min(seq.prompt_len - seq.num_computed, self.chunk_size, budget)
                chunks.append((seq, take))
                budget -= take

        self.max_waiting = max(self.max_waiting, len(self.waiting))
        if not decodes and not chunks:
            self.is_busy = False  # an empty step: its remote prefills leave at once
            for seq in dispatch:
                self.issue(now, self._expect, seq)
            return
        sum_ctx = sum(s.request.input_len + s.num_generated for s in decodes)
        duration = self.costs.iteration_s([(take, s.num_computed) for s, take in chunks], len(decodes), sum_ctx)
        self._run_for(now, duration, decodes, chunks, dispatch)

    def _finish(self, now: float, decodes: list[Seq], chunks: list[tuple[Seq, int]], dispatch: list[Seq]) -> None:
        for seq in decodes:
            if seq.phase is Phase.DECODING:
                self._emit(seq, now)
        for seq, take in chunks:
            if seq.phase is not Phase.PREFILLING:
                continue
            seq.num_computed += take
            self.num_computed_tokens += take
            if seq.num_computed >= seq.prompt_len:
                seq.phase = Phase.DECODING
                if seq.request.block_hashes:
                    self.view.insert(seq.request.block_hashes[: seq.request.input_len // self.block_size])
                self._emit(seq, now)
        if self.direct_transfer:
            self._boundary(now)
            for seq in dispatch:
                self._expect(now, seq)
        else:
            self._boundary(now, tuple((self._expect, seq) for seq in dispatch))

    def _emit(self, seq: Seq, now: float) -> None:
        """A sampled token: the first after a prefill, or one decode step."""
        seq.num_generated += 1
        self.sim.on_token(seq, now)
        if seq.num_generated >= seq.request.output_len:
            seq.phase = Phase.FINISHED
            seq.finished_s = now
            self.running.remove(seq)
            self.num_free_blocks += seq.num_blocks
            seq.num_blocks = 0
            if seq.request.block_hashes:
                self.view.insert(seq.request.block_hashes[: seq.request.input_len // self.block_size])
            self.sim.on_finished(seq, now)

    def _preempt_last(self) -> None:
        victims = [s for s in self.running if s.phase in (Phase.DECODING, Phase.PREFILLING)]
        victim = victims[-1]
        self.running.remove(victim)
        self.num_free_blocks += victim.num_blocks
        victim.num_blocks = 0
        # Recomputed locally later: the prompt and every token sampled so far; the step
        # that completes them samples the next token.
        victim.prompt_len = victim.request.input_len + victim.num_generated
        victim.num_preemptions += 1
        victim.phase = Phase.QUEUED
        self.num_preemptions += 1
        self.waiting.appendleft(victim)
