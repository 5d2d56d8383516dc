"""Chained prefix-block hashes (engine/hashing.py).

These hashes are shared between the workers' prefix caches and the router, which
runs in another process (and without torch), so their exact values are part of
the wire contract: the pinned-value test below must only change on purpose.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from pdserve.engine.hashing import ROOT_HASH, block_hashes, hash_block

BS = 4


def test_only_full_blocks_are_hashed():
    assert block_hashes([], BS) == []
    assert block_hashes([1, 2, 3], BS) == []
    assert len(block_hashes([1, 2, 3, 4], BS)) == 1
    assert len(block_hashes(list(range(7)), BS)) == 1
    assert len(block_hashes(list(range(8)), BS)) == 2
    # A trailing partial block has no hash and does not change the full ones.
    assert block_hashes(list(range(9)), BS) == block_hashes(list(range(8)), BS)


def test_hashes_are_chained_from_the_root():
    toks = list(range(12))
    hs = block_hashes(toks, BS)
    assert hs[0] == hash_block(ROOT_HASH, toks[0:4])
    assert hs[1] == hash_block(hs[0], toks[4:8])
    assert hs[2] == hash_block(hs[1], toks[8:12])
    # Continuing from a parent hash gives the same chain as hashing everything.
    assert block_hashes(toks[4:], BS, parent_hash=hs[0]) == hs[1:]


def test_changing_a_block_changes_it_and_every_later_hash_only():
    toks = list(range(100, 116))  # 4 blocks
    base = block_hashes(toks, BS)
    assert len(set(base)) == 4

    first = list(toks)
    first[1] += 1  # block 0
    changed = block_hashes(first, BS)
    assert all(a != b for a, b in zip(base, changed))

    third = list(toks)
    third[9] += 1  # block 2
    changed = block_hashes(third, BS)
    assert changed[:2] == base[:2]
    assert changed[2] != base[2] and changed[3] != base[3]


def test_same_block_at_different_positions_hashes_differently():
    # Identical content under a different parent is a different prefix.
    hs = block_hashes([7, 7, 7, 7] * 3, BS)
    assert len(set(hs)) == 3


def test_pinned_values():
    """Shared with the router in another process: an algorithm change must be deliberate."""
    assert hash_block(ROOT_HASH, [1, 2, 3, 4]) == 658132497017838498
    assert block_hashes(list(range(10)), 4) == [5919486166599431679, 3142802598544154706]
    assert block_hashes(list(range(10)), 4, extra_keys=b"tenant-a") == [
        2395786108940747724,
        17080893977626273021,
    ]


def test_hashes_fit_in_64_bits_and_are_deterministic():
    toks = [2**32 - 1, 0, 123456, 42] * 4
    a = block_hashes(toks, BS)
    assert a == block_hashes(list(toks), BS)
    assert all(0 <= h < 2**64 for h in a)


def test_extra_keys_salt_changes_every_hash():
    toks = list(range(8))
    plain = block_hashes(toks, BS)
    salted_a = block_hashes(toks, BS, extra_keys=b"tenant-a")
    salted_b = block_hashes(toks, BS, extra_keys=b"tenant-b")
    assert len({*plain, *salted_a, *salted_b}) == 6
    assert block_hashes(toks, BS, extra_keys=b"tenant-a") == salted_a
    # An empty salt is the same as none.
    assert block_hashes(toks, BS, extra_keys=b"") == plain


def test_bad_block_size_raises():
    with pytest.raises(ValueError, match="0"):
        block_hashes([1, 2, 3], 0)


def test_importable_without_torch():
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
        "from pdserve.engine.hashing import block_hashes\n"
        "print(block_hashes([1, 2, 3, 4], 4)[0])\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "658132497017838498"
