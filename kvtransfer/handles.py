"""What a transfer looks like to the caller: its handle, status and the agent's counters
(plain data; the contract that produces them is ``kvtransfer.base``)."""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple


class TransferState(enum.Enum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class TransferStatus:
    state: TransferState
    message: str = ""

    @property
    def done(self) -> bool:
        return self.state is TransferState.DONE

    @property
    def failed(self) -> bool:
        return self.state is TransferState.FAILED

    @property
    def finished(self) -> bool:
        return self.state is not TransferState.PENDING


PENDING = TransferStatus(TransferState.PENDING)
DONE = TransferStatus(TransferState.DONE)


def failed(message: str) -> TransferStatus:
    return TransferStatus(TransferState.FAILED, message)


class TransferError(RuntimeError):
    """A transfer could not be started (bad arguments, unknown peer, closed agent)."""


@dataclass(eq=False)
class TransferHandle:
    """One transfer as seen by one side. Opaque to callers except for its fields."""

    transfer_id: str
    peer: str
    direction: str  # "write" (this side sends) or "expect" (this side receives)
    num_bytes: int
    num_descriptors: int
    started: float  # time.monotonic()
    deadline: float  # time.monotonic()
    status: TransferStatus = PENDING
    finished_at: float | None = None
    is_started: bool = False
    """Bytes may have reached the receiver's region: a write was posted (and not refused
    by a two-sided receiver), or an expectation admitted a writer."""

    @property
    def latency_s(self) -> float | None:
        return None if self.finished_at is None else self.finished_at - self.started


class Notification(NamedTuple):
    peer: str
    message: bytes


class Refusal(NamedTuple):
    """An incoming transfer (claim, data or completion) this receiver did not admit."""

    peer: str
    transfer_id: str
    reason: str


@dataclass(frozen=True)
class TransferRecord:
    transfer_id: str
    peer: str
    direction: str
    num_bytes: int
    num_descriptors: int
    latency_s: float
    state: TransferState
    message: str


@dataclass
class TransferMetrics:
    """Per-agent counters plus the last ``records.maxlen`` finished transfers."""

    writes_done: int = 0
    writes_failed: int = 0
    expects_done: int = 0
    expects_failed: int = 0
    bytes_written: int = 0
    bytes_received: int = 0
    descriptors_written: int = 0
    refused: int = 0
    """Incoming transfers not admitted (invariant 6)."""
    records: deque = field(default_factory=lambda: deque(maxlen=1024))

    def observe(self, h: TransferHandle) -> None:
        ok = h.status.done
        if h.direction == "write":
            if ok:
                self.writes_done += 1
                self.bytes_written += h.num_bytes
                self.descriptors_written += h.num_descriptors
            else:
                self.writes_failed += 1
        else:
            if ok:
                self.expects_done += 1
                self.bytes_received += h.num_bytes
            else:
                self.expects_failed += 1
        self.records.append(TransferRecord(h.transfer_id, h.peer, h.direction, h.num_bytes,
                                           h.num_descriptors, h.latency_s or 0.0, h.status.state,
                                           h.status.message))
