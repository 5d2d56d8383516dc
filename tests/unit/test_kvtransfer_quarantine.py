"""Decode side of a remote prefill in the scheduler: a request that ends while waiting for
its KV keeps its blocks in quarantine until its lease is settled (no write can land any
more), so a late write never reaches another request's blocks. Each lifecycle ends with
every block free."""

from __future__ import annotations

from pdserve.engine.config import SchedulerConfig
from pdserve.engine.kv_cache_manager import KVCacheManager
from pdserve.engine.request import KVTransfer, Request, RequestStatus
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import Scheduler

BS, NUM_BLOCKS = 4, 16


def setup():
    kv = KVCacheManager(NUM_BLOCKS, BS, True)
    return Scheduler(SchedulerConfig(64, 8, None), kv), kv


def remote(sched: Scheduler, rid: str, prompt_len: int, kv_transfer: KVTransfer | None) -> Request:
    req = Request(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=4), BS)
    req.remote_prefill = True
    req.kv_transfer = kv_transfer
    sched.add_request(req)
    (rp,) = sched.schedule().remote_prefills
    assert rp.request is req and req.status is RequestStatus.WAITING_FOR_KV
    return req


def offered(rid: str) -> KVTransfer:
    return KVTransfer("p0", rid, transfer_id=f"lease-{rid}")


def test_aborted_while_waiting_keeps_its_blocks_until_settled():
    sched, kv = setup()
    remote(sched, "a", 10, offered("a"))  # 3 blocks offered under the lease
    assert kv.pool.num_free_blocks == NUM_BLOCKS - 3
    sched.finish_request("a", RequestStatus.FINISHED_ABORTED)  # the client left mid-transfer
    assert "a" in sched.quarantined and kv.pool.num_free_blocks == NUM_BLOCKS - 3
    # A new request cannot get them while a write may still land.
    other = Request("b", list(range(50, 90)), SamplingParams(max_tokens=1), BS)
    sched.add_request(other)
    sched.schedule()
    assert kv.block_ids("b") and not set(kv.block_ids("b")) & set(kv.block_ids("a"))
    sched.finish_request("b", RequestStatus.FINISHED_ABORTED)
    assert not sched.settle_remote_prefill("a", "lease-other")  # another lease: untouched
    assert sched.settle_remote_prefill("a", "lease-a")
    assert not sched.quarantined and kv.pool.num_free_blocks == NUM_BLOCKS


def test_settled_before_it_ends_frees_at_once():
    sched, kv = setup()
    remote(sched, "a", 10, offered("a"))
    assert not sched.settle_remote_prefill("a", "lease-a")  # still waiting: marked settled
    sched.finish_request("a", RequestStatus.FINISHED_ERROR)
    assert not sched.quarantined and kv.pool.num_free_blocks == NUM_BLOCKS


def test_completed_or_prefilled_locally_never_quarantines():
    sched, kv = setup()
    remote(sched, "a", 10, offered("a"))
    sched.complete_remote_prefill("a")
    sched.finish_request("a", RequestStatus.FINISHED_ABORTED)  # aborted while decoding
    remote(sched, "b", 10, offered("b"))
    sched.prefill_locally("b")
    sched.finish_request("b", RequestStatus.FINISHED_ABORTED)
    assert not sched.quarantined and kv.pool.num_free_blocks == NUM_BLOCKS


def test_a_bare_remote_prefill_frees_at_once():
    """Without hop parameters (the engine used alone) nothing can be written under a lease."""
    sched, kv = setup()
    remote(sched, "a", 10, None)
    sched.finish_request("a", RequestStatus.FINISHED_ABORTED)
    assert not sched.quarantined and kv.pool.num_free_blocks == NUM_BLOCKS
