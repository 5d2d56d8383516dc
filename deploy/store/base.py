"""The control-plane store interface: worker registry, KV event stream, pool targets.

One interface (:class:`ControlPlaneStore`), one contract test suite
(``tests/integration/test_store_contract.py``), three implementations:

* :class:`~pdserve.deploy.store.redis_store.RedisStore` -- multi-node clusters and
  several gateway replicas; all state lives in Redis, so any number of store objects in
  any number of processes agree.
* :class:`~pdserve.deploy.store.embedded.EmbeddedStore` -- in-memory, for a single
  ``pdserve up``; the launcher hosts it and serves it over gRPC
  (:class:`~pdserve.deploy.store.embedded.ControlPlaneServer`).
* :class:`~pdserve.deploy.store.embedded.RemoteStore` -- the gRPC client of that server,
  used by workers and gateways in other processes.

Invariants every backend keeps (the contract suite checks each):

* **Registry.** Live workers are pairwise compatible: same protocol version (equal to
  :data:`pdserve.proto.PROTOCOL_VERSION` of the store), same model identity, same KV
  layout except ``tp_size``. A worker entry lives until its TTL lapses without a
  heartbeat, or it deregisters.
* **Leaving is visible.** Whenever a worker's KV cache stops being what it published --
  it expired, deregistered, or re-registered with a different ``started_at_ms`` (a
  restart) -- exactly one ``AllBlocksCleared`` KV event for it is appended to the stream,
  so every reader (the router's prefix index) drops that worker's entries.
* **KV events.** Every event gets a global sequence number; numbers are consecutive
  (1, 2, 3, ...) across all publishers. The stream keeps the most recent
  ``max_retained_events`` events; older ones are trimmed.
* **Wire format.** Protobuf messages are stored and sent with ``SerializeToString`` /
  ``FromString`` only; nothing is pickled.

Expiry is lazy: every method first removes expired entries (emitting their cleared
events) -- ``reap_expired()`` does only that. A reader polling ``read_kv_events`` or
``list_workers`` therefore sees departures within one TTL plus its polling interval.
"""

from __future__ import annotations

import abc
from typing import Iterable, NamedTuple

from pdserve.proto import PROTOCOL_VERSION
from pdserve.proto import pdserve_pb2 as pb

#: Default number of KV events a stream retains.
DEFAULT_MAX_RETAINED_EVENTS = 100_000
#: Default page size of :meth:`ControlPlaneStore.read_kv_events`.
DEFAULT_READ_BATCH = 1000


class StoreError(Exception):
    """Base class of the store's own errors (besides ``ValueError`` for bad input)."""


class StoreUnavailableError(StoreError, ConnectionError):
    """The backing service (Redis, the control-plane server) could not be reached."""


class StoreClosedError(StoreError):
    """The store object was used after :meth:`ControlPlaneStore.close`."""


