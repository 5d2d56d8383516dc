"""One rank's model, its KV region, and the tensors of one step.

Rank 0 turns a ``SchedulerOutput`` into ``StepInputs`` (plain tensors), which the
executor sends to every other rank; each rank runs ``execute`` on the same inputs
and rank 0 samples from the returned logits.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .attention import AttentionBackend, AttentionMetadata, make_attention_backend
from .cuda_graphs import DecodeGraphRunner
from .config import EngineConfig
from .loader import load_model
from .parallel import TPGroup
from .scheduler import ScheduledRequest


@dataclass
class StepInputs:
    """Everything a rank needs for one forward pass. Tokens: decodes first, then prefill chunks."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T]
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks]
    decode_context_lens: torch.Tensor  # [num_decodes]
    prefill_lens: torch.Tensor  # [num_prefills, 2]: (query_len, context_len)
    prefill_block_tables: torch.Tensor  # [num_prefills, max_blocks]
    logits_indices: torch.Tensor  # [num_sampled] token index whose logits are wanted

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self)]

    @classmethod
    def from_tensors(cls, tensors: list[torch.Tensor]) -> "StepInputs":
        return cls(*tensors)

    def to(self, device: str | torch.device) -> "StepInputs":
        """Tensors on ``device``, except ``prefill_lens``: read on the host (grid sizes, lists)."""
        moved = [t.to(device, non_blocking=True) for t in self.tensors()]
        out = StepInputs.from_tensors(moved)
        out.prefill_lens = self.prefill_lens.cpu()
        return out

    @property
    def is_decode_only(self) -> bool:
        return self.prefill_lens.shape[0] == 0 and self.decode_context_lens.shape[0] == self.input_ids.shape[0]

    def attention_metadata(self, block_size: int, backend: AttentionBackend | None = None) -> AttentionMetadata:
        backend = backend or AttentionBackend()
        return backend.build_metadata(
            self.slot_mapping, self.decode_block_tables, self.decode_context_lens,
            self.prefill_lens, self.prefill_block_tables, block_size,
        )


def order_for_step(scheduled: list[ScheduledRequest]) -> list[ScheduledRequest]:
    """Decodes (one new token) first, then prefill chunks, as the attention expects."""
    return [s for s in scheduled if s.num_new_tokens == 1] + [s for s in scheduled if s.num_new_tokens > 1]


def prepare_inputs(ordered: list[ScheduledRequest], block_tables: list[list[int]], block_size: int) -> StepInputs:
    """Build the step's tensors; ``block_tables[i]`` belongs to ``ordered[i]``."""
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    logits_indices: list[int] = []
    dec_tables, dec_lens, pre_tables, pre_lens = [], [], [], []
    for s, table in zip(ordered, block_tables):
        req = s.request
        start = req.num_computed_tokens
        end = start + s.num_new_tokens
        input_ids.extend(req.token_at(start, end))
        for pos in range(start, end):
            positions.append(pos)
            slots.append(table[pos // block_size] * block_size + pos % block_size)
        if s.num_new_tokens == 1:
            dec_tables.append(table)
            dec_lens.append(end)
        else:
            pre_tables.append(table)
            pre_lens.append((s.num_new_tokens, end))
        if s.samples:
            logits_indices.append(len(input_ids) - 1)
    return StepInputs(
        input_ids=torch.tensor(input_ids, dtype=torch.long),
        positions=torch.tensor(positions, dtype=torch.long),
        slot_mapping=torch.tensor(slots, dtype=torch.long),
        decode_block_tables=_pad(dec_tables),
        decode_context_lens=torch.tensor(dec_lens, dtype=torch.long),
        prefill_lens=torch.tensor(pre_lens, dtype=torch.long).view(-1, 2),
        prefill_block_tables=_pad(pre_tables),
        logits_indices=torch.tensor(logits_indices, dtype=torch.long),
    )


def _pad(tables: list[list[int]]) -> torch.Tensor:
    width = max((len(t) for t in tables), default=0)
    out = torch.zeros(len(tables), width, dtype=torch.long)
    for i, t in enumerate(tables):
        out[i, : len(t)] = torch.tensor(t, dtype=torch.long)
    return out


def kv_block_bytes(config: EngineConfig, tp: TPGroup) -> int:
    """Bytes one block takes on one rank: every layer, K and V, this rank's KV heads."""
    m = config.model
    _, kv_heads = tp.kv_head_shard(m.num_kv_heads)
    elem = torch.empty((), dtype=config.dtype).element_size()
    return m.num_layers * 2 * kv_heads * config.cache.block_size * m.head_dim * elem


class ModelRunner:
    def __init__(self, config: EngineConfig, num_blocks: int, tp: TPGroup) -> None:
        self.config = config
        self.tp = tp
        self.block_size = config.cache.block_size
        self.attention = make_attention_backend(config.resolved_attention_backend, config.device)
        self.model = load_model(config.model, tp, config.dtype, config.device, config.context_len)
        self.model.set_kernels(self.attention, config.fused_ops_enabled)
        m = config.model
        self.kv_cache = torch.zeros(
            m.num_layers, num_blocks, 2, self.model.num_local_kv_heads, self.block_size, m.head_dim,
            dtype=config.dtype, device=config.device,
        )
        self.graphs: DecodeGraphRunner | None = None
        if config.cuda_graphs_enabled:
            self.graphs = DecodeGraphRunner(
                self.model, self.kv_cache, self.attention, self.block_size,
                max_batch=config.scheduler.max_num_seqs,
                max_blocks=-(-min(config.cuda_graph_max_len, config.context_len) // self.block_size),
                device=config.device, capture=True,
            )
            self.graphs.capture_all()

    @torch.inference_mode()
    def execute(self, inputs: StepInputs) -> torch.Tensor:
        """Run one step; returns float32 logits [num_sampled, vocab] (on every rank)."""
        if self.graphs is not None and self.graphs.can_run(inputs):
            hidden = self.graphs.run(inputs)
            logits_indices = inputs.logits_indices.to(self.config.device)
        else:
            inputs = inputs.to(self.config.device)
            meta = inputs.attention_metadata(self.block_size, self.attention)
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_cache, meta)
            logits_indices = inputs.logits_indices
        return self.model.compute_logits(hidden[logits_indices]).float()
