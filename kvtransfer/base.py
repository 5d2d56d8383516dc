"""KV transfer interface: scheduler side (what moves) and worker side (moving it).

Split like vLLM's KV connector:

* **Scheduler side** — pure, no transport, no torch: ``layout.KVRegionLayout``
  describes a rank's region and ``layout.plan_transfer`` turns (source blocks,
  destination blocks, TP layouts) into one ``RankPairPlan`` per (source rank,
  destination rank): arrays of ``(src_offset, dst_offset, num_bytes)``.
* **Worker side** — one ``KVTransferAgent`` per TP rank, owning that rank's single
  pre-allocated KV region. A prefill rank ``write``s a plan's descriptors into a
  decode rank; the decode rank ``expect``s them and learns of completion.

Invariants every backend keeps (the conformance test in
``tests/integration/test_kvtransfer.py`` checks them):

1. The region is registered once, at construction; it must stay allocated (and
   not be resized) until ``close()``. Regions must be contiguous.
2. ``metadata()`` is plain bytes (a small JSON header plus an opaque backend blob,
   never pickle); it may be published in any control-plane store. A peer
   becomes addressable by ``add_peer(name, metadata)``. Both sides of a pair
   call ``add_peer`` for each other (a one-sided backend only needs the writer's).
3. ``write`` is asynchronous and returns at once with a ``TransferHandle``;
   ``poll`` never blocks. A handle ends in exactly one terminal state, DONE or
   FAILED (with a message), and stays there. DONE on the writer means every
   byte is in the peer's region and the peer accepted the transfer.
   ``handle.is_started`` says whether bytes may have reached the peer's region
   (False for a write the receiver refused before any byte moved).
4. Every transfer has a deadline (``timeout_s``, default ``default_timeout_s``).
   A transfer not DONE by its deadline becomes FAILED the next time it is polled
   (or at ``progress()``) and its backend resources are released then (NIXL
   cancels the request; torch_dist starts no step after the deadline). After a
   FAILED transfer the destination bytes are undefined. Give the receiver's
   ``expect`` a longer timeout than the writer's ``write`` (the decode worker's
   lease does, ``kvtransfer.lease``), so a compliant writer has given up before
   the receiver does.
5. The source bytes must not change until the write is DONE or FAILED; the
   destination blocks must not be read before the expectation is DONE.
6. ``expect`` comes first: it is the receiver's share of a lease on this rank.
   An incoming transfer is *admitted* only for a live expectation from that peer
   with that transfer id, byte count and destination coverage
   (``frames.coverage_digest``), and only once. Anything else (unknown id,
   expired or cancelled expectation, other destination bytes, a second claim or
   completion) is *refused*: counted in ``metrics.refused``, listed by
   ``take_refusals()``, never notified, never completes an expectation. A
   two-sided receiver (``RECEIVER_CONTROLS_WRITES``, torch_dist) checks before it
   copies, so refused bytes never reach its region. A one-sided WRITE (NIXL)
   lands before the target hears of it, so the writer asks first (CLAIM, then
   GRANT or REFUSE) and posts nothing when refused; a writer that skips the
   claim is refused at completion, but its bytes may already be in the region.
   Every admitted transfer that completes yields its ``notify`` bytes once in
   ``take_notifications()``.
7. ``remove_peer`` fails that peer's pending transfers; ``close()`` fails all
   pending transfers, releases everything and is idempotent.
8. An agent is used from one thread at a time (calls are serialized by a lock;
   backends may run their own helper threads).
9. ``cancel`` on an expectation revokes it: later arrivals for it are refused,
   and its handle's ``is_started`` tells whether a writer was ever admitted
   (bytes may have landed). On a two-sided backend no byte of the transfer lands
   after ``cancel`` returns; on a one-sided one an admitted writer may still be
   writing until its own deadline.
"""

from __future__ import annotations

import json
import struct
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .frames import Frame, FrameKind, coverage_digest
# Re-exported: backends and callers import the transfer types from here.
from .handles import (DONE, PENDING, Notification, Refusal, TransferError, TransferHandle,  # noqa: F401
                      TransferMetrics, TransferRecord, TransferState, TransferStatus, failed)
from .layout import KVRegionLayout, dtype_name


