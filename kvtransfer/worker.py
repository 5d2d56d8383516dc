"""A worker's engine bound to KV transfer agents, one per tensor-parallel rank.

Each TP rank's KV region lives in that rank's process, so each rank runs its own
agent: ``rank_extension`` is the engine rank extension (``EngineConfig.rank_extension
= "pdserve.kvtransfer.worker:rank_extension"``) that creates it beside the model
runner. Rank 0 drives them all with ``executor.call_extension`` (bytes in, bytes
out); every rank plans its own share of a transfer with the pure planner, so only
block ids and peer layouts travel.

``EngineTransport`` is what the prefill and decode services use: asynchronous
``send`` / ``expect`` / ``wait`` / ``revoke`` / ``cancel``. With TP = 1 its calls run on
a thread of the transport's own, beside the engine loop; with TP > 1 on the engine
thread between steps (``AsyncEngine.call``), since they broadcast on the ranks' group
(see ``EngineTransport.attach``). They never block on the network: a write or an
expectation is posted, then polled until DONE, FAILED or its deadline.

Every rank's agent admits only what its rank expects (``base``, invariant 6); the
refusals of all ranks reach the service through ``on_refusals`` (from polls, and from
``collect_refusals``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from pdserve.proto import pdserve_pb2 as pb

from . import _backend_class, create_agent
from .base import TransferHandle, pack_metadata, unpack_metadata
from .layout import KVRegionLayout, plan_transfer

EXTENSION = "pdserve.kvtransfer.worker:rank_extension"
BACKEND_ENUM = {"nixl": pb.NIXL, "torch_dist": pb.TORCH_DIST}
_POLL_INITIAL_S, _POLL_MAX_S = 0.0005, 0.01
_WRITE_SLACK_S = 1.0  # a writer's agents fail its write at the deadline; poll a little past it


class TransferFailed(RuntimeError):
    """A transfer ended FAILED on some rank. ``is_started``: bytes may have reached the
    receiver's region on some rank (False: the receiver refused before any byte moved)."""

    def __init__(self, message: str, is_started: bool) -> None:
        super().__init__(message)
        self.is_started = is_started


def agent_name(worker_id: str, rank: int) -> str:
    return f"{worker_id}.r{rank}"


def extension_config(backend: str, worker_id: str) -> bytes:
    if backend not in BACKEND_ENUM:
        raise ValueError(f"unknown KV transfer backend {backend!r}; choose from {sorted(BACKEND_ENUM)}")
    return json.dumps({"backend": backend, "worker_id": worker_id}).encode()


def _layouts_of(ranks) -> list[KVRegionLayout]:
    return [KVRegionLayout.from_dict(unpack_metadata(r.metadata)[0]["layout"]) for r in ranks]


class KVRankExtension:
    """One rank's agent over its KV region; answers rank 0's commands (JSON + blob)."""

    def __init__(self, runner: Any, tp: Any, config: bytes) -> None:
        cfg = json.loads(config)
        self.rank = tp.rank
        self.layout = KVRegionLayout.for_region(
            runner.kv_cache, num_kv_heads=runner.config.model.num_kv_heads, tp_rank=tp.rank, tp_size=tp.size,
            cache_kind=runner.config.model.cache_kind,
        )
        self.agent = create_agent(cfg["backend"], agent_name(cfg["worker_id"], tp.rank), runner.kv_cache, self.layout)
        self.handles: dict[str, list[TransferHandle]] = {}
        self.ended: OrderedDict[str, bool] = OrderedDict()
        """Transfer ids no longer tracked -> whether bytes may have moved (``is_started``):
        a revocation after a failure or a cancel still learns it."""

    def handle(self, payload: bytes) -> bytes:
        header, _ = unpack_metadata(payload)
        op = header["op"]
        if op == "metadata":
            return self.agent.metadata()
        if op == "add_peers":
            for name, meta in header["peers"].items():
                self.agent.add_peer(name, base64.b64decode(meta))
            return b"{}"
        if op in ("write", "expect"):
            return json.dumps(self._start(op, header)).encode()
        if op == "poll":
            states = {tid: self._poll(tid) for tid in header["tids"]}
            return json.dumps({"states": states, "refusals": self.agent.take_refusals()}).encode()
        if op == "refusals":
            return json.dumps({"refusals": self.agent.take_refusals()}).encode()
        if op == "cancel":
            tid = header["tid"]
            handles = self.handles.pop(tid, ())
            for h in handles:
                self.agent.cancel(h, header.get("message", "cancelled"))
            if handles:
                self._end(tid, handles)
            return json.dumps({"started": self.ended.get(tid, False)}).encode()
        raise ValueError(f"unknown KV transfer command {op!r}")

    def _start(self, op: str, h: dict) -> dict:
        tid = h["tid"]
        if tid in self.handles:
            raise ValueError(f"transfer {tid!r} already started on rank {self.rank}")
        peers = h["peer_agents"]
        peer_layouts = [KVRegionLayout.from_dict(d) for d in h["peer_layouts"]]
        mine = _group_layouts(self.layout)
        if op == "write":
            plans = plan_transfer(mine, peer_layouts, h["src_blocks"], h["dst_blocks"])
            chosen = [(p, peers[p.dst_rank]) for p in plans if p.src_rank == self.rank]
        else:
            # The receiver needs only byte counts and its own offsets; the writer's block
            # ids are unknown here, so any valid ones give the same plan sizes.
            src = list(range(len(h["dst_blocks"])))
            plans = plan_transfer(peer_layouts, mine, src, h["dst_blocks"])
            chosen = [(p, peers[p.src_rank]) for p in plans if p.dst_rank == self.rank]
        handles = []
        for plan, peer in chosen:
            if op == "write":
                handles.append(self.agent.write(tid, peer, plan.descs, timeout_s=h["timeout_s"]))
            else:
                handles.append(self.agent.expect(tid, peer, plan.descs, timeout_s=h["timeout_s"]))
        self.handles[tid] = handles
        return {"bytes": sum(x.num_bytes for x in handles), "descriptors": sum(x.num_descriptors for x in handles)}

    def _poll(self, tid: str) -> dict:
        """``{"state": "done" | "pending" | "failed", "message", "started"}`` for one transfer."""
        handles = self.handles.get(tid)
        if handles is None:
            return {"state": "done"}  # finished earlier (or this rank had nothing to move)
        states = [self.agent.poll(x) for x in handles]
        bad = next((s for s in states if s.failed), None)
        if bad is not None:
            for x in handles:
                self.agent.cancel(x, bad.message)
            del self.handles[tid]
            return {"state": "failed", "message": bad.message, "started": self._end(tid, handles)}
        if all(s.done for s in states):
            del self.handles[tid]
            self._end(tid, handles)
            return {"state": "done"}
        return {"state": "pending"}

    def _end(self, tid: str, handles: list[TransferHandle]) -> bool:
        is_started = any(h.is_started for h in handles)
        self.ended[tid] = is_started
        while len(self.ended) > 4096:
            self.ended.popitem(last=False)
        return is_started

    def close(self) -> None:
        self.agent.close()


