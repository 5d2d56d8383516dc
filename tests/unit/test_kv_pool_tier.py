"""The engine side of the KV pool without a pool: host-slot reservations (``TierIndex``),
the scheduler's fetch lifecycle (ask, wait, confirm, back to the queue, abort), and one
rank's pool agent over a fake client (puts, reads, failures, the slot guard)."""

from __future__ import annotations

import threading
import time

import torch

from pdserve.engine.block_pool import BlockRemoved, BlockStored
from pdserve.engine.config import SchedulerConfig
from pdserve.engine.kv_cache_manager import KVCacheManager
from pdserve.engine.kv_pool_tier import KVPoolAgent, pool_key
from pdserve.engine.kv_tiers import TierIndex
from pdserve.engine.parallel import TPGroup
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import Scheduler

BS = 4


def test_reserved_slots_are_invisible_until_confirmed():
    t = TierIndex(3, BS)
    t.insert(1, (1,) * BS)
    t.take_events()
    slot, victim = t.reserve(2, (2,) * BS)
    assert slot is not None and victim is None
    assert t.lookup(2, (2,) * BS) is None and 2 not in t and t.num_reserved == 1
    assert t.reserve(2, (2,) * BS) == (None, None)  # one reservation per hash
    assert t.reserve(1, (1,) * BS) == (None, None)  # already held
    assert not t.take_events()  # nothing published yet
    t.insert(3, (3,) * BS)
    s4, v4 = t.insert(4, (4,) * BS)  # full: the LRU entry goes, never the reserved slot
    assert v4 == (1, (1,) * BS, v4[2]) and s4 != slot
    assert t.confirm(slot) == 2
    assert t.lookup(2, (2,) * BS) == slot and t.num_reserved == 0
    assert any(isinstance(e, BlockStored) and e.block_hashes == (2,) and e.tier == "host" for e in t.take_events())
    s5, _ = t.reserve(5, (5,) * BS)
    t.release(s5)
    assert t.num_reserved == 0 and 5 not in t
    # An entry for the hash appeared while its read ran: the reserved slot is freed instead.
    s6, _ = t.reserve(6, (6,) * BS)
    t.insert(6, (6,) * BS)
    assert t.confirm(s6) is None and t.lookup(6, (6,) * BS) not in (None, s6) and t.num_reserved == 0


def test_reserving_spills_the_victim_to_disk_like_an_eviction():
    class Meta:
        def __init__(self):
            self.written = []

        def write(self, slot, h, tokens):
            self.written.append((slot, h))

    kv = KVCacheManager(8, BS, num_host_blocks=1, num_disk_blocks=4, disk_meta=Meta())
    kv.host.insert(11, (1,) * BS)
    req = Request("r", list(range(3 * BS + 1)), SamplingParams(max_tokens=1), BS)
    slots = kv.reserve_pool_fetch(0, req, 0, 2)
    assert len(slots) == 1  # one host slot: the second block finds none
    ops = kv.take_copy_ops()
    assert ops.spills == [(slots[0], 0, 11)] and ops.pool_gets == [(0, slots[0], req.block_hashes[0])]
    assert 11 in kv.disk
    assert kv.end_pool_fetch(slots, 0) == [] and kv.host.num_reserved == 0


class Sim:
    """A scheduler over a host tier with the pool on, driven by hand."""

    def __init__(self, num_blocks: int = 16, num_host_blocks: int = 16, max_num_seqs: int = 8) -> None:
        self.kv = KVCacheManager(num_blocks, BS, num_host_blocks=num_host_blocks)
        self.kv.pool_enabled = True
        self.sched = Scheduler(SchedulerConfig(64, max_num_seqs), self.kv)

    def add(self, rid: str, tokens: list[int]) -> Request:
        req = Request(rid, tokens, SamplingParams(max_tokens=1), BS)
        self.sched.add_request(req)
        return req

    def assert_clean(self) -> None:
        assert self.kv.host.num_pinned == 0 and self.kv.host.num_reserved == 0
        assert not self.sched.pool_fetching and self.sched.num_pool_reserved == 0
        assert self.kv.stats().num_free_blocks == self.kv.stats().num_total_blocks


