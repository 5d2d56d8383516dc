"""Transfer leases and hop outcomes: the decode side's rules for what it accepts from a
prefill worker, and what it does when a hop ends (pure: no torch, no I/O).

A decode worker that allocates blocks for a remote prefill *offers a lease*: a transfer
id (128 random bits, so unguessable), the destination blocks, the prefill worker it
asks, and a deadline (the hop's timeout plus ``LEASE_MARGIN_S``). The Prefill request
carries the id; each TP rank's agent expects exactly that transfer (peer, id,
destination bytes) until the deadline (``kvtransfer.base``, invariant 6), so a writer is
admitted only for a live lease whose blocks match, once. The completion is accepted
only for a lease that is still live (``LeaseTable.complete``); anything else is refused
and counted.

What a lease guarantees, and what it cannot:

* The decode worker never *uses* bytes from a transfer it did not offer, nor from one
  that arrives after the lease ended (expired, revoked, completed): those completions
  are refused and the request is prefilled locally or failed.
* It never hands a lease's blocks to another request while a write may still land in
  them: a request that ends while waiting for KV keeps its blocks in quarantine until
  the lease is *settled* (``LLMEngine.settle_kv_transfer``), that is until no admitted
  writer can still be writing: at once if none was admitted, or if the receiver
  controls what lands (two-sided torch_dist: after the revocation returns), else at the
  lease's deadline (a compliant one-sided writer gave up by its own, earlier deadline).
* It cannot stop a one-sided write. A NIXL WRITE into registered memory lands whatever
  the target thinks; compliant writers (ours) claim first and write nothing when
  refused, but a process that holds the target's published metadata and skips the
  claim can write into any block. The lease then only guarantees the two points above.

``decide_hop`` maps how a hop ended to what the decode worker does (module-level so it
can be tested without workers).
"""

from __future__ import annotations

import enum
import secrets
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

LEASE_MARGIN_S = 5.0
"""A lease outlives the hop's timeout (the prefill worker's write deadline) by this much,
so a compliant writer has given up before the decode worker reclaims the blocks (it also
covers the time the Prefill request spends on the wire)."""


class HopOutcome(enum.IntEnum):
    """How a remote prefill ended (``pb.HopOutcome``, same numbers)."""

    DONE = 1
    """The KV is in the destination blocks and the completion was accepted."""
    NEVER_STARTED = 2
    """Nothing was written into the destination blocks: safe to prefill locally."""
    TRANSFER_FAILED = 3
    """Computation or writes may have touched the destination blocks: garbage."""
    ABORTED = 4
    """Cancelled (by either side)."""


class HopAction(enum.Enum):
    COMPLETE = "complete"  # decode on from the transferred KV
    PREFILL_LOCALLY = "prefill_locally"  # recompute the prompt into the same blocks
    FAIL = "fail"  # end the request with an error


class HopDecision(NamedTuple):
    outcome: HopOutcome
    """The outcome counted (NEVER_STARTED when nothing was admitted, whatever was said)."""
    action: HopAction
    hold_until_deadline: bool
    """A write may still land: keep the blocks until the lease's deadline."""


def decide_hop(outcome: HopOutcome, is_started: bool, receiver_controls_writes: bool) -> HopDecision:
    """What to do after a hop ended with ``outcome`` (the prefill worker's answer; a
    transport failure is TRANSFER_FAILED, being ambiguous). ``is_started``: this worker's
    agents admitted a writer (bytes may have landed), known after revoking the lease.
    ``receiver_controls_writes``: after the revocation no byte can land (two-sided)."""
    if outcome is HopOutcome.DONE:
        return HopDecision(HopOutcome.DONE, HopAction.COMPLETE, False)
    quiet = not is_started or receiver_controls_writes  # nothing can land from now on
    if outcome is HopOutcome.ABORTED:
        return HopDecision(HopOutcome.ABORTED, HopAction.FAIL, not quiet)
    if not is_started:  # never admitted: whatever went wrong, nothing was written
        return HopDecision(HopOutcome.NEVER_STARTED, HopAction.PREFILL_LOCALLY, False)
    # Admitted, so the blocks are garbage; recompute into them only once nothing can land.
    return HopDecision(HopOutcome.TRANSFER_FAILED, HopAction.PREFILL_LOCALLY if quiet else HopAction.FAIL,
                       not quiet)


