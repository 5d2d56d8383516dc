"""The decode side's lease table and its hop-outcome rules (pure; no agents, no workers)."""

from __future__ import annotations

import pytest

from pdserve.kvtransfer.lease import (HopAction, HopOutcome, LeaseState, LeaseTable, decide_hop)
from pdserve.proto import pdserve_pb2 as pb


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def table():
    return LeaseTable(clock=Clock())


def offer(table, blocks=(7, 8, 9), ttl=10.0):
    return table.offer("p0", "r1", "r1", 2, list(blocks), ttl)


def test_a_lease_is_completed_once_with_its_own_blocks(table):
    lease = offer(table)
    assert len(lease.transfer_id) == 32 and int(lease.transfer_id, 16) >= 0  # 128 random bits
    assert offer(table).transfer_id != lease.transfer_id
    assert table.get(lease.transfer_id) is lease and lease.is_live
    assert table.complete(lease.transfer_id, 2, [7, 8, 9]) == ""
    assert lease.state is LeaseState.COMPLETED and table.get(lease.transfer_id) is None
    assert table.complete(lease.transfer_id, 2, [7, 8, 9]) == "lease completed"  # a second completion
    assert table.num_refused == 1


def test_unknown_id_and_other_blocks_are_refused(table):
    lease = offer(table)
    assert table.complete("00" * 16, 2, [7, 8, 9]) == "unknown transfer id"
    assert table.complete(lease.transfer_id, 2, [7, 8, 10]) == "blocks differ from the lease's"
    assert table.complete(lease.transfer_id, 1, [7, 8, 9]) == "blocks differ from the lease's"
    assert lease.is_live  # a wrong completion does not spend the lease
    assert table.complete(lease.transfer_id, 2, [7, 8, 9]) == ""
    assert table.num_refused == 3 and [r for _, r in table.refusals][0] == "unknown transfer id"


def test_expiry(table):
    lease = offer(table, ttl=10.0)
    assert table.remaining_s(lease) == 10.0
    table.clock.now += 10.5
    assert table.remaining_s(lease) == 0.0
    assert table.complete(lease.transfer_id, 2, [7, 8, 9]) == "lease expired"
    assert lease.state is LeaseState.EXPIRED and table.live() == []
    assert table.complete(lease.transfer_id, 2, [7, 8, 9]) == "lease expired"  # still refused later
    late = offer(table, ttl=1.0)
    table.clock.now += 2
    assert table.revoke(late.transfer_id).state is LeaseState.EXPIRED  # revoked after its deadline


def test_revoked_lease_refuses_its_completion(table):
    lease = offer(table)
    assert table.revoke(lease.transfer_id) is lease and lease.state is LeaseState.REVOKED
    assert table.revoke(lease.transfer_id) is None
    assert table.complete(lease.transfer_id, 2, [7, 8, 9]) == "lease revoked"


def test_ended_leases_are_forgotten_beyond_the_limit():
    table = LeaseTable(clock=Clock(), remember=2)
    ids = [offer(table).transfer_id for _ in range(3)]
    for tid in ids:
        table.revoke(tid)
    assert table.complete(ids[0], 2, [7, 8, 9]) == "unknown transfer id"
    assert table.complete(ids[2], 2, [7, 8, 9]) == "lease revoked"


O, A = HopOutcome, HopAction


@pytest.mark.parametrize("outcome,is_started,two_sided,want", [
    # the KV arrived and was accepted
    (O.DONE, True, False, (O.DONE, A.COMPLETE, False)),
    # nothing admitted: whatever the answer (or a transport error), nothing was written
    (O.NEVER_STARTED, False, False, (O.NEVER_STARTED, A.PREFILL_LOCALLY, False)),
    (O.TRANSFER_FAILED, False, False, (O.NEVER_STARTED, A.PREFILL_LOCALLY, False)),
    (O.TRANSFER_FAILED, False, True, (O.NEVER_STARTED, A.PREFILL_LOCALLY, False)),
    # a writer was admitted: garbage; recompute once nothing can land, else fail and hold
    (O.TRANSFER_FAILED, True, True, (O.TRANSFER_FAILED, A.PREFILL_LOCALLY, False)),
    (O.TRANSFER_FAILED, True, False, (O.TRANSFER_FAILED, A.FAIL, True)),
    (O.NEVER_STARTED, True, False, (O.TRANSFER_FAILED, A.FAIL, True)),  # our agents know better
    # cancelled: the request fails; blocks held while a one-sided write may land
    (O.ABORTED, False, False, (O.ABORTED, A.FAIL, False)),
    (O.ABORTED, True, True, (O.ABORTED, A.FAIL, False)),
    (O.ABORTED, True, False, (O.ABORTED, A.FAIL, True)),
])
def test_outcome_mapping(outcome, is_started, two_sided, want):
    assert tuple(decide_hop(outcome, is_started, two_sided)) == want


def test_outcomes_match_the_wire():
    for o in HopOutcome:
        assert pb.HopOutcome.Value(f"HOP_{o.name}") == o.value
