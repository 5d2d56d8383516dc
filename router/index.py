"""The router's global prefix index: chained block hash -> workers holding that block.

Two kinds of entries feed it:

* **precise** entries come from the workers' KV events (read from the control-plane
  store by :class:`pdserve.router.events.EventFollower`): ``stored`` adds a worker to
  each listed hash, ``removed`` deletes it, ``cleared`` (a worker restarted, expired
  or deregistered) drops every entry of that worker.
* **optimistic** (approximate) entries come from the router's own decisions: when a
  request is routed, the prompt's block hashes are inserted for the chosen workers at
  once, because those workers will hold the blocks a moment later, long before their
  ``stored`` events travel through the store. An optimistic entry expires after
  ``optimistic_ttl_s`` (default 30 s) unless a ``stored`` event confirms it first (it
  then becomes precise); a ``removed`` event for it, or the worker's ``cleared``,
  deletes it at once.

The index is a *hint*. A stale or missing entry costs a worse routing decision (a
prefix recomputed, a prompt sent where its prefix no longer is), never a wrong
answer: every worker checks its own prefix cache (hash *and* token ids) before reusing
a block.

Representation, chosen for :meth:`PrefixIndex.match` speed: every worker gets a small
integer *bit*; the index maps each hash to an ``int`` bitmask of the workers holding
it (precise or optimistic). Matching a prompt is then one dict lookup and one ``&``
per block, independent of the number of workers (~10 us for 125 blocks; see
``benchmarks/bench_router.py``).

Thread-safe: one lock guards every public method, so an event-follower thread can
apply events while request handlers call :meth:`match`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Callable

from pdserve.proto import pdserve_pb2 as pb

__all__ = ["PrefixIndex", "IndexStats", "DEFAULT_OPTIMISTIC_TTL_S", "DEFAULT_POOL_TTL_S"]

#: How long an optimistic entry (from a routing decision) lives without a stored event.
DEFAULT_OPTIMISTIC_TTL_S = 30.0
#: How long a block put to the cluster-shared KV pool counts as there without being put
#: again: the pool evicts (and loses a leaving worker's share) without telling anyone.
DEFAULT_POOL_TTL_S = 300.0
#: Optimistic deadlines are keyed by ``hash << _KEY_SHIFT | worker bit``.
_KEY_SHIFT = 20


@dataclass(frozen=True)
class IndexStats:
    """Sizes of the index, for metrics."""

    #: Distinct block hashes with at least one holder (precise or optimistic).
    num_blocks: int
    #: (hash, worker) pairs learnt from KV events.
    num_precise_entries: int
    #: (hash, worker) pairs from routing decisions, not yet confirmed or expired.
    num_optimistic_entries: int
    #: Workers with at least one entry.
    num_workers: int
    #: Precise blocks per worker.
    precise_blocks_per_worker: dict[str, int] = field(default_factory=dict)
    #: Events applied, by kind, since the index was created.
    events_applied: dict[str, int] = field(default_factory=dict)
    #: Optimistic entries dropped because their TTL lapsed.
    optimistic_expired: int = 0
    #: Optimistic entries turned precise by a stored event.
    optimistic_confirmed: int = 0


class PrefixIndex:
    """Global map ``block_hash -> {worker_id}`` with longest-prefix matching.

    ``clock`` (monotonic seconds) is injectable for tests; it only times optimistic
    entries.
    """

    def __init__(
        self,
        *,
        optimistic_ttl_s: float = DEFAULT_OPTIMISTIC_TTL_S,
        clock: Callable[[], float] = time.monotonic,
        pool_ttl_s: float = DEFAULT_POOL_TTL_S,
    ) -> None:
        if not optimistic_ttl_s > 0:
            raise ValueError(f"optimistic_ttl_s must be > 0, got {optimistic_ttl_s!r}")
        if not pool_ttl_s > 0:
            raise ValueError(f"pool_ttl_s must be > 0, got {pool_ttl_s!r}")
        self.pool_ttl_s = float(pool_ttl_s)
        self.optimistic_ttl_s = float(optimistic_ttl_s)
        self._clock = clock
        self._lock = threading.Lock()
        # worker id <-> bit
        self._bit: dict[str, int] = {}
        self._ids: list[str | None] = []
        self._free_bits: list[int] = []
        # hash -> mask of every holder (precise | optimistic); what match() reads. A
        # worker is never both a precise and an optimistic holder of one hash (a stored
        # event turns the optimistic entry precise; add_optimistic skips precise
        # holders), so the precise holders are `_mask[h] & ~_opt_mask[h]`: no second
        # dict of every hash (half the memory, and half the rehash pauses CPython takes
        # when a big dict grows or sheds deleted slots).
        self._mask: dict[int, int] = {}
        # bit -> hashes that worker holds precisely (for cleared / remove_worker). A dict
        # with None values rather than a set: CPython's garbage collector skips dicts of
        # atomic keys and values but traverses every set, which made full collections
        # with a big index take milliseconds.
        self._worker_precise: dict[int, dict[int, None]] = {}
        # hash -> mask of optimistic holders, and (hash << _KEY_SHIFT | bit) -> deadline.
        # Flat dicts of ints: the garbage collector never traverses them.
        self._opt_mask: dict[int, int] = {}
        self._opt_deadline: dict[int, float] = {}
        self._opt_count: dict[int, int] = {}  # bit -> optimistic entries of that worker
        # (deadline, bit, hashes) per insertion, deadlines non-decreasing (fixed TTL,
        # monotonic clock). An item is stale when the entry was refreshed, confirmed or
        # dropped since; expiry checks each entry's own deadline.
        self._opt_queue: deque[tuple[float, int, tuple[int, ...]]] = deque()
        # The tiers below a worker's KV region (host memory, disk): hash -> mask of the
        # workers holding it there, and bit -> those hashes. Separate from _mask: a block
        # in a tier must be loaded before use, so it is matched after the region's.
        self._tier_mask: dict[int, int] = {}
        self._worker_tier: dict[int, dict[int, None]] = {}
        # The cluster-shared KV pool: hash -> deadline (a put refreshes it), and the puts in
        # deadline order (an item is stale when its hash was put again or removed since).
        # Held by the pool, not a worker: every worker of the pool can read the block.
        self._pool: dict[int, float] = {}
        self._pool_queue: deque[tuple[float, tuple[int, ...]]] = deque()
        self._n_precise = 0
        self._n_opt = 0
        self._events = {"stored": 0, "removed": 0, "cleared": 0, "pending": 0}
        self._expired = 0
        self._confirmed = 0

    # ------------------------------------------------------------------ matching

    def match(self, block_hashes: Sequence[int], *, precise_only: bool = False) -> dict[str, int]:
        """Per worker, how many leading blocks of ``block_hashes`` it holds.

        The count is the longest *consecutive* prefix: it stops at the worker's first
        missing block (a later block it happens to hold is useless without the ones
        before it). Workers matching no block are absent (count 0).
        ``precise_only`` ignores optimistic entries.
        """
        with self._lock:
            if self._opt_queue and self._opt_queue[0][0] <= self._clock():
                self._expire_locked(self._clock())
            n = len(block_hashes)
            if n == 0:
                return {}
            get = self._precise_of if precise_only else self._mask.get
            active = get(block_hashes[0], 0)
            if not active:
                return {}
            ids = self._ids
            out: dict[str, int] = {}
            for i in range(1, n):
                m = get(block_hashes[i], 0) & active
                if m != active:
                    dropped = active ^ m
                    while dropped:
                        low = dropped & -dropped
                        out[ids[low.bit_length() - 1]] = i  # type: ignore[index]
                        dropped ^= low
                    if not m:
                        return out
                    active = m
            while active:
                low = active & -active
                out[ids[low.bit_length() - 1]] = n  # type: ignore[index]
                active ^= low
            return out

    # ----------------------------------------------------------- precise entries

    def apply_event(self, event: pb.KVEvent) -> None:
        """Apply one KV event (``stored`` / ``removed`` / ``cleared`` / ``pending``) of
        ``event.worker_id``. ``pending`` (another gateway's routing decision) becomes an
        optimistic entry, as this router's own decisions do."""
        kind = event.WhichOneof("event")
        wid = event.worker_id
        if not wid or kind is None:
            return
        if kind == "stored" and event.stored.tier == pb.KV_TIER_POOL:
            self.add_pool_blocks(event.stored.block_hashes)
        elif kind == "removed" and event.removed.tier == pb.KV_TIER_POOL:
            self.remove_pool_blocks(event.removed.block_hashes)
        elif kind == "stored" and event.stored.tier:
            self.add_tier_blocks(wid, event.stored.block_hashes)
        elif kind == "removed" and event.removed.tier:
            self.remove_tier_blocks(wid, event.removed.block_hashes)
        elif kind == "stored":
            self.add_blocks(wid, event.stored.block_hashes)
        elif kind == "pending":
            self.add_optimistic(wid, event.pending.block_hashes)
        elif kind == "removed":
            self.remove_blocks(wid, event.removed.block_hashes)
        else:
            self.remove_worker(wid)
        with self._lock:
            self._events[kind] += 1

    def apply_events(self, events: Iterable[pb.KVEvent]) -> int:
        """Apply events in order; returns how many."""
        n = 0
        for ev in events:
            self.apply_event(ev)
            n += 1
        return n

    def add_blocks(self, worker_id: str, block_hashes: Iterable[int]) -> None:
        """``worker_id`` stored these blocks (precise); confirms optimistic entries."""
        with self._lock:
            bit = self._bit_for(worker_id)
            b = 1 << bit
            mine = self._worker_precise.get(bit)
            if mine is None:
                mine = self._worker_precise[bit] = {}
            mask, opt_mask = self._mask, self._opt_mask
            for h in block_hashes:
                if h in mine:
                    continue
                mine[h] = None
                self._n_precise += 1
                if opt_mask.get(h, 0) & b:  # confirmed: the bit in _mask stays
                    self._drop_opt_locked(h, bit)
                    self._confirmed += 1
                else:
                    mask[h] = mask.get(h, 0) | b

    def remove_blocks(self, worker_id: str, block_hashes: Iterable[int]) -> None:
        """``worker_id`` evicted these blocks: drop its precise and optimistic entries."""
        with self._lock:
            bit = self._bit.get(worker_id)
            if bit is None:
                return
            b = 1 << bit
            mine = self._worker_precise.get(bit)
            opt_mask = self._opt_mask
            for h in block_hashes:
                if mine is not None and h in mine:
                    del mine[h]
                    self._n_precise -= 1
                    self._clear_bit_locked(h, b)
                elif opt_mask.get(h, 0) & b:
                    self._drop_opt_locked(h, bit)
                    self._clear_bit_locked(h, b)
            self._release_if_empty_locked(bit)

    def remove_worker(self, worker_id: str) -> None:
        """Drop every entry (precise and optimistic) of ``worker_id``.

        For a worker that left the registry or restarted (``cleared`` event). Its bit
        is released for reuse.
        """
        with self._lock:
            bit = self._bit.pop(worker_id, None)
            if bit is None:
                return
            b = 1 << bit
            mine = self._worker_precise.pop(bit, {})
            for h in mine:
                self._clear_bit_locked(h, b)
            self._n_precise -= len(mine)
            for h in self._worker_tier.pop(bit, {}):
                self._clear_tier_bit_locked(h, b)
            opt_mask = self._opt_mask
            for _deadline, qbit, hashes in self._opt_queue:
                if qbit != bit:
                    continue
                for h in hashes:
                    if opt_mask.get(h, 0) & b:
                        self._drop_opt_locked(h, bit)
                        self._clear_bit_locked(h, b)
            self._opt_count.pop(bit, None)
            self._ids[bit] = None
            self._free_bits.append(bit)

    # ------------------------------------------------------------- tier entries

    def add_tier_blocks(self, worker_id: str, block_hashes: Iterable[int]) -> None:
        """``worker_id`` holds these blocks in a tier below its KV region (host, disk)."""
        with self._lock:
            bit = self._bit_for(worker_id)
            b = 1 << bit
            mine = self._worker_tier.setdefault(bit, {})
            tm = self._tier_mask
            for h in block_hashes:
                if h not in mine:
                    mine[h] = None
                    tm[h] = tm.get(h, 0) | b

    def remove_tier_blocks(self, worker_id: str, block_hashes: Iterable[int]) -> None:
        with self._lock:
            bit = self._bit.get(worker_id)
            if bit is None:
                return
            mine = self._worker_tier.get(bit, {})
            for h in block_hashes:
                if mine.pop(h, 0) is None:
                    self._clear_tier_bit_locked(h, 1 << bit)
            self._release_if_empty_locked(bit)

    def _clear_tier_bit_locked(self, h: int, b: int) -> None:
        m = self._tier_mask.get(h, 0) & ~b
        if m:
            self._tier_mask[h] = m
        else:
            self._tier_mask.pop(h, None)

    def match_tiers(self, block_hashes: Sequence[int], matches: dict[str, int]) -> dict[str, int]:
        """Per worker, how many blocks after its ``matches`` (its KV-region prefix, from
        :meth:`match`) it holds consecutively in a lower tier. Workers with none are absent."""
        with self._lock:
            if not self._tier_mask:
                return {}
            out: dict[str, int] = {}
            tm = self._tier_mask
            n = len(block_hashes)
            for wid, bit in self._bit.items():
                b = 1 << bit
                start = matches.get(wid, 0)
                i = start
                while i < n and tm.get(block_hashes[i], 0) & b:
                    i += 1
                if i > start:
                    out[wid] = i - start
            return out

    # -------------------------------------------------------------- pool entries

    def add_pool_blocks(self, block_hashes: Iterable[int]) -> None:
        """These blocks were put to the cluster-shared KV pool (any worker's ``stored``
        event with tier POOL): held for ``pool_ttl_s`` from now."""
        with self._lock:
            now = self._clock()
            deadline = now + self.pool_ttl_s
            hashes = tuple(block_hashes)
            for h in hashes:
                self._pool[h] = deadline
            if hashes:
                self._pool_queue.append((deadline, hashes))
            self._expire_pool_locked(now)

    def remove_pool_blocks(self, block_hashes: Iterable[int]) -> None:
        with self._lock:
            for h in block_hashes:
                self._pool.pop(h, None)

    def match_pool(self, block_hashes: Sequence[int], starts: dict[str, int],
                   workers: Iterable[str]) -> dict[str, int]:
        """Per worker of ``workers``, how many blocks from its ``starts`` position on (its
        region and tier prefix) the KV pool holds consecutively. Every worker given is taken
        to read the pool (one pool per deployment). Workers with none are absent."""
        with self._lock:
            now = self._clock()
            self._expire_pool_locked(now)
            if not self._pool:
                return {}
            pool = self._pool
            run = [0] * (len(block_hashes) + 1)  # run[i]: pool blocks from i on, consecutive
            for i in range(len(block_hashes) - 1, -1, -1):
                if pool.get(block_hashes[i], 0.0) > now:
                    run[i] = run[i + 1] + 1
            out = {}
            for wid in workers:
                n = run[min(starts.get(wid, 0), len(block_hashes))]
                if n:
                    out[wid] = n
            return out

    def _expire_pool_locked(self, now: float) -> None:
        q, pool = self._pool_queue, self._pool
        while q and q[0][0] <= now:
            _, hashes = q.popleft()
            for h in hashes:
                d = pool.get(h)
                if d is not None and d <= now:
                    del pool[h]

    def num_pool_blocks(self) -> int:
        """Blocks the KV pool holds as far as this index knows (not expired)."""
        with self._lock:
            self._expire_pool_locked(self._clock())
            return len(self._pool)

    def _release_if_empty_locked(self, bit: int) -> None:
        # A worker with no entry left gives its bit back (keeps the masks narrow).
        wid = self._ids[bit]
        if (wid is not None and not self._worker_precise.get(bit) and not self._opt_count.get(bit)
                and not self._worker_tier.get(bit)):
            del self._bit[wid]
            self._worker_precise.pop(bit, None)
            self._worker_tier.pop(bit, None)
            self._opt_count.pop(bit, None)
            self._ids[bit] = None
            self._free_bits.append(bit)

    def clear_precise(self) -> None:
        """Drop every precise entry of every worker (a resync); optimistic ones stay.

        Optimistic entries are the router's own recent decisions, independent of the
        event stream, and expire on their own.
        """
        with self._lock:
            self._mask = dict(self._opt_mask)
            self._worker_precise = {}
            self._tier_mask = {}
            self._worker_tier = {}
            self._pool = {}
            self._pool_queue.clear()
            self._n_precise = 0
            for bit in list(self._bit.values()):
                self._release_if_empty_locked(bit)

    def clear(self) -> None:
        """Drop everything, optimistic entries included."""
        with self._lock:
            self._mask = {}
            self._worker_precise = {}
            self._tier_mask = {}
            self._worker_tier = {}
            self._pool = {}
            self._pool_queue.clear()
            self._opt_mask = {}
            self._opt_deadline = {}
            self._opt_count = {}
            self._opt_queue.clear()
            self._bit = {}
            self._ids = []
            self._free_bits = []
            self._n_precise = 0
            self._n_opt = 0

    # -------------------------------------------------------- optimistic entries

    def add_optimistic(self, worker_id: str, block_hashes: Sequence[int]) -> None:
        """``worker_id`` is about to hold these blocks (a routing decision).

        Hashes the worker already holds precisely are skipped; existing optimistic
        entries get a fresh deadline.
        """
        if not block_hashes:
            return
        with self._lock:
            now = self._clock()
            if self._opt_queue and self._opt_queue[0][0] <= now:
                self._expire_locked(now)
            bit = self._bit_for(worker_id)
            b = 1 << bit
            deadline = now + self.optimistic_ttl_s
            mask, opt_mask, deadlines = self._mask, self._opt_mask, self._opt_deadline
            added = []
            new = 0
            for h in block_hashes:
                m = mask.get(h, 0)
                om = opt_mask.get(h, 0)
                if m & b and not om & b:
                    continue  # held precisely
                if not om & b:
                    new += 1
                    opt_mask[h] = om | b
                    mask[h] = m | b
                deadlines[(h << _KEY_SHIFT) | bit] = deadline
                added.append(h)
            if new:
                self._n_opt += new
                self._opt_count[bit] = self._opt_count.get(bit, 0) + new
            if added:
                self._opt_queue.append((deadline, bit, tuple(added)))

    def expire(self) -> int:
        """Drop optimistic entries whose TTL lapsed (done lazily anyway); returns how many."""
        with self._lock:
            before = self._expired
            self._expire_locked(self._clock())
            return self._expired - before

    # --------------------------------------------------------------- inspection

    def workers(self) -> list[str]:
        """Workers with at least one entry (precise or optimistic), sorted."""
        with self._lock:
            return self._workers_locked()

    def _workers_locked(self) -> list[str]:
        wp, oc, wt = self._worker_precise, self._opt_count, self._worker_tier
        return sorted(w for w, bit in self._bit.items() if wp.get(bit) or oc.get(bit) or wt.get(bit))

    def num_blocks(self, worker_id: str | None = None, *, precise_only: bool = False) -> int:
        """Distinct hashes in the index, or the entries of ``worker_id``."""
        with self._lock:
            if worker_id is None:
                if not precise_only:
                    return len(self._mask)
                om = self._opt_mask
                return sum(1 for h, m in self._mask.items() if m & ~om.get(h, 0))
            bit = self._bit.get(worker_id)
            if bit is None:
                return 0
            n = len(self._worker_precise.get(bit, ()))
            if not precise_only:
                n += self._opt_count.get(bit, 0)
            return n

    def __len__(self) -> int:
        return len(self._mask)

    def stats(self) -> IndexStats:
        with self._lock:
            self._expire_locked(self._clock())
            per = {self._ids[bit]: len(s) for bit, s in self._worker_precise.items() if s and self._ids[bit] is not None}
            return IndexStats(
                num_blocks=len(self._mask),
                num_precise_entries=self._n_precise,
                num_optimistic_entries=self._n_opt,
                num_workers=len(self._workers_locked()),
                precise_blocks_per_worker=per,  # type: ignore[arg-type]
                events_applied=dict(self._events),
                optimistic_expired=self._expired,
                optimistic_confirmed=self._confirmed,
            )

    # ----------------------------------------------------------------- internals

    def _bit_for(self, worker_id: str) -> int:
        bit = self._bit.get(worker_id)
        if bit is None:
            if not worker_id:
                raise ValueError("worker_id must be a non-empty string")
            if self._free_bits:
                bit = self._free_bits.pop()
                self._ids[bit] = worker_id
            else:
                bit = len(self._ids)
                if bit >= 1 << _KEY_SHIFT:
                    raise RuntimeError(f"PrefixIndex supports at most {1 << _KEY_SHIFT} workers at once")
                self._ids.append(worker_id)
            self._bit[worker_id] = bit
        return bit

    def _drop_opt_locked(self, h: int, bit: int) -> None:
        del self._opt_deadline[(h << _KEY_SHIFT) | bit]
        self._n_opt -= 1
        self._opt_count[bit] -= 1
        m = self._opt_mask[h] & ~(1 << bit)
        if m:
            self._opt_mask[h] = m
        else:
            del self._opt_mask[h]

    def _precise_of(self, h: int, default: int = 0) -> int:
        m = self._mask.get(h, 0)
        return m & ~self._opt_mask.get(h, 0) if m else default

    def _clear_bit_locked(self, h: int, b: int) -> None:
        m = self._mask.get(h, 0) & ~b
        if m:
            self._mask[h] = m
        else:
            self._mask.pop(h, None)

    def _expire_locked(self, now: float) -> None:
        q, deadlines = self._opt_queue, self._opt_deadline
        while q and q[0][0] <= now:
            _deadline, bit, hashes = q.popleft()
            for h in hashes:
                d = deadlines.get((h << _KEY_SHIFT) | bit)
                if d is not None and d <= now:
                    self._drop_opt_locked(h, bit)
                    self._clear_bit_locked(h, 1 << bit)
                    self._expired += 1
            if not self._opt_count.get(bit):
                self._release_if_empty_locked(bit)
