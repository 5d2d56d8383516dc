"""The transfer planner and compatibility checks for the MLA latent cache ("mla_latent").

The latent is one "head" replicated on every TP rank, with no V plane: each destination
rank must receive all of it, from exactly ONE source rank, whatever the two TP sizes (never
a copy per source rank); and a latent cache never matches a K/V cache (plan, agents,
registration).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from pdserve.deploy.runner import KV_LAYOUTS
from pdserve.deploy.store.base import IncompatibleWorkerError, check_compatible
from pdserve.kvtransfer import KVRegionLayout, available_backends, create_agent, plan_transfer
from pdserve.proto import PROTOCOL_VERSION
from pdserve.proto import pdserve_pb2 as pb

LATENT_DIM = 48  # kv_lora_rank 32 + rope 16


def latent_group(tp: int, *, layers=3, blocks=16, bs=4, dtype="bfloat16"):
    return [KVRegionLayout.for_rank(num_layers=layers, num_blocks=blocks, num_kv_heads=1, block_size=bs,
                                    head_dim=LATENT_DIM, dtype=dtype, tp_rank=r, tp_size=tp,
                                    cache_kind="mla_latent")
            for r in range(tp)]


def test_layout_matches_the_engine_region():
    """Offsets and sizes agree with a torch tensor of the engine's latent shape, on every rank."""
    for lay in latent_group(2, layers=2, blocks=5, bs=8, dtype="float16"):
        assert lay.shape == (2, 5, 1, 1, 8, LATENT_DIM) and lay.num_planes == 1
        assert (lay.kv_head_start, lay.num_local_kv_heads) == (0, 1)  # replicated
        region = torch.zeros(lay.shape, dtype=torch.float16)
        assert lay.region_bytes == region.numel() * 2 and lay.block_bytes == region[0, 0].numel() * 2
        base = region.data_ptr()
        assert lay.offset(1, 3) == region[1, 3].data_ptr() - base
        with pytest.raises(IndexError):
            lay.offset(0, 0, kv=1)  # no V plane
        assert KVRegionLayout.for_region(region, num_kv_heads=1, tp_rank=lay.tp_rank, tp_size=2,
                                         cache_kind="mla_latent") == lay
        assert KVRegionLayout.from_dict(lay.to_dict()) == lay


def apply(plans, src_regions, dst_regions):
    writes = [np.zeros(r.shape, dtype=np.int32) for r in dst_regions]
    for p in plans:
        for so, do, n in p.descs.tolist():
            dst_regions[p.dst_rank][do:do + n] = src_regions[p.src_rank][so:so + n]
            writes[p.dst_rank][do:do + n] += 1
    return writes


@pytest.mark.parametrize(("p", "d"), [(1, 1), (1, 2), (2, 1), (2, 2), (4, 2), (2, 4), (1, 8)])
def test_each_decode_rank_gets_the_whole_latent_from_one_prefill_rank(p, d):
    src, dst = latent_group(p), latent_group(d)
    rng = np.random.default_rng(p * 10 + d)
    s0 = src[0]
    logical = rng.integers(0, 256, size=(s0.num_layers, s0.num_blocks, s0.block_bytes), dtype=np.uint8)
    src_regions = [logical.reshape(-1).copy() for _ in src]  # replicated: every rank holds the same bytes
    dst_regions = [rng.integers(0, 256, size=x.region_bytes, dtype=np.uint8) for x in dst]
    before = [r.copy() for r in dst_regions]
    src_blocks, dst_blocks = [3, 4, 5, 9], [0, 1, 7, 2]
    plans = plan_transfer(src, dst, src_blocks, dst_blocks)

    assert sorted(pl.dst_rank for pl in plans) == list(range(d))  # one plan per destination rank
    for pl in plans:
        assert pl.src_rank == pl.dst_rank % p  # replicas share the load, deterministically
        assert pl.num_bytes == s0.num_layers * len(src_blocks) * s0.block_bytes  # one copy, not p
    writes = apply(plans, src_regions, dst_regions)
    for r in range(d):
        got = dst_regions[r].reshape(s0.num_layers, s0.num_blocks, -1)
        want = before[r].reshape(s0.num_layers, s0.num_blocks, -1).copy()
        want[:, dst_blocks] = logical[:, src_blocks]
        np.testing.assert_array_equal(got, want)
        target = np.zeros((s0.num_layers, s0.num_blocks, s0.block_bytes), dtype=np.int32)
        target[:, dst_blocks] = 1
        np.testing.assert_array_equal(writes[r], target.reshape(-1))  # each byte once, nothing else


