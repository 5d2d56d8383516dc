"""The offline API: ``LLM(model=DIR).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig, parse_dtype
from .engine import LLMEngine
from .kv_cache_manager import KVCacheStats
from .outputs import RequestOutput
from .sampling_params import SamplingParams
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from ..kvtransfer.kvpool import KVPoolConfig

Prompt = str | Sequence[int]


class LLM:
    """A whole engine in this process (plus TP rank processes when tensor_parallel_size > 1)."""

    def __init__(
        self,
        model: str | Path,
        *,
        tensor_parallel_size: int = 1,
        dtype: str | torch.dtype = "float32",
        device: str = "cpu",
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        kv_cache_memory: int = 512 << 20,
        enable_prefix_caching: bool = True,
        kv_offload_memory: int = 0,
        kv_offload_dir: str | None = None,
        kv_offload_dir_bytes: int = 16 << 30,
        kv_cache_dtype: str = "auto",
        max_num_batched_tokens: int = 2048,
        prefill_chunk_size: int | None = None,
        max_num_seqs: int = 256,
        max_model_len: int | None = None,
        seed: int = 0,
        attention_backend: str = "auto",
        use_fused_ops: bool | None = None,
        cuda_graphs: bool | None = None,
        overlap_output_processing: bool = True,
        expert_dispatch: str = "all_reduce",
        kv_pool: KVPoolConfig | None = None,
    ) -> None:
        """``kv_pool``: join the cluster-shared KV pool below the host tier (needs
        ``kv_offload_memory``); every rank builds its own client from it."""
        config = EngineConfig(
            model=ModelConfig.from_dir(model),
            dtype=parse_dtype(dtype),
            device=device,
            cache=CacheConfig(block_size, num_kv_blocks, kv_cache_memory, enable_prefix_caching,
                              offload_memory_bytes=kv_offload_memory,
                              offload_dir=None if kv_offload_dir is None else str(kv_offload_dir),
                              offload_dir_bytes=kv_offload_dir_bytes, kv_cache_dtype=kv_cache_dtype, kv_pool=kv_pool),
            scheduler=SchedulerConfig(max_num_batched_tokens, max_num_seqs, prefill_chunk_size),
            parallel=ParallelConfig(tensor_parallel_size, expert_dispatch=expert_dispatch),
            seed=seed,
            max_model_len=max_model_len,
            attention_backend=attention_backend,
            use_fused_ops=use_fused_ops,
            cuda_graphs=cuda_graphs,
            overlap_output_processing=overlap_output_processing,
        )
        self.tokenizer = Tokenizer.from_dir(model)
        self.engine = LLMEngine(config, self.tokenizer)
        self._ids = itertools.count()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run prompts (strings or token-id lists) to completion; results in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = SamplingParams() if sampling_params is None else sampling_params
        params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        added: list[tuple[str, list[int]]] = []
        try:
            for prompt, p in zip(prompts, params):
                rid = str(next(self._ids))
                added.append((rid, self.engine.add_request(rid, prompt, p, stream=False)))
        except Exception:
            for rid, _ in added:
                self.engine.abort_request(rid)
            raise
        results: dict[str, RequestOutput] = {}
        pending = dict(added)
        try:
            while pending:
                # Only requests with a completion that just finished can have a result.
                ended = {d.request_id.partition("#")[0] for d in self.engine.step() if d.finish_reason is not None}
                for rid in ended & pending.keys():
                    out = self.engine.take_finished(rid, pending[rid])
                    if out is not None:
                        results[rid] = out
                        del pending[rid]
        except BaseException:
            for rid in pending:
                self.engine.abort_request(rid)
            raise
        return [results[rid] for rid, _ in added]

    def next_token_logits(self, prompts: Sequence[Prompt]) -> list[torch.Tensor]:
        """Float32 logits [vocab] for the token after each prompt, through the paged engine path."""
        one = SamplingParams(temperature=0.0, max_tokens=1)
        rids = []
        logits: dict[str, torch.Tensor] = {}
        try:
            for prompt in prompts:
                rid = str(next(self._ids))
                self.engine.add_request(rid, prompt, one)
                rids.append(rid)
            while self.engine.has_unfinished:
                self.engine.step()
                logits.update({k: v.clone() for k, v in self.engine.last_logits.items() if k in rids})
        except BaseException:
            for rid in rids:  # a bad prompt (or an interrupt) must not leave the others queued
                self.engine.abort_request(rid)
            raise
        for rid in rids:
            self.engine.take_finished(rid, [])
        return [logits[r] for r in rids]

    def kv_cache_stats(self) -> KVCacheStats:
        return self.engine.kv_cache_stats()

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
