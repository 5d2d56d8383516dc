"""The KV block pool (engine/block_pool.py): ref counts, prefix cache, LRU, KV events."""

from __future__ import annotations

import pytest

from pdserve.engine.block_pool import BlockPool, BlockRemoved, BlockStored
from pdserve.engine.hashing import block_hashes

BS = 4


def _chain(tokens):
    """(hashes, per-block token lists) of the full blocks of ``tokens``."""
    hs = block_hashes(tokens, BS)
    return hs, [tokens[i * BS : (i + 1) * BS] for i in range(len(hs))]


def _all_free(pool: BlockPool) -> bool:
    return pool.num_free_blocks == pool.num_blocks and all(b.ref_count == 0 for b in pool.blocks)


def test_bad_size_raises():
    with pytest.raises(ValueError, match="0"):
        BlockPool(0, BS)


def test_allocate_and_free_track_ref_counts():
    pool = BlockPool(4, BS)
    assert pool.num_free_blocks == 4
    a = pool.allocate(3)
    assert [b.ref_count for b in a] == [1, 1, 1]
    assert len({b.block_id for b in a}) == 3
    assert pool.num_free_blocks == 1

    pool.touch(a[:2])  # a second user of the first two (fork / prefix hit)
    assert [b.ref_count for b in a] == [2, 2, 1]
    pool.free(reversed(a))
    assert [b.ref_count for b in a] == [1, 1, 0]
    assert pool.num_free_blocks == 2
    pool.free(a[:2])
    assert _all_free(pool)


def test_allocating_more_than_free_raises_without_side_effects():
    pool = BlockPool(2, BS)
    held = pool.allocate(1)
    with pytest.raises(ValueError, match="2"):
        pool.allocate(2)
    assert pool.num_free_blocks == 1
    pool.free(held)
    assert _all_free(pool)


def test_double_free_raises():
    pool = BlockPool(2, BS)
    (b,) = pool.allocate(1)
    pool.free([b])
    with pytest.raises(RuntimeError, match="double free"):
        pool.free([b])
    assert _all_free(pool)


def test_touch_revives_a_free_cached_block():
    pool = BlockPool(3, BS)
    toks = [1, 2, 3, 4]
    hs, tl = _chain(toks)
    (b,) = pool.allocate(1)
    pool.cache([b], hs, tl, None)
    pool.free([b])
    assert pool.num_free_blocks == 3 and pool.num_cached_blocks == 1

    hit = pool.lookup(hs[0], toks)
    assert hit is b
    pool.touch([hit])
    assert b.ref_count == 1 and pool.num_free_blocks == 2
    # The revived block is never handed out while referenced.
    others = pool.allocate(2)
    assert b not in others
    pool.free([b, *others])
    assert _all_free(pool)


def test_uncached_free_blocks_are_handed_out_before_cached_ones():
    pool = BlockPool(4, BS)
    blocks = pool.allocate(4)
    cached, plain = blocks[:2], blocks[2:]
    hs, tl = _chain(list(range(8)))
    pool.cache(cached, hs, tl, None)
    # Free the cached ones first: the uncached ones must still go out first.
    pool.free(reversed(cached))
    pool.free(reversed(plain))
    assert pool.num_cached_blocks == 2

    first_two = pool.allocate(2)
    assert {b.block_id for b in first_two} == {b.block_id for b in plain}
    assert pool.num_cached_blocks == 2  # nothing evicted yet
    assert pool.take_events()[-1] == BlockStored(tuple(hs), None, tuple(range(8)), BS)
    pool.free(first_two)
    assert _all_free(pool)


def test_cached_blocks_are_evicted_least_recently_freed_first():
    pool = BlockPool(3, BS)
    blocks = pool.allocate(3)
    # Three independent one-block prefixes.
    chains = [_chain([10 * k + i for i in range(BS)]) for k in range(3)]
    for b, (hs, tl) in zip(blocks, chains):
        pool.cache([b], hs, tl, None)
    pool.take_events()
    # Freed in the order 1, 0, 2: block 1 is the least recently used.
    for i in (1, 0, 2):
        pool.free([blocks[i]])

    (x,) = pool.allocate(1)
    assert x is blocks[1]
    assert pool.take_events() == [BlockRemoved((chains[1][0][0],))]
    assert pool.lookup(chains[1][0][0], chains[1][1][0]) is None
    assert pool.lookup(chains[0][0][0], chains[0][1][0]) is blocks[0]

    # Touching block 2 and freeing it again makes block 0 the oldest.
    pool.touch([blocks[2]])
    pool.free([blocks[2]])
    (y,) = pool.allocate(1)
    assert y is blocks[0]
    pool.free([x, y])
    assert _all_free(pool)