def test_descriptors_merge_runs_of_consecutive_blocks():
    [plan] = plan_transfer(latent_group(1), latent_group(1), [2, 3, 4, 8], [5, 6, 7, 0])
    assert plan.num_descriptors == 3 * 2  # per layer: blocks 2-4 -> 5-7 in one run, then 8 -> 0
    [plan] = plan_transfer(latent_group(1), latent_group(1), list(range(16)), list(range(16)))
    assert plan.num_descriptors == 1  # the whole region


def test_kinds_never_match():
    kv = KVRegionLayout.for_rank(num_layers=3, num_blocks=16, num_kv_heads=1, block_size=4,
                                 head_dim=LATENT_DIM, dtype="bfloat16")
    latent = latent_group(1)[0]
    assert not kv.same_model(latent) and latent.mismatch(kv) == "cache_kind is 'kv', expected 'mla_latent'"
    with pytest.raises(ValueError, match="cache_kind is 'mla_latent', expected 'kv'"):
        plan_transfer([latent], [kv], [0], [0])
    with pytest.raises(ValueError, match="one latent head"):
        KVRegionLayout.for_rank(num_layers=1, num_blocks=2, num_kv_heads=2, block_size=4, head_dim=8,
                                dtype="float32", cache_kind="mla_latent")
    with pytest.raises(ValueError, match="unknown KV cache kind"):
        KVRegionLayout.for_rank(num_layers=1, num_blocks=2, num_kv_heads=1, block_size=4, head_dim=8,
                                dtype="float32", cache_kind="latent")
    with pytest.raises(ValueError, match="not a 'mla_latent' KV region"):
        KVRegionLayout.for_region(torch.zeros(kv.shape), num_kv_heads=1, cache_kind="mla_latent")
    # A peer from before cache kinds existed sends no cache_kind: it is a K/V cache.
    old = {k: v for k, v in kv.to_dict().items() if k != "cache_kind"}
    assert KVRegionLayout.from_dict(old) == kv


_n = itertools.count()


@pytest.mark.parametrize("backend", [pytest.param(b, marks=pytest.mark.skipif(
    b not in available_backends(), reason=f"{b} not installed")) for b in ("nixl", "torch_dist")])
def test_agent_refuses_a_peer_with_another_cache_kind(backend):
    latent = latent_group(1, blocks=4)[0]
    kv = KVRegionLayout.for_rank(num_layers=3, num_blocks=4, num_kv_heads=1, block_size=4,
                                 head_dim=LATENT_DIM, dtype="bfloat16")
    k = next(_n)
    a = create_agent(backend, f"mla{k}", torch.zeros(latent.shape, dtype=torch.bfloat16), latent, default_timeout_s=5)
    b = create_agent(backend, f"kv{k}", torch.zeros(kv.shape, dtype=torch.bfloat16), kv, default_timeout_s=5)
    try:
        with pytest.raises(ValueError, match=r"different KV geometry \(cache_kind is 'kv', expected 'mla_latent'\)"):
            a.add_peer(b.name, b.metadata())
    finally:
        a.close()
        b.close()


def worker(worker_id: str, role: int, kind: str) -> pb.WorkerInfo:
    return pb.WorkerInfo(
        worker_id=worker_id, role=role, address="127.0.0.1:1", protocol_version=PROTOCOL_VERSION,
        model=pb.ModelIdentity(name="m", architecture="DeepseekV3ForCausalLM", weights_digest="d", vocab_size=8),
        kv_layout=pb.KVLayout(layout=KV_LAYOUTS[kind], num_layers=3, num_kv_heads=1, head_dim=LATENT_DIM,
                              block_size=16, dtype="bfloat16", tp_size=1))


def test_registration_refuses_a_worker_with_another_cache_kind():
    decode = worker("d0", pb.DECODE, "mla_latent")
    check_compatible(worker("p0", pb.PREFILL, "mla_latent"), [decode])  # same kind: fine
    with pytest.raises(IncompatibleWorkerError) as e:
        check_compatible(worker("p1", pb.PREFILL, "kv"), [decode])
    assert e.value.field == "kv_layout.layout"
    assert "mla_latent:" in str(e.value) and "'p1' is incompatible with registered worker 'd0'" in str(e.value)
