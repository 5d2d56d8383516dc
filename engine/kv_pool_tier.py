"""The cluster-shared KV pool (Mooncake Store, ``kvtransfer/kvpool.py``) below the host tier.

The pool fills the host tier; everything downstream (host -> region loads) is the host
tier's. Each rank moves its own shard of a block, under its own key
``{layout_digest}/tp{rank}of{tp_size}/{block_hash:016x}``, between its host pool
(``HostKVCache.host``, registered with its ``KVPoolClient`` once: zero copy) and the
pool, on one background thread per rank (the engine loop never waits on the pool):

* **put**: a block saved region -> host is also put to the pool from its host slot
  (``StepInputs.kv_pool_put_ops``). A save that reuses a slot a put still reads waits
  for that put first (``wait_slots``; rare: saves reuse the LRU slot). A failed put
  (pool full, master down) loses only a future hit; it is counted and logged at most
  once per ``LOG_INTERVAL_S``. Rank 0 reports the blocks it stored (the worker
  publishes them as tier "pool" for the routers).
* **get**: the scheduler reserves host slots for a request's next blocks and sends
  ``(job, slot, hash)`` rows (``StepInputs.kv_pool_get_ops``); each rank reads its keys
  into those slots. At the start of every later step each rank contributes, per
  outstanding job, its number of leading hits if its read is done, else -1; the MIN
  over the TP group (one small all-reduce) is what every rank acts on, so all agree:
  -1 asks again next step, n >= 0 ends the job (rank 0 returns it to the scheduler,
  which confirms the first n slots as host-tier entries and frees the rest). A master
  that is down makes the gets raise ``KVPoolUnavailable``: n = 0, the request computes.

Jobs and slots are FIFO on the rank's thread, so a get into a slot that a put still
reads runs after that put.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from .parallel import TPGroup

log = logging.getLogger("pdserve.kvpool")

_U64 = (1 << 64) - 1
LOG_INTERVAL_S = 60.0
"""Failed puts / gets are logged at most once per this many seconds (and counted always)."""
IDLE_POLL_S = 0.005
"""A step with no tokens (every request waits for the pool) waits this long for a fetch
to finish before reporting: the idle loop does not spin."""


@dataclass
class PoolReport:
    """What a rank's pool did since its last step (rank 0's is the engine's)."""

    fetched: list[tuple[int, int]] = field(default_factory=list)
    """(job id, leading blocks every rank read): jobs that ended this step."""
    stored: list[int] = field(default_factory=list)
    """Block hashes this rank put to the pool (or found there already)."""
    num_put_failures: int = 0
    num_get_failures: int = 0


def pool_key(prefix: str, rank: int, size: int, block_hash: int) -> str:
    return f"{prefix}/tp{rank}of{size}/{block_hash & _U64:016x}"


