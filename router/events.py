"""Keeping the prefix index in step with the workers' KV events in the control-plane store.

:class:`EventFollower` reads the store's global KV event stream (``read_kv_events``,
paginated, from the last sequence number it applied) and applies each event to a
:class:`~pdserve.router.index.PrefixIndex`. Call :meth:`EventFollower.poll` yourself
(tests, an asyncio task via ``asyncio.to_thread``), or let :meth:`EventFollower.start`
run it on a daemon thread every ``interval_s``.

**Gaps and resync.** The stream is bounded: a follower that falls behind by more than
the store's retention, or a store that lost its data (Redis restarted empty), leaves
events the follower never saw (``KVEventBatch.gap``). The follower then drops every
precise entry of the index and continues from the oldest event the store still has,
rebuilding from there. This is safe because the index is only a hint: a suffix of the
stream describes a *subset* of what the workers hold (blocks stored before the gap
and still cached are simply unknown until stored again), so routing degrades for a
while -- some prefixes are recomputed -- but no decision is ever incorrect: workers
verify every cache hit against their own cache. Optimistic entries (the router's own
recent decisions) are kept; they expire on their own.

**Departures.** A worker that expires, deregisters or restarts gets one
``AllBlocksCleared`` event in the stream (a store invariant), which drops its entries
in order with its other events. In addition, every ``registry_interval_s`` the
follower lists the live workers and drops the entries of any worker that is not
registered (covers events of a worker that kept publishing after it expired, or a
cleared event lost in a gap).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from pdserve.deploy.store.base import DEFAULT_READ_BATCH, ControlPlaneStore

from pdserve.proto import pdserve_pb2 as pb

from .index import PrefixIndex

__all__ = ["EventFollower", "FollowerStats", "PlacementPublisher"]

log = logging.getLogger(__name__)

#: Events applied between two voluntary GIL releases while catching up.
_YIELD_EVERY = 32


@dataclass(frozen=True)
class FollowerStats:
    """Counters of an :class:`EventFollower`, for metrics."""

    #: Sequence number of the last event applied.
    applied_seq: int
    #: Newest sequence number the store reported at the last read.
    store_last_seq: int
    events_applied: int
    resyncs: int
    polls: int
    #: Polls of the background thread that raised (store unreachable, ...).
    errors: int
    #: Workers whose entries were dropped because they were no longer registered.
    workers_dropped: int

    @property
    def lag(self) -> int:
        """Events in the store not yet applied (as of the last read)."""
        return max(0, self.store_last_seq - self.applied_seq)


class EventFollower:
    """Applies the store's KV events to ``index``; detects gaps and resyncs.

    ``page_size``: events per ``read_kv_events`` call; ``max_pages_per_poll`` bounds
    the work of one :meth:`poll` (the rest is read at the next one).
    ``registry_interval_s``: how often :meth:`poll` also checks the registry (0: every
    poll; None: never). ``clock`` (monotonic seconds) is injectable for tests.
    ``origin``: this gateway's id; ``pending`` events it published itself are skipped,
    others' go to ``index`` (optimistic entries) and to ``on_pending`` (their load).
    """

    def __init__(
        self,
        store: ControlPlaneStore,
        index: PrefixIndex,
        *,
        page_size: int = DEFAULT_READ_BATCH,
        max_pages_per_poll: int = 100,
        registry_interval_s: float | None = 1.0,
        clock: Callable[[], float] = time.monotonic,
        origin: str | None = None,
        on_pending: Callable[[pb.KVEvent], None] | None = None,
    ) -> None:
        if page_size < 1 or max_pages_per_poll < 1:
            raise ValueError("page_size and max_pages_per_poll must be >= 1")
        self.store = store
        self.index = index
        self.origin = origin
        self._on_pending = on_pending
        self._page_size = int(page_size)
        self._max_pages = int(max_pages_per_poll)
        self._registry_interval = registry_interval_s
        self._clock = clock
        self._next_registry_check = float("-inf")
        self._poll_lock = threading.Lock()  # one poll at a time (thread + manual calls)
        self._seq = 0
        self._store_last_seq = 0
        self._applied = 0
        self._resyncs = 0
        self._polls = 0
        self._errors = 0
        self._dropped = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # ------------------------------------------------------------------- polling

    @property
    def applied_seq(self) -> int:
        """Sequence number of the last event applied (0: none)."""
        return self._seq

    def poll(self) -> int:
        """Read and apply everything new (up to ``max_pages_per_poll`` pages).

        Checks the registry first when it is due. Returns the number of events
        applied. Store errors (``StoreUnavailableError``, ...) propagate; the position
        is kept, so the next poll carries on where this one stopped.
        """
        with self._poll_lock:
            self._polls += 1
            if self._registry_interval is not None:
                now = self._clock()
                if now >= self._next_registry_check:
                    self._sync_registry_locked()
                    self._next_registry_check = now + self._registry_interval
            applied = 0
            for _ in range(self._max_pages):
                after = self._seq
                batch = self.store.read_kv_events(after, self._page_size)
                self._store_last_seq = batch.last_seq
                if batch.gap(after):
                    self._resync_locked(after, batch.first_available_seq, batch.last_seq)
                    continue
                if not batch.events:
                    break
                for ev in batch.events:
                    if ev.seq <= self._seq:  # defensive: never apply an event twice
                        continue
                    if ev.HasField("pending"):
                        self._seq = ev.seq
                        if self.origin is not None and ev.pending.origin == self.origin:
                            continue  # this gateway's own decision: already in its index
                        if self._on_pending is not None:
                            self._on_pending(ev)
                    self.index.apply_event(ev)
                    self._seq = ev.seq
                    applied += 1
                    if applied % _YIELD_EVERY == 0:
                        # Hand the GIL over: a request thread waiting to route would
                        # otherwise wait up to the 5 ms switch interval per page.
                        time.sleep(0)
                if self._seq >= batch.last_seq:
                    break
            self._applied += applied
            return applied

    def sync_registry(self) -> int:
        """Drop the index entries of workers that are not registered; returns how many."""
        with self._poll_lock:
            return self._sync_registry_locked()

    def resync(self) -> None:
        """Drop every precise entry and re-read from the oldest retained event."""
        with self._poll_lock:
            batch = self.store.read_kv_events(self._seq, 1)
            self._store_last_seq = batch.last_seq
            self._resync_locked(self._seq, batch.first_available_seq, batch.last_seq)

    def _resync_locked(self, after: int, first_available: int, last_seq: int) -> None:
        self._resyncs += 1
        level = logging.INFO if after == 0 else logging.WARNING
        log.log(
            level,
            "KV event stream gap (had seq %d, store retains %d..%d): dropping the prefix "
            "index and rebuilding from the retained events",
            after, first_available, last_seq,
        )
        self.index.clear_precise()
        # Every retained event is re-read; `first_available - 1` is never a gap again.
        self._seq = max(0, first_available - 1)

    def _sync_registry_locked(self) -> int:
        live = {w.worker_id for w in self.store.list_workers()}
        gone = [w for w in self.index.workers() if w not in live]
        for wid in gone:
            log.info("worker %s is no longer registered: dropping its prefix-index entries", wid)
            self.index.remove_worker(wid)
        self._dropped += len(gone)
        return len(gone)

    def stats(self) -> FollowerStats:
        return FollowerStats(
            applied_seq=self._seq,
            store_last_seq=self._store_last_seq,
            events_applied=self._applied,
            resyncs=self._resyncs,
            polls=self._polls,
            errors=self._errors,
            workers_dropped=self._dropped,
        )

    # ------------------------------------------------------------ background thread

    def start(self, interval_s: float = 0.1) -> None:
        """Poll every ``interval_s`` seconds on a daemon thread until :meth:`stop`.

        Errors are logged and counted (``stats().errors``); polling goes on, so a
        store outage only makes the index stale for its duration.
        """
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s!r}")
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("EventFollower is already running")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(float(interval_s),), name="pdserve-kv-events", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float | None = 5.0) -> None:
        """Stop the background thread (idempotent) and wait for it up to ``timeout_s``."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self, interval_s: float) -> None:
        last_error = None
        while not self._stop.is_set():
            try:
                self.poll()
                if last_error is not None:
                    log.info("KV event polling recovered")
                    last_error = None
            except Exception as e:  # noqa: BLE001 - keep following; the index just goes stale
                self._errors += 1
                if repr(e) != last_error:  # log each distinct failure once
                    log.warning("polling KV events failed (will retry every %.2fs): %r", interval_s, e)
                    last_error = repr(e)
            self._stop.wait(interval_s)

    def __enter__(self) -> "EventFollower":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class PlacementPublisher:
    """Publishes a router's routing decisions (``Router.take_placements``: ``pending`` KV
    events) to the store as soon as they are made, so other gateways sharing the store
    count a prefix as held where it is in flight, and its load there, before the
    worker's own events and Stats say so. A daemon thread; a failed publish is logged
    and dropped (the events are hints: the workers' own events follow)."""

    def __init__(self, store: ControlPlaneStore, router, *, max_wait_s: float = 0.5) -> None:
        self.store = store
        self.router = router
        self._max_wait_s = max_wait_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.published = 0
        self.errors = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pdserve-placements", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self.router.placements_ready.set()  # wake it
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout_s)

    def publish_now(self) -> int:
        """Publish what is queued; returns how many events."""
        events = self.router.take_placements()
        by_worker: dict[str, list[pb.KVEvent]] = {}
        for ev in events:
            by_worker.setdefault(ev.worker_id, []).append(ev)
        for wid, evs in by_worker.items():
            self.store.publish_kv_events(wid, evs)
        self.published += len(events)
        return len(events)

    def _run(self) -> None:
        last_error = None
        while not self._stop.is_set():
            self.router.placements_ready.wait(self._max_wait_s)
            if self._stop.is_set():
                return
            try:
                self.publish_now()
                last_error = None
            except Exception as e:  # noqa: BLE001 - hints only: drop them, keep serving
                self.errors += 1
                if repr(e) != last_error:
                    log.warning("publishing routing placements failed (dropped): %r", e)
                    last_error = repr(e)