def test_a_request_waits_for_the_pool_then_loads_what_it_read():
    sim = Sim()
    prompt = list(range(100, 100 + 5 * BS + 2))  # 5 full blocks, all of them lookup candidates
    req = sim.add("a", prompt)
    out = sim.sched.schedule()
    assert out.is_empty and "a" in sim.sched.pool_fetching and req.status is RequestStatus.WAITING_FOR_KV
    assert sim.sched.num_seqs == 1 and sim.sched.num_pool_reserved == 5
    ops = sim.kv.take_copy_ops()
    assert [h for _, _, h in ops.pool_gets] == [h - (1 << 64) if h >= 1 << 63 else h for h in req.block_hashes[:5]]
    assert not ops.saves and bool(ops)
    assert sim.sched.queued_prefill_tokens() == len(prompt) - 5 * BS  # the reads count as hits
    job = ops.pool_gets[0][0]

    # Every rank read the first three blocks: they become host entries, two slots are freed.
    sim.sched.pool_results([(job, 3)])
    assert not sim.sched.pool_fetching and sim.sched.waiting[0] is req and req.status is RequestStatus.WAITING
    assert len(sim.kv.host) == 3 and sim.kv.host.num_reserved == 0 and sim.sched.num_pool_hit_tokens == 3 * BS
    assert sim.kv.host.num_pinned == 3  # until its next lookup

    out = sim.sched.schedule()  # asks once per admission: now it loads from the host tier
    assert out.is_empty and "a" in sim.sched.loading
    assert len(sim.kv.take_copy_ops().loads) == 3
    out = sim.sched.schedule()
    (s,) = out.scheduled
    assert s.request is req and req.num_computed_tokens == 3 * BS
    sim.sched.update_after_step(out)
    sim.sched.finish_request("a", RequestStatus.FINISHED_STOPPED)
    sim.assert_clean()


def test_a_miss_computes_and_asks_no_second_time():
    sim = Sim()
    req = sim.add("a", list(range(2 * BS + 1)))
    sim.sched.schedule()
    job = sim.kv.take_copy_ops().pool_gets[0][0]
    sim.sched.pool_results([(job, 0)])
    out = sim.sched.schedule()
    assert [s.request for s in out.scheduled] == [req] and req.num_computed_tokens == 0
    assert not sim.kv.take_copy_ops().pool_gets
    sim.sched.update_after_step(out)
    sim.sched.finish_request("a", RequestStatus.FINISHED_STOPPED)
    sim.assert_clean()


def test_a_second_request_waits_for_the_blocks_another_reads():
    sim = Sim()
    prompt = list(range(3 * BS + 1))
    sim.add("a", prompt)
    b = sim.add("b", prompt + [7])
    out = sim.sched.schedule()
    # b's next block is being read for a: b waits for it instead of reading it again.
    assert out.is_empty and list(sim.sched.pool_fetching) == ["a"] and list(sim.sched.waiting) == [b]
    assert len(sim.kv.take_copy_ops().pool_gets) == 3 and "b" not in sim.sched._pool_asked
    sim.sched.pool_results([(0, 3)])
    sim.sched.schedule()
    assert set(sim.sched.loading) == {"a", "b"}  # both find the blocks in the host tier
    assert not sim.kv.take_copy_ops().pool_gets
    for rid in ("a", "b"):
        sim.sched.finish_request(rid, RequestStatus.FINISHED_ABORTED)
    sim.kv.take_copy_ops()
    sim.assert_clean()


def test_reads_in_flight_hold_at_most_half_the_host_tier():
    sim = Sim(num_host_blocks=8)
    sim.add("a", list(range(6 * BS + 1)))
    sim.add("b", list(range(1000, 1000 + 6 * BS + 1)))
    sim.sched.schedule()
    assert list(sim.sched.pool_fetching) == ["a"] and sim.kv.host.num_reserved == 4
    # b found no room to read into: it computes, without having asked.
    assert [r.request_id for r in sim.sched.running] == ["b"] and "b" not in sim.sched._pool_asked
    sim.sched.pool_results([(0, 0)])
    for rid in ("a", "b"):
        sim.sched.finish_request(rid, RequestStatus.FINISHED_ABORTED)
    sim.assert_clean()


def test_abort_while_reading_keeps_the_slots_until_every_rank_ended():
    sim = Sim()
    sim.add("a", list(range(4 * BS + 1)))
    sim.sched.schedule()
    job = sim.kv.take_copy_ops().pool_gets[0][0]
    sim.sched.finish_request("a", RequestStatus.FINISHED_ABORTED)
    assert not sim.sched.pool_fetching and not sim.sched.waiting and sim.sched.num_seqs == 0
    assert sim.kv.host.num_reserved == 4  # a rank may still be writing into them
    sim.sched.pool_results([(job, 2)])  # what was read is kept, unpinned
    assert len(sim.kv.host) == 2
    sim.assert_clean()


