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
   byte is in the peer's region and the peer was notified.
4. Every transfer has a deadline (``timeout_s``, default ``default_timeout_s``).
   A transfer not DONE by its deadline becomes FAILED the next time it is polled
   (or at ``progress()``) and its backend resources are released then (NIXL
   cancels the request; torch_dist starts no step after the deadline). After a
   FAILED transfer the destination bytes are undefined. Give the receiver's
   ``expect`` a longer timeout than the writer's ``write``: a two-sided backend
   then refuses data for an expectation that already failed, and a one-sided one
   has cancelled its write before the receiver gives up and reuses the blocks.
5. The source bytes must not change until the write is DONE or FAILED; the
   destination blocks must not be read before the expectation is DONE.
6. ``expect`` is the receiver's side: it tracks completion (and a deadline) of a
   transfer that a peer writes; it is bookkeeping only for one-sided backends and
   may be called before or after the data arrives. Every successful incoming
   transfer also yields its ``notify`` bytes once in ``take_notifications()``.
7. ``remove_peer`` fails that peer's pending transfers; ``close()`` fails all
   pending transfers, releases everything and is idempotent.
8. An agent is used from one thread at a time (calls are serialized by a lock;
   backends may run their own helper threads).
"""

from __future__ import annotations

import enum
import json
import struct
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import numpy as np

from .layout import KVRegionLayout, dtype_name


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

    @property
    def latency_s(self) -> float | None:
        return None if self.finished_at is None else self.finished_at - self.started


class Notification(NamedTuple):
    peer: str
    message: bytes


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


# ---- wire formats (plain bytes, no pickle) ------------------------------------------
_MD_MAGIC = b"PDKVMD1\0"
_NOTIF_MAGIC = b"PDKVN1"


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


def pack_notif(transfer_id: str, num_bytes: int, message: bytes) -> bytes:
    tid = transfer_id.encode()
    return _NOTIF_MAGIC + struct.pack("<HQ", len(tid), num_bytes) + tid + bytes(message)


def unpack_notif(data: bytes) -> tuple[str, int, bytes] | None:
    """(transfer_id, num_bytes, message), or None for a message not in our format."""
    data = bytes(data)
    if not data.startswith(_NOTIF_MAGIC) or len(data) < len(_NOTIF_MAGIC) + 10:
        return None
    n, nbytes = struct.unpack_from("<HQ", data, len(_NOTIF_MAGIC))
    start = len(_NOTIF_MAGIC) + 10
    return data[start:start + n].decode(), nbytes, data[start + n:]


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


class KVTransferAgent(ABC):
    """Worker side: one per TP rank, owning that rank's KV region. See module doc."""

    backend: ClassVar[str] = "abstract"
    #: how long arrivals with no ``expect`` yet, and failed transfer ids, are remembered
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
        self._expects: dict[tuple[str, str], tuple[TransferHandle, int]] = {}
        self._arrived: OrderedDict[tuple[str, str], tuple[float, int, str]] = OrderedDict()
        self._expired: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._notifications: list[Notification] = []

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
            raise ValueError(f"peer {name!r} has a different KV geometry: {lay} vs {self.layout}")
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
            for key, (h, _) in list(self._expects.items()):
                if key[0] == name:
                    self._finish(h, failed(f"peer {name} removed"))
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
                self._start_write(h, arr, pack_notif(transfer_id, h.num_bytes, notify))
            except Exception as e:  # transport refused at once: a failed transfer
                self._fail_write(h, f"{type(e).__name__}: {e}")
            return h

    # ---- receiver -----------------------------------------------------------------
    def expect(self, transfer_id: str, peer: str, descs: Any,
               timeout_s: float | None = None) -> TransferHandle:
        """Track an incoming transfer from ``peer`` into this region (see invariant 6)."""
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
            self._expired.pop(key, None)
            arrived = self._arrived.pop(key, None)
            if arrived is not None:
                self._complete_expect(h, arrived[1], arrived[2])
            else:
                self._expects[key] = (h, h.num_bytes)
            return h

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
                self._expects.pop((handle.peer, handle.transfer_id), None)
                self._remember_expired((handle.peer, handle.transfer_id))
                self._finish(handle, failed(message))

    def progress(self) -> None:
        """Drain incoming completions and fail whatever is past its deadline."""
        with self._lock:
            if self._closed:
                return
            self._progress_backend()
            now = time.monotonic()
            for h in [h for h in self._writes.values() if now > h.deadline]:
                self._fail_write(h, f"timed out after {h.deadline - h.started:.3g}s")
            for key, (h, _) in list(self._expects.items()):
                if now > h.deadline:
                    del self._expects[key]
                    self._remember_expired(key)
                    self._finish(h, failed(f"timed out after {h.deadline - h.started:.3g}s"))
            cutoff = now - self.REMEMBER_S
            for od, stamp in ((self._arrived, lambda v: v[0]), (self._expired, lambda v: v)):
                while od and (len(od) > self.REMEMBER_MAX or stamp(next(iter(od.values()))) < cutoff):
                    od.popitem(last=False)

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
            for key, (h, _) in list(self._expects.items()):
                self._finish(h, failed("agent closed"))
            self._expects.clear()
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

    def _remember_expired(self, key: tuple[str, str]) -> None:
        self._expired[key] = time.monotonic()
        self._expired.move_to_end(key)

    def _incoming_allowed(self, peer: str, tid: str) -> bool:
        """False when the receiver already gave up on this transfer (do not write it)."""
        with self._lock:
            return not self._closed and (peer, tid) not in self._expired

    def _complete_expect(self, h: TransferHandle, nbytes: int, error: str) -> None:
        if error:
            self._finish(h, failed(error))
        elif nbytes != h.num_bytes:
            self._finish(h, failed(f"received {nbytes} bytes, expected {h.num_bytes}"))
        else:
            self._finish(h, DONE)

    def _on_incoming(self, peer: str, tid: str, nbytes: int, message: bytes,
                     error: str = "") -> None:
        """A peer's write arrived (or failed on arrival): settle its expectation and notify."""
        with self._lock:
            if self._closed:
                return
            key = (peer, tid)
            if key in self._expired:
                return  # already failed here; the data was not wanted
            entry = self._expects.pop(key, None)
            if entry is not None:
                self._complete_expect(entry[0], nbytes, error)
            else:
                self._arrived[key] = (time.monotonic(), nbytes, error)
                self._arrived.move_to_end(key)
            if not error:
                self._notifications.append(Notification(peer, message))

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
    def _start_write(self, h: TransferHandle, descs: np.ndarray, frame: bytes) -> None:
        """Start the transfer; raise to fail it at once. ``frame`` is the notification."""

    @abstractmethod
    def _poll_write(self, h: TransferHandle) -> TransferStatus | None:
        """Backend state of a pending write (None or PENDING while in flight)."""

    @abstractmethod
    def _release_write(self, h: TransferHandle) -> None:
        """Free (and cancel, if in flight) a write's resources. Must not raise."""

    def _progress_backend(self) -> None:
        """Deliver incoming completions via ``_on_incoming`` (e.g. drain notifications)."""

    def _backend_pending(self) -> int:
        """Backend resources still held for transfers no longer tracked (e.g. stuck I/O)."""
        return 0

    @abstractmethod
    def _close_backend(self) -> None: ...
