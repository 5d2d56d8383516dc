"""Prometheus ``/metrics`` for one worker.

Each worker serves its own figures over HTTP, bound to the same host as its gRPC
server (loopback by default): queue depth, running requests, KV blocks, prefix-cache
hit and query tokens, and the KV transfer counters its Prefill/Decode services keep.
Every sample carries the worker's ``worker_id`` and ``role`` as labels.

Engine figures are only safe to read on the engine thread (``aengine.call``), which a
scrape, running on the HTTP server's thread, cannot await. So a task on the worker's
event loop refreshes a snapshot every ``interval_s`` and the collector reads that
snapshot; engine figures are at most ``interval_s`` old. The transfer counters are
plain protobuf scalars on the services and are read at scrape time.

A private :class:`CollectorRegistry` per worker keeps several workers in one process
(tests, Ray actors sharing a process) from colliding in the global registry.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from typing import Any, Iterable

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("pdserve.worker.metrics")

PREFIX = "pdserve"

#: Transfer direction of each service's counters: a prefill service sends KV, a
#: decode service receives it (a "both" worker may do either).
DIRECTIONS = {"prefill": "send", "decode": "receive"}


class WorkerCollector(Collector):
    """Reads the latest engine snapshot and the services' transfer counters at scrape time."""

    def __init__(self, worker_id: str, role: str, transfers: dict[str, Any]) -> None:
        """``transfers`` maps a service kind ("prefill"/"decode") to the object whose
        ``transfers`` attribute holds its counters (a ``pb.StatsResponse``)."""
        self.worker_id = worker_id
        self.role = role
        self.transfers = transfers
        self.snapshot: dict[str, int] | None = None
        self.snapshot_time: float | None = None  # time.monotonic() of the last refresh

    def update(self, stats: Any) -> None:
        self.snapshot = dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else dict(stats)
        self.snapshot_time = time.monotonic()

    def collect(self) -> Iterable:
        labels = ["worker_id", "role"]
        values = [self.worker_id, self.role]

        info = GaugeMetricFamily(f"{PREFIX}_worker_info", "Worker identity (always 1).", labels=labels)
        info.add_metric(values, 1)
        yield info

        s = self.snapshot
        if s is not None:
            def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
                g = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)
                g.add_metric(values, value)
                return g

            def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
                c = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)
                c.add_metric(values, value)
                return c

            total, free = s["num_kv_blocks_total"], s["num_kv_blocks_free"]
            yield gauge("requests_waiting", "Requests waiting to be scheduled (queue depth).", s["num_waiting"])
            yield gauge("requests_running", "Requests being run (prefill or decode).", s["num_running"])
            yield gauge("queued_prefill_tokens", "Prompt tokens still to prefill.", s["num_queued_prefill_tokens"])
            yield gauge("kv_blocks_total", "KV cache blocks in the pool.", total)
            yield gauge("kv_blocks_used", "KV cache blocks in use (total minus free).", total - free)
            yield gauge("kv_blocks_free", "KV cache blocks free (including evictable cached ones).", free)
            yield counter("prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache.",
                          s["prefix_cache_hit_tokens"])
            yield counter("prefix_cache_query_tokens", "Prompt tokens looked up in the prefix cache.",
                          s["prefix_cache_query_tokens"])
            if s.get("num_host_blocks_total"):
                yield counter("kv_tier_hit_tokens", "Prompt tokens loaded back from the host KV tier.",
                              s["tier_hit_tokens"])
                yield gauge("kv_host_blocks_total", "Blocks of the host KV tier.", s["num_host_blocks_total"])
                yield gauge("kv_host_blocks_used", "Blocks of the host KV tier holding a block.",
                            s["num_host_blocks_used"])
                yield counter("kv_pool_hit_tokens", "Prompt tokens read from the cluster-shared KV pool.",
                              s.get("pool_hit_tokens", 0))
                yield counter("kv_pool_puts", "KV blocks put to the cluster-shared KV pool.", s.get("pool_puts", 0))
                yield counter("kv_pool_put_failures", "KV blocks not put to the pool (full, master down).",
                              s.get("pool_put_failures", 0))
                yield counter("kv_pool_get_failures", "KV blocks whose read from the pool failed (master down).",
                              s.get("pool_get_failures", 0))
            yield gauge("stats_age_seconds", "Age of the engine figures in this scrape.",
                        time.monotonic() - (self.snapshot_time or time.monotonic()))

        if self.transfers:
            tl = labels + ["direction"]
            fams = {
                "bytes": CounterMetricFamily(f"{PREFIX}_kv_transfer_bytes", "KV bytes transferred.", labels=tl),
                "count": CounterMetricFamily(f"{PREFIX}_kv_transfers", "KV transfers completed.", labels=tl),
                "failures": CounterMetricFamily(f"{PREFIX}_kv_transfer_failures", "KV transfers that failed.",
                                                labels=tl),
                "latency": CounterMetricFamily(f"{PREFIX}_kv_transfer_latency_seconds",
                                               "Summed latency of completed KV transfers.", labels=tl),
                "outcomes": CounterMetricFamily(
                    f"{PREFIX}_kv_hop_outcomes", "Remote prefills by how they ended (decode: as acted on; "
                    "prefill: as answered): done, never_started, transfer_failed, aborted.",
                    labels=tl + ["outcome"]),
            }
            for kind, service in self.transfers.items():
                t = service.transfers
                lv = values + [DIRECTIONS.get(kind, kind)]
                fams["bytes"].add_metric(lv, t.transfer_bytes)
                fams["count"].add_metric(lv, t.transfer_count)
                fams["failures"].add_metric(lv, t.transfer_failures)
                fams["latency"].add_metric(lv, t.transfer_latency_ms_sum / 1000.0)
                for outcome in ("done", "never_started", "transfer_failed", "aborted"):
                    fams["outcomes"].add_metric(lv + [outcome], getattr(t.hop_outcomes, outcome))
            yield from fams.values()
            if "decode" in self.transfers:
                decode = self.transfers["decode"].transfers
                fallbacks = CounterMetricFamily(
                    f"{PREFIX}_local_prefill_fallbacks",
                    "Remote prefills this decode worker computed itself (nothing had been written, or "
                    "nothing more could land).", labels=labels)
                fallbacks.add_metric(values, decode.local_prefill_fallbacks)
                yield fallbacks
                refused = CounterMetricFamily(
                    f"{PREFIX}_kv_refused_transfers",
                    "KV writes and completions this decode worker refused: unknown transfer id, expired or "
                    "ended lease, other blocks, a second completion (as of its last Stats or hop).",
                    labels=labels)
                refused.add_metric(values, decode.refused_transfers)
                yield refused


