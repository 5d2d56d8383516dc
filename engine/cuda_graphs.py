"""CUDA graphs for decode-only steps: one graph per batch-size bucket, captured at start.

A decode step of ``b`` requests runs the graph of the smallest bucket >= b. Its inputs
are copied into static buffers sized for the largest bucket; rows b..bucket-1 are
padding: token 0 at position 0, slot -1 (the KV store skips it) and a context of one
token on block 0 (read, never written, and its output dropped). Block tables are
padded to ``max_blocks`` columns, so one graph serves every context up to
``max_blocks * block_size`` tokens; a longer decode, or any step with a prefill, runs
eagerly. All graphs share one memory pool and are captured largest first, so the
smaller ones reuse the largest one's activations.

With ``capture=False`` the same buffers and padding run eagerly: that is how the
bucketing is tested on a machine without CUDA.
"""

from __future__ import annotations

import bisect

import torch
from torch import nn

from .attention import AttentionBackend


def graph_batch_sizes(max_batch: int) -> list[int]:
    """Buckets 1, 2, 4, 8, then powers of two and their 1.5x midpoints (12, 16, 24, 32, 48, ...),
    ending at ``max_batch`` so every decode batch the scheduler can form has one."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes = [1, 2, 4, 8]
    p = 8
    while sizes[-1] < max_batch:
        sizes += [p * 3 // 2, p * 2]
        p *= 2
    return sorted({s for s in sizes if s < max_batch} | {max_batch})


def bucket_for(batch: int, buckets: list[int]) -> int | None:
    """Smallest bucket >= batch; None when the batch is larger than every bucket."""
    i = bisect.bisect_left(buckets, batch)
    return buckets[i] if i < len(buckets) else None


class DecodeGraphRunner:
    """Static buffers, one captured forward per bucket, and the padding between them."""

    def __init__(
        self,
        model: nn.Module,
        kv_cache: torch.Tensor,
        attention: AttentionBackend,
        block_size: int,
        *,
        max_batch: int,
        max_blocks: int,
        device: str | torch.device,
        capture: bool = True,
    ) -> None:
        if capture and torch.device(device).type != "cuda":
            raise ValueError(f"CUDA graph capture needs a CUDA device, got {device!r}")
        if max_blocks < 1:
            raise ValueError(f"max_blocks must be >= 1, got {max_blocks}")
        self.model = model
        self.kv_cache = kv_cache
        self.attention = attention
        self.block_size = block_size
        self.buckets = graph_batch_sizes(max_batch)
        self.max_blocks = max_blocks
        self.capture = capture
        n = self.buckets[-1]
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=device)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=device)
        self._no_prefill_lens = torch.zeros(0, 2, dtype=torch.long)  # host, like StepInputs.to keeps it
        self._no_prefill_tables = torch.zeros(0, max_blocks, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._metadata = {b: self._build_metadata(b) for b in self.buckets}

    def _build_metadata(self, bucket: int):
        # Views of the static buffers: the kernels read whatever the buffers hold at replay.
        return self.attention.build_metadata(
            self.slot_mapping[:bucket], self.block_tables[:bucket], self.context_lens[:bucket],
            self._no_prefill_lens, self._no_prefill_tables, self.block_size,
        )

    def _forward(self, bucket: int) -> torch.Tensor:
        return self.model(self.input_ids[:bucket], self.positions[:bucket], self.kv_cache, self._metadata[bucket])

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Warm up (compiles the Triton kernels) and capture every bucket, largest first."""
        if not self.capture:
            return
        pool = torch.cuda.graph_pool_handle()
        for bucket in reversed(self.buckets):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._forward(bucket)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bucket] = self._forward(bucket)
            self.graphs[bucket] = graph
        torch.cuda.synchronize()

    def can_run(self, inputs) -> bool:
        """A decode-only step that fits a bucket and the padded block-table width."""
        return (
            inputs.is_decode_only
            and bucket_for(inputs.input_ids.shape[0], self.buckets) is not None
            and inputs.decode_block_tables.shape[1] <= self.max_blocks
        )

    @torch.inference_mode()
    def run(self, inputs) -> torch.Tensor:
        """Final hidden states [b, hidden] of a decode-only step (see ``can_run``)."""
        b = inputs.input_ids.shape[0]
        bucket = bucket_for(b, self.buckets)
        width = inputs.decode_block_tables.shape[1]
        self.input_ids[:b].copy_(inputs.input_ids, non_blocking=True)
        self.positions[:b].copy_(inputs.positions, non_blocking=True)
        self.slot_mapping[:b].copy_(inputs.slot_mapping, non_blocking=True)
        self.block_tables[:b, :width].copy_(inputs.decode_block_tables, non_blocking=True)
        self.block_tables[:b, width:].zero_()
        self.context_lens[:b].copy_(inputs.decode_context_lens, non_blocking=True)
        # Padding rows (stale from a larger earlier batch otherwise).
        self.input_ids[b:bucket].zero_()
        self.positions[b:bucket].zero_()
        self.slot_mapping[b:bucket].fill_(-1)
        self.block_tables[b:bucket].zero_()
        self.context_lens[b:bucket].fill_(1)
        if self.capture:
            self.graphs[bucket].replay()
            return self.outputs[bucket][:b]
        return self._forward(bucket)[:b]