class IncompatibleWorkerError(ValueError):
    """A worker was refused at registration: it cannot work with the registered ones.

    ``field`` names the first mismatching field (e.g. ``"kv_layout.block_size"``,
    ``"model.weights_digest"``, ``"protocol_version"``); the message names the field,
    the worker's value and the value the cluster has.
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class KVEventBatch(NamedTuple):
    """Result of :meth:`ControlPlaneStore.read_kv_events`."""

    events: list[pb.KVEvent]
    #: Sequence number of the oldest event still retained (``last_seq + 1`` when the
    #: stream is empty). ``first_available_seq > after_seq + 1`` means events the
    #: reader never saw were trimmed: it must resync.
    first_available_seq: int
    #: Sequence number of the newest event ever appended (0: none yet).
    last_seq: int

    def gap(self, after_seq: int) -> bool:
        """True when a reader that had seen up to ``after_seq`` must resync.

        Either events after ``after_seq`` were trimmed, or the stream restarted from
        scratch (``last_seq < after_seq``, e.g. the Redis server lost its data).
        """
        return self.first_available_seq > after_seq + 1 or self.last_seq < after_seq


# --------------------------------------------------------------------------- helpers


#: Fields that must match between all registered workers (dotted WorkerInfo paths).
#: ``kv_layout.tp_size`` is deliberately absent: the KV transfer re-shards across TP.
COMPAT_FIELDS: tuple[str, ...] = (
    "protocol_version",
    "model.name",
    "model.architecture",
    "model.weights_digest",
    "model.vocab_size",
    "kv_layout.layout",
    "kv_layout.num_layers",
    "kv_layout.num_kv_heads",
    "kv_layout.head_dim",
    "kv_layout.block_size",
    "kv_layout.dtype",
)


def _field(worker: pb.WorkerInfo, path: str):
    value = worker
    for part in path.split("."):
        value = getattr(value, part)
    return value


def compat_values(worker: pb.WorkerInfo) -> tuple:
    """The values of :data:`COMPAT_FIELDS` of ``worker``, in that order."""
    return tuple(_field(worker, f) for f in COMPAT_FIELDS)


def compat_signature(worker: pb.WorkerInfo) -> bytes:
    """A canonical byte string equal for two workers iff they are compatible.

    Built field by field (length-prefixed), so it does not depend on protobuf's
    serialization order or on fields outside :data:`COMPAT_FIELDS`.
    """
    parts = []
    for value in compat_values(worker):
        raw = str(value).encode("utf-8")
        parts.append(b"%d:%s" % (len(raw), raw))
    return b"|".join(parts)


def validate_worker(worker: pb.WorkerInfo, ttl_s: float) -> None:
    """Input checks for :meth:`ControlPlaneStore.register`; raises ``ValueError``.

    Also refuses a protocol version other than this process's PROTOCOL_VERSION
    (:class:`IncompatibleWorkerError`).
    """
    if not isinstance(worker, pb.WorkerInfo):
        raise TypeError(f"worker must be a pdserve.v1.WorkerInfo, not {type(worker).__name__}")
    if not worker.worker_id:
        raise ValueError("worker.worker_id must be set")
    if worker.role == pb.ROLE_UNSPECIFIED:
        raise ValueError(f"worker {worker.worker_id!r}: role must be PREFILL, DECODE or BOTH")
    validate_ttl(ttl_s)
    if worker.protocol_version != PROTOCOL_VERSION:
        raise IncompatibleWorkerError(
            f"worker {worker.worker_id!r} is incompatible: protocol_version is "
            f"{worker.protocol_version}, this control plane speaks {PROTOCOL_VERSION}",
            field="protocol_version",
        )


def validate_ttl(ttl_s: float) -> None:
    if not (isinstance(ttl_s, (int, float)) and 0 < ttl_s <= 86_400 * 7):
        raise ValueError(f"ttl_s must be a number of seconds in (0, 604800], got {ttl_s!r}")


def check_compatible(worker: pb.WorkerInfo, registered: Iterable[pb.WorkerInfo]) -> None:
    """Raise :class:`IncompatibleWorkerError` if ``worker`` mismatches any of ``registered``.

    Entries with the same ``worker_id`` are skipped (re-registering replaces them).
    The message lists every mismatching field with both values.
    """
    mine = compat_values(worker)
    for other in registered:
        if other.worker_id == worker.worker_id:
            continue
        theirs = compat_values(other)
        diffs = [(f, a, b) for f, a, b in zip(COMPAT_FIELDS, mine, theirs) if a != b]
        if diffs:
            detail = "; ".join(f"{f} is {a!r}, registered worker has {b!r}" for f, a, b in diffs)
            raise IncompatibleWorkerError(
                f"worker {worker.worker_id!r} is incompatible with registered worker "
                f"{other.worker_id!r}: {detail}",
                field=diffs[0][0],
            )


def role_matches(worker_role: int, wanted: int | None) -> bool:
    """Whether a worker of ``worker_role`` serves a ``list_workers(role=wanted)`` query.

    ``None``/``ROLE_UNSPECIFIED``: every worker. ``PREFILL`` and ``DECODE`` also match
    ``BOTH`` workers; ``BOTH`` matches only ``BOTH``.
    """
    if wanted is None or wanted == pb.ROLE_UNSPECIFIED:
        return True
    if worker_role == wanted:
        return True
    return worker_role == pb.BOTH and wanted in (pb.PREFILL, pb.DECODE)


def cleared_event(worker_id: str, seq: int = 0) -> pb.KVEvent:
    """An ``AllBlocksCleared`` event for ``worker_id``."""
    return pb.KVEvent(seq=seq, worker_id=worker_id, cleared=pb.AllBlocksCleared())


def event_payload(event: pb.KVEvent) -> bytes:
    """``event`` serialized without ``seq`` and ``worker_id`` (the store assigns both)."""
    if not isinstance(event, pb.KVEvent):
        raise TypeError(f"events must be pdserve.v1.KVEvent, not {type(event).__name__}")
    if event.WhichOneof("event") is None:
        raise ValueError("a KVEvent must carry one of stored / removed / cleared / pending")
    stripped = pb.KVEvent()
    stripped.CopyFrom(event)
    stripped.ClearField("seq")
    stripped.ClearField("worker_id")
    return stripped.SerializeToString()


def validate_read(after_seq: int, max_events: int) -> None:
    if not isinstance(after_seq, int) or after_seq < 0:
        raise ValueError(f"after_seq must be an int >= 0, got {after_seq!r}")
    if not isinstance(max_events, int) or max_events < 1:
        raise ValueError(f"max_events must be an int >= 1, got {max_events!r}")


# ------------------------------------------------------------------------- interface


class ControlPlaneStore(abc.ABC):
    """Worker registry with TTLs, the global KV event stream, and pool targets.

    Implementations are thread-safe. Methods raise :class:`StoreUnavailableError` when
    the backing service cannot be reached and :class:`StoreClosedError` after
    :meth:`close`. See the module docstring for the invariants.
    """

    # -- registry -----------------------------------------------------------------

    @abc.abstractmethod
    def register(self, worker: pb.WorkerInfo, ttl_s: float) -> None:
        """Register (or replace) ``worker``; it stays live for ``ttl_s`` seconds.

        Refuses, with :class:`IncompatibleWorkerError` and nothing registered, a worker
        whose ``protocol_version`` differs from ``PROTOCOL_VERSION`` or which differs
        from any live worker in model identity (name, architecture, weights_digest,
        vocab_size) or KV layout (layout, num_layers, num_kv_heads, head_dim,
        block_size, dtype). ``kv_layout.tp_size`` may differ. The check and the
        registration are atomic: two incompatible workers racing cannot both get in.
        Raises ``ValueError`` for an empty ``worker_id``, an unset role or a bad TTL.

        Re-registering a ``worker_id`` that is live replaces its entry (and its TTL).
        If ``started_at_ms`` differs from the live entry's, the worker restarted and
        its cache is gone: one ``AllBlocksCleared`` event for it is appended. The same
        ``started_at_ms`` (a retry, or re-registering after ``heartbeat`` returned
        False) appends nothing.
        """

    @abc.abstractmethod
    def heartbeat(self, worker_id: str, ttl_s: float) -> bool:
        """Extend ``worker_id``'s entry to live ``ttl_s`` seconds from now.

        Returns False (and changes nothing) if the entry is unknown or already expired:
        the worker must :meth:`register` again. An expired entry's cleared event has
        been emitted by then, so a worker re-registering after False should republish
        what it wants indexed.
        """

    @abc.abstractmethod
    def deregister(self, worker_id: str) -> None:
        """Remove ``worker_id`` and append one ``AllBlocksCleared`` event for it.

        A no-op (no event) when the worker is not registered.
        """

    @abc.abstractmethod
    def list_workers(self, role: int | None = None) -> list[pb.WorkerInfo]:
        """Live workers, sorted by ``worker_id``.

        ``role`` None or ``ROLE_UNSPECIFIED``: all of them; ``PREFILL`` / ``DECODE``:
        those with that role *or* ``BOTH``; ``BOTH``: only ``BOTH`` workers.
        Expired entries never appear.
        """

    @abc.abstractmethod
    def get_worker(self, worker_id: str) -> pb.WorkerInfo | None:
        """The live entry of ``worker_id``, or None (unknown or expired)."""

    def reap_expired(self) -> int:
        """Remove entries whose TTL lapsed, appending one cleared event for each.

        Idempotent; every other method does this first, so calling it is only needed
        to make departures visible without reading anything. Returns how many entries
        this call removed (0 where the backend cannot tell).
        """
        return 0

    # -- KV events ----------------------------------------------------------------

    @abc.abstractmethod
    def publish_kv_events(self, worker_id: str, events: list[pb.KVEvent]) -> int:
        """Append ``events`` of ``worker_id`` to the stream, in order; atomic.

        Each event gets the next global sequence number (consecutive, also across
        concurrent publishers in any process) and ``worker_id``; the ``seq`` and
        ``worker_id`` fields of the given events are ignored. Every event must set one
        of ``stored`` / ``removed`` / ``cleared`` (``ValueError`` otherwise, nothing
        appended). Returns the sequence number of the last appended event, or the
        current last sequence number when ``events`` is empty.
        """

    @abc.abstractmethod
    def read_kv_events(self, after_seq: int = 0, max_events: int = DEFAULT_READ_BATCH) -> KVEventBatch:
        """Up to ``max_events`` retained events with ``seq > after_seq``, oldest first.

        Returns ``(events, first_available_seq, last_seq)``. A reader keeps the seq of
        the last event it applied and passes it as ``after_seq`` next time (0 at
        start); it has everything when ``events`` is empty or its seq reaches
        ``last_seq``.

        **Resync.** The stream is bounded: if ``first_available_seq > after_seq + 1``,
        events the reader never saw were trimmed (it fell behind by more than the
        retention). Likewise ``last_seq < after_seq`` means the stream started over
        (e.g. a Redis server that lost its data). In both cases (see
        :meth:`KVEventBatch.gap`) the reader must drop its whole index and rebuild it
        from the events it reads from now on (the returned ones included); entries it
        misses are re-learnt as workers store blocks again.
        """

    # -- pool targets -------------------------------------------------------------

    @abc.abstractmethod
    def get_pool_targets(self) -> pb.PoolTargets | None:
        """The desired pool sizes last set, or None if never set."""

    @abc.abstractmethod
    def set_pool_targets(self, targets: pb.PoolTargets) -> None:
        """Replace the desired pool sizes."""

    # -- lifecycle ----------------------------------------------------------------

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections. Idempotent; afterwards methods raise StoreClosedError.

        Closing a client (RedisStore, RemoteStore) leaves the shared state as it is;
        closing an EmbeddedStore discards it.
        """

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
