"""The gateway's view of the workers: the registry from the control-plane store, one gRPC
channel per worker, the back-off of workers that refused or broke a call, the load the
router weighs (their Stats), and the KV events that feed its prefix index.

A background task refreshes the worker list every ``refresh_interval_s`` (the store
client is blocking, so it runs in a thread); another polls Stats every
``stats_interval_s``. Draining workers keep their channels (their streams run on) but get
no new requests; a worker that answered UNAVAILABLE or broke a stream gets none for
``unavailable_backoff_s`` unless it re-registers as a new incarnation sooner.
``generation.Generation`` routes and opens its calls through a pool; the pool knows
nothing of requests. Nothing here imports torch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import grpc

from pdserve.proto import auth
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc

from .events import EventFollower, PlacementPublisher
from .metrics import GatewayMetrics

if TYPE_CHECKING:
    from .gateway import GatewayConfig

log = logging.getLogger("pdserve.gateway")

CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20)]
"""A first message carrying a long prompt's logprobs (k + 1 per prompt token) outgrows
gRPC's default 4 MiB."""

PREFILL_ROLES = (pb.PREFILL, pb.BOTH)
DECODE_ROLES = (pb.DECODE, pb.BOTH)


class WorkerPool:
    """The registered workers, their channels and back-off, and the router fed from them."""

    def __init__(self, config: GatewayConfig, router: Any, metrics: GatewayMetrics) -> None:
        self.config = config
        self.router = router
        self.metrics = metrics
        self.workers: dict[str, pb.WorkerInfo] = {}
        self._store = None
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._tasks: list[asyncio.Task] = []
        self._follower = None
        self._publisher: PlacementPublisher | None = None
        self._refresh_failing = False
        #: address -> monotonic time it was first missing from the registry (its channel kept)
        self._vanished: dict[str, float] = {}
        #: worker_id -> (started_at_ms, monotonic time until which it gets no new requests)
        self._unavailable: dict[str, tuple[int, float]] = {}

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        from pdserve.deploy.store import open_store  # noqa: PLC0415 - redis is imported only when used

        self._store = await asyncio.to_thread(open_store, self.config.store_url,
                                              cluster_secret=self.config.cluster_secret)
        await self.refresh()
        self._tasks.append(asyncio.create_task(self._refresh_loop(), name="gateway-refresh"))
        if self.config.stats_interval_s > 0 and hasattr(self.router, "update_load"):
            self._tasks.append(asyncio.create_task(self._stats_loop(), name="gateway-stats"))
        await self._start_event_follower()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._follower is not None:
            await asyncio.to_thread(self._follower.stop)
        if self._publisher is not None:
            await asyncio.to_thread(self._publisher.stop)
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        if self._store is not None:
            self._store.close()

    async def _start_event_follower(self) -> None:
        """Feed the router's prefix index from the store's KV events (the workers', and
        the other gateways' placements), and publish this router's placements."""
        index = getattr(self.router, "index", None)
        if index is None:
            return
        origin = getattr(self.router, "origin", None)
        self._follower = EventFollower(self._store, index, origin=origin,
                                       on_pending=getattr(self.router, "note_placement", None))
        self._follower.start(self.config.events_interval_s)
        if origin is not None:
            self._publisher = PlacementPublisher(self._store, self.router)
            self._publisher.start()

    # -- the worker view ----------------------------------------------------------------

    async def refresh(self) -> None:
        try:
            workers = await asyncio.to_thread(self._store.list_workers)
        except Exception as e:  # noqa: BLE001 - keep the last known view; retried next interval
            if not self._refresh_failing:
                log.warning("listing workers failed (keeping the last known %d): %s", len(self.workers), e)
            self._refresh_failing = True
            return
        self._refresh_failing = False
        # Draining workers keep their channels (their streams run on) but get no new requests.
        self.workers = {w.worker_id: w for w in workers}
        self._update_router()
        for w in workers:
            if w.kv_layout.block_size and w.kv_layout.block_size != self.config.block_size:
                log.warning("worker %s uses block_size %d, the gateway %d: prefix routing will miss",
                            w.worker_id, w.kv_layout.block_size, self.config.block_size)
        routable = [w for w in workers if not w.draining]
        self.metrics.workers.labels("prefill").set(sum(w.role in PREFILL_ROLES for w in routable))
        self.metrics.workers.labels("decode").set(sum(w.role in DECODE_ROLES for w in routable))
        # A vanished worker's channel stays open while a stream may still run on it (the
        # registry can empty out from under live workers: a store restarted empty); closing
        # it would cancel those streams. It is closed once absent for a request's lifetime.
        now = time.monotonic()
        addresses = {w.address for w in workers}
        for address in addresses:
            self._vanished.pop(address, None)
        for address in [a for a in self._channels if a not in addresses]:
            since = self._vanished.setdefault(address, now)
            if now - since > self.config.request_timeout_s:
                del self._vanished[address]
                await self._channels.pop(address).close()

    def _update_router(self) -> None:
        now = time.monotonic()
        for wid, (started_at_ms, until) in list(self._unavailable.items()):
            w = self.workers.get(wid)
            if now >= until or w is None or w.started_at_ms != started_at_ms:
                del self._unavailable[wid]
        live = [w for w in self.workers.values() if not w.draining]
        routable = [w for w in live if w.worker_id not in self._unavailable]
        if not any(w.role in DECODE_ROLES for w in routable):
            routable = live  # a suspect worker beats none: its call fails or it recovered
        self.router.update_workers(routable)

    def metrics_targets(self) -> list[dict[str, Any]]:
        """The workers' Prometheus endpoints in ``http_sd_configs`` form."""
        out = []
        for w in sorted(self.workers.values(), key=lambda w: w.worker_id):
            if not w.metrics_url:
                continue
            url = urlsplit(w.metrics_url)
            out.append({"targets": [url.netloc], "labels": {
                "__metrics_path__": url.path or "/metrics", "worker_id": w.worker_id,
                "role": pb.Role.Name(w.role).lower(), "draining": str(w.draining).lower()}})
        return out

    def mark_unavailable(self, worker_id: str) -> None:
        """A worker refused a call (UNAVAILABLE) or broke a stream: route around it for a while."""
        w = self.workers.get(worker_id)
        if w is not None:
            self._unavailable[worker_id] = (w.started_at_ms, time.monotonic() + self.config.unavailable_backoff_s)
            self._update_router()

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.refresh_interval_s)
            await self.refresh()

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.stats_interval_s)
            await asyncio.gather(*(self._poll_stats(w) for w in list(self.workers.values())))

    async def _poll_stats(self, worker: pb.WorkerInfo) -> None:
        channel = self.channel(worker.address)
        stub = pb_grpc.DecodeStub(channel) if worker.role in DECODE_ROLES else pb_grpc.PrefillStub(channel)
        try:
            stats = await stub.Stats(pb.StatsRequest(), timeout=1.0)
        except grpc.aio.AioRpcError as e:
            log.debug("Stats of %s failed: %s", worker.worker_id, e.code().name)
            return
        self.router.update_load(worker.worker_id, stats)

    async def ready(self) -> dict[str, Any]:
        """``{"ready": bool, "prefill": n, "decode": n}`` from a fresh look at the store."""
        try:
            workers = await asyncio.wait_for(asyncio.to_thread(self._store.list_workers), timeout=5.0)
        except Exception as e:  # noqa: BLE001 - not ready is the answer
            return {"ready": False, "prefill": 0, "decode": 0, "reason": f"control-plane store: {e}"}
        workers = [w for w in workers if not w.draining]
        num_prefill = sum(w.role in PREFILL_ROLES for w in workers)
        num_decode = sum(w.role in DECODE_ROLES for w in workers)
        # Decode workers alone serve (they prefill locally); prefill workers alone cannot.
        return {"ready": num_decode >= 1, "prefill": num_prefill, "decode": num_decode}

    def channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = auth.aio_insecure_channel(address, self.config.cluster_secret,
                                                                          options=CHANNEL_OPTIONS)
        return channel


__all__ = ["CHANNEL_OPTIONS", "DECODE_ROLES", "PREFILL_ROLES", "WorkerPool"]