# ---- wire formats (plain bytes, no pickle) ------------------------------------------
_MD_MAGIC = b"PDKVMD1\0"


def pack_metadata(header: dict[str, Any], blob: bytes = b"") -> bytes:
    head = json.dumps(header, sort_keys=True).encode()
    return _MD_MAGIC + struct.pack("<I", len(head)) + head + bytes(blob)


def unpack_metadata(data: bytes) -> tuple[dict[str, Any], bytes]:
    data = bytes(data)
    if not data.startswith(_MD_MAGIC) or len(data) < len(_MD_MAGIC) + 4:
        raise ValueError("not pdserve KV transfer metadata")
    (n,) = struct.unpack_from("<I", data, len(_MD_MAGIC))
    start = len(_MD_MAGIC) + 4
    if start + n > len(data):
        raise ValueError("truncated KV transfer metadata")
    return json.loads(data[start:start + n]), data[start + n:]


def as_descs(descs: Any) -> np.ndarray:
    """Descriptors as a C-contiguous ``int64 [n, 3]`` array (accepts a ``RankPairPlan``)."""
    if hasattr(descs, "descs"):
        descs = descs.descs
    arr = np.ascontiguousarray(np.asarray(descs, dtype=np.int64))
    if arr.size == 0:
        return arr.reshape(0, 3)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise TransferError(f"descriptors must be [n, 3] (src_off, dst_off, bytes), got {arr.shape}")
    return arr


def check_bounds(offsets: np.ndarray, lengths: np.ndarray, limit: int, what: str) -> None:
    if len(lengths) == 0:
        return
    if lengths.min() <= 0:
        raise TransferError("descriptor lengths must be positive")
    if offsets.min() < 0 or int((offsets + lengths).max()) > limit:
        raise TransferError(f"descriptor outside the {what} region of {limit} bytes")


@dataclass
class PeerInfo:
    name: str
    backend: str
    layout: KVRegionLayout | None
    region_bytes: int
    header: dict[str, Any]


@dataclass(eq=False)
class _Expectation:
    handle: TransferHandle
    digest: int  # coverage digest of the expected destination bytes


