"""Continuous batching (engine/scheduler.py), driven without a model.

``Sim`` plays the engine loop: ``schedule()`` -> "run the model" -> ``update_after_step``
-> append a fake token to every request whose step samples -> finish the ones that
reached ``max_tokens``. The fake model keeps a KV store (block id -> token per slot),
so every step also checks that each request reads back exactly its own tokens from
its block table (prefix hits, forks and preemption included) and only writes to
blocks nobody else references. Each test reads as a lifecycle and ends with a check
that no block leaked.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from pdserve.engine.config import SchedulerConfig
from pdserve.engine.kv_cache_manager import KVCacheManager
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import Scheduler, SchedulerOutput

W, R, P = RequestStatus.WAITING, RequestStatus.RUNNING, RequestStatus.PREEMPTED


class Sim:
    def __init__(
        self,
        num_blocks: int,
        block_size: int = 4,
        max_num_batched_tokens: int = 64,
        max_num_seqs: int = 16,
        prefill_chunk_size: int | None = None,
        enable_prefix_caching: bool = True,
        token_fn=None,
    ) -> None:
        self.bs = block_size
        self.config = SchedulerConfig(max_num_batched_tokens, max_num_seqs, prefill_chunk_size)
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching)
        self.sched = Scheduler(self.config, self.kv)
        self.reqs: dict[str, Request] = {}
        self.appended: dict[str, list[int]] = {}
        self.store: dict[int, list[int | None]] = {i: [None] * block_size for i in range(num_blocks)}
        self.token_fn = token_fn or (lambda req: 1000 + len(req.output_token_ids))
        self.num_steps = 0
        self.last_sampled: list[str] = []

    # -- intake ------------------------------------------------------------------

    def add(self, rid: str, prompt, max_tokens: int = 4, n: int = 1, **params) -> Request:
        sp = SamplingParams(max_tokens=max_tokens, n=n, **params)
        group = [Request(rid if i == 0 else f"{rid}#{i}", list(prompt), sp, self.bs) for i in range(n)]
        for r in group:
            self.reqs[r.request_id] = r
            self.appended[r.request_id] = []
        self.sched.add_request(group[0], group[1:])
        return group[0]

    def abort(self, rid: str) -> None:
        self.sched.finish_request(rid, RequestStatus.FINISHED_ABORTED)

    # -- the loop ----------------------------------------------------------------

    def step(self) -> SchedulerOutput:
        out = self.sched.schedule()
        self.num_steps += 1
        self.check(out)
        sampling = [s.request for s in out.scheduled if s.samples]  # before the counts move
        self.last_sampled = [r.request_id for r in sampling]
        for s in out.scheduled:
            self._run_model(s.request, s.num_new_tokens)
        self.sched.update_after_step(out)
        self.check()
        for req in sampling:
            tok = self.token_fn(req)
            req.append_token(tok)
            self.appended[req.request_id].append(tok)
            if len(req.output_token_ids) >= req.sampling_params.max_tokens:
                self.sched.finish_request(req.request_id, RequestStatus.FINISHED_LENGTH)
        self.check()
        return out

    def run(self, max_steps: int = 1000) -> None:
        while self.sched.has_unfinished:
            assert not self.step().is_empty, "no progress with requests pending"
            max_steps -= 1
            assert max_steps > 0, "requests never finished"

    def _run_model(self, req: Request, n: int) -> None:
        """Read the KV of every computed token, then write the new ones."""
        table = self.kv.block_ids(req.request_id)
        toks = req.all_token_ids
        start = req.num_computed_tokens
        assert start + n <= len(toks)
        assert len(table) >= self.kv.num_blocks_needed(start + n)
        for p in range(start):
            assert self.store[table[p // self.bs]][p % self.bs] == toks[p], f"{req.request_id} reads wrong KV at {p}"
        for p in range(start, start + n):
            block = self.kv.pool.blocks[table[p // self.bs]]
            assert block.ref_count == 1, f"{req.request_id} writes into shared {block!r}"
            assert block.block_hash is None, f"{req.request_id} writes into cached {block!r}"
            self.store[block.block_id][p % self.bs] = toks[p]

    # -- invariants --------------------------------------------------------------

    def check(self, out: SchedulerOutput | None = None) -> None:
        pool, sched = self.kv.pool, self.sched
        tables = {rid: self.kv.block_ids(rid) for rid in self.reqs}
        # Ref counts are exactly the block-table references; a block is free iff unreferenced.
        uses = Counter(b for t in tables.values() for b in t)
        assert sum(b.ref_count for b in pool.blocks) == sum(len(t) for t in tables.values())
        for b in pool.blocks:
            assert b.ref_count == uses[b.block_id], b
            assert (b.block_id in pool._free) == (b.ref_count == 0), b
        assert pool.num_free_blocks == sum(b.ref_count == 0 for b in pool.blocks)
        # The cache index is consistent, and a cached block in a table holds that request's prefix.
        for h, b in pool._cached.items():
            assert b.block_hash == h
        for rid, t in tables.items():
            assert len(set(t)) == len(t)
            req = self.reqs[rid]
            for i, bid in enumerate(t):
                h = pool.blocks[bid].block_hash
                assert h is None or (i < len(req.block_hashes) and req.block_hashes[i] == h)
            if req.status.is_finished:
                assert t == [] and rid not in sched.requests
        # Queues.
        running, waiting = [r.request_id for r in sched.running], [r.request_id for r in sched.waiting]
        pending = [c.request_id for cs in sched._forks_pending.values() for c in cs]
        assert len({*running, *waiting, *pending}) == len(running) + len(waiting) + len(pending)
        assert {*running, *waiting, *pending} == set(sched.requests)
        assert all(r.status is R for r in sched.running)
        assert all(r.status in (W, P) for r in sched.waiting)
        assert len(sched.running) <= self.config.max_num_seqs
        for rid, req in self.reqs.items():
            assert req.output_token_ids == self.appended[rid]
            assert len(req.output_token_ids) <= req.sampling_params.max_tokens
        if out is not None:
            assert out.num_batched_tokens <= self.config.max_num_batched_tokens
            ids = [s.request.request_id for s in out.scheduled]
            assert len(set(ids)) == len(ids)
            assert set(ids) <= set(running)
            if set(out.preempted_ids) & set(ids):
                # Re-admitted in the step that preempted it: only when every running
                # request was preempted, so everything that runs now was just admitted.
                assert set(ids) == set(running)
            for s in out.scheduled:
                assert 1 <= s.num_new_tokens <= self.config.chunk_size

    # -- helpers for the narration ------------------------------------------------

    def refs(self, rid: str) -> list[int]:
        return [self.kv.pool.blocks[b].ref_count for b in self.kv.block_ids(rid)]

    def all_free(self) -> bool:
        s = self.kv.stats()
        return s.num_free_blocks == s.num_total_blocks


def plan(out: SchedulerOutput) -> dict[str, int]:
    return {s.request.request_id: s.num_new_tokens for s in out.scheduled}


def toks(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


# -- lifecycles --------------------------------------------------------------------


def test_single_request_prefill_then_decode_to_the_end():
    sim = Sim(num_blocks=8)
    a = sim.add("a", toks(0, 6), max_tokens=3)
    assert a.status is W and sim.sched.num_waiting == 1

    out = sim.step()
    assert plan(out) == {"a": 6} and out.scheduled[0].num_new_tokens == 6
    assert a.status is R and a.num_computed_tokens == 6 and a.output_token_ids == [1000]
    assert len(sim.kv.block_ids("a")) == 2
    assert plan(sim.step()) == {"a": 1}
    assert plan(sim.step()) == {"a": 1}
    assert a.status is RequestStatus.FINISHED_LENGTH and a.output_token_ids == [1000, 1001, 1002]
    assert not sim.sched.has_unfinished
    assert sim.step().is_empty
    assert sim.all_free()


def test_chunked_prefill_under_the_token_budget():
    sim = Sim(num_blocks=16, max_num_batched_tokens=8, prefill_chunk_size=5)
    a = sim.add("a", toks(0, 12), max_tokens=2)

    # 12 prompt tokens in chunks of at most 5; only the last chunk samples.
    out = sim.step()
    assert plan(out) == {"a": 5} and sim.last_sampled == []
    assert a.num_computed_tokens == 5 and a.output_token_ids == []
    assert a.is_prefilling
    assert len(sim.kv.block_ids("a")) == 2  # room for tokens 0..4
    assert plan(sim.step()) == {"a": 5}
    assert a.num_computed_tokens == 10 and a.output_token_ids == []
    assert sim.kv.stats().num_cached_blocks == 2  # full blocks are cached as they complete
    assert plan(sim.step()) == {"a": 2}
    assert a.output_token_ids == [1000]
    assert plan(sim.step()) == {"a": 1}
    assert a.status is RequestStatus.FINISHED_LENGTH
    assert sim.all_free()


def test_budget_splits_between_two_prefills():
    sim = Sim(num_blocks=16, max_num_batched_tokens=8, prefill_chunk_size=5)
    sim.add("a", toks(0, 12), max_tokens=1)
    sim.add("b", toks(100, 6), max_tokens=1)
    # a takes a chunk of 5, b gets the 3 tokens left in the budget.
    assert plan(sim.step()) == {"a": 5, "b": 3}
    assert plan(sim.step()) == {"a": 5, "b": 3}  # b's last 3 sample and finish it
    assert "b" not in sim.sched.requests
    assert plan(sim.step()) == {"a": 2}
    assert not sim.sched.has_unfinished
    assert sim.all_free()


def test_decodes_and_prefill_chunks_share_a_step():
    sim = Sim(num_blocks=16, max_num_batched_tokens=6)
    a = sim.add("a", toks(0, 4), max_tokens=5)
    assert plan(sim.step()) == {"a": 4}

    b = sim.add("b", toks(100, 10), max_tokens=2)
    # Running decodes go first (one token each), the new prompt fills the rest.
    assert plan(sim.step()) == {"a": 1, "b": 5}
    assert sim.last_sampled == ["a"] and b.output_token_ids == []
    assert plan(sim.step()) == {"a": 1, "b": 5}
    assert sim.last_sampled == ["a", "b"] and b.output_token_ids == [1000]
    assert plan(sim.step()) == {"a": 1, "b": 1}
    assert b.status is RequestStatus.FINISHED_LENGTH
    assert plan(sim.step()) == {"a": 1}
    assert a.status is RequestStatus.FINISHED_LENGTH and len(a.output_token_ids) == 5
    assert sim.all_free()


def test_admission_waits_for_free_blocks():
    sim = Sim(num_blocks=4)
    a = sim.add("a", toks(0, 12), max_tokens=2)  # 3 blocks, a 4th for its 13th token
    b = sim.add("b", toks(100, 8), max_tokens=1)  # 2 blocks

    assert plan(sim.step()) == {"a": 12}  # b does not fit next to a
    assert b.status is W and sim.kv.block_ids("b") == []
    assert plan(sim.step()) == {"a": 1}  # a's decode takes the last free block
    assert a.status is RequestStatus.FINISHED_LENGTH
    assert sim.kv.stats().num_free_blocks == 4

    # a's freed (cached) blocks are evicted for b.
    out = sim.step()
    assert plan(out) == {"b": 8} and b.num_cached_tokens == 0
    assert b.status is RequestStatus.FINISHED_LENGTH
    assert sim.all_free()


def test_max_num_seqs_caps_the_running_set():
    sim = Sim(num_blocks=16, max_num_seqs=2)
    a = sim.add("a", toks(0, 3), max_tokens=1)
    b = sim.add("b", toks(10, 3), max_tokens=3)
    c = sim.add("c", toks(20, 3), max_tokens=1)

    assert plan(sim.step()) == {"a": 3, "b": 3}
    assert c.status is W
    # a finished with its first token, which frees a seat for c in the same step as b's decode.
    assert a.status is RequestStatus.FINISHED_LENGTH
    assert plan(sim.step()) == {"b": 1, "c": 3}
    assert len(sim.sched.running) == 1
    assert plan(sim.step()) == {"b": 1}
    assert b.status is c.status is RequestStatus.FINISHED_LENGTH
    assert sim.all_free()


def test_preemption_by_recompute_when_blocks_run_out():
    sim = Sim(num_blocks=5)
    a = sim.add("a", toks(0, 8), max_tokens=8)  # 16 tokens: 4 blocks at the end
    b = sim.add("b", toks(100, 8), max_tokens=8)

    assert plan(sim.step()) == {"a": 8, "b": 8}  # 2 + 2 blocks, one left
    assert a.output_token_ids == b.output_token_ids == [1000]

    # Both need a third block for their 9th token; only one is free. The most
    # recently admitted running request (b) is the victim.
    out = sim.step()
    assert out.preempted_ids == ["b"]
    assert plan(out) == {"a": 1}
    assert b.status is P and b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert sim.kv.block_ids("b") == []
    assert list(sim.sched.waiting) == [b]
    assert b.output_token_ids == [1000]  # what it generated is kept, to be recomputed
    assert sim.kv.stats().num_cached_blocks >= 4  # b's prompt blocks survive in the cache

    # No admission in a step that preempted; later, while a holds 3 blocks, b (3 needed)
    # still does not fit: its cached blocks are counted as revived, not as free extras.
    assert plan(sim.step()) == {"a": 1}
    assert b.status is P

    sim.run()
    assert a.status is b.status is RequestStatus.FINISHED_LENGTH
    assert a.output_token_ids == b.output_token_ids == toks(1000, 8)  # nothing lost or duplicated
    assert b.num_preemptions == 1 and b.num_cached_tokens == 0
    assert sim.all_free()


def test_preemption_victim_is_the_latest_admitted_and_goes_first_in_line():
    sim = Sim(num_blocks=6)
    a = sim.add("a", toks(0, 4), max_tokens=8)
    b = sim.add("b", toks(10, 4), max_tokens=8)
    c = sim.add("c", toks(20, 4), max_tokens=8)

    assert plan(sim.step()) == {"a": 4, "b": 4, "c": 4}  # one block each
    assert plan(sim.step()) == {"a": 1, "b": 1, "c": 1}  # 5th token: a second block each
    assert sim.kv.stats().num_free_blocks == 0
    d = sim.add("d", toks(30, 4), max_tokens=1)  # no block left: waits behind them
    for _ in range(3):
        assert plan(sim.step()) == {"a": 1, "b": 1, "c": 1}

    # 9th token: a needs a third block -> c (latest) is preempted; its two blocks go
    # to a and b.
    out = sim.step()
    assert out.preempted_ids == ["c"] and plan(out) == {"a": 1, "b": 1}
    assert [r.request_id for r in sim.sched.waiting] == ["c", "d"]
    assert c.num_computed_tokens == 0 and c.output_token_ids == toks(1000, 5)

    sim.run()
    for r in (a, b, c):
        assert r.status is RequestStatus.FINISHED_LENGTH and r.output_token_ids == toks(1000, 8)
    assert d.status is RequestStatus.FINISHED_LENGTH
    assert c.num_preemptions >= 1
    assert sim.all_free()


def test_preempted_request_recomputes_its_outputs_with_prefix_hits():
    sim = Sim(num_blocks=4, max_num_batched_tokens=64)
    a = sim.add("a", toks(0, 5), max_tokens=6)  # 11 tokens: 3 blocks
    b = sim.add("b", toks(100, 4), max_tokens=8)  # 12 tokens: 3 blocks (11 computed)
    sim.step()
    while "a" in sim.sched.requests and not b.num_preemptions:
        sim.step()
    assert b.num_preemptions == 1 and b.status is P
    n_out = len(b.output_token_ids)
    assert n_out >= 1
    # b's fully computed blocks (prompt + outputs) are in the cache, so on re-admission
    # it hits them and recomputes only the tail, then samples its next token.
    sim.run()
    assert b.output_token_ids == toks(1000, 8)
    assert a.output_token_ids == toks(1000, 6)
    assert sim.all_free()


def test_prefix_cache_hit_for_a_shared_prefix():
    sim = Sim(num_blocks=16)
    system = toks(500, 8)  # two full blocks
    a = sim.add("a", system + [1, 2, 3], max_tokens=4)
    sim.step()
    assert a.num_cached_tokens == 0
    a_blocks = sim.kv.block_ids("a")

    b = sim.add("b", system + [7, 8, 9, 10, 11], max_tokens=2)
    out = sim.step()
    assert plan(out) == {"a": 1, "b": 5}  # b computes only what is not cached
    assert b.num_cached_tokens == 8
    assert sim.kv.block_ids("b")[:2] == a_blocks[:2]
    assert sim.refs("a") == [2, 2, 1] and sim.refs("b") == [2, 2, 1, 1]

    # Same prompt as a: only its full blocks come from the cache (a's third block also
    # holds a's first output, so it is not a's prompt block).
    c = sim.add("c", system + [1, 2, 3], max_tokens=1)
    assert plan(sim.step())["c"] == 3 and c.num_cached_tokens == 8
    sim.run()
    assert not sim.sched.has_unfinished
    assert sim.all_free()


def test_a_request_waits_for_its_prefix_in_flight_instead_of_computing_it_twice():
    """Two requests of one group arrive together: the second waits while the first
    computes the shared prefix (chunked over several steps), then hits the cache; a
    request of another group behind it is admitted meanwhile."""
    sim = Sim(num_blocks=32, max_num_batched_tokens=64, prefill_chunk_size=8)
    system = toks(500, 24)  # six blocks, three chunks
    a = sim.add("a", system + [1, 2, 3], max_tokens=2)
    b = sim.add("b", system + [7, 8], max_tokens=2)
    c = sim.add("c", toks(900, 6), max_tokens=2)
    assert plan(sim.step()) == {"a": 8, "c": 6}  # b waits: a's first chunk is its prefix
    assert [r.request_id for r in sim.sched.waiting] == ["b"]
    assert plan(sim.step()) == {"a": 8, "c": 1}
    plan(sim.step())  # a's third chunk: the whole prefix is cached after it
    assert b.status is W
    out = sim.step()
    assert plan(out)["b"] == 2 and b.num_cached_tokens == 24
    sim.run()
    assert sim.sched.num_prefix_hit_tokens == 24
    assert sim.all_free()


def test_a_request_waits_for_its_prefix_arriving_from_a_prefill_worker():
    """A remote prefill's blocks are being written by a prefill worker; a request of the
    same group prefilled here waits for them rather than computing them beside them."""
    sim = Sim(num_blocks=32, max_num_batched_tokens=64)
    system = toks(500, 24)
    a = sim.add("a", system + [1, 2, 3], max_tokens=2)
    a.remote_prefill = True
    b = sim.add("b", system + [7, 8], max_tokens=2)
    out = sim.sched.schedule()
    assert [rp.request.request_id for rp in out.remote_prefills] == ["a"] and plan(out) == {}
    assert [r.request_id for r in sim.sched.waiting] == ["b"]
    assert sim.sched.queued_prefill_tokens() == 2  # b's own tokens only: the rest is on its way
    for block in sim.kv.block_ids("a"):  # the prefill worker's write lands
        sim.store[block] = [None] * sim.bs
    for p in range(27):
        sim.store[sim.kv.block_ids("a")[p // sim.bs]][p % sim.bs] = a.all_token_ids[p]
    sim.sched.complete_remote_prefill("a")
    a.append_token(1000)
    sim.appended["a"].append(1000)
    out = sim.step()
    assert plan(out)["b"] == 2 and b.num_cached_tokens == 24
    sim.run()
    assert sim.all_free()


def test_prefix_in_flight_wait_ends_when_the_leader_is_preempted():
    """A waiting follower of a preempted leader is not stuck: the leader's prefix is no
    longer in flight, so either may go first, and both finish."""
    sim = Sim(num_blocks=9, max_num_batched_tokens=64, prefill_chunk_size=4)
    system = toks(300, 12)
    a = sim.add("a", system + [1], max_tokens=20)
    b = sim.add("b", system + [2], max_tokens=20)
    sim.run()
    assert a.num_preemptions + b.num_preemptions > 0
    assert sim.all_free()


def test_prefix_in_flight_is_not_waited_for_without_prefix_caching():
    sim = Sim(num_blocks=32, max_num_batched_tokens=64, enable_prefix_caching=False)
    system = toks(500, 16)
    sim.add("a", system + [1], max_tokens=1)
    sim.add("b", system + [2], max_tokens=1)
    assert plan(sim.step()) == {"a": 17, "b": 17}
    sim.run()
    assert sim.all_free()


def test_prompt_of_whole_blocks_recomputes_its_last_block():
    sim = Sim(num_blocks=16)
    sim.add("a", toks(0, 8), max_tokens=1)
    sim.run()
    b = sim.add("b", toks(0, 8), max_tokens=1)
    assert plan(sim.step()) == {"b": 4}  # 8 cached would leave nothing to sample from
    assert b.num_cached_tokens == 4 and b.status is RequestStatus.FINISHED_LENGTH
    assert sim.all_free()


def test_prefix_caching_disabled_computes_everything():
    sim = Sim(num_blocks=16, enable_prefix_caching=False)
    sim.add("a", toks(0, 9), max_tokens=1)
    sim.run()
    b = sim.add("b", toks(0, 9), max_tokens=1)
    assert plan(sim.step()) == {"b": 9} and b.num_cached_tokens == 0
    assert sim.kv.stats().num_cached_blocks == 0
    assert sim.all_free()


@pytest.mark.parametrize("prompt_len, shared_blocks", [(10, 2), (8, 1), (3, 0)])
def test_siblings_fork_after_the_parent_prompt_and_share_its_blocks(prompt_len, shared_blocks):
    sim = Sim(num_blocks=16, max_num_batched_tokens=64, prefill_chunk_size=4)
    parent = sim.add("p", toks(0, prompt_len), max_tokens=3, n=3)
    s1, s2 = sim.reqs["p#1"], sim.reqs["p#2"]
    assert sim.sched.num_waiting == 3 and list(sim.sched.waiting) == [parent]

    # The parent prefills alone, chunk by chunk; siblings wait for its whole prompt.
    while parent.num_computed_tokens < prompt_len:
        out = sim.step()
        assert set(plan(out)) == {"p"}
        if parent.num_computed_tokens < prompt_len:
            assert sim.kv.block_ids("p#1") == [] and s1.num_computed_tokens == 0
    # Forked: the full prompt blocks (all but the block of the last prompt token) are shared.
    assert [r.request_id for r in sim.sched.waiting] == ["p#1", "p#2"]
    assert sim.kv.block_ids("p#1") == sim.kv.block_ids("p#2") == sim.kv.block_ids("p")[:shared_blocks]
    assert sim.refs("p")[:shared_blocks] == [3] * shared_blocks
    assert s1.num_computed_tokens == s2.num_computed_tokens == shared_blocks * 4

    # Next step: the parent decodes, each sibling computes only its tail and samples.
    out = sim.step()
    tail = prompt_len - shared_blocks * 4
    assert plan(out) == {"p": 1, "p#1": tail, "p#2": tail}
    assert sim.last_sampled == ["p", "p#1", "p#2"]
    assert s1.output_token_ids == s2.output_token_ids == [1000]
    assert s1.status is s2.status is R
    assert sim.refs("p#1")[:shared_blocks] == [3] * shared_blocks
    assert sim.kv.block_ids("p#1")[shared_blocks:] != sim.kv.block_ids("p#2")[shared_blocks:]

    sim.run()
    for r in (parent, s1, s2):
        assert r.status is RequestStatus.FINISHED_LENGTH and r.output_token_ids == toks(1000, 3)
    assert sim.all_free()


def test_siblings_in_a_tight_pool_release_their_blocks_for_the_queue_head():
    # Forked siblings park on shared blocks while waiting; when the head of the queue
    # cannot get blocks they let go and recompute (or re-hit the cache) later.
    sim = Sim(num_blocks=4, max_num_seqs=1)
    parent = sim.add("p", toks(0, 9), max_tokens=4, n=3)
    sim.run()
    for rid in ("p", "p#1", "p#2"):
        assert sim.reqs[rid].status is RequestStatus.FINISHED_LENGTH
        assert sim.reqs[rid].output_token_ids == toks(1000, 4)
    assert parent.num_preemptions == 0
    assert sim.all_free()


def test_running_request_takes_blocks_back_from_parked_siblings_before_preempting():
    sim = Sim(num_blocks=6, max_num_batched_tokens=16, prefill_chunk_size=8, max_num_seqs=1)
    p = sim.add("p", toks(0, 9), max_tokens=1, n=2)
    a = sim.add("a", toks(100, 16), max_tokens=4)  # 20 tokens: 5 blocks at the end
    assert plan(sim.step()) == {"p": 8}
    assert plan(sim.step()) == {"p": 1}
    # p is done; its sibling forked onto p's first two blocks and waits behind a,
    # the only holder of them now.
    s = sim.reqs["p#1"]
    assert p.status is RequestStatus.FINISHED_LENGTH
    assert [r.request_id for r in sim.sched.waiting] == ["a", "p#1"]
    assert sim.refs("p#1") == [1, 1]
    assert plan(sim.step()) == {"a": 8}
    assert plan(sim.step()) == {"a": 8}
    assert sim.kv.stats().num_free_blocks == 0

    # a's 17th token needs a fifth block: the parked sibling lets go of its blocks
    # rather than a preempting itself (which left an empty step, then a livelock).
    out = sim.step()
    assert out.preempted_ids == [] and plan(out) == {"a": 1}
    assert sim.kv.block_ids("p#1") == [] and s.num_computed_tokens == 0 and s.status is W
    sim.run()
    assert a.output_token_ids == toks(1000, 4) and s.output_token_ids == [1000]
    assert a.num_preemptions == 0
    assert sim.all_free()


# -- aborts ---------------------------------------------------------------------------


def test_abort_while_waiting():
    sim = Sim(num_blocks=8)
    a = sim.add("a", toks(0, 6))
    sim.abort("a")
    assert a.status is RequestStatus.FINISHED_ABORTED
    assert not sim.sched.has_unfinished and not sim.sched.waiting
    assert sim.step().is_empty
    assert sim.sched.finish_request("a", RequestStatus.FINISHED_ABORTED) is None  # twice: no-op
    assert sim.all_free()


def test_abort_mid_prefill():
    sim = Sim(num_blocks=8, max_num_batched_tokens=5)
    a = sim.add("a", toks(0, 12))
    sim.step()
    assert a.num_computed_tokens == 5 and len(sim.kv.block_ids("a")) == 2
    sim.abort("a")
    assert a.status is RequestStatus.FINISHED_ABORTED and not sim.sched.running
    assert sim.kv.block_ids("a") == []
    assert sim.kv.stats().num_cached_blocks == 1  # its one complete block stays reusable
    assert sim.all_free()


def test_abort_while_decoding():
    sim = Sim(num_blocks=8)
    a = sim.add("a", toks(0, 6), max_tokens=10)
    b = sim.add("b", toks(10, 6), max_tokens=3)
    sim.step()
    sim.step()
    sim.abort("a")
    assert a.status is RequestStatus.FINISHED_ABORTED and a.output_token_ids == [1000, 1001]
    assert sim.sched.running == [b]
    sim.run()
    assert b.status is RequestStatus.FINISHED_LENGTH
    assert sim.all_free()


def test_abort_while_preempted():
    sim = Sim(num_blocks=5)
    a = sim.add("a", toks(0, 8), max_tokens=8)
    b = sim.add("b", toks(100, 8), max_tokens=8)
    sim.step()
    assert sim.step().preempted_ids == ["b"]
    assert b.status is P
    sim.abort("b")
    assert b.status is RequestStatus.FINISHED_ABORTED and not sim.sched.waiting
    sim.run()
    assert a.status is RequestStatus.FINISHED_LENGTH
    assert sim.all_free()


def test_abort_parent_with_pending_siblings():
    sim = Sim(num_blocks=8, max_num_batched_tokens=4)
    sim.add("p", toks(0, 10), n=3)
    sim.step()  # mid-prefill: siblings not forked yet
    assert sim.sched.num_waiting == 2
    sim.abort("p")
    for rid in ("p", "p#1", "p#2"):
        assert sim.reqs[rid].status is RequestStatus.FINISHED_ABORTED
    assert not sim.sched.has_unfinished and sim.sched.num_waiting == 0
    assert sim.step().is_empty
    assert sim.all_free()


def test_abort_group_after_fork():
    sim = Sim(num_blocks=8)
    sim.add("p", toks(0, 10), max_tokens=5, n=3)
    sim.step()  # prompt done: siblings forked onto the shared blocks
    assert sim.refs("p")[:2] == [3, 3]
    sim.abort("p#2")  # a forked sibling still waiting
    assert sim.refs("p")[:2] == [2, 2]
    sim.step()  # p#1 running now
    for rid in ("p", "p#1"):  # the engine aborts a group parent first
        sim.abort(rid)
    assert not sim.sched.has_unfinished
    assert sim.all_free()


def test_abort_a_pending_sibling_before_the_fork():
    sim = Sim(num_blocks=8)
    parent = sim.add("p", toks(0, 10), max_tokens=2, n=3)
    sim.abort("p#1")
    assert sim.reqs["p#1"].status is RequestStatus.FINISHED_ABORTED
    assert sim.sched.num_waiting == 2
    sim.run()
    assert sim.reqs["p#1"].output_token_ids == []
    assert sim.reqs["p#1"].status is RequestStatus.FINISHED_ABORTED
    assert parent.status is sim.reqs["p#2"].status is RequestStatus.FINISHED_LENGTH
    assert sim.all_free()


def test_duplicate_request_id_is_rejected():
    sim = Sim(num_blocks=8)
    sim.add("a", toks(0, 4))
    with pytest.raises(ValueError, match="'a'"):
        sim.add("a", toks(0, 4))
    # A sibling clashing with a known id is rejected before anything is queued.
    with pytest.raises(ValueError, match="'a'"):
        sim.sched.add_request(Request("b", [1], SamplingParams(), 4), [Request("a", [1], SamplingParams(), 4)])
    assert "b" not in sim.sched.requests and len(sim.sched.waiting) == 1
    sim.abort("a")
    assert sim.all_free()


# -- randomized -----------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(30))
def test_random_simulation_keeps_invariants(seed):
    rng = random.Random(seed)
    bs = rng.choice([2, 4])
    max_total = 24  # prompt + max_tokens of any request
    num_blocks = -(-max_total // bs) + rng.randrange(0, 4)  # tight: one big request fills it
    sim = Sim(
        num_blocks=num_blocks,
        block_size=bs,
        max_num_batched_tokens=rng.choice([8, 16, 32]),
        max_num_seqs=rng.choice([2, 4, 8]),
        prefill_chunk_size=rng.choice([None, 3, 5]),
        enable_prefix_caching=rng.random() < 0.8,
        token_fn=lambda req: rng.randrange(4),  # tiny vocab: outputs collide in the cache too
    )
    prefixes = [[rng.randrange(4) for _ in range(rng.randrange(1, 12))] for _ in range(3)]
    groups: list[str] = []
    for i in range(40):
        if rng.random() < 0.5:
            prompt = rng.choice(prefixes) + [rng.randrange(4) for _ in range(rng.randrange(0, 6))]
            prompt = prompt[: max_total - 1] or [0]
            max_tokens = rng.randrange(1, max_total - len(prompt) + 1)
            n = rng.choice([1, 1, 1, 2, 3])
            sim.add(f"r{i}", prompt, max_tokens=max_tokens, n=n, cache_salt=rng.choice([None, None, "x"]))
            groups.append(f"r{i}")
        if rng.random() < 0.08 and groups:
            g = groups.pop(rng.randrange(len(groups)))
            for rid in sorted(r for r in sim.reqs if r == g or r.startswith(g + "#")):
                sim.abort(rid)  # parent first, like the engine
        if sim.sched.has_unfinished:
            assert not sim.step().is_empty
    sim.run(max_steps=2000)

    for rid, req in sim.reqs.items():
        assert req.status.is_finished, rid
        if req.status is RequestStatus.FINISHED_LENGTH:
            assert len(req.output_token_ids) == req.sampling_params.max_tokens
    assert sim.all_free()
    assert sum(b.ref_count for b in sim.kv.pool.blocks) == 0
