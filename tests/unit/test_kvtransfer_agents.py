"""Both KV transfer backends with two agents in one process (fast checks of the
agent contract; the multi-process conformance test is in tests/integration)."""

from __future__ import annotations

import itertools
import json
import threading
import time

import pytest
import torch

from pdserve.kvtransfer import (KVRegionLayout, TransferError, TransferState, available_backends,
                                create_agent, plan_transfer)
from pdserve.kvtransfer.base import unpack_metadata

LAY = KVRegionLayout.for_rank(num_layers=2, num_blocks=8, num_kv_heads=2, block_size=4, head_dim=8,
                              dtype="bfloat16")
BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(b not in available_backends(),
                                                      reason=f"{b} not installed"))
            for b in ("nixl", "torch_dist")]
_n = itertools.count()


@pytest.fixture
def pair(request):
    backend = request.param
    k = next(_n)
    a = create_agent(backend, f"a{k}", torch.randn(LAY.shape).to(torch.bfloat16), LAY, default_timeout_s=10)
    b = create_agent(backend, f"b{k}", torch.randn(LAY.shape).to(torch.bfloat16), LAY, default_timeout_s=10)
    a.add_peer(b.name, b.metadata())
    b.add_peer(a.name, a.metadata())
    yield a, b
    a.close()
    b.close()


@pytest.mark.parametrize("pair", BACKENDS, indirect=True)
def test_write_expect_notify(pair):
    a, b = pair
    [plan] = plan_transfer([LAY], [LAY], [1, 2, 5], [0, 6, 7])
    untouched = b.region[:, [1, 2, 3, 4, 5]].clone()
    he = b.expect("t1", a.name, plan)
    h = a.write("t1", b.name, plan, b"hello")
    assert a.wait(h).done and b.wait(he).done
    assert torch.equal(b.region[:, [0, 6, 7]], a.region[:, [1, 2, 5]])
    assert torch.equal(b.region[:, [1, 2, 3, 4, 5]], untouched)
    assert b.take_notifications() == [(a.name, b"hello")]
    assert b.take_notifications() == []
    # a second transfer, one layer of one block
    [plan2] = plan_transfer([LAY], [LAY], [3], [3], range(1, 2))
    he = b.expect("t2", a.name, plan2)
    assert a.wait(a.write("t2", b.name, plan2, b"")).done and b.wait(he).done
    assert torch.equal(b.region[1, 3], a.region[1, 3])
    assert b.take_notifications() == [(a.name, b"")]
    assert a.metrics.writes_done == 2 and a.metrics.bytes_written == plan.num_bytes + plan2.num_bytes
    assert b.metrics.expects_done == 2 and b.metrics.bytes_received == plan.num_bytes + plan2.num_bytes
    assert b.metrics.refused == 0 and b.take_refusals() == []
    assert a.num_pending() == 0 and b.num_pending() == 0


def _refused(a, b, tid, plan, notify=b"x"):
    """Write ``plan`` as ``tid``: the receiver must refuse it before any byte lands."""
    before = b.region.clone()
    st = a.wait(a.write(tid, b.name, plan, notify, timeout_s=5))
    assert st.failed and "refused" in st.message, st
    assert torch.equal(b.region, before)
    assert b.take_notifications() == []
    return b.take_refusals()


@pytest.mark.parametrize("pair", BACKENDS, indirect=True)
def test_only_expected_transfers_are_admitted(pair):
    """Invariant 6: unknown id, other blocks, a second write, an expired or cancelled
    expectation are all refused, counted, never notified, and write nothing."""
    a, b = pair
    [plan] = plan_transfer([LAY], [LAY], [1, 2], [3, 4])
    [other] = plan_transfer([LAY], [LAY], [1, 2], [3, 5])
    assert _refused(a, b, "made-up", plan) == [(a.name, "made-up", "no such transfer expected")]
    h = b.expect("t", a.name, plan)
    [(_, _, why)] = _refused(a, b, "t", other)  # the right id, other destination blocks
    assert "destination differs" in why
    assert b.poll(h).failed and not h.is_started  # the offer is spent, nothing landed
    h = b.expect("ok", a.name, plan)
    assert a.wait(a.write("ok", b.name, plan, b"1")).done and b.wait(h).done and h.is_started
    assert b.take_notifications() == [(a.name, b"1")]
    assert _refused(a, b, "ok", plan) == [(a.name, "ok", "transfer completed")]  # a second completion
    h = b.expect("late", a.name, plan, timeout_s=0.05)
    assert b.wait(h).failed
    assert _refused(a, b, "late", plan) == [(a.name, "late", "transfer expired")]
    h = b.expect("revoked", a.name, plan)
    b.cancel(h)
    assert _refused(a, b, "revoked", plan) == [(a.name, "revoked", "transfer cancelled")]
    assert b.metrics.refused == 5 and b.metrics.expects_done == 1
    assert a.num_pending() == 0 and b.num_pending() == 0


