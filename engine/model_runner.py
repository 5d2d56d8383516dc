"""One rank's model, its KV region, and the tensors of one step.

Rank 0 turns a ``SchedulerOutput`` into ``StepInputs`` (plain tensors), which the
executor sends to every other rank; each rank runs ``execute`` on the same inputs
and rank 0 samples from the returned logits.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
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


def prepare_inputs(ordered: list[ScheduledRequest], tables: np.ndarray, rows: list[int], block_size: int) -> StepInputs:
    """Build the step's tensors. ``tables`` is the persistent block-table array
    (``KVCacheManager.tables.array``) and ``rows[i]`` the row of ``ordered[i]``.

    Work per request is O(its new tokens) for the token ids and O(1) otherwise; positions,
    slots and block tables are computed for the whole step in numpy.
    """
    n = len(ordered)
    num_new = np.fromiter((s.num_new_tokens for s in ordered), np.int64, n)
    start = np.fromiter((s.request.num_computed_tokens for s in ordered), np.int64, n)
    rows_np = np.asarray(rows, dtype=np.int64)
    end = start + num_new
    cum = np.cumsum(num_new)
    total = int(cum[-1])
    positions = np.arange(total, dtype=np.int64) - np.repeat(cum - num_new - start, num_new)
    token_rows = np.repeat(rows_np, num_new)
    slots = tables[token_rows, positions // block_size].astype(np.int64) * block_size + positions % block_size
    input_ids: list[int] = []
    for s in ordered:
        req = s.request
        if s.num_new_tokens == 1:
            input_ids.append(req.token_at_position(req.num_computed_tokens))
        else:
            input_ids.extend(req.token_at(req.num_computed_tokens, req.num_computed_tokens + s.num_new_tokens))
    num_dec = int(np.searchsorted(num_new, 2)) if n and num_new[0] == 1 else 0  # decodes come first
    blocks_needed = -(-end // block_size)
    dec_width = int(blocks_needed[:num_dec].max()) if num_dec else 0
    pre_width = int(blocks_needed[num_dec:].max()) if num_dec < n else 0
    samples = np.fromiter((s.samples for s in ordered), bool, n)
    return StepInputs(
        input_ids=torch.tensor(input_ids, dtype=torch.long),
        positions=torch.from_numpy(positions),
        slot_mapping=torch.from_numpy(slots),
        decode_block_tables=torch.from_numpy(tables[rows_np[:num_dec], :dec_width].astype(np.int64)),
        decode_context_lens=torch.from_numpy(end[:num_dec].copy()),
        prefill_lens=torch.from_numpy(np.stack([num_new[num_dec:], end[num_dec:]], axis=1)).view(-1, 2),
        prefill_block_tables=torch.from_numpy(tables[rows_np[num_dec:], :pre_width].astype(np.int64)),
        logits_indices=torch.from_numpy((cum - 1)[samples]),
    )


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
