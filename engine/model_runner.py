"""One rank's model, its KV region, and the tensors of one step.

Rank 0 turns a ``SchedulerOutput`` into ``StepInputs`` (plain tensors), which the
executor sends to every other rank; each rank runs ``execute`` on the same inputs
and rank 0 samples from the returned logits.

Prompt logprobs: a prefill chunk of a request that asked for them also names the
positions whose logits give its prompt tokens' logprobs. ``execute`` computes those
logits a slice at a time, reduces each to the prompt token's logprob and the top-k
(on the logits' device; rank 0 only) and returns just that; ``add_prompt_logprobs``
appends the rows to their requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import torch

from .attention import FP8_KV_DTYPE, AttentionBackend, AttentionMetadata, make_attention_backend
from .cuda_graphs import DecodeGraphRunner
from .config import EngineConfig
from .kv_pool_tier import IDLE_POLL_S, KVPoolAgent, PoolReport, make_pool_agent
from .kv_tiers import DiskKVFiles, HostKVCache, layout_digest, tier_dtype
from .loader import kv_scales_for, load_model
from .moe import set_expert_dispatch
from .parallel import TPGroup
from .scheduler import ScheduledRequest


_EMPTY = torch.zeros(0, dtype=torch.long)

PROMPT_LOGPROBS_ROWS = 512
"""Prompt positions whose logits are computed at once: bounds the [rows, vocab] float32
temporary (256 MiB at a 128k vocabulary) whatever the chunk size."""


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
    prompt_logprobs_indices: torch.Tensor = field(default_factory=lambda: _EMPTY.clone())
    """[P] token indices whose logits give a prompt token's logprob (see ``prompt_logprobs_span``)."""
    prompt_logprobs_token_ids: torch.Tensor = field(default_factory=lambda: _EMPTY.clone())
    """[P] the prompt token each of those rows scores (the one after its position)."""
    prompt_logprobs_k: torch.Tensor = field(default_factory=lambda: _EMPTY.clone())
    """[1] the largest top-k any of those rows asked for; [0] when there is no row."""
    kv_save_ops: torch.Tensor = field(default_factory=lambda: _EMPTY.view(0, 2).clone())
    """[K, 2] (region block id, host slot): evicted blocks to copy to the host tier
    before this step's forward overwrites them (``kv_tiers``)."""
    kv_load_ops: torch.Tensor = field(default_factory=lambda: _EMPTY.view(0, 2).clone())
    """[K, 2] (host slot, region block id): host-tier blocks to copy in for a later step."""
    kv_spill_ops: torch.Tensor = field(default_factory=lambda: _EMPTY.view(0, 3).clone())
    """[K, 3] (host slot, disk slot, block hash): host-tier blocks to write to the disk
    tier before this step's saves reuse their slots."""
    kv_disk_load_ops: torch.Tensor = field(default_factory=lambda: _EMPTY.view(0, 3).clone())
    """[K, 3] (disk slot, region block id, block hash): disk-tier blocks to copy in."""
    kv_pool_put_ops: torch.Tensor = field(default_factory=lambda: _EMPTY.view(0, 2).clone())
    """[K, 2] (host slot, block hash): blocks this step saves to the host tier, also put
    to the KV pool (``kv_pool_tier``)."""
    kv_pool_get_ops: torch.Tensor = field(default_factory=lambda: _EMPTY.view(0, 3).clone())
    """[K, 3] (job id, reserved host slot, block hash): blocks to read from the KV pool."""

    def set_copy_ops(self, ops) -> "StepInputs":
        """Attach a ``kv_cache_manager.CopyOps``."""
        self.kv_spill_ops = ops_tensor(ops.spills, 3)
        self.kv_save_ops = ops_tensor(ops.saves)
        self.kv_load_ops = ops_tensor(ops.loads)
        self.kv_disk_load_ops = ops_tensor(ops.disk_loads, 3)
        self.kv_pool_put_ops = ops_tensor(ops.pool_puts)
        self.kv_pool_get_ops = ops_tensor(ops.pool_gets, 3)
        return self

    @classmethod
    def copies_only(cls, ops) -> "StepInputs":
        """A step with no tokens: only the tier copies (every request is waiting for them)."""
        e = _EMPTY
        return cls(e, e, e, e.view(0, 0), e, e.view(0, 2), e.view(0, 0), e).set_copy_ops(ops)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self)]

    @classmethod
    def from_tensors(cls, tensors: list[torch.Tensor]) -> "StepInputs":
        return cls(*tensors)

    def to(self, device: str | torch.device) -> "StepInputs":
        """Tensors on ``device``, except ``prefill_lens`` and the copy ops: read on the host
        (grid sizes, lists)."""
        moved = [t.to(device, non_blocking=True) for t in self.tensors()]
        out = StepInputs.from_tensors(moved)
        out.prefill_lens = self.prefill_lens.cpu()
        for name in ("kv_save_ops", "kv_load_ops", "kv_spill_ops", "kv_disk_load_ops", "kv_pool_put_ops",
                     "kv_pool_get_ops"):
            setattr(out, name, getattr(self, name).cpu())
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