def _group_layouts(layout: KVRegionLayout) -> list[KVRegionLayout]:
    """The layouts of every rank of this rank's TP group."""
    return [
        KVRegionLayout.for_rank(num_layers=layout.num_layers, num_blocks=layout.num_blocks,
                                num_kv_heads=layout.num_kv_heads, block_size=layout.block_size,
                                head_dim=layout.head_dim, dtype=layout.dtype, tp_rank=r, tp_size=layout.tp_size,
                                cache_kind=layout.cache_kind)
        for r in range(layout.tp_size)
    ]


def rank_extension(runner: Any, tp: Any, config: bytes) -> KVRankExtension:
    return KVRankExtension(runner, tp, config)


class EngineTransport:
    """The services' view of KV transfer for one worker (all TP ranks)."""

    def __init__(self, engine: Any, backend: str) -> None:
        self.engine = engine
        self.backend = backend
        self.executor = engine.executor
        self.rank_metadata = self.executor.call_extension(pack_metadata({"op": "metadata"}))
        self.layouts = [KVRegionLayout.from_dict(unpack_metadata(m)[0]["layout"]) for m in self.rank_metadata]
        self.aengine = None
        self._pool: ThreadPoolExecutor | None = None
        self._peer_epochs: dict[str, int] = {}
        self.receiver_controls_writes: bool = _backend_class(backend).RECEIVER_CONTROLS_WRITES
        """After ``revoke`` no byte of that transfer lands (two-sided backends)."""
        self.on_refusals: Callable[[list[tuple[str, str, str]]], None] | None = None
        """Called on the event loop with the (peer agent, transfer id, reason) every rank refused."""

    def attach(self, aengine: Any) -> None:
        """Route later calls through the engine thread of ``aengine`` (TP > 1), or through
        this transport's own thread (TP = 1).

        NOTE: with one rank the agent is only ever used through these calls, so they need
        no step boundary: run on a thread of their own (one at a time), a finished
        prefill's KV write and a decode worker's ``expect``/poll no longer wait for the
        prefill iteration or decode step in progress. With TP > 1 the control bytes are
        broadcast on the ranks' step group, which only the engine thread may use.
        """
        self.aengine = aengine
        if self.engine.config.parallel.tensor_parallel_size == 1:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pdserve-kv")

    def endpoint(self) -> pb.TransferEndpoint:
        ranks = [
            pb.RankAgent(tp_rank=r, agent_name=unpack_metadata(m)[0]["name"], metadata=m, num_blocks=lay.num_blocks)
            for r, (m, lay) in enumerate(zip(self.rank_metadata, self.layouts))
        ]
        return pb.TransferEndpoint(backend=BACKEND_ENUM[self.backend], ranks=ranks)

    async def _call(self, header: dict) -> list[bytes]:
        payload = pack_metadata(header)
        if self._pool is not None:
            return await asyncio.get_running_loop().run_in_executor(self._pool, self.executor.call_extension, payload)
        return await self.aengine.call(lambda: self.executor.call_extension(payload))

    async def _ensure_peer(self, info: pb.WorkerInfo) -> None:
        if info.transfer.backend != BACKEND_ENUM[self.backend]:
            raise RuntimeError(f"worker {info.worker_id} uses another KV transfer backend")
        if self._peer_epochs.get(info.worker_id) == info.started_at_ms:
            return
        peers = {r.agent_name: base64.b64encode(r.metadata).decode() for r in info.transfer.ranks}
        await self._call({"op": "add_peers", "peers": peers})
        self._peer_epochs[info.worker_id] = info.started_at_ms

    async def send(self, transfer_id: str, src_block_ids: list[int], destination: pb.KVDestination,
                   peer: pb.WorkerInfo, timeout_s: float) -> pb.TransferStats:
        """Write the blocks into the peer's destination blocks within ``timeout_s``. Raises
        ``TransferFailed`` (with ``is_started``), or ``TimeoutError``; cancelled, it cancels
        the write on every rank."""
        try:
            await self._ensure_peer(peer)
        except (OSError, RuntimeError, ValueError) as e:
            raise TransferFailed(f"cannot reach {peer.worker_id}'s agents: {e}", is_started=False) from e
        start = time.monotonic()
        answers = await self._call({
            "op": "write", "tid": transfer_id, "src_blocks": list(src_block_ids),
            "dst_blocks": list(destination.block_ids), "timeout_s": timeout_s,
            "peer_agents": [r.agent_name for r in peer.transfer.ranks],
            "peer_layouts": [lay.to_dict() for lay in _layouts_of(peer.transfer.ranks)],
        })
        try:
            await self.wait(transfer_id, timeout_s + _WRITE_SLACK_S)
        except asyncio.CancelledError:
            self.cancel(transfer_id)
            raise
        sizes = [json.loads(a) for a in answers]
        return pb.TransferStats(bytes=sum(s["bytes"] for s in sizes), descriptors=sum(s["descriptors"] for s in sizes),
                                latency_ms=1000 * (time.monotonic() - start))

    async def expect(self, transfer_id: str, source: pb.WorkerInfo, first_block_index: int, block_ids: list[int],
                     timeout_s: float) -> None:
        """Admit ``source``'s write of ``transfer_id`` into ``block_ids`` on every rank for
        ``timeout_s`` (the lease's remaining time)."""
        await self._ensure_peer(source)
        await self._call({
            "op": "expect", "tid": transfer_id, "dst_blocks": list(block_ids), "timeout_s": timeout_s,
            "peer_agents": [r.agent_name for r in source.transfer.ranks],
            "peer_layouts": [lay.to_dict() for lay in _layouts_of(source.transfer.ranks)],
        })

    async def wait(self, transfer_id: str, timeout_s: float) -> None:
        """Poll until every rank's part is DONE; raise ``TransferFailed`` on FAILED, and
        ``TimeoutError`` past ``timeout_s`` (then the transfer is cancelled)."""
        deadline = time.monotonic() + timeout_s
        interval = _POLL_INITIAL_S
        while True:
            answers = [json.loads(a) for a in await self._call({"op": "poll", "tids": [transfer_id]})]
            self._note_refusals(answers)
            states = [a["states"][transfer_id] for a in answers]
            failed = [s for s in states if s["state"] == "failed"]
            if failed:
                if len(failed) < len(states):
                    self.cancel(transfer_id)  # the other ranks' parts are of no use now
                raise TransferFailed(f"KV transfer {transfer_id} failed: {failed[0]['message']}",
                                     is_started=any(s.get("started") for s in failed) or len(failed) < len(states))
            if all(s["state"] == "done" for s in states):
                return
            if time.monotonic() > deadline:
                self.cancel(transfer_id)
                raise TimeoutError(f"KV transfer {transfer_id} did not finish in {timeout_s:.3g}s")
            await asyncio.sleep(interval)
            interval = min(interval * 2, _POLL_MAX_S)

    async def revoke(self, transfer_id: str) -> bool:
        """Stop admitting ``transfer_id`` on every rank and return whether a writer had been
        admitted on any (bytes may have landed). With ``receiver_controls_writes``, no byte
        of it lands once this returns."""
        answers = await self._call({"op": "cancel", "tid": transfer_id, "message": "revoked"})
        return any(json.loads(a).get("started") for a in answers)

    def cancel(self, transfer_id: str) -> None:
        """Stop a transfer on every rank (from the event loop; fire and forget)."""
        if self.aengine is not None:
            asyncio.get_running_loop().create_task(self._call({"op": "cancel", "tid": transfer_id}))

    async def collect_refusals(self) -> None:
        """Hand the refusals every rank recorded since the last poll to ``on_refusals``."""
        self._note_refusals([json.loads(a) for a in await self._call({"op": "refusals"})])

    def _note_refusals(self, answers: list[dict]) -> None:
        refusals = [tuple(r) for a in answers for r in a.get("refusals", ())]
        if refusals and self.on_refusals is not None:
            self.on_refusals(refusals)

    def close(self) -> None:
        """Agents close with the engine's executor (rank extensions); call this first, so
        no transfer call is still running on this transport's thread when they do."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