class KVPoolAgent:
    """One rank's side of the pool: ``client`` (None: this rank could not join; its puts
    are skipped and its gets read nothing) over ``host``, that rank's host-tier pool."""

    def __init__(self, client, host: torch.Tensor, key_prefix: str, tp: TPGroup, device: str) -> None:
        self.client = client
        self.host = host
        self.key_prefix = key_prefix
        self.tp = tp
        self.device = device
        if client is not None:
            client.register(host)
        self._cond = threading.Condition()
        self._busy: Counter[int] = Counter()
        """Host slots a queued or running put reads."""
        self._fetches: dict[int, int | None] = {}
        """Outstanding jobs in the order they started (the same on every rank): this rank's
        leading hits once its read is done, else None."""
        self._report = PoolReport()
        self._last_log = {"put": -LOG_INTERVAL_S, "get": -LOG_INTERVAL_S}
        self._unlogged = Counter()
        self.num_puts = 0
        self.num_put_failures = 0
        self.num_gets = 0
        self.num_get_failures = 0
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._serve, name=f"pdserve-kvpool-tp{tp.rank}", daemon=True)
        self._thread.start()

    # -- the engine loop's side (every rank, in ``ModelRunner.run``) ---------------------

    def poll(self, wait_s: float = 0.0) -> PoolReport:
        """Start of a step: settle the outstanding jobs every rank has finished (a
        collective when tensor parallel; every rank calls it at the same point of the
        same step), and hand over what happened since the last call."""
        with self._cond:
            if self._fetches and wait_s > 0 and None in self._fetches.values():
                self._cond.wait_for(lambda: any(n is not None for n in self._fetches.values()), wait_s)
            jobs = list(self._fetches)
            mine = [-1 if n is None else n for n in self._fetches.values()]
            report, self._report = self._report, PoolReport()
        if jobs:
            agreed = mine
            if self.tp.size > 1:
                t = torch.tensor(mine, dtype=torch.long, device=self.device)
                agreed = self.tp.all_reduce_min(t).tolist()
            with self._cond:
                for job, n in zip(jobs, agreed):
                    if n >= 0:
                        del self._fetches[job]
                        report.fetched.append((job, int(n)))
        return report

    def wait_slots(self, slots: list[int]) -> None:
        """Block until no put reads any of ``slots`` (a save is about to overwrite them)."""
        with self._cond:
            if any(self._busy[s] for s in slots):
                self._cond.wait_for(lambda: not any(self._busy[s] for s in slots))

    def put(self, ops: torch.Tensor) -> None:
        """``ops``: [K, 2] (host slot, block hash as int64), saved to the host this step."""
        if not ops.shape[0] or self.client is None:
            return
        rows = ops.tolist()
        with self._cond:
            for slot, _ in rows:
                self._busy[slot] += 1
        self._jobs.put(("put", rows))

    def start_gets(self, ops: torch.Tensor) -> None:
        """``ops``: [K, 3] (job id, reserved host slot, block hash as int64), in block order."""
        if not ops.shape[0]:
            return
        jobs: dict[int, list[tuple[int, int]]] = {}
        for job, slot, h in ops.tolist():
            jobs.setdefault(job, []).append((slot, h))
        with self._cond:
            for job in jobs:
                self._fetches[job] = None
        for job, rows in jobs.items():
            self._jobs.put(("get", job, rows))

    @property
    def num_pending_puts(self) -> int:
        """Puts queued or running (block shards)."""
        with self._cond:
            return sum(self._busy.values())

    def close(self) -> None:
        """Stop the thread (after the job it runs), then leave the pool."""
        self._jobs.put(None)
        self._thread.join(timeout=30)
        if self.client is not None:
            self.client.close()

    # -- the rank's pool thread ---------------------------------------------------------

    def _serve(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            if item[0] == "put":
                self._put(item[1])
            else:
                self._get(item[1], item[2])

    def _keys(self, hashes) -> list[str]:
        return [pool_key(self.key_prefix, self.tp.rank, self.tp.size, h) for h in hashes]

    def _put(self, rows: list[tuple[int, int]]) -> None:
        stored: list[int] = []
        failed = 0
        try:
            seen: set[int] = set()
            rows_once = [r for r in rows if not (r[1] in seen or seen.add(r[1]))]
            ok = self.client.put_blocks(self._keys(h for _, h in rows_once), [self.host[s] for s, _ in rows_once])
            stored = [h & _U64 for (_, h), good in zip(rows_once, ok) if good]
            failed = len(rows_once) - len(stored)
            if failed:
                self._log("put", f"{failed} of {len(rows_once)} blocks not stored (pool full?)")
        except Exception as e:  # noqa: BLE001 - KVPoolUnavailable and the like: a lost future hit
            failed = len(rows)
            self._log("put", f"{failed} blocks not stored: {e}")
        with self._cond:
            for slot, _ in rows:
                self._busy[slot] -= 1
                if not self._busy[slot]:
                    del self._busy[slot]
            self.num_puts += len(stored)
            self.num_put_failures += failed
            self._report.stored += stored
            self._report.num_put_failures += failed
            self._cond.notify_all()

    def _get(self, job: int, rows: list[tuple[int, int]]) -> None:
        n = failed = 0
        if self.client is not None:
            try:
                hits = self.client.get_blocks(self._keys(h for _, h in rows), [self.host[s] for s, _ in rows])
                while n < len(hits) and hits[n]:
                    n += 1
            except Exception as e:  # noqa: BLE001 - KVPoolUnavailable and the like: the request computes
                failed = len(rows)
                self._log("get", f"fetching {len(rows)} blocks failed: {e}")
        with self._cond:
            self._fetches[job] = n
            self.num_gets += n
            self.num_get_failures += failed
            self._report.num_get_failures += failed
            self._cond.notify_all()

    def _log(self, what: str, message: str) -> None:
        now = time.monotonic()
        if now - self._last_log[what] < LOG_INTERVAL_S:
            self._unlogged[what] += 1
            return
        more = self._unlogged.pop(what, 0)
        self._last_log[what] = now
        log.warning("KV pool (tp rank %d): %s%s", self.tp.rank, message,
                    f" ({more} more failed {what}s not logged since)" if more else "")


def make_pool_agent(config, tp: TPGroup, host: torch.Tensor) -> KVPoolAgent:
    """This rank's agent for ``config.cache.kv_pool``; a master that does not answer is
    logged and the rank serves without the pool (``agent.client`` None)."""
    from ..kvtransfer.kvpool import KVPoolClient, KVPoolUnavailable  # noqa: PLC0415

    from .kv_tiers import layout_digest  # noqa: PLC0415

    client = None
    try:
        client = KVPoolClient(config.cache.kv_pool)
    except KVPoolUnavailable as e:
        log.warning("KV pool: %s; tp rank %d serves without the pool", e, tp.rank)
    return KVPoolAgent(client, host, layout_digest(config), tp, config.device)


__all__ = ["IDLE_POLL_S", "KVPoolAgent", "PoolReport", "make_pool_agent", "pool_key"]
