"""Per-request block tables on top of the block pool.

The scheduler talks to this object only: how many tokens of a request the prefix
cache already holds, whether a request can get slots for its next tokens, and
freeing. Block ids leave through ``block_ids``; ``KVBlock`` objects stay inside.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .block_pool import BlockPool, BlockStored, KVBlock, KVEvent
from .kv_tiers import TierIndex, as_int64
from .request import Request


@dataclass(frozen=True)
class KVCacheStats:
    num_total_blocks: int
    num_free_blocks: int
    """Unreferenced blocks, cached ones included (they are evictable)."""
    num_cached_blocks: int

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_total_blocks


@dataclass(frozen=True)
class PrefixHit:
    """Blocks a new request can reuse; pass it back to ``allocate_slots`` unchanged."""

    blocks: tuple[KVBlock, ...]
    num_tokens: int
    host: tuple[tuple[int, int], ...] = ()
    """(block hash, host slot) of the blocks right after ``blocks`` that the host tier
    holds: loaded into new region blocks before the request runs (``start_load``)."""
    disk: tuple[tuple[int, int], ...] = ()
    """(block hash, disk slot) of the blocks right after those that the disk tier holds."""

    @property
    def num_tier_blocks(self) -> int:
        return len(self.host) + len(self.disk)


NO_HIT = PrefixHit((), 0)


@dataclass(frozen=True)
class CopyOps:
    """One step's tier copies, in the order every rank runs them (``kv_tiers``)."""

    spills: list[tuple[int, int, int]]
    """(host slot, disk slot, block hash as int64): host -> disk, first."""
    saves: list[tuple[int, int]]
    """(region block id, host slot): region -> host, before the forward overwrites them."""
    loads: list[tuple[int, int]]
    """(host slot, region block id): host -> region, asynchronous."""
    disk_loads: list[tuple[int, int, int]]
    """(disk slot, region block id, block hash as int64): disk -> region, asynchronous."""
    pool_puts: list[tuple[int, int]] = field(default_factory=list)
    """(host slot, block hash as int64): blocks saved this step, also put to the KV pool."""
    pool_gets: list[tuple[int, int, int]] = field(default_factory=list)
    """(job id, reserved host slot, block hash as int64): KV pool -> host (``kv_pool_tier``)."""

    def __bool__(self) -> bool:
        return bool(self.spills or self.saves or self.loads or self.disk_loads or self.pool_puts or self.pool_gets)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 num_host_blocks: int = 0, num_disk_blocks: int = 0, disk_meta=None) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, block_size, enable_prefix_caching)
        self.host: TierIndex | None = None
        """The host tier's index (``kv_tiers``), when the worker has one."""
        self.disk: TierIndex | None = None
        """The disk tier's index (below the host tier; ``disk_meta`` records its blocks)."""
        self._disk_meta = disk_meta
        self._save_ops: list[tuple[int, int]] = []
        self._load_ops: list[tuple[int, int]] = []
        self._spill_ops: list[tuple[int, int, int]] = []
        self._fresh: list[int] = []
        """Host entries whose save is not run yet (pinned: a spill must not read them)."""
        self._disk_load_ops: list[tuple[int, int, int]] = []
        self.pool_enabled = False
        """The KV pool fills the host tier (set by the engine once rank 0 joined the pool)."""
        self._pool_put_ops: list[tuple[int, int]] = []
        self._pool_get_ops: list[tuple[int, int, int]] = []
        self._pool_events: list[KVEvent] = []
        if num_host_blocks and enable_prefix_caching:
            self.host = TierIndex(num_host_blocks, block_size)
            self.pool.on_evict = self._evicting
            if num_disk_blocks:
                self.disk = TierIndex(num_disk_blocks, block_size, tier="disk")
        self._blocks: dict[str, list[KVBlock]] = {}
        self._num_cached: dict[str, int] = {}
        """How many leading blocks of each request are already registered in the cache."""
        self.tables = BlockTables()
        """Every request's block ids as a row of one persistent array (the step's block tables)."""

    # -- queries -------------------------------------------------------------------

    def stats(self) -> KVCacheStats:
        return KVCacheStats(self.pool.num_blocks, self.pool.num_free_blocks, self.pool.num_cached_blocks)

    def block_ids(self, request_id: str) -> list[int]:
        return self.tables.block_ids(request_id)

    def num_blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_prefix(self, request: Request, use_host: bool = True, touch: bool = True) -> PrefixHit:
        """Longest cached prefix of the request's tokens, in full blocks: in the region,
        then (``use_host``) continued in the host tier.

        At least one token is always left to compute, so the step that finishes the
        prompt has logits to sample from.
        """
        if not self.enable_prefix_caching:
            return NO_HIT
        bs = self.block_size
        max_blocks = (request.num_tokens - 1) // bs
        hits: list[KVBlock] = []
        hashes = request.block_hashes[:max_blocks]
        for i, h in enumerate(hashes):
            block = self.pool.lookup(h, request.token_at(i * bs, (i + 1) * bs))
            if block is None:
                break
            hits.append(block)
        host: list[tuple[int, int]] = []
        disk: list[tuple[int, int]] = []
        if use_host and self.host is not None:
            i = len(hits)
            for tier, out in ((self.host, host), (self.disk, disk)):
                while tier is not None and i < len(hashes):
                    slot = tier.lookup(hashes[i], request.token_at(i * bs, (i + 1) * bs), touch)
                    if slot is None:
                        break
                    out.append((hashes[i], slot))
                    i += 1
        return PrefixHit(tuple(hits), len(hits) * bs, tuple(host), tuple(disk))

    # -- the host tier ---------------------------------------------------------------

    def _host_slot(self, block_hash: int, token_ids, reserve: bool = False) -> int | None:
        """A host slot for a block (``TierIndex.insert``, or ``reserve`` for a pool fetch);
        the entry evicted to make room goes down to the disk tier, if there is one."""
        slot, victim = (self.host.reserve if reserve else self.host.insert)(block_hash, token_ids)
        if victim is not None and self.disk is not None:
            vh, vtokens, vslot = victim
            dslot, _ = self.disk.insert(vh, vtokens)
            if dslot is not None:
                self._spill_ops.append((vslot, dslot, as_int64(vh)))
                self._disk_meta.write(dslot, vh, vtokens)
        return slot

    def _evicting(self, block: KVBlock) -> None:
        slot = self._host_slot(block.block_hash, block.token_ids)
        if slot is not None:
            self._save_ops.append((block.block_id, slot))
            if self.pool_enabled:
                self._pool_put_ops.append((slot, as_int64(block.block_hash)))
            # Its bytes land with this step's saves, after its spills: not a victim before.
            self.host.pin(block.block_hash)
            self._fresh.append(block.block_hash)

    def pin(self, hit: PrefixHit) -> None:
        """Keep ``hit``'s tier entries where they are (the allocation that follows may
        evict region blocks into the tiers, which must not push these out) until
        ``end_load``."""
        for h, _ in hit.host:
            self.host.pin(h)
        for h, _ in hit.disk:
            self.disk.pin(h)

    def start_load(self, request: Request, hit: PrefixHit) -> None:
        """After ``pin(hit)`` and ``allocate_slots(request, tier tokens, hit)``: copy the
        tiers' blocks of ``hit`` into the request's new blocks."""
        first = len(hit.blocks)
        blocks = self._blocks[request.request_id][first: first + hit.num_tier_blocks]
        for (h, slot), block in zip(hit.host, blocks):
            self._load_ops.append((slot, block.block_id))
        for (h, slot), block in zip(hit.disk, blocks[len(hit.host):]):
            self._disk_load_ops.append((slot, block.block_id, as_int64(h)))

    def end_load(self, hit: PrefixHit) -> None:
        for h, _ in hit.host:
            self.host.unpin(h)
        for h, _ in hit.disk:
            self.disk.unpin(h)

    # -- the KV pool (``kv_pool_tier``) -------------------------------------------------

    def reserve_pool_fetch(self, job: int, request: Request, first: int, num_blocks: int) -> list[int]:
        """Reserve host slots for the request's blocks ``first..first+num_blocks-1`` (fewer
        when a block is held or reserved already, or every slot is pinned) and queue their
        pool gets; returns the slots, in block order."""
        bs = self.block_size
        slots = []
        for i in range(first, first + num_blocks):
            h = request.block_hashes[i]
            slot = self._host_slot(h, request.token_at(i * bs, (i + 1) * bs), reserve=True)
            if slot is None:
                break
            slots.append(slot)
            self._pool_get_ops.append((job, slot, as_int64(h)))
        return slots

    def end_pool_fetch(self, slots: list[int], num_fetched: int) -> list[int]:
        """Every rank read the first ``num_fetched`` of ``slots``: they become host-tier
        entries, pinned (``unpin_blocks`` them once the request looked them up); the rest
        are freed. Returns the hashes of the new entries."""
        out = []
        for i, slot in enumerate(slots):
            if i < num_fetched:
                h = self.host.confirm(slot)
                if h is not None:
                    self.host.pin(h)
                    out.append(h)
            else:
                self.host.release(slot)
        return out

    def unpin_blocks(self, hashes: list[int]) -> None:
        for h in hashes:
            self.host.unpin(h)

    def pool_stored(self, hashes: list[int]) -> None:
        """Rank 0 put these blocks to the pool: published with tier "pool" (routers count
        them as held by every worker of the pool)."""
        if hashes:
            self._pool_events.append(BlockStored(tuple(hashes), None, (), self.block_size, tier="pool"))

    def take_copy_ops(self) -> "CopyOps":
        """The tier copies decided since the last call: the next forward's ranks run them
        first (``kv_tiers`` ordering)."""
        ops = CopyOps(self._spill_ops, self._save_ops, self._load_ops, self._disk_load_ops,
                      self._pool_put_ops, self._pool_get_ops)
        self._spill_ops, self._save_ops, self._load_ops, self._disk_load_ops = [], [], [], []
        self._pool_put_ops, self._pool_get_ops = [], []
        for h in self._fresh:
            self.host.unpin(h)
        self._fresh = []
        return ops

    # -- resources -----------------------------------------------------------------

    def allocate_slots(self, request: Request, num_new_tokens: int, hit: PrefixHit = NO_HIT) -> bool:
        """Make room for ``num_new_tokens`` after the computed ones; False if blocks are short.

        On False nothing changed. ``hit`` is only for a request that holds no blocks yet.
        """
        held = self._blocks.get(request.request_id)
        if held and not hit.blocks and request.num_computed_tokens + num_new_tokens <= len(held) * self.block_size:
            return True  # fits the blocks it holds (most decode steps)
        if hit.blocks and held:
            raise ValueError(f"request {request.request_id} already holds blocks")
        num_held = len(held) if held else len(hit.blocks)
        num_computed = max(request.num_computed_tokens, hit.num_tokens)
        num_new_blocks = self.num_blocks_needed(num_computed + num_new_tokens) - num_held
        # Touching a cached block that nobody references takes it off the free list.
        num_revived = sum(1 for b in hit.blocks if b.ref_count == 0)
        if num_new_blocks > self.pool.num_free_blocks - num_revived:
            return False
        if held is None:
            held = self._blocks[request.request_id] = []
            self._num_cached[request.request_id] = len(hit.blocks)
        num_before = len(held)
        if hit.blocks:
            self.pool.touch(hit.blocks)
            held.extend(hit.blocks)
        if num_new_blocks > 0:
            held.extend(self.pool.allocate(num_new_blocks))
        if len(held) > num_before:
            self.tables.append(request.request_id, [b.block_id for b in held[num_before:]])
        return True

    def fork(self, parent: Request, child: Request, num_blocks: int) -> None:
        """Let ``child`` share the first ``num_blocks`` blocks of ``parent`` (n > 1)."""
        shared = self._blocks[parent.request_id][:num_blocks]
        if child.request_id in self._blocks:
            raise ValueError(f"request {child.request_id} already holds blocks")
        self.pool.touch(shared)
        self._blocks[child.request_id] = list(shared)
        self.tables.append(child.request_id, [b.block_id for b in shared])
        self._num_cached[child.request_id] = min(self._num_cached[parent.request_id], num_blocks)

    def cache_computed_blocks(self, request: Request) -> None:
        """Register the request's newly completed full blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        blocks = self._blocks.get(request.request_id)
        if not blocks:
            return
        bs = self.block_size
        start = self._num_cached[request.request_id]
        end = min(request.num_computed_tokens // bs, len(request.block_hashes))
        if end <= start:
            return
        tokens = [request.token_at(i * bs, (i + 1) * bs) for i in range(start, end)]
        parent = request.block_hashes[start - 1] if start else None
        self.pool.cache(blocks[start:end], request.block_hashes[start:end], tokens, parent)
        self._num_cached[request.request_id] = end

    def free(self, request: Request) -> None:
        """Release every block of the request (idempotent)."""
        blocks = self._blocks.pop(request.request_id, None)
        self._num_cached.pop(request.request_id, None)
        self.tables.remove(request.request_id)
        if blocks:
            # Last blocks first: they are the least likely to be shared, so evict them first.
            self.pool.free(reversed(blocks))

    def take_events(self) -> list[KVEvent]:
        events = self.pool.take_events()
        for tier in (self.host, self.disk):
            if tier is not None:
                events += tier.take_events()
        if self._pool_events:
            events += self._pool_events
            self._pool_events = []
        return events


class BlockTables:
    """Block ids of every request holding blocks: a row each of one persistent int32 array.

    Rows are updated as requests grow (only the new ids are written), so a step's block
    tables are one fancy-index of this array by the batch's rows, never a rebuild from
    Python lists. Rows and columns grow on demand; a freed row is cleared and reused.
    """

    def __init__(self, num_rows: int = 64, num_cols: int = 64) -> None:
        self.array = np.zeros((num_rows, num_cols), dtype=np.int32)
        self._row: dict[str, int] = {}
        self._ids: dict[str, list[int]] = {}
        self._free_rows = list(range(num_rows - 1, -1, -1))

    def row(self, request_id: str) -> int:
        return self._row[request_id]

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block ids (the live list: do not modify)."""
        return self._ids.get(request_id, [])

    def append(self, request_id: str, block_ids: list[int]) -> None:
        row = self._row.get(request_id)
        if row is None:
            if not self._free_rows:
                n = self.array.shape[0]
                self.array = np.concatenate([self.array, np.zeros_like(self.array)])
                self._free_rows = list(range(2 * n - 1, n - 1, -1))
            row = self._row[request_id] = self._free_rows.pop()
            self._ids[request_id] = []
        ids = self._ids[request_id]
        start, end = len(ids), len(ids) + len(block_ids)
        if end > self.array.shape[1]:
            wider = np.zeros((self.array.shape[0], max(end, 2 * self.array.shape[1])), dtype=np.int32)
            wider[:, : self.array.shape[1]] = self.array
            self.array = wider
        self.array[row, start:end] = block_ids
        ids.extend(block_ids)

    def remove(self, request_id: str) -> None:
        row = self._row.pop(request_id, None)
        if row is not None:
            self.array[row, : len(self._ids.pop(request_id))] = 0
            self._free_rows.append(row)
