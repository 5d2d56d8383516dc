"""Chained prefix-block hashes, shared by the workers' prefix caches and the router.

Pure Python on purpose: the router imports this without torch. For a prompt split
into full blocks of ``block_size`` tokens,

    h_0 = H(ROOT,    tokens of block 0, extra_keys)
    h_i = H(h_{i-1}, tokens of block i, extra_keys)

so equal hashes mean equal prefixes (up to a 64-bit collision, which the engine's
cache additionally guards against by comparing the block's tokens). ``H`` is
BLAKE2b truncated to 64 bits: stable across processes and Python versions, unlike
``hash()``. ``extra_keys`` carries anything else the KV depends on, such as a
per-tenant cache salt (``cache_salt_keys``): the engine's requests and the router's
prefix lookups must salt alike, or the router's index never matches the workers' blocks.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

ROOT_HASH = 0
_MASK64 = (1 << 64) - 1


def cache_salt_keys(cache_salt: str | None) -> bytes:
    """The ``extra_keys`` of a request's ``cache_salt`` (vLLM's per-tenant prefix-cache salt);
    no salt: none. ``engine/request.py`` salts its block hashes with the same bytes."""
    return cache_salt.encode() if cache_salt else b""


def hash_block(parent_hash: int, token_ids: Sequence[int], extra_keys: bytes = b"") -> int:
    """Hash one full block chained onto its parent's hash."""
    h = hashlib.blake2b(digest_size=8)
    h.update((parent_hash & _MASK64).to_bytes(8, "little"))
    h.update(struct.pack(f"<{len(token_ids)}I", *token_ids))
    if extra_keys:
        h.update(b"\x00salt")
        h.update(extra_keys)
    return int.from_bytes(h.digest(), "little")


def block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    extra_keys: bytes = b"",
    parent_hash: int = ROOT_HASH,
) -> list[int]:
    """Hashes of every *full* block of ``token_ids`` (a trailing partial block has none)."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    out: list[int] = []
    h = parent_hash
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        h = hash_block(h, token_ids[start : start + block_size], extra_keys)
        out.append(h)
    return out