def ops_tensor(rows: list[tuple[int, ...]], width: int = 2) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long).view(-1, width)


def order_for_step(scheduled: list[ScheduledRequest]) -> list[ScheduledRequest]:
    """Decodes (one new token) first, then prefill chunks, as the attention expects."""
    return [s for s in scheduled if s.num_new_tokens == 1] + [s for s in scheduled if s.num_new_tokens > 1]


def prompt_logprobs_span(s: ScheduledRequest) -> tuple[int, int] | None:
    """Positions ``[start, end)`` of this chunk whose logits the request's prompt logprobs
    still need (position j scores prompt token j + 1), or None.

    Positions collected before a preemption are not collected again. The scheduler never
    lets the prefix cache skip a needed position, so the span always continues the list.
    """
    req = s.request
    first = req.prompt_logprobs_position
    if first is None:
        return None
    computed = req.num_computed_tokens
    if computed > first:
        raise RuntimeError(f"request {req.request_id}: prompt logprobs from position {first} are missing "
                           f"but the chunk starts at {computed}")
    end = min(computed + s.num_new_tokens, req.num_prompt_tokens - 1)
    return (first, end) if first < end else None


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
    lp_indices: list[int] = []
    lp_token_ids: list[int] = []
    lp_k = 0
    for i, s in enumerate(ordered):
        span = prompt_logprobs_span(s)
        if span is not None:
            first = int(cum[i] - num_new[i]) - s.request.num_computed_tokens  # token index of position 0
            lp_indices.extend(range(first + span[0], first + span[1]))
            lp_token_ids.extend(s.request.prompt_token_ids[span[0] + 1 : span[1] + 1])
            lp_k = max(lp_k, s.request.sampling_params.prompt_logprobs)
    return StepInputs(
        input_ids=torch.tensor(input_ids, dtype=torch.long),
        positions=torch.from_numpy(positions),
        slot_mapping=torch.from_numpy(slots),
        decode_block_tables=torch.from_numpy(tables[rows_np[:num_dec], :dec_width].astype(np.int64)),
        decode_context_lens=torch.from_numpy(end[:num_dec].copy()),
        prefill_lens=torch.from_numpy(np.stack([num_new[num_dec:], end[num_dec:]], axis=1)).view(-1, 2),
        prefill_block_tables=torch.from_numpy(tables[rows_np[num_dec:], :pre_width].astype(np.int64)),
        logits_indices=torch.from_numpy((cum - 1)[samples]),
        prompt_logprobs_indices=torch.tensor(lp_indices, dtype=torch.long),
        prompt_logprobs_token_ids=torch.tensor(lp_token_ids, dtype=torch.long),
        prompt_logprobs_k=torch.tensor([lp_k] if lp_indices else [], dtype=torch.long),
    )


@dataclass
class PromptLogprobRows:
    """One step's prompt-logprob rows, in ``StepInputs.prompt_logprobs_indices`` order, on
    the logits' device: the scored prompt token's logprob and the step's top-k."""

    token_logprobs: torch.Tensor  # [P] float32
    top_ids: torch.Tensor  # [P, k]
    top_logprobs: torch.Tensor  # [P, k] float32


