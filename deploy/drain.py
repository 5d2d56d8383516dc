"""Leaving the cluster without failing a request: a worker's drain.

A worker asked to stop gracefully (SIGTERM, or ``pdserve scale`` lowering its pool)

1. re-registers with ``draining=True``: gateways stop routing new requests to it at
   their next refresh (``GatewayConfig.refresh_interval_s``, 0.5 s by default), while
   decode workers can still look it up as a prefill peer;
2. keeps serving: what it runs finishes, and calls that arrive late (a gateway that
   routed just before the flag, a decode worker whose prefill hop was queued behind
   KV admission) are served too;
3. once ``grace_s`` passed since the mark and nothing is in flight, it *closes*: new
   ``Generate``/``Prefill`` calls are refused with ``UNAVAILABLE`` "draining" before
   any work starts, which the callers treat as "go elsewhere" (the gateway retries
   another decode worker; a decode worker prefills the prompt itself);
4. stops the server, deregisters and exits.

``timeout_s`` bounds the whole drain: past it the worker stops anyway and what is
still running fails with an explicit error (never silently).

:class:`Activity` is the gRPC server interceptor that counts the calls in flight and
refuses new ones once closed. Only ``Generate`` and ``Prefill`` count: ``Stats``,
``Abort`` and health checks keep working to the end.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import grpc

log = logging.getLogger("pdserve.worker")

#: The calls that are work: they count as in flight, and are refused once closed.
WORK_METHODS = frozenset({"/pdserve.v1.Decode/Generate", "/pdserve.v1.Prefill/Prefill"})
#: The status details a closed worker refuses with (callers may match on it).
DRAINING = "worker is draining"


class Activity(grpc.aio.ServerInterceptor):
    """Counts in-flight work calls; once :meth:`close` d, refuses new ones."""

    def __init__(self) -> None:
        self.num_inflight = 0
        self.is_closed = False
        self._idle = asyncio.Event()
        self._idle.set()

    def close(self) -> None:
        self.is_closed = True

    async def wait_idle(self, timeout_s: float) -> bool:
        """True once nothing is in flight (False if ``timeout_s`` passed first)."""
        try:
            await asyncio.wait_for(self._idle.wait(), max(timeout_s, 0.0))
            return True
        except asyncio.TimeoutError:
            return False

    def _begin(self) -> None:
        self.num_inflight += 1
        self._idle.clear()

    def _end(self) -> None:
        self.num_inflight -= 1
        if self.num_inflight == 0:
            self._idle.set()

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or details.method not in WORK_METHODS:
            return handler
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary),
                request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream),
                request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        return handler

    def _wrap_unary(self, behavior):
        async def unary(request, context):
            if self.is_closed:
                await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING)
            self._begin()
            try:
                return await behavior(request, context)
            finally:
                self._end()
        return unary

    def _wrap_stream(self, behavior):
        async def stream(request, context):
            if self.is_closed:
                await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING)
            self._begin()
            try:
                async for msg in behavior(request, context):
                    yield msg
            finally:
                self._end()
        return stream


class Shutdown:
    """How a worker's ``serve`` is asked to end.

    ``request(drain=True)`` starts a graceful drain; ``request(drain=False)`` (or a
    second request of any kind) stops now. Thread-safe through the loop it belongs to.
    """

    def __init__(self) -> None:
        self.requested = asyncio.Event()
        self.now = asyncio.Event()

    def request(self, drain: bool = True) -> None:
        if self.requested.is_set() or not drain:
            self.now.set()
        self.requested.set()


@dataclass(frozen=True)
class DrainPolicy:
    #: Seconds to keep accepting after the draining mark: longer than the gateways'
    #: refresh interval, so a request routed on a stale view still finds the worker.
    grace_s: float = 1.5
    #: Upper bound on the whole drain; past it, what still runs is cancelled.
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if not (self.grace_s >= 0):
            raise ValueError(f"drain grace must be >= 0 seconds, got {self.grace_s!r}")
        if not (self.timeout_s >= self.grace_s):
            raise ValueError(f"drain timeout ({self.timeout_s!r} s) must be >= the grace ({self.grace_s!r} s)")


async def drain(activity: Activity, policy: DrainPolicy, mark_draining: Callable[[], Awaitable[None]]) -> bool:
    """Steps 1-3 of the module docstring. True if it closed with nothing in flight."""
    t0 = time.monotonic()
    try:
        await mark_draining()
    except Exception as e:  # noqa: BLE001 - still drain: the TTL or deregister removes the entry
        log.warning("could not mark the worker draining in the store: %s", e)
    await asyncio.sleep(policy.grace_s)
    while True:
        left = policy.timeout_s - (time.monotonic() - t0)
        if not await activity.wait_idle(left):
            log.warning("drain timed out after %.0f s with %d calls in flight; stopping anyway",
                        policy.timeout_s, activity.num_inflight)
            activity.close()
            return False
        # Closing is atomic with the idle check (one event loop): nothing starts in between.
        if activity.num_inflight == 0:
            activity.close()
            log.info("drained in %.1f s", time.monotonic() - t0)
            return True