class WorkerMetrics:
    """The collector, its HTTP server and the snapshot-refresh task of one worker."""

    def __init__(self, worker_id: str, role: str, aengine: Any, transfers: dict[str, Any],
                 interval_s: float = 0.5) -> None:
        self.aengine = aengine
        self.interval_s = interval_s
        self.collector = WorkerCollector(worker_id, role, transfers)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        self._httpd = None
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task | None = None
        self.url: str | None = None

    async def refresh(self) -> None:
        self.collector.update(await self.aengine.call(self.aengine.engine.stats))

    async def _refresh_loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - keep the last snapshot; try again next tick
                log.debug("refreshing engine stats failed: %s", e)
            await asyncio.sleep(self.interval_s)

    async def start(self, host: str, port: int = 0) -> str:
        """Take a first snapshot, serve ``http://host:port/metrics`` (port 0: any free
        port) and keep the snapshot fresh. Returns the metrics URL."""
        try:
            await self.refresh()
        except Exception as e:  # noqa: BLE001 - the loop retries
            log.warning("first engine stats snapshot failed: %s", e)
        try:
            self._httpd, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise ValueError(f"cannot serve metrics on {host}:{port}: {e}") from e
        bound = self._httpd.server_port
        shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
        self.url = f"http://{shown}:{bound}/metrics"
        self._task = asyncio.create_task(self._refresh_loop())
        return self.url

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._httpd is not None:
            self._httpd.shutdown()  # waits for serve_forever to return
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