class KVTransferAgent(ABC):
    """Worker side: one per TP rank, owning that rank's KV region. See module doc."""

    backend: ClassVar[str] = "abstract"
    #: the receiver copies incoming bytes itself, so a refused transfer never touches its
    #: region and a cancelled expectation receives nothing more (invariants 6, 9)
    RECEIVER_CONTROLS_WRITES: ClassVar[bool] = False
    #: how long ended expectations are remembered (to name why a late arrival is refused)
    REMEMBER_S: ClassVar[float] = 600.0
    REMEMBER_MAX: ClassVar[int] = 65536

    def __init__(self, name: str, region: Any, layout: KVRegionLayout, *,
                 default_timeout_s: float = 30.0) -> None:
        if not name or "/" in name:
            raise ValueError(f"bad agent name {name!r}")
        if not region.is_contiguous():
            raise ValueError("the KV region must be one contiguous tensor")
        nbytes = region.numel() * region.element_size()
        if nbytes != layout.region_bytes:
            raise ValueError(f"region has {nbytes} bytes, layout says {layout.region_bytes}")
        if dtype_name(region.dtype) != layout.dtype:
            raise ValueError(f"region dtype {region.dtype} != layout dtype {layout.dtype}")
        self.name = name
        self.region = region
        self.layout = layout
        self.default_timeout_s = float(default_timeout_s)
        self.metrics = TransferMetrics()
        self._lock = threading.RLock()
        self._closed = False
        self._peers: dict[str, PeerInfo] = {}
        self._writes: dict[tuple[str, str], TransferHandle] = {}  # (peer, tid) -> pending
        self._expects: dict[tuple[str, str], _Expectation] = {}  # (peer, tid) -> live
        self._ended: OrderedDict[tuple[str, str], tuple[float, str]] = OrderedDict()
        """(peer, tid) of expectations that ended -> (when, how): "completed", "expired"..."""
        self._notifications: list[Notification] = []
        self._refusals: deque[Refusal] = deque(maxlen=1024)

    # ---- metadata and peers -------------------------------------------------------
    @property
    def region_bytes(self) -> int:
        return self.layout.region_bytes

    def metadata(self) -> bytes:
        """Plain bytes describing this agent; publish them for peers' ``add_peer``."""
        with self._lock:
            self._check_open()
            header = {"backend": self.backend, "name": self.name, "layout": self.layout.to_dict(),
                      "region_bytes": self.region_bytes, **self._metadata_fields()}
            return pack_metadata(header, self._metadata_blob())

    def add_peer(self, name: str, metadata: bytes) -> None:
        """Make peer ``name`` addressable from its ``metadata()`` bytes (replaces an old entry)."""
        header, blob = unpack_metadata(metadata)
        if header.get("backend") != self.backend:
            raise ValueError(f"peer {name!r} uses backend {header.get('backend')!r}, not {self.backend!r}")
        if header.get("name") != name:
            raise ValueError(f"metadata is for {header.get('name')!r}, not {name!r}")
        lay = KVRegionLayout.from_dict(header["layout"]) if header.get("layout") else None
        if lay is not None and not lay.same_model(self.layout):
            raise ValueError(f"peer {name!r} has a different KV geometry ({self.layout.mismatch(lay)}): "
                             f"{lay} vs {self.layout}")
        with self._lock:
            self._check_open()
            if name in self._peers:
                self.remove_peer(name)
            info = PeerInfo(name, header["backend"], lay, int(header["region_bytes"]), header)
            self._add_peer_backend(info, blob)
            self._peers[name] = info

    def remove_peer(self, name: str) -> None:
        """Forget a peer; its pending writes and expectations fail."""
        with self._lock:
            for key, h in list(self._writes.items()):
                if key[0] == name:
                    self._fail_write(h, f"peer {name} removed")
            for key, exp in list(self._expects.items()):
                if key[0] == name:
                    self._end_expect(exp.handle, failed(f"peer {name} removed"), "failed")
            if self._peers.pop(name, None) is not None:
                self._remove_peer_backend(name)

    def peers(self) -> list[str]:
        with self._lock:
            return sorted(self._peers)

    # ---- sender -------------------------------------------------------------------
    def write(self, transfer_id: str, peer: str, descs: Any, notify: bytes = b"",
              timeout_s: float | None = None) -> TransferHandle:
        """Start writing local bytes into ``peer``'s region.

        ``descs``: ``[n, 3]`` rows of (local src offset, peer dst offset, bytes), e.g. a
        ``RankPairPlan``. ``notify`` reaches the peer's ``take_notifications`` after the
        data. Raises ``TransferError`` for bad arguments; transport failures show up as
        FAILED in ``poll``.
        """
        arr = as_descs(descs)
        with self._lock:
            self._check_open()
            info = self._peers.get(peer)
            if info is None:
                raise TransferError(f"unknown peer {peer!r} (add_peer first)")
            if (peer, transfer_id) in self._writes:
                raise TransferError(f"transfer {transfer_id!r} to {peer!r} already pending")
            check_bounds(arr[:, 0], arr[:, 2], self.region_bytes, "local")
            check_bounds(arr[:, 1], arr[:, 2], info.region_bytes, f"peer {peer!r}")
            h = self._new_handle(transfer_id, peer, "write", arr, timeout_s)
            self._writes[(peer, transfer_id)] = h
            try:
                self._start_write(h, arr, Frame(FrameKind.DONE, transfer_id, h.num_bytes,
                                                coverage_digest(arr), bytes(notify)))
            except Exception as e:  # transport refused at once: a failed transfer
                self._fail_write(h, f"{type(e).__name__}: {e}")
            return h

    # ---- receiver -----------------------------------------------------------------
    def expect(self, transfer_id: str, peer: str, descs: Any,
               timeout_s: float | None = None) -> TransferHandle:
        """Admit one incoming transfer from ``peer`` into exactly these destination bytes,
        until the deadline (invariant 6). Call it before the writer starts: nothing that
        arrives without a live expectation is admitted."""
        arr = as_descs(descs)
        with self._lock:
            self._check_open()
            key = (peer, transfer_id)
            if key in self._expects:
                raise TransferError(f"transfer {transfer_id!r} from {peer!r} already expected")
            check_bounds(arr[:, 1], arr[:, 2], self.region_bytes, "local")
            info = self._peers.get(peer)
            if info is not None:
                check_bounds(arr[:, 0], arr[:, 2], info.region_bytes, f"peer {peer!r}")
            h = self._new_handle(transfer_id, peer, "expect", arr, timeout_s)
            self._ended.pop(key, None)
            self._expects[key] = _Expectation(h, coverage_digest(arr))
            return h

    def take_refusals(self) -> list[Refusal]:
        """Incoming transfers refused since the last call (at most the last 1024)."""
        with self._lock:
            self.progress()
            out = list(self._refusals)
            self._refusals.clear()
            return out

    def take_notifications(self) -> list[Notification]:
        """Notifications of successful incoming writes since the last call."""
        with self._lock:
            self.progress()
            out, self._notifications = self._notifications, []
            return out

    # ---- both ---------------------------------------------------------------------
    def poll(self, handle: TransferHandle) -> TransferStatus:
        """Current state of a transfer (never blocks)."""
        with self._lock:
            if handle.status.finished:
                return handle.status
            if handle.direction == "write" and not self._closed:
                try:
                    st = self._poll_write(handle)
                except Exception as e:
                    st = failed(f"{type(e).__name__}: {e}")
                if st is not None and st.finished and not handle.status.finished:
                    self._release_write(handle)
                    self._writes.pop((handle.peer, handle.transfer_id), None)
                    self._finish(handle, st)
            self.progress()
            return handle.status

    def wait(self, handle: TransferHandle, interval_s: float = 0.0005) -> TransferStatus:
        """Poll until the transfer finishes (its deadline bounds the wait)."""
        while True:
            st = self.poll(handle)
            if st.finished:
                return st
            time.sleep(interval_s)

    def cancel(self, handle: TransferHandle, message: str = "cancelled") -> None:
        with self._lock:
            if handle.status.finished:
                return
            if handle.direction == "write":
                self._fail_write(handle, message)
            else:
                self._end_expect(handle, failed(message), "cancelled")

    def progress(self) -> None:
        """Drain incoming completions and fail whatever is past its deadline."""
        with self._lock:
            if self._closed:
                return
            self._progress_backend()
            now = time.monotonic()
            for h in [h for h in self._writes.values() if now > h.deadline]:
                self._fail_write(h, f"timed out after {h.deadline - h.started:.3g}s")
            for exp in [e for e in self._expects.values() if now > e.handle.deadline]:
                h = exp.handle
                self._end_expect(h, failed(f"timed out after {h.deadline - h.started:.3g}s"), "expired")
            cutoff = now - self.REMEMBER_S
            while self._ended and (len(self._ended) > self.REMEMBER_MAX
                                   or next(iter(self._ended.values()))[0] < cutoff):
                self._ended.popitem(last=False)

    def num_pending(self) -> int:
        """Transfers still holding resources (writes and expectations)."""
        with self._lock:
            return len(self._writes) + len(self._expects) + self._backend_pending()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            for h in list(self._writes.values()):
                self._fail_write(h, "agent closed")
            for exp in list(self._expects.values()):
                self._end_expect(exp.handle, failed("agent closed"), "closed")
            for name in list(self._peers):
                self._peers.pop(name)
                try:
                    self._remove_peer_backend(name)
                except Exception:
                    pass
            self._closed = True
            self._close_backend()

    def __enter__(self) -> "KVTransferAgent":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- helpers for backends -----------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise TransferError(f"agent {self.name!r} is closed")

    def _new_handle(self, tid: str, peer: str, direction: str, arr: np.ndarray,
                    timeout_s: float | None) -> TransferHandle:
        now = time.monotonic()
        t = self.default_timeout_s if timeout_s is None else float(timeout_s)
        return TransferHandle(tid, peer, direction, int(arr[:, 2].sum()) if len(arr) else 0,
                              len(arr), now, now + t)

    def _finish(self, h: TransferHandle, status: TransferStatus) -> None:
        if h.status.finished:
            return
        h.status = status
        h.finished_at = time.monotonic()
        self.metrics.observe(h)

    def _fail_write(self, h: TransferHandle, message: str) -> None:
        if h.status.finished:
            return
        self._writes.pop((h.peer, h.transfer_id), None)
        try:
            self._release_write(h)
        finally:
            self._finish(h, failed(message))

    def _end_expect(self, h: TransferHandle, status: TransferStatus, how: str) -> None:
        key = (h.peer, h.transfer_id)
        if self._expects.get(key) is not None and self._expects[key].handle is h:
            del self._expects[key]
        self._ended[key] = (time.monotonic(), how)
        self._ended.move_to_end(key)
        self._finish(h, status)

    def _refuse(self, peer: str, tid: str, reason: str) -> str:
        self.metrics.refused += 1
        self._refusals.append(Refusal(peer, tid, reason))
        return reason

    def _admit(self, peer: str, tid: str, nbytes: int, digest: int) -> str:
        """Admit a writer for a live expectation (call with the lock held): "" when
        admitted (the expectation is then started), else the refusal reason (counted).

        A claim for the right id but other destination bytes fails the expectation: its
        writer does not write what was offered. Nothing was admitted, so nothing landed."""
        key = (peer, tid)
        exp = self._expects.get(key)
        if exp is None:
            ended = self._ended.get(key)
            return self._refuse(peer, tid, f"transfer {ended[1]}" if ended else "no such transfer expected")
        h = exp.handle
        if h.is_started:
            return self._refuse(peer, tid, "transfer already admitted")
        if time.monotonic() > h.deadline:
            self._end_expect(h, failed("timed out"), "expired")
            return self._refuse(peer, tid, "transfer expired")
        if nbytes != h.num_bytes or digest != exp.digest:
            why = f"destination differs from the expected one ({nbytes} bytes, expected {h.num_bytes})"
            self._end_expect(h, failed(f"refused a writer: {why}"), "failed")
            return self._refuse(peer, tid, why)
        h.is_started = True
        return ""

    def _complete_incoming(self, peer: str, tid: str, nbytes: int, digest: int, message: bytes) -> str:
        """A writer's completion arrived (call with the lock held): complete its admitted
        expectation and notify; "" when accepted, else the refusal reason (counted).

        A completion for a live expectation that was never admitted, or for other bytes,
        fails it as started: that writer skipped the claim, so its bytes may be anywhere
        in the expected blocks."""
        exp = self._expects.get((peer, tid))
        if exp is not None and (not exp.handle.is_started or nbytes != exp.handle.num_bytes
                                or digest != exp.digest):
            exp.handle.is_started = True
            self._end_expect(exp.handle, failed("a write arrived that was not admitted"), "failed")
            return self._refuse(peer, tid, "completion of a write that was not admitted")
        if exp is None:
            ended = self._ended.get((peer, tid))
            return self._refuse(peer, tid, f"transfer {ended[1]}" if ended else "no such transfer expected")
        self._end_expect(exp.handle, DONE, "completed")
        self._notifications.append(Notification(peer, message))
        return ""

    # ---- backend hooks ------------------------------------------------------------
    def _metadata_fields(self) -> dict[str, Any]:
        return {}

    def _metadata_blob(self) -> bytes:
        return b""

    @abstractmethod
    def _add_peer_backend(self, info: PeerInfo, blob: bytes) -> None: ...

    @abstractmethod
    def _remove_peer_backend(self, name: str) -> None: ...

    @abstractmethod
    def _start_write(self, h: TransferHandle, descs: np.ndarray, done: Frame) -> None:
        """Start the transfer; raise to fail it at once. ``done`` is its completion frame
        (transfer id, bytes, coverage digest, notify bytes). Set ``h.is_started`` once
        bytes may move."""

    @abstractmethod
    def _poll_write(self, h: TransferHandle) -> TransferStatus | None:
        """Backend state of a pending write (None or PENDING while in flight)."""

    @abstractmethod
    def _release_write(self, h: TransferHandle) -> None:
        """Free (and cancel, if in flight) a write's resources. Must not raise."""

    def _progress_backend(self) -> None:
        """Settle incoming transfers via ``_admit`` / ``_complete_incoming`` (e.g. drain
        notifications)."""

    def _backend_pending(self) -> int:
        """Backend resources still held for transfers no longer tracked (e.g. stuck I/O)."""
        return 0

    @abstractmethod
    def _close_backend(self) -> None: ...
