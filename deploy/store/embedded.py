"""The embedded control-plane store, its gRPC server, and the client for it.

A single-machine ``pdserve up`` keeps the store in the launcher process
(:class:`EmbeddedStore`), serves it with :class:`ControlPlaneServer`, and workers and
gateways in other processes reach it through :class:`RemoteStore`, which implements the
same :class:`~pdserve.deploy.store.base.ControlPlaneStore` interface over the
``pdserve.v1.ControlPlane`` gRPC service.

Error mapping on the wire: IncompatibleWorkerError <-> FAILED_PRECONDITION (with the
message; the field name travels in the ``pdserve-incompatible-field`` trailer), other
ValueError <-> INVALID_ARGUMENT, unset pool targets <-> NOT_FOUND, an unreachable or
stopped server -> StoreUnavailableError (a refused token too: UNAUTHENTICATED).

Authentication (``pdserve.proto.auth``): a server given a cluster secret (or finding one
in the environment) refuses calls without a valid token; one that would listen beyond
loopback without a secret refuses to start. RemoteStore signs its calls with the
secret it is given, else the environment's, else the local ``pdserve up``'s.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from typing import Callable

import grpc

from pdserve.proto import auth
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc

from ..credentials import client_secret
from .base import (
    DEFAULT_MAX_RETAINED_EVENTS,
    DEFAULT_READ_BATCH,
    ControlPlaneStore,
    IncompatibleWorkerError,
    KVEventBatch,
    StoreClosedError,
    StoreUnavailableError,
    check_compatible,
    cleared_event,
    event_payload,
    role_matches,
    validate_read,
    validate_ttl,
    validate_worker,
)

__all__ = ["EmbeddedStore", "ControlPlaneServer", "RemoteStore"]


class _Entry:
    __slots__ = ("info", "deadline")

    def __init__(self, info: pb.WorkerInfo, deadline: float):
        self.info = info
        self.deadline = deadline


def _copy(msg):
    out = type(msg)()
    out.CopyFrom(msg)
    return out


class EmbeddedStore(ControlPlaneStore):
    """In-memory, thread-safe store; TTLs run on a monotonic clock.

    ``clock`` (seconds, monotonic) is injectable for tests. Messages are copied in and
    out, so callers never share mutable state with the store.
    """

    def __init__(
        self,
        max_retained_events: int = DEFAULT_MAX_RETAINED_EVENTS,
        clock: Callable[[], float] = time.monotonic,
    ):
        if max_retained_events < 1:
            raise ValueError("max_retained_events must be >= 1")
        self._max_retained = int(max_retained_events)
        self._clock = clock
        self._lock = threading.RLock()
        self._workers: dict[str, _Entry] = {}
        # _events[i].seq == _events_base + i; entries before _first_retained() are
        # trimmed logically and dropped physically in amortized batches.
        self._events: list[pb.KVEvent] = []
        self._events_base = 1
        self._last_seq = 0
        self._pool_targets: bytes | None = None
        self._closed = False

    # -- internals (call with the lock held) ----------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError("EmbeddedStore is closed")

    def _append(self, event: pb.KVEvent) -> int:
        self._last_seq += 1
        event.seq = self._last_seq
        self._events.append(event)
        excess = len(self._events) - self._max_retained
        if excess > max(self._max_retained, 1024):
            del self._events[:excess]
            self._events_base += excess
        return self._last_seq

    def _first_retained(self) -> int:
        return max(self._events_base, self._last_seq - self._max_retained + 1)

    def _reap(self) -> int:
        now = self._clock()
        dead = [wid for wid, e in self._workers.items() if e.deadline <= now]
        for wid in sorted(dead):
            del self._workers[wid]
            self._append(cleared_event(wid))
        return len(dead)

    def _live(self, worker_id: str) -> _Entry | None:
        self._reap()
        return self._workers.get(worker_id)

    # -- ControlPlaneStore -------------------------------------------------------------

    def register(self, worker: pb.WorkerInfo, ttl_s: float) -> None:
        validate_worker(worker, ttl_s)
        with self._lock:
            self._check_open()
            self._reap()
            check_compatible(worker, (e.info for e in self._workers.values()))
            old = self._workers.get(worker.worker_id)
            if old is not None and old.info.started_at_ms != worker.started_at_ms:
                self._append(cleared_event(worker.worker_id))
            self._workers[worker.worker_id] = _Entry(_copy(worker), self._clock() + ttl_s)

    def heartbeat(self, worker_id: str, ttl_s: float) -> bool:
        validate_ttl(ttl_s)
        with self._lock:
            self._check_open()
            entry = self._live(worker_id)
            if entry is None:
                return False
            entry.deadline = self._clock() + ttl_s
            return True

    def deregister(self, worker_id: str) -> None:
        with self._lock:
            self._check_open()
            if self._live(worker_id) is not None:
                del self._workers[worker_id]
                self._append(cleared_event(worker_id))

    def list_workers(self, role: int | None = None) -> list[pb.WorkerInfo]:
        with self._lock:
            self._check_open()
            self._reap()
            return [
                _copy(self._workers[wid].info)
                for wid in sorted(self._workers)
                if role_matches(self._workers[wid].info.role, role)
            ]

    def get_worker(self, worker_id: str) -> pb.WorkerInfo | None:
        with self._lock:
            self._check_open()
            entry = self._live(worker_id)
            return None if entry is None else _copy(entry.info)

    def reap_expired(self) -> int:
        with self._lock:
            self._check_open()
            return self._reap()

    def publish_kv_events(self, worker_id: str, events: list[pb.KVEvent]) -> int:
        if not worker_id:
            raise ValueError("worker_id must be set")
        payloads = [event_payload(ev) for ev in events]  # validates all before appending
        with self._lock:
            self._check_open()
            self._reap()
            for raw in payloads:
                ev = pb.KVEvent.FromString(raw)
                ev.worker_id = worker_id
                self._append(ev)
            return self._last_seq

    def read_kv_events(self, after_seq: int = 0, max_events: int = DEFAULT_READ_BATCH) -> KVEventBatch:
        validate_read(after_seq, max_events)
        with self._lock:
            self._check_open()
            self._reap()
            first = self._first_retained()
            start = max(after_seq + 1, first) - self._events_base
            out = [_copy(ev) for ev in self._events[start : start + max_events]]
            return KVEventBatch(out, first, self._last_seq)

    def get_pool_targets(self) -> pb.PoolTargets | None:
        with self._lock:
            self._check_open()
            return None if self._pool_targets is None else pb.PoolTargets.FromString(self._pool_targets)

    def set_pool_targets(self, targets: pb.PoolTargets) -> None:
        if not isinstance(targets, pb.PoolTargets):
            raise TypeError(f"targets must be pdserve.v1.PoolTargets, not {type(targets).__name__}")
        with self._lock:
            self._check_open()
            self._pool_targets = targets.SerializeToString()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._workers.clear()
            self._events.clear()


# ------------------------------------------------------------------------ gRPC server

_FIELD_TRAILER = "pdserve-incompatible-field"


def _ms(ttl_s: float) -> int:
    validate_ttl(ttl_s)
    return max(1, int(round(ttl_s * 1000)))


class _Servicer(pb_grpc.ControlPlaneServicer):
    def __init__(self, store: ControlPlaneStore):
        self._store = store

    def _run(self, context, fn, *args):
        try:
            return fn(*args)
        except IncompatibleWorkerError as e:
            if e.field:
                context.set_trailing_metadata(((_FIELD_TRAILER, e.field),))
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except (ValueError, TypeError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except StoreClosedError as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))

    def Register(self, request, context):
        ttl_s = request.ttl_ms / 1000.0
        self._run(context, self._store.register, request.worker, ttl_s)
        return pb.RegisterResponse()

    def Heartbeat(self, request, context):
        known = self._run(context, self._store.heartbeat, request.worker_id, request.ttl_ms / 1000.0)
        return pb.HeartbeatResponse(known=known)

    def Deregister(self, request, context):
        self._run(context, self._store.deregister, request.worker_id)
        return pb.DeregisterResponse()

    def ListWorkers(self, request, context):
        workers = self._run(context, self._store.list_workers, request.role or None)
        return pb.ListWorkersResponse(workers=workers)

    def PublishKVEvents(self, request, context):
        last = self._run(context, self._store.publish_kv_events, request.worker_id, list(request.events))
        return pb.PublishKVEventsResponse(last_seq=last)

    def ReadKVEvents(self, request, context):
        max_events = request.max_events or DEFAULT_READ_BATCH
        batch = self._run(context, self._store.read_kv_events, request.after_seq, max_events)
        return pb.ReadKVEventsResponse(
            events=batch.events, first_available_seq=batch.first_available_seq, last_seq=batch.last_seq
        )

    def GetPoolTargets(self, request, context):
        targets = self._run(context, self._store.get_pool_targets)
        if targets is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "pool targets were never set")
        return targets

    def SetPoolTargets(self, request, context):
        self._run(context, self._store.set_pool_targets, request)
        return pb.SetPoolTargetsResponse()


class ControlPlaneServer:
    """Serves a store (by default a new :class:`EmbeddedStore`) as ``pdserve.v1.ControlPlane``.

    ::

        server = ControlPlaneServer()
        port = server.start()            # binds 127.0.0.1:0 unless told otherwise
        ... RemoteStore(server.address) in other processes ...
        server.stop()

    The server owns (and closes on :meth:`stop`) a store it created; a store passed in
    is left open. ``server.store`` is the backing store, for in-process use.
    ``cluster_secret`` (default: the environment's, ``pdserve.proto.auth.load_secret``)
    makes every call need a valid token; ``server.rejections`` counts refused ones.
    Without a secret only a loopback ``host`` is allowed (ValueError otherwise).
    """

    def __init__(
        self,
        store: ControlPlaneStore | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        max_workers: int = 16,
        cluster_secret: bytes | None = None,
    ):
        secret = cluster_secret if cluster_secret is not None else auth.load_secret()
        auth.require_secret_beyond_loopback(host, secret, "the control-plane server")
        self._interceptors = auth.server_interceptors(secret, "control-plane server", aio=False)
        #: Refused calls by reason (None without a secret: nothing is checked).
        self.rejections: auth.Rejections | None = self._interceptors[0].rejections if self._interceptors else None
        self._owns_store = store is None
        self.store: ControlPlaneStore = store if store is not None else EmbeddedStore()
        self._host = host
        self._requested_port = port
        self._max_workers = max_workers
        self._server: grpc.Server | None = None
        self.port: int | None = None

    @property
    def address(self) -> str:
        """``host:port`` clients connect to (after :meth:`start`)."""
        if self.port is None:
            raise RuntimeError("ControlPlaneServer is not started")
        return f"{self._host}:{self.port}"

    @property
    def url(self) -> str:
        """``grpc://host:port``, what :func:`pdserve.deploy.store.open_store` takes."""
        return f"grpc://{self.address}"

    def start(self) -> int:
        """Bind and start serving; returns the bound port."""
        if self._server is not None:
            raise RuntimeError("ControlPlaneServer already started")
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self._max_workers, thread_name_prefix="control-plane"),
            interceptors=self._interceptors,
        )
        pb_grpc.add_ControlPlaneServicer_to_server(_Servicer(self.store), server)
        port = server.add_insecure_port(f"{self._host}:{self._requested_port}")
        if port == 0:
            raise OSError(f"could not bind the control-plane server to {self._host}:{self._requested_port}")
        server.start()
        self._server, self.port = server, port
        return port

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop serving (idempotent); closes the store if the server created it."""
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None
        if self._owns_store:
            self.store.close()

    def __enter__(self):
        if self._server is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ------------------------------------------------------------------------ gRPC client


class RemoteStore(ControlPlaneStore):
    """:class:`ControlPlaneStore` over the ControlPlane gRPC service of a :class:`ControlPlaneServer`.

    ``address`` is ``host:port`` or ``grpc://host:port``. Every call has a deadline of
    ``timeout_s``; an unreachable server raises :class:`StoreUnavailableError`.
    ``get_worker`` is served by ListWorkers (the service has no single-worker call).
    Calls are signed with ``cluster_secret``, else the environment's or the local
    ``pdserve up``'s (``pdserve.deploy.credentials.client_secret``), if any.
    """

    def __init__(self, address: str, timeout_s: float = 5.0, cluster_secret: bytes | None = None):
        if address.startswith("grpc://"):
            address = address[len("grpc://") :]
        address = address.rstrip("/")
        if not address or ":" not in address:
            raise ValueError(f"control-plane address must be host:port, got {address!r}")
        self.address = address
        self._timeout = timeout_s
        self._channel = auth.insecure_channel(address, client_secret(cluster_secret))
        self._stub = pb_grpc.ControlPlaneStub(self._channel)
        self._closed = False
        self._lock = threading.Lock()

    def _call(self, method: str, request, *, not_found_ok: bool = False):
        if self._closed:
            raise StoreClosedError("RemoteStore is closed")
        try:
            return getattr(self._stub, method)(request, timeout=self._timeout)
        except grpc.RpcError as e:
            code = e.code()
            details = e.details() or ""
            if code == grpc.StatusCode.FAILED_PRECONDITION:
                field = dict(e.trailing_metadata() or ()).get(_FIELD_TRAILER)
                raise IncompatibleWorkerError(details, field=field) from None
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise ValueError(details) from None
            if code == grpc.StatusCode.NOT_FOUND and not_found_ok:
                return None
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise StoreUnavailableError(
                    f"control-plane server {self.address} unreachable ({code.name}): {details}"
                ) from None
            raise StoreUnavailableError(f"control-plane call {method} failed ({code.name}): {details}") from None

    def register(self, worker: pb.WorkerInfo, ttl_s: float) -> None:
        validate_worker(worker, ttl_s)
        self._call("Register", pb.RegisterRequest(worker=worker, ttl_ms=_ms(ttl_s)))

    def heartbeat(self, worker_id: str, ttl_s: float) -> bool:
        return self._call("Heartbeat", pb.HeartbeatRequest(worker_id=worker_id, ttl_ms=_ms(ttl_s))).known

    def deregister(self, worker_id: str) -> None:
        self._call("Deregister", pb.DeregisterRequest(worker_id=worker_id))

    def list_workers(self, role: int | None = None) -> list[pb.WorkerInfo]:
        resp = self._call("ListWorkers", pb.ListWorkersRequest(role=role or pb.ROLE_UNSPECIFIED))
        return list(resp.workers)

    def get_worker(self, worker_id: str) -> pb.WorkerInfo | None:
        for w in self.list_workers():
            if w.worker_id == worker_id:
                return w
        return None

    def reap_expired(self) -> int:
        self._call("ListWorkers", pb.ListWorkersRequest())  # the server reaps on every call
        return 0

    def publish_kv_events(self, worker_id: str, events: list[pb.KVEvent]) -> int:
        if not worker_id:
            raise ValueError("worker_id must be set")
        for ev in events:
            event_payload(ev)  # same validation as the server, before sending
        resp = self._call("PublishKVEvents", pb.PublishKVEventsRequest(worker_id=worker_id, events=events))
        return resp.last_seq

    def read_kv_events(self, after_seq: int = 0, max_events: int = DEFAULT_READ_BATCH) -> KVEventBatch:
        validate_read(after_seq, max_events)
        resp = self._call(
            "ReadKVEvents", pb.ReadKVEventsRequest(after_seq=after_seq, max_events=min(max_events, 2**32 - 1))
        )
        return KVEventBatch(list(resp.events), resp.first_available_seq, resp.last_seq)

    def get_pool_targets(self) -> pb.PoolTargets | None:
        return self._call("GetPoolTargets", pb.GetPoolTargetsRequest(), not_found_ok=True)

    def set_pool_targets(self, targets: pb.PoolTargets) -> None:
        if not isinstance(targets, pb.PoolTargets):
            raise TypeError(f"targets must be pdserve.v1.PoolTargets, not {type(targets).__name__}")
        self._call("SetPoolTargets", targets)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._channel.close()
