"""A cluster-shared KV block pool on Mooncake Store (the tier below host and disk).

Every worker that joins the pool contributes ``segment_size`` bytes of its host memory
to one pool that a ``mooncake_master`` indexes (``pdserve.deploy.kvpool.MasterProcess``
runs it); any worker can then put a KV block under a key and any other read it back,
over TCP on CPU hosts or RDMA on GPU clusters. Data flow of a get: the client asks the
master where the key's replica lives (one RPC per batch), then the transfer engine
copies the bytes from the owner's segment straight into the caller's buffer.

Contract of :class:`KVPoolClient` (numbered, like ``kvtransfer.base``):

1. Zero copy. Every buffer handed to ``put_blocks`` / ``get_blocks`` lies inside memory
   given to ``register`` first (the host tier's pool, typically); the library moves
   bytes between registered memory and the pool without staging. A buffer outside a
   registered region is a ``ValueError``: under RDMA it could not be transferred at all.
2. Keys are opaque here. The caller builds them (model identity + KV layout + TP rank
   + chained block hash); a key names immutable content, so putting a key that already
   exists succeeds without rewriting it.
3. A miss is ``False``, never an exception: a key not in the pool, a block evicted, a
   peer that held it gone (``TRANSFER_FAIL`` until the master expires the peer), and a
   stored block whose size differs from the buffer (logged as a warning: two writers
   disagree on the layout a key names).
4. Master unreachable raises :class:`KVPoolUnavailable`: the call that finds it
   (``RPC_FAIL``) raises when the library gives up (its RPC timeout, seconds, after a
   crash), and for ``retry_interval_s`` afterwards every call raises without touching
   the library (``library_calls`` does not move); then one TCP connect (``connect_timeout_s``)
   decides whether the next call may try again. The library's own retries (seconds per
   call once its heartbeat gives up) are never waited on twice. The engine keeps
   serving from its own tiers meanwhile.
5. Sizes are bounded: ``0 < nbytes <= max_block_bytes`` per block, checked before any
   library call.

NOTE: objects live in the contributing workers' segments, so the pool holds what its
live members contribute: a worker that leaves takes its share of the blocks with it,
and a restarted master starts empty (clients re-mount their segments by themselves).

The ``mooncake`` package (the ``kvpool`` extra) is imported only by ``KVPoolClient``;
importing this module needs neither it nor torch.
"""

from __future__ import annotations

import bisect
import logging
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("pdserve.kvpool")

PROTOCOLS = ("tcp", "rdma")
#: Metadata exchanged peer to peer through the transfer engine's handshake: no separate
#: metadata server (etcd, HTTP) to run or expose.
P2P_METADATA = "P2PHANDSHAKE"
_METADATA_SCHEMES = ("http://", "https://", "etcd://", "redis://")
MAX_KEY_LEN = 512

# Mooncake's ErrorCode values (mooncake-store types.h; the binding returns plain ints).
OBJECT_NOT_FOUND = -704
OBJECT_ALREADY_EXISTS = -705
INVALID_PARAMS = -600  # get_into: the stored object is larger than the buffer
NO_AVAILABLE_HANDLE = -200  # put: the pool is full (nothing evictable yet)
#: The master (or its service) is unreachable: the pool is unavailable, not the key.
_UNAVAILABLE = frozenset({-900, -901, -1010})  # RPC_FAIL, RPC_TIMEOUT, UNAVAILABLE_IN_CURRENT_STATUS
#: Not a problem worth a warning: the key is simply not (or not yet, or no longer) there.
_QUIET_MISSES = frozenset({OBJECT_NOT_FOUND, -703, -707, -712})  # + REPLICA_IS_NOT_READY, LEASE_EXPIRED, REPLICA_IS_GONE

#: The library retries a failed setup about 4.5 s per attempt, 20 times by default (90 s
#: against a dead master). Ours: 2, unless the environment says otherwise.
_SETUP_RETRIES_ENV = "MC_STORE_CLIENT_SETUP_RETRIES"
_SETUP_RETRIES = "2"


