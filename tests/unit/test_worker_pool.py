"""The gateway's worker pool keeps a vanished worker's channel while a stream may still run
on it (a store restarted empty must not cancel live streams), and closes it after a
request's lifetime."""

from __future__ import annotations

import asyncio

from pdserve.proto import pdserve_pb2 as pb
from pdserve.router.gateway import GatewayConfig
from pdserve.router.metrics import GatewayMetrics
from pdserve.router.policy import Router
from pdserve.router.workers import WorkerPool
from test_gateway_edge import make_model_dir


class ListedStore:
    def __init__(self) -> None:
        self.workers: list[pb.WorkerInfo] = []

    def list_workers(self):
        return list(self.workers)

    def close(self) -> None:
        pass


def test_a_vanished_workers_channel_outlives_an_empty_registry(tmp_path):
    config = GatewayConfig(store_url="grpc://127.0.0.1:1", model_dir=str(make_model_dir(tmp_path / "m")),
                           request_timeout_s=0.2)
    pool = WorkerPool(config, Router(), GatewayMetrics())
    store = pool._store = ListedStore()
    worker = pb.WorkerInfo(worker_id="d0", role=pb.DECODE, address="127.0.0.1:9", num_kv_blocks=8)

    async def run() -> None:
        store.workers = [worker]
        await pool.refresh()
        channel = pool.channel(worker.address)
        store.workers = []  # the store restarted empty
        await pool.refresh()
        assert pool.workers == {} and pool.channel(worker.address) is channel  # kept for live streams
        store.workers = [worker]  # it re-registers: the same channel, no longer vanished
        await pool.refresh()
        assert pool.channel(worker.address) is channel and not pool._vanished
        store.workers = []
        await pool.refresh()
        await asyncio.sleep(0.3)  # past a request's lifetime
        await pool.refresh()
        assert worker.address not in pool._channels
        await pool.stop()

    asyncio.run(run())