@dataclass
class ModelOutput:
    logits: torch.Tensor
    """float32 [num_sampled, vocab], the rows ``logits_indices`` names."""
    prompt_logprobs: PromptLogprobRows | None = None
    """Rank 0, when the step has prompt-logprob rows."""
    pool: PoolReport | None = None
    """With a KV pool: the pool reads every rank finished, and what was put (``kv_pool_tier``)."""


def add_prompt_logprobs(ordered: list[ScheduledRequest], rows: PromptLogprobRows) -> None:
    """Append each request's rows of the step to ``Request.prompt_logprobs`` (prompt token
    first, then its top-k). Call before the scheduler advances ``num_computed_tokens``."""
    token_logprobs = rows.token_logprobs.tolist()
    top_ids, top_logprobs = rows.top_ids.tolist(), rows.top_logprobs.tolist()
    r = 0
    for s in ordered:
        span = prompt_logprobs_span(s)
        if span is None:
            continue
        req = s.request
        k = req.sampling_params.prompt_logprobs
        for j in range(span[0], span[1]):
            entry = {req.prompt_token_ids[j + 1]: token_logprobs[r]}
            for t, v in zip(top_ids[r][:k], top_logprobs[r][:k]):
                entry.setdefault(t, v)
            req.prompt_logprobs.append(entry)
            r += 1
    if r != len(token_logprobs):
        raise RuntimeError(f"{len(token_logprobs)} prompt-logprob rows for {r} positions")


def kv_block_bytes(config: EngineConfig, tp: TPGroup) -> int:
    """Bytes one block takes on one rank: every layer, K and V (or the MLA latent), this rank's KV heads."""
    m = config.model
    _, kv_heads = tp.kv_head_shard(m.num_kv_heads)
    elem = torch.empty((), dtype=config.kv_dtype).element_size()
    return m.num_layers * m.num_cache_planes * kv_heads * config.cache.block_size * m.head_dim * elem


