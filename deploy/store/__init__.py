"""The control-plane store: worker registry, KV event stream, pool targets.

``open_store(url)`` picks the backend:

* ``None`` / ``""`` / ``"embedded"`` -> :class:`EmbeddedStore` (in this process),
* ``"grpc://host:port"`` -> :class:`RemoteStore` (a :class:`ControlPlaneServer`),
* ``"redis://..."``, ``"rediss://..."``, ``"unix://..."`` -> :class:`RedisStore`.

See :mod:`pdserve.deploy.store.base` for the interface and its invariants.
"""

from __future__ import annotations

from .base import (
    DEFAULT_MAX_RETAINED_EVENTS,
    ControlPlaneStore,
    IncompatibleWorkerError,
    KVEventBatch,
    StoreClosedError,
    StoreError,
    StoreUnavailableError,
)
from .embedded import ControlPlaneServer, EmbeddedStore, RemoteStore

__all__ = [
    "ControlPlaneServer",
    "ControlPlaneStore",
    "DEFAULT_MAX_RETAINED_EVENTS",
    "EmbeddedStore",
    "IncompatibleWorkerError",
    "KVEventBatch",
    "RedisStore",
    "RemoteStore",
    "StoreClosedError",
    "StoreError",
    "StoreUnavailableError",
    "open_store",
]


def __getattr__(name: str):
    # RedisStore imports the redis package; only pay for it when used.
    if name == "RedisStore":
        from .redis_store import RedisStore

        return RedisStore
    raise AttributeError(name)


def open_store(url: str | None = None, *, cluster_secret: bytes | None = None, password: str | None = None,
               **kwargs) -> ControlPlaneStore:
    """Open the store ``url`` names (see the module docstring); ``kwargs`` go to the backend.

    Credentials go where they apply and are ignored elsewhere: ``cluster_secret`` signs
    a RemoteStore's calls (default: the environment's or the local ``pdserve up``'s),
    ``password`` is a RedisStore's when its URL has none (default: the environment's).
    ``max_retained_events`` is accepted by EmbeddedStore and RedisStore, ``namespace``
    by RedisStore, ``timeout_s`` by RemoteStore.
    """
    if url is None or url == "" or url == "embedded":
        return EmbeddedStore(**kwargs)
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "grpc":
        return RemoteStore(url, cluster_secret=cluster_secret, **kwargs)
    if scheme in ("redis", "rediss", "unix"):
        from .redis_store import RedisStore

        return RedisStore(url, password=password, **kwargs)
    from ..credentials import redact  # noqa: PLC0415

    raise ValueError(f"unknown control-plane store URL {redact(url)!r}: use redis://..., grpc://host:port or none")