def test_lookup_verifies_tokens():
    pool = BlockPool(2, BS)
    toks = [5, 6, 7, 8]
    hs, tl = _chain(toks)
    (b,) = pool.allocate(1)
    pool.cache([b], hs, tl, None)
    assert pool.lookup(hs[0], toks) is b
    assert pool.lookup(hs[0], (5, 6, 7, 8)) is b
    # Same hash, other tokens (a 64-bit collision): no hit.
    assert pool.lookup(hs[0], [5, 6, 7, 9]) is None
    assert pool.lookup(hs[0] ^ 1, toks) is None
    pool.free([b])
    assert _all_free(pool)


def test_caching_emits_stored_with_parent_and_eviction_emits_removed():
    pool = BlockPool(4, BS)
    toks = list(range(100, 112))
    hs, tl = _chain(toks)  # three blocks
    blocks = pool.allocate(3)

    pool.cache(blocks[:1], hs[:1], tl[:1], None)
    pool.cache(blocks[1:3], hs[1:3], tl[1:3], hs[0])
    assert pool.take_events() == [
        BlockStored((hs[0],), None, tuple(toks[:4]), BS),
        BlockStored((hs[1], hs[2]), hs[0], tuple(toks[4:12]), BS),
    ]
    assert pool.take_events() == []
    assert [b.block_hash for b in blocks] == hs

    pool.free(reversed(blocks))  # tail first: it is evicted first
    got = pool.allocate(3)  # the one never-used block, then two cached ones
    assert got[0].block_id == 3
    assert got[1:] == [blocks[2], blocks[1]]
    assert pool.take_events() == [BlockRemoved((hs[2], hs[1]))]
    assert pool.num_cached_blocks == 1
    assert all(b.block_hash is None and b.token_ids is None for b in got)
    pool.free(got)
    assert _all_free(pool)


def test_duplicate_content_is_not_cached_twice():
    pool = BlockPool(4, BS)
    toks = list(range(8))
    hs, tl = _chain(toks)
    a = pool.allocate(2)
    b = pool.allocate(2)  # a second request computed the same prefix itself
    pool.cache(a, hs, tl, None)
    pool.cache(b, hs, tl, None)
    assert pool.num_cached_blocks == 2
    assert [x.block_hash for x in b] == [None, None]
    assert len(pool.take_events()) == 1  # only the first caching is announced
    assert pool.lookup(hs[1], tl[1]) is a[1]
    # Re-caching a block that already has its hash is a no-op too.
    pool.cache(a, hs, tl, None)
    assert pool.take_events() == []
    # b's blocks are plain: freed, they are handed out before a's cached ones.
    pool.free(reversed(a))
    pool.free(reversed(b))
    assert set(pool.allocate(2)) == set(b)
    assert pool.take_events() == []
    pool.free(b)
    assert _all_free(pool)


def test_partial_run_of_new_blocks_gets_the_right_parent():
    # Block 0 is already cached elsewhere; a new chain stores blocks 1 and 2
    # with block 0's hash as parent.
    pool = BlockPool(5, BS)
    toks = list(range(12))
    hs, tl = _chain(toks)
    first = pool.allocate(1)
    pool.cache(first, hs[:1], tl[:1], None)
    pool.take_events()
    mine = pool.allocate(3)
    pool.cache(mine, hs, tl, None)
    assert pool.take_events() == [BlockStored((hs[1], hs[2]), hs[0], tuple(toks[4:12]), BS)]
    pool.free(first)
    pool.free(reversed(mine))
    assert _all_free(pool)


def test_caching_disabled_is_a_no_op():
    pool = BlockPool(2, BS, enable_caching=False)
    hs, tl = _chain([1, 2, 3, 4])
    blocks = pool.allocate(1)
    pool.cache(blocks, hs, tl, None)
    assert pool.num_cached_blocks == 0
    assert pool.lookup(hs[0], tl[0]) is None
    assert pool.take_events() == []
    pool.free(blocks)
    assert _all_free(pool)


def test_reset_prefix_cache():
    pool = BlockPool(3, BS)
    hs, tl = _chain(list(range(8)))
    blocks = pool.allocate(2)
    pool.cache(blocks, hs, tl, None)
    pool.take_events()

    assert pool.reset_prefix_cache() is False  # blocks are in use
    assert pool.num_cached_blocks == 2

    pool.free(reversed(blocks))
    assert pool.reset_prefix_cache() is True
    assert pool.num_cached_blocks == 0
    assert all(b.block_hash is None for b in pool.blocks)
    assert pool.lookup(hs[0], tl[0]) is None
    (ev,) = pool.take_events()
    assert isinstance(ev, BlockRemoved) and set(ev.block_hashes) == set(hs)
    # Resetting an empty cache emits nothing.
    assert pool.reset_prefix_cache() is True
    assert pool.take_events() == []
    # The blocks are reusable and can be cached again.
    again = pool.allocate(2)
    pool.cache(again, hs, tl, None)
    assert pool.num_cached_blocks == 2
    pool.free(again)
    assert _all_free(pool)