class FakeClient:
    """A pool in a dict, with the client's calling convention; ``fail`` makes calls raise."""

    def __init__(self, store: dict, gate: threading.Event | None = None) -> None:
        self.store = store
        self.gate = gate
        self.fail = False
        self.closed = False

    def register(self, buffer) -> None:
        self.buffer = buffer

    def put_blocks(self, keys, buffers):
        if self.gate is not None:
            self.gate.wait(5)
        if self.fail:
            raise RuntimeError("master down")
        for k, b in zip(keys, buffers):
            self.store[k] = b.clone()
        return [True] * len(keys)

    def get_blocks(self, keys, buffers):
        if self.fail:
            raise RuntimeError("master down")
        hits = []
        for k, b in zip(keys, buffers):
            if k in self.store:
                b.copy_(self.store[k])
            hits.append(k in self.store)
        return hits

    def close(self) -> None:
        self.closed = True


def wait_for(agent: KVPoolAgent, n_jobs_done: int = 1, timeout_s: float = 5.0):
    deadline = time.monotonic() + timeout_s
    fetched = []
    while len(fetched) < n_jobs_done:
        report = agent.poll(0.01)
        fetched += report.fetched
        assert time.monotonic() < deadline
    return fetched


def test_agent_puts_reads_and_counts_failures():
    store: dict = {}
    host_a = torch.arange(4 * 6, dtype=torch.float32).view(4, 6)
    a = KVPoolAgent(FakeClient(store), host_a, "digest", TPGroup(), "cpu")
    a.put(torch.tensor([[1, 11], [2, -5]]))
    while a.num_pending_puts:
        time.sleep(0.01)
    report = a.poll()
    assert sorted(report.stored) == sorted([11, (-5) & ((1 << 64) - 1)])
    assert set(store) == {pool_key("digest", 0, 1, 11), pool_key("digest", 0, 1, -5)}
    assert pool_key("digest", 0, 1, -5).endswith("/tp0of1/fffffffffffffffb")

    host_b = torch.zeros(4, 6)
    b = KVPoolAgent(FakeClient(store), host_b, "digest", TPGroup(), "cpu")
    b.start_gets(torch.tensor([[7, 3, 11], [7, 0, 12], [7, 2, -5]]))  # 12 is a miss: stops the run
    assert wait_for(b) == [(7, 1)]
    assert torch.equal(host_b[3], host_a[1])

    b.client.fail = True
    b.start_gets(torch.tensor([[8, 0, 11]]))
    assert wait_for(b) == [(8, 0)]
    a.client.fail = True
    a.put(torch.tensor([[0, 99]]))
    while a.num_pending_puts:
        time.sleep(0.01)
    report = a.poll()
    assert report.num_put_failures == 1 and not report.stored
    assert (a.num_put_failures, b.num_get_failures) == (1, 1)
    for agent in (a, b):
        agent.close()
        assert agent.client.closed


def test_a_save_into_a_slot_a_put_reads_waits_for_the_put():
    gate = threading.Event()
    agent = KVPoolAgent(FakeClient({}, gate), torch.zeros(2, 3), "d", TPGroup(), "cpu")
    agent.put(torch.tensor([[1, 5]]))
    done = threading.Event()
    t = threading.Thread(target=lambda: (agent.wait_slots([1]), done.set()))
    t.start()
    agent.wait_slots([0])  # another slot: no wait
    assert not done.wait(0.2)
    gate.set()
    assert done.wait(5)
    t.join()
    agent.close()


def test_a_rank_without_a_client_reads_nothing():
    agent = KVPoolAgent(None, torch.zeros(2, 3), "d", TPGroup(), "cpu")
    agent.put(torch.tensor([[1, 5]]))
    agent.start_gets(torch.tensor([[0, 1, 5]]))
    assert wait_for(agent) == [(0, 0)]
    agent.close()


def test_a_released_reservation_publishes_nothing():
    t = TierIndex(1, BS)
    s, _ = t.reserve(1, (1,) * BS)
    t.release(s)
    assert not [e for e in t.take_events() if isinstance(e, BlockRemoved)]


def test_pool_stored_events_have_tier_pool():
    kv = KVCacheManager(4, BS, num_host_blocks=2)
    kv.pool_stored([1, 2])
    kv.pool_stored([])
    (ev,) = kv.take_events()
    assert ev.tier == "pool" and ev.block_hashes == (1, 2)