class KVPoolUnavailable(RuntimeError):
    """The pool's master cannot be reached (or this client is closed): serve without it."""


def _parse_host_port(value: str, field: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{field} must be HOST:PORT with a port in 1..65535, got {value!r}")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class KVPoolConfig:
    """How one worker process joins the pool. Built once per process; validated here."""

    master_address: str
    """``HOST:PORT`` of ``mooncake_master``'s RPC service (``MasterProcess.address``)."""
    metadata_server: str = P2P_METADATA
    """Where transfer engines find each other's segments: ``P2PHANDSHAKE`` (peer to peer,
    no server), or an ``http://HOST:PORT/metadata`` / ``etcd://HOST:PORT`` server."""
    protocol: str = "tcp"
    """``tcp`` (any host) or ``rdma`` (GPU clusters with InfiniBand/RoCE NICs)."""
    device_name: str = ""
    """RDMA NICs, comma-separated (``mlx5_0,mlx5_1``); empty: the library picks. Unused on tcp."""
    local_hostname: str = "127.0.0.1"
    """The address other workers reach this worker's segment at (its node IP on a cluster)."""
    segment_size: int = 256 << 20
    """Bytes of host memory this worker contributes to the pool; 0 joins as a pure client."""
    local_buffer_size: int = 16 << 20
    """The library's own registered staging buffer (used by its non-zero-copy paths)."""
    max_block_bytes: int = 64 << 20
    """Largest block ``put_blocks`` / ``get_blocks`` accept."""
    retry_interval_s: float = 5.0
    """After the master was found unreachable: seconds every call fails fast before retrying."""
    connect_timeout_s: float = 1.0
    """TCP connect timeout of the reachability probe (at start-up and when retrying)."""

    def __post_init__(self) -> None:
        _parse_host_port(self.master_address, "master_address")
        if self.metadata_server != P2P_METADATA and not self.metadata_server.startswith(_METADATA_SCHEMES):
            raise ValueError(f"metadata_server must be {P2P_METADATA!r} or a URL starting with one of "
                             f"{_METADATA_SCHEMES}, got {self.metadata_server!r}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if not self.local_hostname or any(c.isspace() for c in self.local_hostname):
            raise ValueError(f"local_hostname must be a host name or IP address, got {self.local_hostname!r}")
        for name, low in (("segment_size", 0), ("local_buffer_size", 1), ("max_block_bytes", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        for name in ("retry_interval_s", "connect_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")

    @property
    def master_host_port(self) -> tuple[str, int]:
        return _parse_host_port(self.master_address, "master_address")


def _span(buffer: Any) -> tuple[int, int]:
    """``(address, nbytes)`` of a C-contiguous host buffer: a CPU torch tensor (duck-typed,
    torch is not imported), a numpy array, or any object with the buffer protocol."""
    if hasattr(buffer, "data_ptr"):
        if buffer.device.type != "cpu" or not buffer.is_contiguous():
            raise ValueError(f"a KV pool buffer must be a contiguous CPU tensor, got {buffer.device} "
                             f"contiguous={buffer.is_contiguous()}")
        return buffer.data_ptr(), buffer.numel() * buffer.element_size()
    import numpy as np  # noqa: PLC0415

    view = memoryview(buffer)
    if not view.c_contiguous:
        raise ValueError("a KV pool buffer must be C-contiguous")
    return np.frombuffer(view.cast("B"), dtype=np.uint8).ctypes.data, view.nbytes


def can_connect(host: str, port: int, timeout_s: float) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout_s``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


class KVPoolClient:
    """One process's handle on the pool (see the module docstring for the contract).

    ``KVPoolClient(config)`` joins the pool (mounting ``segment_size`` bytes) or raises
    :class:`KVPoolUnavailable` within about ``connect_timeout_s`` when the master does
    not answer. Several clients may live in one process (each its own transfer engine);
    one client is called from one thread at a time.
    """

    def __init__(self, config: KVPoolConfig) -> None:
        self.config = config
        self._regions: list[tuple[int, int, Any]] = []  # (start, end, owner), sorted by start
        self._down_until: float | None = None
        self._down_reason = ""
        self._store = None
        self.library_calls = 0
        """Batch calls that reached the library (fail-fast refusals do not): a counter for
        metrics, and the proof in tests that a down master is not waited on twice."""
        host, port = config.master_host_port
        if not can_connect(host, port, config.connect_timeout_s):
            raise KVPoolUnavailable(f"KV pool master {config.master_address} is not reachable")
        try:
            from mooncake.store import MooncakeDistributedStore  # noqa: PLC0415
        except ImportError as e:
            raise RuntimeError("the KV pool needs Mooncake: pip install 'pdserve[kvpool]' "
                               f"(and Debian's libibverbs1): {e}") from e
        os.environ.setdefault(_SETUP_RETRIES_ENV, _SETUP_RETRIES)
        store = MooncakeDistributedStore()
        rc = store.setup(config.local_hostname, config.metadata_server, config.segment_size,
                         config.local_buffer_size, config.protocol, config.device_name, config.master_address)
        if rc != 0:
            raise KVPoolUnavailable(f"joining the KV pool at {config.master_address} failed (setup returned {rc})")
        self._store = store

    # -- registered memory -------------------------------------------------------------

    def register(self, buffer: Any) -> None:
        """Make ``buffer``'s memory usable by ``put_blocks`` / ``get_blocks`` (pinned for
        RDMA). Kept alive by this client until ``unregister`` or ``close``."""
        start, nbytes = _span(buffer)
        if nbytes == 0:
            raise ValueError("cannot register an empty buffer")
        if any(s < start + nbytes and start < e for s, e, _ in self._regions):
            raise ValueError("buffer overlaps memory already registered with this KV pool client")
        rc = self._live_store().register_buffer(start, nbytes)
        if rc != 0:
            raise RuntimeError(f"registering {nbytes} bytes with the KV pool failed (rc {rc})")
        bisect.insort(self._regions, (start, start + nbytes, buffer), key=lambda r: r[0])

    def unregister(self, buffer: Any) -> None:
        start, _ = _span(buffer)
        for i, (s, _, _) in enumerate(self._regions):
            if s == start:
                del self._regions[i]
                self._live_store().unregister_buffer(start)
                return
        raise ValueError("buffer was not registered with this KV pool client")

    # -- blocks ------------------------------------------------------------------------

    def put_blocks(self, keys: Sequence[str], buffers: Sequence[Any]) -> list[bool]:
        """Store each buffer's bytes under its key. ``True``: stored, or already there.
        ``False``: not stored (pool full, a peer failed); the caller loses nothing but
        the chance of a later hit."""
        ptrs, sizes = self._spans(keys, buffers)
        if len(set(keys)) != len(keys):
            raise ValueError("put_blocks: duplicate keys in one call")
        codes = self._call(lambda s: s.batch_put_from(list(keys), ptrs, sizes))
        failed = [(k, c) for k, c in zip(keys, codes) if c not in (0, OBJECT_ALREADY_EXISTS, NO_AVAILABLE_HANDLE)]
        if failed:
            log.warning("KV pool: %d of %d puts failed, e.g. %r (code %d)", len(failed), len(keys), *failed[0])
        return [c in (0, OBJECT_ALREADY_EXISTS) for c in codes]

    def get_blocks(self, keys: Sequence[str], buffers: Sequence[Any]) -> list[bool]:
        """Read each key into its buffer. ``True``: the buffer now holds exactly the
        stored block. ``False``: a miss (contract 3); the buffer's bytes are unspecified."""
        ptrs, sizes = self._spans(keys, buffers)
        codes = self._call(lambda s: s.batch_get_into(list(keys), ptrs, sizes))
        failed = []  # one warning per call, not per block: a dead peer fails many at once
        for key, size, code in zip(keys, sizes, codes):
            if code >= 0 and code != size or code == INVALID_PARAMS:
                stored = f"{code} bytes" if code >= 0 else f"more than {size} bytes"
                log.warning("KV pool: %r holds %s, its buffer %d: treated as a miss (writer and reader "
                            "disagree on the layout the key names?)", key, stored, size)
            elif code < 0 and code not in _QUIET_MISSES:
                failed.append((key, code))
        if failed:
            log.warning("KV pool: %d of %d gets failed (treated as misses), e.g. %r (code %d)",
                        len(failed), len(keys), *failed[0])
        return [code == size for size, code in zip(sizes, codes)]

    def exists(self, keys: Sequence[str]) -> list[bool]:
        """Whether the pool holds each key now (it may be evicted before a get)."""
        self._check_keys(keys)
        return [c == 1 for c in self._call(lambda s: s.batch_is_exist(list(keys)))]

    @property
    def is_available(self) -> bool:
        """False while calls fail fast (the master was unreachable) or after ``close``."""
        return self._store is not None and (self._down_until is None or time.monotonic() >= self._down_until)

    def close(self) -> None:
        """Leave the pool: unmount this worker's segment (its blocks leave with it) and
        unregister memory. About a second or two; up to ~20 s when the master is gone
        (the library's unmount retries). Idempotent."""
        store, self._store = self._store, None
        if store is None:
            return
        for start, _, _ in self._regions:
            store.unregister_buffer(start)
        self._regions.clear()
        store.close()

    def __enter__(self) -> KVPoolClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------

    def _live_store(self):
        if self._store is None:
            raise KVPoolUnavailable("KV pool client is closed")
        return self._store

    def _check_keys(self, keys: Sequence[str]) -> None:
        for key in keys:
            if not isinstance(key, str) or not key or len(key) > MAX_KEY_LEN:
                raise ValueError(f"a KV pool key must be a non-empty str of at most {MAX_KEY_LEN} "
                                 f"characters, got {key!r:.80}")

    def _spans(self, keys: Sequence[str], buffers: Sequence[Any]) -> tuple[list[int], list[int]]:
        if len(keys) != len(buffers):
            raise ValueError(f"{len(keys)} keys but {len(buffers)} buffers")
        self._check_keys(keys)
        ptrs, sizes = [], []
        for key, buf in zip(keys, buffers):
            ptr, nbytes = _span(buf)
            if not 0 < nbytes <= self.config.max_block_bytes:
                raise ValueError(f"block {key!r} is {nbytes} bytes; a KV pool block must be 1.."
                                 f"{self.config.max_block_bytes} bytes (max_block_bytes)")
            i = bisect.bisect_right(self._regions, ptr, key=lambda r: r[0]) - 1
            if i < 0 or ptr + nbytes > self._regions[i][1]:
                raise ValueError(f"block {key!r} is not inside memory registered with this KV pool "
                                 "client (register() it first)")
            ptrs.append(ptr)
            sizes.append(nbytes)
        return ptrs, sizes

    def _call(self, fn) -> list[int]:
        """Run one batch call under the fail-fast rule (contract 4)."""
        store = self._live_store()
        if self._down_until is not None:
            if time.monotonic() < self._down_until:
                raise KVPoolUnavailable(self._down_reason)
            if not can_connect(*self.config.master_host_port, self.config.connect_timeout_s):
                return self._mark_down("still not reachable")
        self.library_calls += 1
        codes = fn(store)
        if any(c in _UNAVAILABLE for c in codes):
            return self._mark_down(f"call failed (code {next(c for c in codes if c in _UNAVAILABLE)})")
        if self._down_until is not None:
            log.info("KV pool: master %s reachable again", self.config.master_address)
            self._down_until = None
        return codes

    def _mark_down(self, why: str):
        self._down_until = time.monotonic() + self.config.retry_interval_s
        self._down_reason = (f"KV pool master {self.config.master_address} unavailable ({why}); "
                             f"retrying after {self.config.retry_interval_s:g} s")
        log.warning("%s", self._down_reason)
        raise KVPoolUnavailable(self._down_reason)
