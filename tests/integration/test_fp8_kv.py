"""The FP8 KV cache (``kv_cache_dtype="fp8_e4m3"``) against a transformers reference.

FP8 is lossy, so the reference is not plain transformers: it is transformers' eager
attention over keys and values rounded exactly as an FP8 cache stores them
(``hf_reference.fp8_kv_round``: x / scale to float8_e4m3fn, saturating, times scale),
with the checkpoint's per-layer scales. Against it, greedy output is token-identical --
alone, with chunked prefill and preemption, after blocks went to the host tier and back,
at TP 2, and through prefill -> decode. How far FP8 is from the unrounded cache is
measured, not tested: benchmarks/bench_kv_tiers.py --fp8 (docs/benchmarks.md).

The checkpoint here carries per-layer ``self_attn.k_scale`` / ``v_scale`` tensors (as FP8
checkpoints do), and layer 0's key scale is small enough that the largest keys saturate.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import save_file

import hf_reference as H
from pdserve.deploy.runner import worker_info
from pdserve.deploy.store.base import IncompatibleWorkerError, check_compatible
from pdserve.engine import LLM, SamplingParams
from pdserve.engine.config import CacheConfig, EngineConfig, ModelConfig
from pdserve.engine.engine import LLMEngine
from pdserve.proto import pdserve_pb2 as pb

pytestmark = pytest.mark.integration

MAX_TOKENS = 32
LENGTHS = [1, 15, 16, 17, 40, 100, 150, 200]


def scales(num_layers: int) -> tuple[list[float], list[float]]:
    # Keys of this model reach ~4: 4 / 0.005 = 800 > 448, so layer 0's largest keys saturate.
    # As float32 values: that is what the checkpoint stores and the engine reads.
    f32 = lambda xs: [float(torch.tensor(x, dtype=torch.float32)) for x in xs]  # noqa: E731
    return f32([0.005] + [0.02 * (i + 1) for i in range(1, num_layers)]), f32([0.013 * (i + 2) for i in range(num_layers)])


def write_scales(model_dir, k_scales, v_scales, layers=None) -> None:
    layers = range(len(k_scales)) if layers is None else layers
    tensors = {}
    for i in layers:
        tensors[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(k_scales[i])
        tensors[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor(v_scales[i])
    save_file(tensors, str(model_dir / "kv_scales.safetensors"))


@pytest.fixture(scope="module")
def case(hf_model_dir, tmp_path_factory):
    """(model dir with KV scales, prompts, the FP8 reference's greedy tokens)."""
    src = hf_model_dir("llama")
    model_dir = tmp_path_factory.mktemp("fp8") / "llama-fp8-scales"
    shutil.copytree(src, model_dir)
    cfg = H.read_config(model_dir)
    ks, vs = scales(cfg["num_hidden_layers"])
    write_scales(model_dir, ks, vs)
    prompts = H.random_prompts(cfg["vocab_size"], LENGTHS, seed=16)
    want = [t.tokens for t in H.hf_greedy_fp8_kv(model_dir, prompts, MAX_TOKENS, ks, vs)]
    return model_dir, prompts, want, (ks, vs)


def check(llm: LLM, case, prompts=None, want=None, batch: int = 8) -> None:
    model_dir, all_prompts, all_want, _ = case
    prompts, want = prompts or all_prompts, want or all_want
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    got = []
    for i in range(0, len(prompts), batch):
        got += [o.outputs[0].token_ids for o in llm.generate(prompts[i:i + batch], sp)]
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"prompt {i}: first difference at token {H.first_mismatch(g, w)}: {g} != {w}"
    s = llm.kv_cache_stats()
    assert s.num_free_blocks == s.num_total_blocks


@pytest.mark.parametrize("config,batch", [
    (dict(), 8),
    (dict(prefill_chunk_size=16, max_num_batched_tokens=48, num_kv_blocks=40), 8),  # chunks + preemption
], ids=["default", "chunked_preempt"])
def test_greedy_equals_fp8_reference(case, config, batch):
    model_dir = case[0]
    with LLM(model_dir, kv_cache_dtype="fp8_e4m3", **config) as llm:
        runner = llm.engine.executor.runner
        assert runner.kv_cache.dtype == torch.float8_e4m3fn
        assert runner.kv_scales == list(zip(*case[3]))  # taken from the checkpoint
        check(llm, case, batch=batch)
        if "num_kv_blocks" in config:
            assert llm.engine.scheduler.num_preemptions > 0


def test_host_tier_round_trip_is_exact(case):
    """FP8 blocks evicted to the host tier and loaded back are the same bytes: the second
    pass over the prompts hits the tier and still equals the reference."""
    model_dir, prompts, want, _ = case
    with LLM(model_dir, kv_cache_dtype="fp8_e4m3", num_kv_blocks=32, kv_offload_memory=4 << 20) as llm:
        check(llm, case, batch=2)
        check(llm, case, batch=2)
        stats = llm.engine.stats()
        assert stats.tier_hit_tokens > 0 and llm.engine.kv.host.num_pinned == 0


def test_disk_tier_keeps_fp8_blocks_across_a_restart(case, tmp_path):
    """FP8 blocks spilled to the disk tier are re-indexed by a restarted engine (the files
    hold FP8 bytes; the re-index must expect FP8-sized blocks) and served from disk exactly."""
    model_dir, prompts, want, _ = case
    # A region of 20 blocks and a host tier of 4 (FP8 blocks of this model are 6 KiB): the
    # prompts' ~34 blocks overflow both, so the host tier spills to disk.
    kw = dict(kv_cache_dtype="fp8_e4m3", num_kv_blocks=20, kv_offload_memory=4 * 6144, kv_offload_dir=tmp_path / "kv")
    with LLM(model_dir, **kw) as llm:
        assert llm.engine.num_host_blocks == 4
        check(llm, case, batch=1)
        held = len(llm.engine.kv.disk)
        assert held > 0
    with LLM(model_dir, **kw) as again:
        assert len(again.engine.kv.disk) == held  # every block the first run left, re-indexed
        check(again, case, batch=1)
        assert again.engine.executor.runner.host_kv.disk.num_read > 0


def test_tensor_parallel_2_is_exact(case):
    with LLM(case[0], kv_cache_dtype="fp8_e4m3", tensor_parallel_size=2) as llm:
        check(llm, case)


def test_prefill_to_decode_moves_fp8_bytes(case):
    """P -> D in process: the decode engine's region receives the prefill engine's FP8
    bytes as they are (no dequantize, no re-quantize) and continues exactly."""
    model_dir, prompts, want, _ = case

    def engine():
        cfg = EngineConfig(model=ModelConfig.from_dir(model_dir), cache=CacheConfig(num_blocks=64, kv_cache_dtype="fp8_e4m3"))
        return LLMEngine(cfg)

    p, d = engine(), engine()
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    out: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        d.add_request(str(i), prompt, sp, remote_prefill=True)
    moved = 0
    while d.has_unfinished:
        for delta in d.step():
            out.setdefault(delta.request_id, []).extend(delta.token_ids)
        for rp in d.take_remote_prefills():
            rid = rp.request.request_id
            p.add_prefill_only(rid, rp.request.prompt_token_ids, rp.request.sampling_params)
            first = None
            while first is None:
                first = next((x for x in p.step() if x.request_id == rid and x.finish_reason is not None), None)
            assert p.take_finished(rid, rp.request.prompt_token_ids) is not None
            src = p.block_ids(rid)[rp.first_block_index:]
            dst_region, src_region = d.executor.runner.kv_cache, p.executor.runner.kv_cache
            assert src_region.dtype == dst_region.dtype == torch.float8_e4m3fn
            dst_region.view(torch.uint8)[:, rp.block_ids] = src_region.view(torch.uint8)[:, src]
            moved += len(src)
            assert p.release(rid)
            delta = d.complete_remote_prefill(rid, first.token_ids[0], None)
            out.setdefault(rid, []).extend(delta.token_ids)
    assert moved > 0
    assert [out[str(i)] for i in range(len(prompts))] == want
    for e in (p, d):
        s = e.kv_cache_stats()
        assert s.num_free_blocks == s.num_total_blocks


def test_fp8_doubles_the_blocks_of_bf16(case):
    """Same KV memory: twice the blocks of a bfloat16 cache (four times float32's)."""
    memory = 8 << 20
    blocks = {}
    for dtype, kv in (("bfloat16", "auto"), ("bfloat16", "fp8_e4m3"), ("float32", "auto")):
        with LLM(case[0], dtype=dtype, kv_cache_dtype=kv, kv_cache_memory=memory) as llm:
            blocks[dtype, kv] = llm.kv_cache_stats().num_total_blocks
    # (memory // bytes per block: the halves round down)
    assert blocks["bfloat16", "fp8_e4m3"] // 2 == blocks["bfloat16", "auto"]
    assert blocks["bfloat16", "auto"] // 2 == blocks["float32", "auto"]


def test_registration_refuses_a_peer_with_another_cache_dtype(case):
    """The store's compatibility check compares the cache dtype: an FP8 prefill worker
    and a float32-cache decode worker never pair up (their bytes mean different things)."""
    from pdserve.deploy.runner import WorkerConfig

    infos = []
    for kv in ("fp8_e4m3", "auto"):
        args = WorkerConfig(model=str(case[0]), store="embedded://unused", kv_cache_dtype=kv, num_kv_blocks=8)
        with LLM(case[0], kv_cache_dtype=kv, num_kv_blocks=8) as llm:
            infos.append(worker_info(args, pb.PREFILL if kv != "auto" else pb.DECODE, f"w-{kv}",
                                     "127.0.0.1:1", llm.engine, pb.TransferEndpoint()))
    assert infos[0].kv_layout.dtype == "float8_e4m3fn" and infos[1].kv_layout.dtype == "float32"
    with pytest.raises(IncompatibleWorkerError) as info:
        check_compatible(infos[0], [infos[1]])
    assert info.value.field == "kv_layout.dtype"


def test_bad_configuration_is_refused(case, hf_model_dir, tmp_path):
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        CacheConfig(kv_cache_dtype="fp8")
    # Scales for some layers only: the checkpoint is inconsistent, not silently mixed with 1.0.
    partial = tmp_path / "partial"
    shutil.copytree(hf_model_dir("llama"), partial)
    ks, vs = case[3]
    write_scales(partial, ks, vs, layers=[0])
    with pytest.raises(ValueError, match="KV cache scales for some layers but not for layers"):
        LLM(partial, kv_cache_dtype="fp8_e4m3")
    with LLM(partial) as llm:  # a cache that is not FP8 does not use (or check) the scales
        assert llm.engine.executor.runner.kv_scales is None
    bad = tmp_path / "bad"
    shutil.copytree(hf_model_dir("llama"), bad)
    write_scales(bad, [0.0] * len(ks), vs)
    with pytest.raises(ValueError, match="positive finite"):
        LLM(bad, kv_cache_dtype="fp8_e4m3")
    mla = ModelConfig.from_dir(hf_model_dir("deepseek_v3"))
    with pytest.raises(ValueError, match="not supported for MLA models"):
        EngineConfig(model=mla, cache=CacheConfig(kv_cache_dtype="fp8_e4m3"))


def test_triton_kernels_read_and_write_fp8(case):
    """The Triton backend (the interpreter here; compiled on a GPU) over the FP8 cache: the
    kernels quantize on store and dequantize on read as the torch twin does (they fold
    k_scale into the softmax scale and v_scale into the output: equal up to float32
    rounding), so greedy output equals the reference. A few prompts, 8 tokens: slow."""
    model_dir, prompts, want, _ = case
    few = [2, 3, 4]  # 16, 17 and 40 tokens: a full block, one past it, chunks of decodes
    cfg = EngineConfig(model=ModelConfig.from_dir(model_dir), attention_backend="triton",
                       cache=CacheConfig(num_blocks=32, kv_cache_dtype="fp8_e4m3"))
    engine = LLMEngine(cfg)
    sp = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    out: dict[str, list[int]] = {}
    for i in few:
        engine.add_request(str(i), prompts[i], sp)
    while engine.has_unfinished:
        for delta in engine.step():
            out.setdefault(delta.request_id, []).extend(delta.token_ids)
    assert [out[str(i)] for i in few] == [want[i][:8] for i in few]
    s = engine.kv_cache_stats()
    assert s.num_free_blocks == s.num_total_blocks