def test_nixl_cannot_stop_a_write_that_skips_the_claim():
    """A one-sided WRITE lands whatever the target thinks: a writer that skips the claim
    gets its bytes in, even one whose metadata the target never loaded, but its completion
    is refused and the expectation fails as started (the decode worker then treats those
    blocks as garbage)."""
    if "nixl" not in available_backends():
        pytest.skip("nixl not installed")
    k = next(_n)
    a = create_agent("nixl", f"rogue{k}", torch.randn(LAY.shape).to(torch.bfloat16), LAY)
    b = create_agent("nixl", f"target{k}", torch.zeros(LAY.shape, dtype=torch.bfloat16), LAY)
    try:
        a.add_peer(b.name, b.metadata())  # b never loads a's metadata
        [plan] = plan_transfer([LAY], [LAY], [1], [2])
        he = b.expect("t", a.name, plan)

        def post_unclaimed(h, descs, done):  # no CLAIM: post at once, as if granted
            a._claiming[h] = (descs, done)
            a._post(h)

        a._start_write = post_unclaimed
        h = a.write("t", b.name, plan, b"")
        assert a.wait(h).done
        st = b.wait(he)
        assert st.failed and he.is_started
        assert torch.equal(b.region[:, 2], a.region[:, 1])  # the bytes are there all the same
        assert [r.reason for r in b.take_refusals()] == ["completion of a write that was not admitted"]
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("pair", BACKENDS, indirect=True)
def test_metadata_is_plain_bytes(pair):
    a, _ = pair
    md = a.metadata()
    assert isinstance(md, bytes) and not md.startswith(b"\x80")  # not a pickle
    header, _ = unpack_metadata(md)
    json.dumps(header)
    assert header["name"] == a.name and KVRegionLayout.from_dict(header["layout"]) == LAY


@pytest.mark.parametrize("pair", BACKENDS, indirect=True)
def test_errors_timeouts_and_close(pair):
    a, b = pair
    [plan] = plan_transfer([LAY], [LAY], [1], [2])
    with pytest.raises(TransferError):
        a.write("x", "nobody", plan)
    h = b.expect("late", a.name, plan, timeout_s=0.2)
    with pytest.raises(TransferError, match="already expected"):
        b.expect("late", a.name, plan)
    st = b.wait(h)
    assert st.state is TransferState.FAILED and "timed out" in st.message
    assert b.poll(h) is st  # terminal states stick
    h2 = b.expect("cancel-me", a.name, plan)
    b.cancel(h2)
    assert b.poll(h2).failed and b.num_pending() == 0
    h3 = b.expect("pending", a.name, plan)
    b.close()
    b.close()
    assert h3.status.failed and "closed" in h3.status.message
    with pytest.raises(TransferError, match="closed"):
        b.expect("after", a.name, plan)
    assert b.metrics.expects_failed == 3


def test_torch_dist_leaves_no_threads():
    if "torch_dist" not in available_backends():
        pytest.skip("torch.distributed unavailable")
    before = set(threading.enumerate())
    agents = [create_agent("torch_dist", f"t{i}", torch.zeros(LAY.shape, dtype=torch.bfloat16), LAY)
              for i in range(2)]
    agents[0].add_peer("t1", agents[1].metadata())
    [plan] = plan_transfer([LAY], [LAY], [0], [1])
    agents[1].expect("w", "t0", plan)
    assert agents[0].wait(agents[0].write("w", "t1", plan)).done
    for a in agents:
        a.close()
    deadline = time.monotonic() + 5
    while set(threading.enumerate()) - before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not (set(threading.enumerate()) - before)
