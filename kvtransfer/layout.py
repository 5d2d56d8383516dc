"""Byte layout of a rank's KV region and the pure transfer planner (scheduler side).

A rank's KV region is ONE contiguous tensor of shape
``[num_layers, num_blocks, 2, num_local_kv_heads, block_size, head_dim]``
(see ``engine/attention.py``): layer-major, K and V of a block adjacent, heads
outermost inside a block. So, in bytes::

    head   = block_size * head_dim * elem        # one head of K (or of V) of one block
    kv     = num_local_kv_heads * head           # all local heads of K (or of V)
    block  = 2 * kv                              # K then V of one block, one layer
    layer  = num_blocks * block
    offset(layer, block, kv, local_head) = layer*L + block*B + kv*KV + local_head*HEAD

**Cache kinds.** ``cache_kind`` "kv" is the layout above (2 planes, K and V);
"mla_latent" (DeepSeek's multi-head latent attention, ``engine/mla.py``) has ONE plane
and one "head" of ``kv_lora_rank + qk_rope_head_dim`` values, the same on every TP
rank: ``[num_layers, num_blocks, 1, 1, block_size, latent_dim]``. In the formulas above
``2`` becomes ``num_planes``. A replicated head is just the case ``num_kv_heads <
tp_size`` of the head rule below, so each destination rank copies the latent once, from
one source rank (``choose_sources``), never once per source rank. Layouts of different
kinds never match (``same_model``).

This module imports neither torch nor any transport: a router or scheduler can
plan transfers from layouts alone. ``plan_transfer`` says which bytes of which
source rank go to which bytes of which destination rank; the worker-side agents
(``base.KVTransferAgent``) move them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

#: Bytes per element for the dtype names a layout may carry (torch's names,
#: without the ``torch.`` prefix).
DTYPE_SIZES: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2": 1,
    "float8_e5m2fnuz": 1,
    "int8": 1,
    "uint8": 1,
}


def dtype_name(dtype: Any) -> str:
    """``torch.bfloat16`` / ``"torch.bfloat16"`` / ``"bfloat16"`` -> ``"bfloat16"``."""
    name = str(dtype)
    return name[len("torch."):] if name.startswith("torch.") else name


#: Planes per block of each KV cache kind (see the module docstring).
CACHE_KINDS: dict[str, int] = {"kv": 2, "mla_latent": 1}


def kv_head_shard(num_kv_heads: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    """(first KV head, KV heads) of a TP rank; same rule as ``engine.parallel.TPGroup``.

    Heads are split evenly when ``tp_size <= num_kv_heads`` and replicated when
    there are more ranks than heads (rank r holds head ``r * num_kv_heads // tp_size``).
    """
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} out of range for tp_size {tp_size}")
    if tp_size <= num_kv_heads:
        if num_kv_heads % tp_size:
            raise ValueError(f"{num_kv_heads} KV heads not divisible by tp_size={tp_size}")
        n = num_kv_heads // tp_size
        return tp_rank * n, n
    return tp_rank * num_kv_heads // tp_size, 1


@dataclass(frozen=True)
class KVRegionLayout:
    """Geometry of one rank's KV region (what a peer needs to address it).

    ``num_kv_heads`` is the model's total; this rank holds global heads
    ``[kv_head_start, kv_head_start + num_local_kv_heads)``.
    """

    num_layers: int
    num_blocks: int
    num_kv_heads: int
    num_local_kv_heads: int
    kv_head_start: int
    block_size: int
    head_dim: int
    dtype: str
    tp_rank: int = 0
    tp_size: int = 1
    cache_kind: str = "kv"
    """"kv" (K and V planes) or "mla_latent" (one latent plane, one head replicated on every rank)."""

    def __post_init__(self) -> None:
        if self.cache_kind not in CACHE_KINDS:
            raise ValueError(f"unknown KV cache kind {self.cache_kind!r}; known: {', '.join(CACHE_KINDS)}")
        if self.cache_kind == "mla_latent" and self.num_kv_heads != 1:
            raise ValueError(f"an mla_latent cache has one latent head, got num_kv_heads={self.num_kv_heads}")
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        if self.dtype not in DTYPE_SIZES:
            raise ValueError(f"unsupported KV dtype {self.dtype!r}")
        for f in ("num_layers", "num_blocks", "num_kv_heads", "num_local_kv_heads",
                  "block_size", "head_dim", "tp_size"):
            if int(getattr(self, f)) <= 0:
                raise ValueError(f"{f} must be positive, got {getattr(self, f)}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank {self.tp_rank} out of range for tp_size {self.tp_size}")
        if not (0 <= self.kv_head_start
                and self.kv_head_start + self.num_local_kv_heads <= self.num_kv_heads):
            raise ValueError(
                f"local heads [{self.kv_head_start}, {self.kv_head_start + self.num_local_kv_heads})"
                f" outside the model's {self.num_kv_heads} KV heads")

    # ---- construction -------------------------------------------------------------
    @classmethod
    def for_rank(cls, *, num_layers: int, num_blocks: int, num_kv_heads: int, block_size: int,
                 head_dim: int, dtype: Any, tp_rank: int = 0, tp_size: int = 1,
                 cache_kind: str = "kv") -> "KVRegionLayout":
        """The layout the engine gives TP rank ``tp_rank`` of ``tp_size``."""
        start, n = kv_head_shard(num_kv_heads, tp_rank, tp_size)
        return cls(num_layers, num_blocks, num_kv_heads, n, start, block_size, head_dim,
                   dtype_name(dtype), tp_rank, tp_size, cache_kind)

    @classmethod
    def for_region(cls, region: Any, *, num_kv_heads: int, tp_rank: int = 0,
                   tp_size: int = 1, cache_kind: str = "kv") -> "KVRegionLayout":
        """Layout of an engine KV tensor ``[L, N, planes, H_local, block_size, head_dim]``
        (planes: 2 for "kv", 1 for "mla_latent")."""
        shape = tuple(region.shape)
        planes = CACHE_KINDS.get(cache_kind)
        if len(shape) != 6 or shape[2] != planes:
            raise ValueError(f"not a {cache_kind!r} KV region shape [L, N, {planes}, H, block_size, head_dim]: {shape}")
        lay = cls.for_rank(num_layers=shape[0], num_blocks=shape[1], num_kv_heads=num_kv_heads,
                           block_size=shape[4], head_dim=shape[5], dtype=region.dtype,
                           tp_rank=tp_rank, tp_size=tp_size, cache_kind=cache_kind)
        if lay.num_local_kv_heads != shape[3]:
            raise ValueError(f"region holds {shape[3]} KV heads; rank {tp_rank}/{tp_size} of "
                             f"{num_kv_heads} heads should hold {lay.num_local_kv_heads}")
        return lay

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "KVRegionLayout":
        """Inverse of ``to_dict``; a dict without ``cache_kind`` (an older peer) is "kv"."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    # ---- sizes and offsets ----------------------------------------------------------
    @property
    def num_planes(self) -> int:
        """Planes per block: 2 (K, V) or 1 (the MLA latent)."""
        return CACHE_KINDS[self.cache_kind]

    @property
    def shape(self) -> tuple[int, int, int, int, int, int]:
        return (self.num_layers, self.num_blocks, self.num_planes, self.num_local_kv_heads, self.block_size,
                self.head_dim)

    @property
    def element_size(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def head_bytes(self) -> int:
        """One head of K (or V) of one block of one layer."""
        return self.block_size * self.head_dim * self.element_size

    @property
    def kv_bytes(self) -> int:
        """All local heads of one plane (K, V or the latent) of one block of one layer."""
        return self.num_local_kv_heads * self.head_bytes

    @property
    def block_bytes(self) -> int:
        """Every plane of one block of one layer (a contiguous run)."""
        return self.num_planes * self.kv_bytes

    @property
    def layer_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    @property
    def region_bytes(self) -> int:
        return self.num_layers * self.layer_bytes

    @property
    def kv_head_end(self) -> int:
        return self.kv_head_start + self.num_local_kv_heads

    def holds_head(self, head: int) -> bool:
        return self.kv_head_start <= head < self.kv_head_end

    def offset(self, layer: int, block: int, kv: int = 0, local_head: int = 0) -> int:
        """Byte offset of (layer, block, plane (K=0/V=1; 0 for the latent), local head index) in the region."""
        if not (0 <= layer < self.num_layers and 0 <= block < self.num_blocks and 0 <= kv < self.num_planes
                and 0 <= local_head < self.num_local_kv_heads):
            raise IndexError(f"({layer}, {block}, {kv}, {local_head}) outside {self.shape}")
        return (layer * self.layer_bytes + block * self.block_bytes + kv * self.kv_bytes
                + local_head * self.head_bytes)

    def head_offset(self, layer: int, block: int, kv: int, head: int) -> int:
        """Byte offset of a GLOBAL head index (must be held by this rank)."""
        if not self.holds_head(head):
            raise IndexError(f"head {head} not held by rank {self.tp_rank} "
                             f"[{self.kv_head_start}, {self.kv_head_end})")
        return self.offset(layer, block, kv, head - self.kv_head_start)

    def same_model(self, other: "KVRegionLayout") -> bool:
        """Whether blocks of ``other`` can be copied into this layout (same geometry)."""
        return (self.cache_kind, self.num_layers, self.num_kv_heads, self.block_size, self.head_dim,
                self.dtype) == (other.cache_kind, other.num_layers, other.num_kv_heads, other.block_size,
                                other.head_dim, other.dtype)

    def mismatch(self, other: "KVRegionLayout") -> str | None:
        """Why blocks of ``other`` cannot be copied into this layout (the first differing
        field, both values), or None when ``same_model``."""
        for f in ("cache_kind", "num_layers", "num_kv_heads", "block_size", "head_dim", "dtype"):
            mine, theirs = getattr(self, f), getattr(other, f)
            if mine != theirs:
                return f"{f} is {theirs!r}, expected {mine!r}"
        return None


@dataclass(frozen=True)
class RankPairPlan:
    """What one source rank writes into one destination rank.

    ``descs`` is an ``int64`` array of shape ``[n, 3]``: rows of
    ``(src_offset_bytes, dst_offset_bytes, num_bytes)``, offsets relative to the
    start of each rank's region, in (layer, block pair, K/V, head run) order and
    merged wherever both sides are contiguous.
    """

    src_rank: int
    dst_rank: int
    descs: np.ndarray

    @property
    def num_descriptors(self) -> int:
        return int(self.descs.shape[0])

    @property
    def num_bytes(self) -> int:
        return int(self.descs[:, 2].sum()) if len(self.descs) else 0

    @property
    def src_offsets(self) -> np.ndarray:
        return self.descs[:, 0]

    @property
    def dst_offsets(self) -> np.ndarray:
        return self.descs[:, 1]

    @property
    def lengths(self) -> np.ndarray:
        return self.descs[:, 2]


def merge_descriptors(descs: np.ndarray) -> np.ndarray:
    """Merge consecutive rows whose source and destination ranges both continue
    the previous row's (order is kept; nothing is reordered)."""
    descs = np.asarray(descs, dtype=np.int64).reshape(-1, 3)
    if len(descs) <= 1:
        return descs.copy()
    src, dst, n = descs[:, 0], descs[:, 1], descs[:, 2]
    cont = (src[1:] == src[:-1] + n[:-1]) & (dst[1:] == dst[:-1] + n[:-1])
    starts = np.concatenate(([0], np.flatnonzero(~cont) + 1))
    out = np.empty((len(starts), 3), dtype=np.int64)
    out[:, 0] = src[starts]
    out[:, 1] = dst[starts]
    out[:, 2] = np.add.reduceat(n, starts)
    return out


def _check_group(layouts: Sequence[KVRegionLayout], what: str) -> None:
    if not layouts:
        raise ValueError(f"no {what} layouts")
    size = len(layouts)
    for i, lay in enumerate(layouts):
        if lay.tp_rank != i or lay.tp_size != size:
            raise ValueError(f"{what} layouts must be listed by rank: entry {i} is rank "
                             f"{lay.tp_rank}/{lay.tp_size} in a group of {size}")
        if not lay.same_model(layouts[0]):
            raise ValueError(f"{what} rank {i} has a different model geometry than rank 0")


def choose_sources(src_layouts: Sequence[KVRegionLayout], dst: KVRegionLayout) -> list[int]:
    """Source rank for each of ``dst``'s local heads (one per head, deterministic).

    When several source ranks hold a head (replicated heads), destination rank d
    takes it from holder ``d % num_holders`` so that replicas share the load.
    """
    out = []
    for head in range(dst.kv_head_start, dst.kv_head_end):
        holders = [s.tp_rank for s in src_layouts if s.holds_head(head)]
        if not holders:
            raise ValueError(f"no source rank holds KV head {head}")
        out.append(holders[dst.tp_rank % len(holders)])
    return out


def plan_transfer(src_layouts: Sequence[KVRegionLayout], dst_layouts: Sequence[KVRegionLayout],
                  src_block_ids: Sequence[int], dst_block_ids: Sequence[int],
                  layers: range | None = None) -> list[RankPairPlan]:
    """Plan copying source blocks into destination blocks across TP groups.

    ``src_block_ids[i]`` (in every source rank's region) goes to ``dst_block_ids[i]``
    (in every destination rank's region); each destination rank receives exactly
    its own KV heads, each head from exactly one source rank. ``layers`` limits the
    copy to a range of layers (step 1; default all). Returns one ``RankPairPlan`` per
    (source rank, destination rank) pair that has something to move, ordered by
    (dst_rank, src_rank). Descriptors are merged where contiguous on both sides, so
    equal layouts give one descriptor per (layer, run of consecutive block pairs).
    """
    _check_group(src_layouts, "source")
    _check_group(dst_layouts, "destination")
    s0, d0 = src_layouts[0], dst_layouts[0]
    if not s0.same_model(d0):
        raise ValueError(f"source and destination geometry differ ({d0.mismatch(s0)}): {s0} vs {d0}")
    if len(src_block_ids) != len(dst_block_ids):
        raise ValueError(f"{len(src_block_ids)} source blocks but {len(dst_block_ids)} destination blocks")
    sb = np.asarray(src_block_ids, dtype=np.int64).reshape(-1)
    db = np.asarray(dst_block_ids, dtype=np.int64).reshape(-1)
    if len(sb) and (sb.min() < 0 or sb.max() >= min(s.num_blocks for s in src_layouts)):
        raise ValueError(f"source block ids out of range [0, {s0.num_blocks})")
    if len(db) and (db.min() < 0 or db.max() >= min(d.num_blocks for d in dst_layouts)):
        raise ValueError(f"destination block ids out of range [0, {d0.num_blocks})")
    if len(np.unique(db)) != len(db):
        raise ValueError("destination block ids repeat (two sources for one block)")
    if layers is None:
        layers = range(s0.num_layers)
    if layers.step != 1 or (len(layers) and (layers.start < 0 or layers.stop > s0.num_layers)):
        raise ValueError(f"layers must be a step-1 range within [0, {s0.num_layers}), got {layers}")
    lay_ids = np.arange(layers.start, layers.stop, dtype=np.int64)

    plans: list[RankPairPlan] = []
    for dst in dst_layouts:
        srcs = choose_sources(src_layouts, dst)
        # runs of consecutive destination heads that come from the same source rank
        runs: dict[int, list[tuple[int, int]]] = {}
        h = 0
        while h < len(srcs):
            e = h
            while e + 1 < len(srcs) and srcs[e + 1] == srcs[h]:
                e += 1
            runs.setdefault(srcs[h], []).append((dst.kv_head_start + h, dst.kv_head_start + e + 1))
            h = e + 1
        for s_rank in sorted(runs):
            src = src_layouts[s_rank]
            r = np.asarray(runs[s_rank], dtype=np.int64)  # [R, 2] global head ranges
            head_b = src.head_bytes  # == dst.head_bytes (same geometry)
            planes = np.arange(src.num_planes)
            # offsets broadcast over [layer, block pair, plane, run]
            s_off = (lay_ids[:, None, None, None] * src.layer_bytes
                     + sb[None, :, None, None] * src.block_bytes
                     + planes[None, None, :, None] * src.kv_bytes
                     + (r[None, None, None, :, 0] - src.kv_head_start) * head_b)
            d_off = (lay_ids[:, None, None, None] * dst.layer_bytes
                     + db[None, :, None, None] * dst.block_bytes
                     + planes[None, None, :, None] * dst.kv_bytes
                     + (r[None, None, None, :, 0] - dst.kv_head_start) * head_b)
            n = np.broadcast_to((r[:, 1] - r[:, 0]) * head_b, s_off.shape)
            descs = np.stack([s_off.reshape(-1), d_off.reshape(-1), n.reshape(-1)], axis=1)
            if len(descs):
                plans.append(RankPairPlan(s_rank, dst.tp_rank, merge_descriptors(descs)))
    return plans