class LeaseState(enum.Enum):
    OFFERED = "offered"
    COMPLETED = "completed"
    REVOKED = "revoked"
    EXPIRED = "expired"


@dataclass(eq=False)
class Lease:
    transfer_id: str
    source_worker_id: str
    """The prefill worker asked to write."""
    request_id: str
    """The completion whose blocks these are."""
    group_id: str
    """The request id the client knows (n > 1: its completions are ``{group_id}#i``)."""
    first_block_index: int
    block_ids: tuple[int, ...]
    deadline: float
    """``clock()`` after which no completion is accepted."""
    state: LeaseState = LeaseState.OFFERED
    task: Any = None
    """The hop running under this lease (an ``asyncio.Task``; the decode worker's)."""

    @property
    def is_live(self) -> bool:
        return self.state is LeaseState.OFFERED


@dataclass
class LeaseTable:
    """The decode worker's leases by transfer id (event-loop thread only)."""

    clock: Callable[[], float] = time.monotonic
    remember: int = 4096
    """Ended leases kept to name why a late completion is refused."""
    num_refused: int = 0
    refusals: deque = field(default_factory=lambda: deque(maxlen=256))
    """The latest (transfer id, reason) refused."""
    _live: dict[str, Lease] = field(default_factory=dict)
    _ended: OrderedDict = field(default_factory=OrderedDict)

    def offer(self, source_worker_id: str, request_id: str, group_id: str, first_block_index: int,
              block_ids: list[int], ttl_s: float) -> Lease:
        lease = Lease(secrets.token_hex(16), source_worker_id, request_id, group_id, first_block_index,
                      tuple(block_ids), self.clock() + ttl_s)
        self._live[lease.transfer_id] = lease
        return lease

    def get(self, transfer_id: str | None) -> Lease | None:
        """The live lease with this id, or None."""
        return self._live.get(transfer_id) if transfer_id else None

    def live(self) -> list[Lease]:
        return list(self._live.values())

    def remaining_s(self, lease: Lease) -> float:
        return max(0.0, lease.deadline - self.clock())

    def complete(self, transfer_id: str, first_block_index: int, block_ids: list[int]) -> str:
        """Accept the completion of a transfer into ``block_ids``: "" when accepted (the
        lease is then COMPLETED), else the reason it is refused (counted). A lease whose
        blocks differ stays live: the completion was wrong, not the lease."""
        lease = self._live.get(transfer_id)
        if lease is None:
            state = self._ended.get(transfer_id)
            return self._refuse(transfer_id, f"lease {state.value}" if state else "unknown transfer id")
        if self.clock() > lease.deadline:
            self._end(lease, LeaseState.EXPIRED)
            return self._refuse(transfer_id, "lease expired")
        if first_block_index != lease.first_block_index or tuple(block_ids) != lease.block_ids:
            return self._refuse(transfer_id, "blocks differ from the lease's")
        self._end(lease, LeaseState.COMPLETED)
        return ""

    def revoke(self, transfer_id: str) -> Lease | None:
        """End a live lease without a completion (the hop failed or was cancelled);
        returns it, or None if it was not live. Its completion is refused from now on."""
        lease = self._live.get(transfer_id)
        if lease is not None:
            self._end(lease, LeaseState.EXPIRED if self.clock() > lease.deadline else LeaseState.REVOKED)
        return lease

    def _end(self, lease: Lease, state: LeaseState) -> None:
        lease.state = state
        del self._live[lease.transfer_id]
        self._ended[lease.transfer_id] = state
        while len(self._ended) > self.remember:
            self._ended.popitem(last=False)

    def _refuse(self, transfer_id: str, reason: str) -> str:
        self.num_refused += 1
        self.refusals.append((transfer_id, reason))
        return reason
