"""The pool of KV blocks: reference counts, the prefix cache and its LRU eviction.

Invariants:
- a block is in ``_free`` exactly when its ``ref_count`` is 0;
- a block with a ``block_hash`` is findable through ``_cached`` until it is
  evicted, which happens only when it is reused for new content;
- free blocks without a hash are handed out before cached ones, and cached ones in
  least-recently-freed order, so the cache keeps what was used last.
Every stored/evicted hash is recorded as a KV event for the worker to publish.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class BlockStored:
    block_hashes: tuple[int, ...]
    parent_block_hash: int | None
    token_ids: tuple[int, ...]
    block_size: int
    tier: str = "device"
    """Where the blocks now live: "device" (the KV region) or a tier below it ("host")."""


@dataclass(frozen=True)
class BlockRemoved:
    block_hashes: tuple[int, ...]
    tier: str = "device"


KVEvent = BlockStored | BlockRemoved


class KVBlock:
    __slots__ = ("block_id", "ref_count", "block_hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.block_hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None
        """The block's tokens when cached: a hash hit is confirmed against them."""

    def __repr__(self) -> str:
        return f"KVBlock({self.block_id}, ref={self.ref_count}, hash={self.block_hash})"


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[int, KVBlock] = {}
        self._events: list[KVEvent] = []
        self.on_evict = None
        """Called with each cached block about to lose its content (reused), before its
        hash and tokens are cleared: the host tier saves it (``KVCacheManager``)."""

    @property
    def num_free_blocks(self) -> int:
        """Blocks with no reference, including cached ones that may be evicted."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def lookup(self, block_hash: int, token_ids: Sequence[int]) -> KVBlock | None:
        block = self._cached.get(block_hash)
        if block is None or block.token_ids != tuple(token_ids):
            return None
        return block

    def allocate(self, num_blocks: int) -> list[KVBlock]:
        """Take ``num_blocks`` free blocks (ref_count 1), evicting cached content if needed."""
        if num_blocks > len(self._free):
            raise ValueError(f"cannot allocate {num_blocks} blocks, {len(self._free)} free")
        out = []
        evicted = []
        for _ in range(num_blocks):
            _, block = self._free.popitem(last=False)
            if block.block_hash is not None:
                if self.on_evict is not None:
                    self.on_evict(block)
                evicted.append(block.block_hash)
                del self._cached[block.block_hash]
                block.block_hash = None
                block.token_ids = None
            block.ref_count = 1
            out.append(block)
        if evicted:
            self._events.append(BlockRemoved(tuple(evicted)))
        return out

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take one more reference to each block (prefix-cache hit or fork)."""
        for block in blocks:
            if block.ref_count == 0:
                del self._free[block.block_id]
            block.ref_count += 1

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference from each block; pass a request's blocks last-first."""
        for block in blocks:
            if block.ref_count <= 0:
                raise RuntimeError(f"double free of {block!r}")
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block.block_id] = block
                if block.block_hash is None:
                    # Nothing worth keeping: hand it out before any cached block.
                    self._free.move_to_end(block.block_id, last=False)

    def cache(self, blocks: Sequence[KVBlock], hashes: Sequence[int], tokens: Sequence[Sequence[int]], parent_hash: int | None) -> None:
        """Register consecutive full blocks under their chained hashes (no-op when caching is off).

        ``parent_hash`` is the hash of the block before ``blocks[0]`` (None at the start).
        """
        if not self.enable_caching:
            return
        run: list[tuple[int, Sequence[int]]] = []
        run_parent = parent_hash
        prev = parent_hash
        for block, h, toks in zip(blocks, hashes, tokens):
            if block.block_hash is None and h not in self._cached:
                block.block_hash = h
                block.token_ids = tuple(toks)
                self._cached[h] = block
                if not run:
                    run_parent = prev
                run.append((h, toks))
            elif run:
                self._emit_stored(run, run_parent)
                run = []
            prev = h
        if run:
            self._emit_stored(run, run_parent)

    def _emit_stored(self, run: list[tuple[int, Sequence[int]]], parent: int | None) -> None:
        tokens = tuple(t for _, toks in run for t in toks)
        self._events.append(BlockStored(tuple(h for h, _ in run), parent, tokens, self.block_size))

    def take_events(self) -> list[KVEvent]:
        events, self._events = self._events, []
        return events

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; only possible while no block is referenced."""
        if len(self._free) != self.num_blocks:
            return False
        if self._cached:
            self._events.append(BlockRemoved(tuple(self._cached)))
        for block in self._cached.values():
            block.block_hash = None
            block.token_ids = None
        self._cached.clear()
        return True
