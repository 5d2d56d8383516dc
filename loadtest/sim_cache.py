"""The simulator's prefix caches: one LRU of block hashes per worker, and the router's view.

A worker's cache follows the engine's store-full-blocks semantics: a prompt hits the
longest cached run of its chained block hashes from the start (at most
``(input_len - 1) // block_size`` blocks: one token is always computed), and once its
prompt is computed every full block is cached. Blocks become most recent from last
to first, so a prompt's tail is evicted before its shared prefix (the engine frees a
request's blocks last-first).

The router sees a cache through :class:`RouterView`: the worker's real cache plus the
router's own optimistic entries (the hashes it just routed there, living
``optimistic_ttl_s``, or until the worker's events confirm or evict them), as
:class:`pdserve.router.index.PrefixIndex` does, so a prompt family follows its first
request before that request's prefill has finished. Events reach the router at once
here (the real ones lag by the event follower's poll).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence


class PrefixCache:
    """LRU set of block hashes with a capacity in blocks."""

    def __init__(self, capacity_blocks: int) -> None:
        if capacity_blocks < 0:
            raise ValueError(f"capacity_blocks must be >= 0, got {capacity_blocks}")
        self.capacity_blocks = capacity_blocks
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._blocks

    def __len__(self) -> int:
        return len(self._blocks)

    def match(self, hashes: Sequence[int], max_blocks: int) -> int:
        """Cached blocks at the start of ``hashes`` (at most ``max_blocks``); touches them."""
        num = 0
        for h in hashes[:max_blocks]:
            if h not in self._blocks:
                break
            num += 1
        for h in reversed(hashes[:num]):
            self._blocks.move_to_end(h)
        return num

    def insert(self, hashes: Sequence[int]) -> list[int]:
        """Cache ``hashes`` (a prompt's full blocks); returns the hashes evicted for them."""
        for h in reversed(hashes):
            self._blocks[h] = None
            self._blocks.move_to_end(h)
        evicted = []
        while len(self._blocks) > self.capacity_blocks:
            evicted.append(self._blocks.popitem(last=False)[0])
        return evicted


class RouterView:
    """What the kv router believes one worker holds: its cache plus recent decisions."""

    def __init__(self, cache: PrefixCache, optimistic_ttl_s: float = 30.0) -> None:
        self.cache = cache
        self.optimistic_ttl_s = optimistic_ttl_s
        self._optimistic: dict[int, float] = {}

    def match(self, hashes: Sequence[int], max_blocks: int, now: float) -> int:
        num = 0
        for h in hashes[:max_blocks]:
            if h in self.cache or self._optimistic.get(h, -1.0) > now:
                num += 1
            else:
                break
        return num

    def insert(self, hashes: Sequence[int]) -> None:
        """The worker cached ``hashes``: its events confirm them (the router's entries become
        precise) and remove what it evicted, optimistic entries included."""
        evicted = self.cache.insert(hashes)
        for h in (*hashes, *evicted):
            self._optimistic.pop(h, None)

    def add_optimistic(self, hashes: Sequence[int], now: float) -> None:
        expiry = now + self.optimistic_ttl_s
        for h in hashes:
            self._optimistic[h] = expiry
        if len(self._optimistic) > 4 * max(1, self.cache.capacity_blocks):
            self._optimistic = {h: t for h, t in self._optimistic.items() if t > now}