class ModelRunner:
    def __init__(self, config: EngineConfig, num_blocks: int, tp: TPGroup) -> None:
        self.config = config
        self.tp = tp
        self.block_size = config.cache.block_size
        self.attention = make_attention_backend(config.resolved_attention_backend, config.device, config.model.cache_kind)
        self.model = load_model(config.model, tp, config.dtype, config.device, config.context_len)
        self.model.set_kernels(self.attention, config.fused_ops_enabled)
        set_expert_dispatch(self.model, config.parallel.expert_dispatch)
        m = config.model
        self.kv_cache = torch.zeros(
            m.num_layers, num_blocks, m.num_cache_planes, self.model.num_local_kv_heads, self.block_size, m.head_dim,
            dtype=config.kv_dtype, device=config.device,
        )
        self.kv_scales = kv_scales_for(self.model, config) if config.kv_dtype == FP8_KV_DTYPE else None
        """Per-layer (k_scale, v_scale) of an FP8 cache; None otherwise."""
        # The tiers copy bytes; float8 has no CPU index_copy_/index_put_, so they see uint8.
        copyable = self.kv_cache.view(tier_dtype(config))
        self.host_kv: HostKVCache | None = None
        num_host_blocks = config.cache.num_host_blocks(kv_block_bytes(config, tp))
        if num_host_blocks:
            disk = None
            if config.cache.offload_dir is not None:
                disk = DiskKVFiles(config.cache.offload_dir, tp.rank, layout_digest(config),
                                   (copyable.shape[0], *copyable.shape[2:]), copyable.dtype)
            self.host_kv = HostKVCache(copyable, num_host_blocks, disk)
        self.pool: KVPoolAgent | None = None
        if getattr(config.cache, "kv_pool", None) is not None and self.host_kv is not None:
            self.pool = make_pool_agent(config, tp, self.host_kv.host)
        self.graphs: DecodeGraphRunner | None = None
        if config.cuda_graphs_enabled:
            self.graphs = DecodeGraphRunner(
                self.model, self.kv_cache, self.attention, self.block_size,
                max_batch=config.scheduler.max_num_seqs,
                max_blocks=-(-min(config.cuda_graph_max_len, config.context_len) // self.block_size),
                device=config.device, capture=True,
            )
            self.graphs.capture_all()

    def execute(self, inputs: StepInputs) -> torch.Tensor:
        """Run one step; returns float32 logits [num_sampled, vocab] (on every rank)."""
        return self.run(inputs).logits

    @torch.inference_mode()
    def run(self, inputs: StepInputs) -> ModelOutput:
        """Run one step: the sampled rows' logits (every rank) and the prompt-logprob rows (rank 0)."""
        # Only rank 0 reduces to the top-k; it reads k before the move, from the host (no sync).
        k = int(inputs.prompt_logprobs_k[0]) if self.tp.rank == 0 and inputs.prompt_logprobs_k.shape[0] else 0
        pool = None
        if self.host_kv is not None:
            self.host_kv.wait()  # the previous step's loads land before anything reads them
            if self.pool is not None:  # every rank, at the same point: it may be a collective
                pool = self.pool.poll(0.0 if inputs.num_tokens else IDLE_POLL_S)
            if inputs.kv_spill_ops.shape[0]:
                self.host_kv.spill(inputs.kv_spill_ops.cpu())
            saves = inputs.kv_save_ops.cpu()
            if self.pool is not None and saves.shape[0]:
                self.pool.wait_slots(saves[:, 1].tolist())  # a put may still read a reused slot
            self.host_kv.save(saves)
            if self.pool is not None:  # after the spills and saves: gets overwrite their slots
                self.pool.put(inputs.kv_pool_put_ops.cpu())
                self.pool.start_gets(inputs.kv_pool_get_ops.cpu())
            self.host_kv.start_loads(inputs.kv_load_ops.cpu(), inputs.kv_disk_load_ops.cpu())
        if not inputs.num_tokens:
            return ModelOutput(torch.empty(0, self.config.model.vocab_size), pool=pool)
        device = self.config.device
        if self.graphs is not None and self.graphs.can_run(inputs):
            hidden = self.graphs.run(inputs)
            logits_indices = inputs.logits_indices.to(device)
        else:
            inputs = inputs.to(device)
            meta = inputs.attention_metadata(self.block_size, self.attention)
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_cache, meta)
            logits_indices = inputs.logits_indices
        logits = self.model.compute_logits(hidden[logits_indices]).float()
        prompt_logprobs = None
        if inputs.prompt_logprobs_indices.shape[0]:
            prompt_logprobs = self._prompt_logprobs(
                hidden, inputs.prompt_logprobs_indices.to(device), inputs.prompt_logprobs_token_ids.to(device), k)
        return ModelOutput(logits, prompt_logprobs, pool)

    def close(self) -> None:
        """Leave the KV pool, if this rank joined it."""
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def _prompt_logprobs(
        self, hidden: torch.Tensor, indices: torch.Tensor, token_ids: torch.Tensor, k: int
    ) -> PromptLogprobRows | None:
        """log_softmax of the raw logits at ``indices``, PROMPT_LOGPROBS_ROWS at a time, each
        slice reduced to the scored token's logprob and the top-k before the next slice."""
        is_rank0 = self.tp.rank == 0
        token_logprobs, top_ids, top_logprobs = [], [], []
        for start in range(0, indices.shape[0], PROMPT_LOGPROBS_ROWS):
            rows = indices[start : start + PROMPT_LOGPROBS_ROWS]
            # Every rank takes part: the LM head all-gathers its vocabulary shards.
            logits = self.model.compute_logits(hidden[rows]).float()  # [rows, vocab]
            if not is_rank0:
                continue
            logprobs = torch.log_softmax(logits, dim=-1)
            targets = token_ids[start : start + PROMPT_LOGPROBS_ROWS]
            token_logprobs.append(logprobs.gather(1, targets.unsqueeze(1)).squeeze(1))
            values, ids = logprobs.topk(k, dim=-1)
            top_ids.append(ids)
            top_logprobs.append(values)
        if not is_rank0:
            return None
        return PromptLogprobRows(torch.cat(token_logprobs), torch.cat(top_ids), torch.cat(top_logprobs))
