"""Live pool scaling: keep a running deployment's pools at the store's pool targets.

``pdserve scale --prefill N --decode M`` only writes ``PoolTargets`` to the
control-plane store; the :class:`PoolScaler` inside ``pdserve up`` reconciles:

- too few workers in a pool: launch the next index (``<pool>-<k>``, never reusing the
  id of a worker that may still be draining); it registers and the gateways' next
  refresh starts routing to it;
- too many: take the highest-indexed ones out and stop them with a drain
  (``deploy/drain.py``): marked draining, no new requests, in-flight ones finish, then
  they exit. A draining worker no longer counts toward its pool;
- a worker whose Ray actor died (a crash) is released and replaced.

Each role's target applies to the spec's first pool of that role (``both`` pools are
not scaled). Launch failures are logged and retried after ``retry_backoff_s``.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Any

from pdserve.proto import pdserve_pb2 as pb

from .cluster import ClusterSpec, PoolSpec

log = logging.getLogger("pdserve.scaler")


class PoolScaler:
    def __init__(self, launcher: Any, store: Any, spec: ClusterSpec, *, interval_s: float = 1.0,
                 drain_timeout_s: float = 600.0, retry_backoff_s: float = 10.0) -> None:
        self.launcher = launcher
        self.store = store
        self.spec = spec
        self.interval_s = interval_s
        self.drain_timeout_s = drain_timeout_s
        self.retry_backoff_s = retry_backoff_s
        self.pools: dict[str, PoolSpec] = {}
        for pool in spec.pools:
            if pool.role in ("prefill", "decode"):
                self.pools.setdefault(pool.role, pool)
        self.draining: set[str] = set()
        self._next_index = {p.name: p.count for p in self.pools.values()}
        self._failed_until = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stoppers: list[threading.Thread] = []
        self._lock = threading.Lock()

    # -- targets ----------------------------------------------------------------------

    def publish_spec_targets(self) -> None:
        """The spec's pool sizes become the targets (``pdserve up`` at start)."""
        self.store.set_pool_targets(pb.PoolTargets(
            num_prefill=self.pools["prefill"].count if "prefill" in self.pools else 0,
            num_decode=self.pools["decode"].count if "decode" in self.pools else 0))

    def targets(self) -> dict[str, int]:
        t = self.store.get_pool_targets()
        if t is None:
            return {role: pool.count for role, pool in self.pools.items()}
        return {role: {"prefill": t.num_prefill, "decode": t.num_decode}[role] for role in self.pools}

    # -- the loop ---------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pdserve-scaler", daemon=True)
        self._thread.start()

    def stop(self, wait_drains: bool = False) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if wait_drains:
            for t in list(self._stoppers):
                t.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.reconcile()
            except Exception:  # noqa: BLE001 - the next round retries; never kill the loop
                log.exception("reconciling pool sizes failed")
            self._stop.wait(self.interval_s)

    def members(self, pool: PoolSpec) -> list[str]:
        """Worker ids of ``pool`` that count toward it (launched, not draining), by index."""
        pattern = re.compile(rf"^{re.escape(pool.name)}-(\d+)$")
        with self._lock:
            ids = [wid for wid in self.launcher.workers if pattern.match(wid) and wid not in self.draining]
        return sorted(ids, key=lambda wid: int(pattern.match(wid).group(1)))

    def reconcile(self) -> None:
        """One round: replace dead workers, then move every pool toward its target."""
        self._replace_dead()
        targets = self.targets()
        for role, pool in self.pools.items():
            if self._stop.is_set():
                return
            members = self.members(pool)
            want = targets[role]
            if len(members) > want:
                for wid in members[want:][::-1]:
                    self._drain(wid)
            elif len(members) < want and time.monotonic() >= self._failed_until:
                for _ in range(want - len(members)):
                    if not self._launch(pool):
                        break

    def _launch(self, pool: PoolSpec) -> bool:
        index = self._next_index[pool.name]
        self._next_index[pool.name] = index + 1
        try:
            handle = self.launcher.launch_worker(pool, index)
        except Exception as e:  # noqa: BLE001 - no room, a bad node: retried after the backoff
            log.error("could not start worker %s-%d: %s (retrying in %.0f s)", pool.name, index, e,
                      self.retry_backoff_s)
            self._failed_until = time.monotonic() + self.retry_backoff_s
            return False
        log.info("scaled up: %s registered at %s", handle.worker_id, handle.address)
        return True

    def _drain(self, worker_id: str) -> None:
        with self._lock:
            self.draining.add(worker_id)
        log.info("scaling down: draining %s", worker_id)

        def stop() -> None:
            try:
                graceful = self.launcher.stop_worker(worker_id, timeout_s=self.drain_timeout_s + 30, drain=True)
                log.info("%s stopped (%s)", worker_id, "drained" if graceful else "forced")
            except Exception:  # noqa: BLE001
                log.exception("stopping %s failed", worker_id)
            finally:
                with self._lock:
                    self.draining.discard(worker_id)

        t = threading.Thread(target=stop, name=f"pdserve-drain-{worker_id}", daemon=True)
        self._stoppers = [s for s in self._stoppers if s.is_alive()] + [t]
        t.start()

    def _replace_dead(self) -> None:
        alive = self.launcher.alive()
        for wid, ok in alive.items():
            if not ok and wid not in self.draining:
                log.warning("worker %s died; replacing it", wid)
                self.launcher.kill_worker(wid)  # releases its placement group
