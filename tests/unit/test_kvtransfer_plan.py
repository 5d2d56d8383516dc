"""The pure transfer planner: applying a plan with plain memory copies must give each
destination rank exactly its KV heads of the source blocks, and touch nothing else."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from pdserve.engine.parallel import TPGroup
from pdserve.kvtransfer import (KVRegionLayout, choose_sources, kv_head_shard, merge_descriptors,
                                plan_transfer)
from pdserve.kvtransfer.base import as_descs, pack_metadata, unpack_metadata
from pdserve.kvtransfer.frames import Frame, FrameKind, coverage_digest, pack_frame, unpack_frame


def group(tp: int, *, layers=3, blocks=16, heads=4, bs=4, hd=8, dtype="bfloat16"):
    return [KVRegionLayout.for_rank(num_layers=layers, num_blocks=blocks, num_kv_heads=heads,
                                    block_size=bs, head_dim=hd, dtype=dtype, tp_rank=r, tp_size=tp)
            for r in range(tp)]


def fake_cluster(src, dst, rng):
    """Source regions cut from ONE logical cache (so replicated heads agree) and random
    destination regions, all as flat uint8 arrays."""
    s0 = src[0]
    row = s0.head_bytes
    logical = rng.integers(0, 256, size=(s0.num_layers, s0.num_blocks, 2, s0.num_kv_heads, row),
                           dtype=np.uint8)
    src_regions = [np.ascontiguousarray(logical[:, :, :, s.kv_head_start:s.kv_head_end]).reshape(-1)
                   for s in src]
    dst_regions = [rng.integers(0, 256, size=d.region_bytes, dtype=np.uint8) for d in dst]
    return logical, src_regions, dst_regions


def apply(plans, src_regions, dst_regions):
    out = [r.copy() for r in dst_regions]
    writes = [np.zeros(r.shape, dtype=np.int32) for r in dst_regions]
    for p in plans:
        for so, do, n in p.descs.tolist():
            assert n > 0
            out[p.dst_rank][do:do + n] = src_regions[p.src_rank][so:so + n]
            writes[p.dst_rank][do:do + n] += 1
    return out, writes


def expected(logical, dst, dst_regions, src_blocks, dst_blocks, layers):
    out = []
    for d, region in zip(dst, dst_regions):
        view = region.copy().reshape(d.num_layers, d.num_blocks, 2, d.num_local_kv_heads, -1)
        for sb, db in zip(src_blocks, dst_blocks):
            view[layers.start:layers.stop, db] = logical[layers.start:layers.stop, sb, :,
                                                         d.kv_head_start:d.kv_head_end]
        out.append(view.reshape(-1))
    return out


def check(src, dst, src_blocks, dst_blocks, layers=None, seed=0):
    rng = np.random.default_rng(seed)
    logical, sreg, dreg = fake_cluster(src, dst, rng)
    plans = plan_transfer(src, dst, src_blocks, dst_blocks, layers)
    got, writes = apply(plans, sreg, dreg)
    lay = layers if layers is not None else range(src[0].num_layers)
    want = expected(logical, dst, dreg, src_blocks, dst_blocks, lay)
    for d in range(len(dst)):
        np.testing.assert_array_equal(got[d], want[d])
        # each targeted byte written exactly once, everything else never
        target = np.zeros(dst[d].region_bytes, dtype=bool).reshape(
            dst[d].num_layers, dst[d].num_blocks, -1)
        target[lay.start:lay.stop, list(dst_blocks)] = True
        np.testing.assert_array_equal(writes[d], target.reshape(-1).astype(np.int32))
    for p in plans:  # nothing left to merge
        np.testing.assert_array_equal(merge_descriptors(p.descs), p.descs)
    return plans


# ---- layout ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_offsets_match_the_torch_region(dtype):
    lay = KVRegionLayout.for_rank(num_layers=3, num_blocks=5, num_kv_heads=4, block_size=4,
                                  head_dim=8, dtype=dtype, tp_rank=1, tp_size=2)
    region = torch.zeros(lay.shape, dtype=dtype)
    assert KVRegionLayout.for_region(region, num_kv_heads=4, tp_rank=1, tp_size=2) == lay
    assert region.numel() * region.element_size() == lay.region_bytes
    base = region.data_ptr()
    for layer in range(3):
        for block in range(5):
            for kv in range(2):
                for h in range(2):
                    assert region[layer, block, kv, h].data_ptr() - base == lay.offset(layer, block, kv, h)
                    assert lay.head_offset(layer, block, kv, 2 + h) == lay.offset(layer, block, kv, h)
    with pytest.raises(IndexError):
        lay.head_offset(0, 0, 0, 0)  # head 0 lives on rank 0
    with pytest.raises(IndexError):
        lay.offset(3, 0)
    assert KVRegionLayout.from_dict(lay.to_dict()) == lay


@pytest.mark.parametrize("heads,tp", [(4, 1), (4, 2), (4, 4), (2, 4), (1, 2), (2, 8), (3, 6), (2, 3)])
def test_head_shard_matches_the_engine(heads, tp):
    for r in range(tp):
        assert kv_head_shard(heads, r, tp) == TPGroup(r, tp).kv_head_shard(heads)


def test_layout_validation():
    with pytest.raises(ValueError):
        KVRegionLayout.for_rank(num_layers=1, num_blocks=1, num_kv_heads=3, block_size=1,
                                head_dim=1, dtype="float32", tp_rank=0, tp_size=2)
    with pytest.raises(ValueError):
        KVRegionLayout(1, 1, 4, 2, 3, 1, 1, "float32")  # heads [3, 5) of 4
    with pytest.raises(ValueError):
        KVRegionLayout(1, 1, 4, 4, 0, 1, 1, "complex64")
    with pytest.raises(ValueError):
        KVRegionLayout.for_region(torch.zeros(2, 3, 2, 4, 4, 8), num_kv_heads=4, tp_rank=0, tp_size=2)


# ---- planner correctness -----------------------------------------------------------
@pytest.mark.parametrize("p,d", [(1, 1), (1, 2), (2, 1), (2, 2), (1, 4), (4, 1), (2, 4), (4, 2)])
def test_tp_combinations(p, d):
    src, dst = group(p), group(d)
    check(src, dst, [3, 4, 5, 9, 0, 15], [10, 11, 12, 2, 7, 1])


def test_random_layouts_and_tp_combinations():
    rng = random.Random(1234)
    for case in range(150):
        heads = rng.choice([1, 2, 4, 8])
        tps = [t for t in (1, 2, 3, 4, 8) if t > heads or heads % t == 0]
        p, d = rng.choice(tps), rng.choice(tps)
        geo = dict(layers=rng.randint(1, 4), heads=heads, bs=rng.choice([1, 2, 4]),
                   hd=rng.choice([2, 4, 8]), dtype=rng.choice(["float32", "bfloat16", "uint8"]))
        src = group(p, blocks=rng.randint(1, 12), **geo)
        dst = group(d, blocks=rng.randint(1, 12), **geo)
        n = rng.randint(0, min(src[0].num_blocks, dst[0].num_blocks))
        sb = [rng.randrange(src[0].num_blocks) for _ in range(n)]  # sources may repeat
        db = rng.sample(range(dst[0].num_blocks), n)
        if rng.random() < 0.3:  # runs of consecutive blocks
            s0, d0 = rng.randrange(src[0].num_blocks - n + 1), rng.randrange(dst[0].num_blocks - n + 1)
            sb, db = list(range(s0, s0 + n)), list(range(d0, d0 + n))
        L = geo["layers"]
        a = rng.randrange(L)
        layers = rng.choice([None, range(a, rng.randint(a, L)), range(0, L)])
        check(src, dst, sb, db, layers, seed=case)


def test_layer_subset_only_touches_those_layers():
    src, dst = group(2, layers=4), group(1, layers=4)
    plans = check(src, dst, [1, 2], [5, 6], range(0, 2))
    for p in plans:
        assert p.dst_offsets.max() < 2 * dst[0].layer_bytes
    assert plan_transfer(src, dst, [1, 2], [5, 6], range(1, 1)) == []


def test_every_destination_head_has_one_source_and_replicas_share_load():
    src, dst = group(4, heads=2), group(4, heads=2)  # both replicate: ranks 0,1 hold head 0
    assert [choose_sources(src, x) for x in dst] == [[0], [1], [2], [3]]
    plans = check(src, dst, [0, 1], [1, 0])
    assert sorted((p.src_rank, p.dst_rank) for p in plans) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    src2 = group(2, heads=2)
    assert [choose_sources(src2, x) for x in group(4, heads=2)] == [[0], [0], [1], [1]]
    assert [choose_sources(group(8, heads=2), x) for x in group(1, heads=2)] == [[0, 4]]


# ---- minimal descriptors ---------------------------------------------------------------
def test_equal_layouts_one_descriptor_per_layer_and_run():
    src, dst = group(1, layers=3), group(1, layers=3)
    pairs = [(3, 10), (4, 11), (5, 12), (9, 2), (0, 7), (1, 8)]
    plans = check(src, dst, [s for s, _ in pairs], [d for _, d in pairs])
    assert len(plans) == 1 and plans[0].num_descriptors == 3 * 3  # runs: 3-5, 9, 0-1
    blk = src[0].block_bytes
    assert plans[0].descs[0].tolist() == [3 * blk, 10 * blk, 3 * blk]
    # same with tp 2 -> 2: each pair is rank i -> rank i with the same counts
    plans = check(group(2), group(2), [3, 4, 5, 9], [10, 11, 12, 2])
    assert sorted((p.src_rank, p.dst_rank, p.num_descriptors) for p in plans) == [(0, 0, 6), (1, 1, 6)]


def test_whole_region_is_one_descriptor():
    src, dst = group(1, layers=2, blocks=4), group(1, layers=2, blocks=4)
    plans = check(src, dst, range(4), range(4))
    assert plans[0].num_descriptors == 1 and plans[0].num_bytes == src[0].region_bytes


def test_reshard_descriptor_counts():
    L, B = 3, 4
    # 1 -> 2: each destination takes half the heads: one run per (layer, block, K/V)
    plans = check(group(1, layers=L), group(2, layers=L), range(B), range(4, 4 + B))
    assert [(p.src_rank, p.dst_rank, p.num_descriptors) for p in plans] == [(0, 0, L * B * 2), (0, 1, L * B * 2)]
    # 2 -> 1: two sources each fill half of every (layer, block, K/V)
    plans = check(group(2, layers=L), group(1, layers=L), range(B), range(B))
    assert [(p.src_rank, p.dst_rank, p.num_descriptors) for p in plans] == [(0, 0, L * B * 2), (1, 0, L * B * 2)]
    for p in plans:
        assert set(p.lengths.tolist()) == {2 * group(1)[0].head_bytes}


# ---- validation -----------------------------------------------------------------------
def test_plan_validation():
    src, dst = group(1), group(2)
    with pytest.raises(ValueError, match="blocks"):
        plan_transfer(src, dst, [1, 2], [3])
    with pytest.raises(ValueError, match="repeat"):
        plan_transfer(src, dst, [1, 2], [3, 3])
    with pytest.raises(ValueError, match="range"):
        plan_transfer(src, dst, [16], [3])
    with pytest.raises(ValueError, match="range"):
        plan_transfer(src, dst, [1], [-1])
    with pytest.raises(ValueError, match="layers"):
        plan_transfer(src, dst, [1], [2], range(0, 4))
    with pytest.raises(ValueError, match="layers"):
        plan_transfer(src, dst, [1], [2], range(0, 3, 2))
    with pytest.raises(ValueError, match="geometry"):
        plan_transfer(src, group(1, hd=4), [1], [2])
    with pytest.raises(ValueError, match="by rank"):
        plan_transfer(list(reversed(group(2))), dst, [1], [2])
    with pytest.raises(ValueError, match="no source rank"):
        plan_transfer([KVRegionLayout(3, 16, 4, 2, 0, 4, 8, "bfloat16", 0, 1)], dst, [1], [2])
    assert plan_transfer(src, dst, [], []) == []


# ---- wire helpers -----------------------------------------------------------------------
def test_wire_formats_roundtrip():
    md = pack_metadata({"a": 1, "name": "x"}, b"\x00blob\xff")
    assert unpack_metadata(md) == ({"a": 1, "name": "x"}, b"\x00blob\xff")
    with pytest.raises(ValueError):
        unpack_metadata(b"garbage")
    for kind in FrameKind:
        f = Frame(kind, "req-1/0", 123, 2**64 - 5, b"hi")
        assert unpack_frame(pack_frame(f)) == f
    assert unpack_frame(b"plain") is None
    assert as_descs([]).shape == (0, 3)
    plan = plan_transfer(group(1), group(1), [1], [2])[0]
    assert as_descs(plan) is not None and as_descs(plan).shape == (3, 3)


def test_coverage_digest_names_destination_bytes_not_their_split():
    """Writer and receiver plan the same destination with different source blocks (the
    receiver does not know them), so their descriptors merge differently: same digest.
    Any other destination byte: another digest."""
    for src, dst in ((group(1), group(1)), (group(1), group(2)), (group(2), group(1))):
        writer = plan_transfer(src, dst, [7, 2, 9], [4, 5, 6])  # sources not contiguous
        receiver = plan_transfer(src, dst, [0, 1, 2], [4, 5, 6])  # placeholder sources
        for w, r in zip(writer, receiver, strict=True):
            assert coverage_digest(w.descs) == coverage_digest(r.descs)
    src, dst = group(1), group(1)
    writer = plan_transfer(src, dst, [7, 2, 9], [4, 5, 6])
    receiver = plan_transfer(src, dst, [0, 1, 2], [4, 5, 6])
    assert writer[0].num_descriptors == 3 * 3 and receiver[0].num_descriptors == 3  # merged runs
    moved = plan_transfer(src, dst, [0, 1, 2], [4, 5, 7])
    assert coverage_digest(moved[0].descs) != coverage_digest(receiver[0].descs)
    fewer_layers = plan_transfer(src, dst, [0, 1, 2], [4, 5, 6], range(0, 1))
    assert coverage_digest(fewer_layers[0].descs) != coverage_digest(receiver[0].descs)
    assert coverage_digest(as_descs([])) == coverage_digest(as_descs([]))
