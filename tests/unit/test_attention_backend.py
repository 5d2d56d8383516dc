"""The attention-backend seam and the CUDA-graph bucketing, checked without a GPU.

The Triton kernels run through Triton's interpreter here (tests/conftest.py sets
TRITON_INTERPRET=1 without CUDA), so shapes stay tiny. Float32 throughout: the
interpreter mishandles bfloat16 CPU tensors, so bf16 is covered in tests/gpu only.

Tolerance: the kernels and the pure-torch twin differ only in float32 summation
order (online softmax over tiles vs one softmax; split-K merges), ~1e-6 relative on
these magnitudes; 1e-4 leaves a wide margin while a wrong block, position or
mask moves values by > 1e-2.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pdserve.engine.attention import AttentionBackend, TritonAttentionBackend, make_attention_backend
from pdserve.engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.engine.cuda_graphs import DecodeGraphRunner, bucket_for, graph_batch_sizes
from pdserve.engine.model_runner import ModelRunner, StepInputs
from pdserve.engine.parallel import SINGLE

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = RTOL = 1e-4
BLOCK_SIZE = 16


# -- config ------------------------------------------------------------------------


def _config(model_dir, **kw) -> EngineConfig:
    return EngineConfig(model=ModelConfig.from_dir(model_dir), device=kw.pop("device", "cpu"), **kw)


def test_backend_choice_and_validation(hf_model_dir):
    d = hf_model_dir("llama")
    auto = _config(d)
    assert (auto.resolved_attention_backend, auto.fused_ops_enabled, auto.cuda_graphs_enabled) == ("torch", False, False)
    assert _config(d, attention_backend="triton").resolved_attention_backend == "triton"
    with pytest.raises(ValueError, match="'flash'"):
        _config(d, attention_backend="flash")
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA device"):
        _config(d, attention_backend="triton", cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graph_max_len must be >= 1, got 0"):
        _config(d, cuda_graph_max_len=0)
    odd = dataclasses.replace(ModelConfig.from_dir(d), head_dim=48)  # e.g. a model with 96-wide heads
    assert EngineConfig(model=odd, device="cuda").resolved_attention_backend == "torch"
    with pytest.raises(ValueError, match="head_dim a power of two in \\[16, 256\\], got 48"):
        EngineConfig(model=odd, attention_backend="triton")
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        make_attention_backend("flash", "cpu")


# -- buckets -----------------------------------------------------------------------


def test_graph_batch_sizes_cover_every_batch():
    assert graph_batch_sizes(256) == [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256]
    assert graph_batch_sizes(5) == [1, 2, 4, 5]
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(100)[-3:] == [64, 96, 100]
    with pytest.raises(ValueError, match="got 0"):
        graph_batch_sizes(0)


def test_bucket_for_picks_smallest_bucket_that_fits():
    buckets = graph_batch_sizes(256)
    assert [bucket_for(b, buckets) for b in (1, 3, 8, 9, 33, 129, 256)] == [1, 4, 8, 12, 48, 192, 256]
    assert bucket_for(257, buckets) is None


# -- the backends agree ------------------------------------------------------------


def _random_cache(num_blocks: int, num_kv_heads: int, head_dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_blocks, 2, num_kv_heads, BLOCK_SIZE, head_dim, generator=g).to(DEVICE)


def test_triton_backend_matches_torch_on_a_mixed_step():
    """Two decodes, then a prefill over a cached prefix ending mid-block and a fresh prefill."""
    g = torch.Generator().manual_seed(7)
    num_heads, num_kv_heads, head_dim = 4, 2, 32
    kv = _random_cache(12, num_kv_heads, head_dim, seed=1)
    tables = torch.tensor([[3, 7, 0, 0], [5, 0, 0, 0], [1, 2, 9, 0], [4, 6, 0, 0]])
    decode_lens = torch.tensor([20, 9])
    prefill_lens = torch.tensor([[10, 40], [17, 17]])  # (query_len, context_len)
    num_tokens = 2 + 10 + 17
    q = torch.randn(num_tokens, num_heads, head_dim, generator=g).to(DEVICE)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g).to(DEVICE)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g).to(DEVICE)
    slots = [int(tables[0, 19 // 16]) * 16 + 19 % 16, int(tables[1, 0]) * 16 + 8]
    slots += [int(tables[2, p // 16]) * 16 + p % 16 for p in range(30, 40)]
    slots += [int(tables[3, p // 16]) * 16 + p % 16 for p in range(17)]
    slot_mapping = torch.tensor(slots).to(DEVICE)
    outs = []
    for backend in (AttentionBackend(), TritonAttentionBackend()):
        cache = kv.clone()
        meta = backend.build_metadata(slot_mapping, tables[:2].to(DEVICE), decode_lens.to(DEVICE), prefill_lens,
                                      tables[2:].to(DEVICE), BLOCK_SIZE)
        backend.store_kv(cache, k, v, meta)
        outs.append((backend.forward(q, cache, meta, head_dim**-0.5), cache))
    (ref, ref_cache), (got, got_cache) = outs
    torch.testing.assert_close(got_cache, ref_cache, rtol=0, atol=0)
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL)


def test_triton_metadata_is_int32_on_the_device():
    meta = TritonAttentionBackend().build_metadata(
        torch.arange(6).to(DEVICE), torch.zeros(1, 2, dtype=torch.long).to(DEVICE), torch.tensor([5]).to(DEVICE),
        torch.tensor([[3, 3], [2, 18]]), torch.zeros(2, 2, dtype=torch.long).to(DEVICE), BLOCK_SIZE,
    )
    assert meta.prefill_cu_query_lens.tolist() == [0, 3, 5]
    assert meta.prefill_context_lens_tensor.tolist() == [3, 18]
    assert meta.max_prefill_query_len == 3 and meta.num_decodes == 1
    for t in (meta.decode_block_tables, meta.decode_context_lens, meta.prefill_cu_query_lens,
              meta.prefill_context_lens_tensor, meta.prefill_block_tables):
        assert t.dtype == torch.int32 and t.device.type == torch.device(DEVICE).type


# -- padded bucket == unpadded eager -----------------------------------------------


def _decode_step(context_lens: list[int], num_blocks: int, vocab: int, seed: int) -> StepInputs:
    """Decodes whose last token is new; each request owns distinct random blocks."""
    g = torch.Generator().manual_seed(seed)
    width = max(-(-n // BLOCK_SIZE) for n in context_lens)
    blocks = (torch.randperm(num_blocks - 1, generator=g)[: width * len(context_lens)] + 1).view(len(context_lens), width)
    pos = torch.tensor(context_lens) - 1
    slots = blocks[torch.arange(len(context_lens)), pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
    b = len(context_lens)
    return StepInputs(
        input_ids=torch.randint(3, vocab, (b,), generator=g), positions=pos, slot_mapping=slots,
        decode_block_tables=blocks, decode_context_lens=torch.tensor(context_lens),
        prefill_lens=torch.zeros(0, 2, dtype=torch.long), prefill_block_tables=torch.zeros(0, 0, dtype=torch.long),
        logits_indices=torch.arange(b),
    )


def test_padded_bucket_run_matches_unpadded_eager_run(hf_model_dir):
    """A batch of 3 runs in bucket 4 through the static buffers (capture off, so eagerly
    on any device): same logits as the plain eager step, and the padding row writes no KV."""
    config = _config(hf_model_dir("llama"), device=DEVICE, attention_backend="triton",
                     cache=CacheConfig(block_size=BLOCK_SIZE, num_blocks=24), scheduler=SchedulerConfig(max_num_seqs=6))
    runner = ModelRunner(config, 24, SINGLE)
    g = torch.Generator().manual_seed(3)
    runner.kv_cache.copy_(torch.randn(runner.kv_cache.shape, generator=g) * 0.5)  # a prefilled cache, never zeros
    graphs = DecodeGraphRunner(runner.model, runner.kv_cache, runner.attention, BLOCK_SIZE,
                               max_batch=6, max_blocks=4, device=DEVICE, capture=False)
    assert graphs.buckets == [1, 2, 4, 6]
    step = _decode_step([21, 5, 37], num_blocks=24, vocab=config.model.vocab_size, seed=4)
    assert graphs.can_run(step)

    with torch.inference_mode():
        graphs.run(_decode_step([30, 9, 2, 17, 40], 24, config.model.vocab_size, seed=5))  # leaves stale rows 3, 4
        before = runner.kv_cache.clone()
        padded = runner.model.compute_logits(graphs.run(step)).float()
    changed = (runner.kv_cache != before).flatten(2).any(-1)  # [layers, blocks]
    written = {int(s) // BLOCK_SIZE for s in step.slot_mapping}
    assert {int(b) for b in changed.any(0).nonzero().flatten()} == written  # never block 0 (the padding's)

    eager = runner.execute(step)  # the triton backend, unpadded
    runner.attention = AttentionBackend()  # the pure-torch specification
    runner.model.set_kernels(runner.attention, fused_ops=False)
    reference = runner.execute(step)
    assert padded.shape == eager.shape == (3, config.model.vocab_size)
    torch.testing.assert_close(eager, reference, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(padded, reference, rtol=RTOL, atol=ATOL)


def test_graph_runner_declines_what_it_cannot_run(hf_model_dir):
    config = _config(hf_model_dir("llama"), device=DEVICE, attention_backend="triton",
                     cache=CacheConfig(block_size=BLOCK_SIZE, num_blocks=24))
    runner = ModelRunner(config, 24, SINGLE)
    graphs = DecodeGraphRunner(runner.model, runner.kv_cache, runner.attention, BLOCK_SIZE,
                               max_batch=4, max_blocks=2, device=DEVICE, capture=False)
    vocab = config.model.vocab_size
    assert graphs.can_run(_decode_step([20, 3], 24, vocab, seed=1))
    assert not graphs.can_run(_decode_step([40], 24, vocab, seed=1))  # 3 blocks > max_blocks
    assert not graphs.can_run(_decode_step([5] * 5, 24, vocab, seed=1))  # batch 5 > largest bucket
    mixed = _decode_step([5], 24, vocab, seed=1)
    mixed.prefill_lens = torch.tensor([[2, 2]])
    assert not graphs.can_run(mixed)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        DecodeGraphRunner(runner.model, runner.kv_cache, runner.attention, BLOCK_SIZE,
                          max_batch=4, max_blocks=2, device="cpu", capture=True)
