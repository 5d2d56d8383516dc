"""Engine configuration: one frozen dataclass tree, built once per process.

``ModelConfig`` is read from a Hugging Face ``config.json``; the other sections
come from the caller (``LLM(...)`` or the CLI). Validation happens in
``__post_init__`` and raises ``ValueError`` naming the offending value.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..kvtransfer.kvpool import KVPoolConfig

ATTENTION_BACKENDS = ("auto", "torch", "triton")

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
        raise ValueError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16")
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}; use float32, bfloat16 or float16") from None


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 ("llama3") frequency scaling; ``None`` in ModelConfig means plain RoPE."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class MoEConfig:
    """A mixture-of-experts MLP (Qwen2/3-MoE, Mixtral): softmax top-k routing over
    ``num_experts`` SiLU-gated experts; see engine/moe.py."""

    num_experts: int
    top_k: int
    """Experts per token (HF ``num_experts_per_tok``)."""
    intermediate_size: int
    """One expert's hidden size (HF ``moe_intermediate_size``; Mixtral ``intermediate_size``)."""
    renormalize: bool
    """Rescale the top-k probabilities to sum to 1 (HF ``norm_topk_prob``)."""
    sparse_layers: tuple[int, ...]
    """Layers whose MLP is the expert block; the others keep a dense MLP of
    ``ModelConfig.intermediate_size``."""
    shared_expert_intermediate_size: int = 0
    """Qwen2-MoE: one always-on expert of this size behind a sigmoid gate; 0: none."""

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.top_k} must be in [1, num_experts={self.num_experts}]")
        if self.intermediate_size < 1:
            raise ValueError(f"moe_intermediate_size must be >= 1, got {self.intermediate_size}")

    def is_sparse(self, layer: int) -> bool:
        return layer in self.sparse_layers


@dataclass(frozen=True)
class YarnScaling:
    """YaRN RoPE scaling as DeepSeek configs use it (``rope_type: "yarn"``); see engine/mla.py."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    """Also scales the softmax (by ``yarn_mscale(factor, mscale_all_dim) ** 2``), as MLA models do."""
    attention_factor: float | None = None
    """Multiplies cos/sin; None derives it from ``mscale`` / ``mscale_all_dim``."""
    truncate: bool = True

    def __post_init__(self) -> None:
        if not self.factor > 0:
            raise ValueError(f"rope_parameters.factor={self.factor} must be > 0")
        if self.original_max_position_embeddings < 1:
            raise ValueError(f"rope_parameters.original_max_position_embeddings="
                             f"{self.original_max_position_embeddings} must be >= 1")


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek V2/V3); see engine/mla.py.

    For an MLA model ``ModelConfig.num_kv_heads`` is 1 and ``ModelConfig.head_dim`` is
    ``kv_lora_rank + qk_rope_head_dim``: the KV cache holds one latent "head" per token
    (the compressed KV after ``kv_a_layernorm``, then the roped shared key), with no
    separate V plane, replicated on every TP rank.
    """

    q_lora_rank: int | None
    """None: a plain ``q_proj`` (DeepSeek-V2-Lite)."""
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool = True
    """RoPE pairs are adjacent dims (x0, x1), (x2, x3) ... (DeepSeek's layout) rather than halves."""
    yarn: YarnScaling | None = None

    def __post_init__(self) -> None:
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.q_lora_rank is not None and self.q_lora_rank < 1:
            raise ValueError(f"q_lora_rank={self.q_lora_rank} must be >= 1 or null")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Values per token in the cache: kv_lora_rank + qk_rope_head_dim."""
        return self.kv_lora_rank + self.qk_rope_head_dim


@dataclass(frozen=True)
class GroupedTopKConfig:
    """DeepSeek's expert routing (V3 ``noaux_tc``; V2 ``greedy`` / ``group_limited_greedy``)
    and the shared experts; ``ModelConfig.moe`` holds the expert sizes and sparse layers."""

    scoring_func: str
    """"sigmoid" (V3) or "softmax" (V2)."""
    topk_method: str
    """"noaux_tc" (V3: sigmoid + e_score_correction_bias for the choice, sum of each
    group's top-2 ranks groups), "greedy" or "group_limited_greedy" (V2: a group's max)."""
    num_groups: int
    """HF ``n_group``; 1 for greedy."""
    topk_groups: int
    """HF ``topk_group``: groups a token's experts may come from."""
    routed_scaling_factor: float
    num_shared_experts: int
    """HF ``n_shared_experts``: one dense MLP of ``num_shared_experts * moe_intermediate_size``."""

    def __post_init__(self) -> None:
        methods = {"sigmoid": ("noaux_tc",), "softmax": ("greedy", "group_limited_greedy")}
        if self.scoring_func not in methods:
            raise ValueError(f"scoring_func={self.scoring_func!r} is not supported; supported: sigmoid, softmax")
        if self.topk_method not in methods[self.scoring_func]:
            raise ValueError(f"topk_method={self.topk_method!r} is not supported with scoring_func="
                             f"{self.scoring_func!r}; supported: {', '.join(methods[self.scoring_func])}")
        if self.num_groups < 1 or not 1 <= self.topk_groups <= self.num_groups:
            raise ValueError(f"n_group={self.num_groups} and topk_group={self.topk_groups}: "
                             f"need 1 <= topk_group <= n_group")
        if self.num_shared_experts < 0:
            raise ValueError(f"n_shared_experts={self.num_shared_experts} must be >= 0")


@dataclass(frozen=True)
class ModelConfig:
    """The parts of a Hugging Face config the runtime needs."""

    model_dir: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    tie_word_embeddings: bool
    attention_bias: bool
    """q/k/v projections carry a bias (Qwen2)."""
    qk_norm: bool
    """RMSNorm on each head of q and k before RoPE (Qwen3)."""
    eos_token_ids: tuple[int, ...] = ()
    moe: MoEConfig | None = None
    """The expert MLP of a mixture-of-experts model; None: dense."""
    mla: MLAConfig | None = None
    """Multi-head latent attention (DeepSeek); None: multi-head / grouped-query attention."""
    grouped_topk: GroupedTopKConfig | None = None
    """DeepSeek's expert routing and shared experts (with ``moe``); None: softmax top-k."""

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads ({self.num_kv_heads})"
            )
        if self.mla is not None and (self.num_kv_heads, self.head_dim) != (1, self.mla.latent_dim):
            raise ValueError(f"an MLA model caches one latent head of {self.mla.latent_dim} values, "
                             f"got num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}")

    @property
    def cache_kind(self) -> str:
        """"kv" (K and V planes per block) or "mla_latent" (one latent plane); see engine/attention.py."""
        return "kv" if self.mla is None else "mla_latent"

    @property
    def num_cache_planes(self) -> int:
        """Planes per block in the KV region: 2 (K, V) or 1 (the MLA latent)."""
        return 2 if self.mla is None else 1

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        model_dir = Path(model_dir)
        path = model_dir / "config.json"
        if not path.is_file():
            raise ValueError(f"{model_dir} is not a model directory: no config.json")
        from .models import registry  # the registry's parsers build MoEConfig: import here, not at the top

        cfg = json.loads(path.read_text())
        try:
            arch = registry.find(cfg.get("architectures") or [])
        except ValueError as e:
            raise ValueError(f"{e} (in {path})") from None
        num_heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        rope = _rope_params(cfg)
        eos = _eos_ids(model_dir, cfg)
        fields = dict(
            model_dir=str(model_dir),
            architecture=arch.name,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or hidden // num_heads,
            max_position_embeddings=_max_positions(cfg),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope[0],
            rope_scaling=rope[1],
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            qk_norm=False,
            eos_token_ids=eos,
        )
        fields.update(arch.parse(cfg))
        return cls(**fields)


def _max_positions(cfg: dict) -> int:
    """Context limit. NOTE: attention here is always full; a model trained with a sliding
    window (Mistral v0.1) is exact only up to the window, so the context is capped there."""
    limit = cfg.get("max_position_embeddings", 2048)
    window = cfg.get("sliding_window")
    if window and cfg.get("use_sliding_window", True):
        limit = min(limit, int(window))
    return limit


def _rope_params(cfg: dict) -> tuple[float, RopeScaling | None]:
    # transformers 4.x writes rope_theta + rope_scaling; 5.x writes rope_parameters.
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in (None, "default"):
        return theta, None
    if rope_type == "yarn" and "kv_lora_rank" in cfg:
        return theta, None  # MLA (DeepSeek): YaRN lives in MLAConfig.yarn, read by the registry's parser
    if rope_type != "llama3":
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: default, llama3")
    return theta, RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )


def _eos_ids(model_dir: Path, cfg: dict) -> tuple[int, ...]:
    ids: list[int] = []
    gen = model_dir / "generation_config.json"
    sources = [cfg]
    if gen.is_file():
        sources.append(json.loads(gen.read_text()))
    for src in sources:
        eos = src.get("eos_token_id")
        if eos is None:
            continue
        for e in eos if isinstance(eos, list) else [eos]:
            if e not in ids:
                ids.append(int(e))
    return tuple(ids)


KV_CACHE_DTYPES = ("auto", "fp8_e4m3")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    """Tokens per KV block; the same on every worker of a deployment."""
    num_blocks: int | None = None
    """Explicit pool size; None derives it from ``memory_bytes``."""
    memory_bytes: int = 512 << 20
    """KV memory per rank when ``num_blocks`` is None."""
    enable_prefix_caching: bool = True
    offload_memory_bytes: int = 0
    """Host-memory tier per rank (``kv_tiers``): full blocks evicted from the KV region
    are kept there, LRU, and loaded back on a prefix hit. 0: no host tier."""
    offload_dir: str | None = None
    """Disk tier below the host tier: blocks the host tier evicts are written there (a
    file per block, LRU, ``offload_dir_bytes`` per rank) and survive a restart."""
    offload_dir_bytes: int = 16 << 30
    kv_cache_dtype: str = "auto"
    """"auto": the KV cache holds keys and values in the model's dtype; "fp8_e4m3": in
    float8_e4m3fn with a scale per layer for K and one for V (``engine.attention.quantize_kv``):
    half of bfloat16's bytes per block, on every transfer and tier."""
    kv_pool: KVPoolConfig | None = None
    """The cluster-shared KV pool (Mooncake Store) below the host tier, which it fills
    (``engine/kv_pool_tier.py``); needs ``offload_memory_bytes``. None: no pool."""

    def __post_init__(self) -> None:
        if self.kv_pool is not None and not self.offload_memory_bytes:
            raise ValueError("the KV pool (--kv-pool-master, LLM(kv_pool=...)) needs a host tier to fill: set "
                             "--kv-offload-memory (LLM: kv_offload_memory, CacheConfig.offload_memory_bytes)")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.offload_dir is not None and not self.offload_memory_bytes:
            raise ValueError("offload_dir needs offload_memory_bytes (the disk tier sits below the host tier)")
        if self.offload_dir_bytes < 1:
            raise ValueError(f"offload_dir_bytes must be >= 1, got {self.offload_dir_bytes}")
        if self.offload_memory_bytes < 0:
            raise ValueError(f"offload_memory_bytes must be >= 0, got {self.offload_memory_bytes}")
        if self.offload_memory_bytes and not self.enable_prefix_caching:
            raise ValueError("offload_memory_bytes needs enable_prefix_caching (the host tier holds cached blocks)")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.memory_bytes < 1:
            raise ValueError(f"memory_bytes must be >= 1, got {self.memory_bytes}")

    def num_disk_blocks(self, block_bytes: int) -> int:
        """Disk-tier blocks per rank (0: no disk tier); ValueError when one does not fit."""
        return 0 if self.offload_dir is None else _tier_blocks("offload_dir_bytes", self.offload_dir_bytes, block_bytes)

    def num_host_blocks(self, block_bytes: int) -> int:
        """Host-tier blocks per rank for blocks of ``block_bytes`` (0: no tier); ValueError
        when the budget cannot hold one block."""
        if not self.offload_memory_bytes:
            return 0
        return _tier_blocks("offload_memory_bytes", self.offload_memory_bytes, block_bytes)


def _tier_blocks(name: str, budget: int, block_bytes: int) -> int:
    n = budget // block_bytes
    if n < 1:
        raise ValueError(f"{name}={budget} cannot hold one KV block ({block_bytes} bytes per rank)")
    return n


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048
    """Token budget of one step (prefill chunks plus decodes)."""
    max_num_seqs: int = 256
    """Most requests running at once."""
    prefill_chunk_size: int | None = None
    """Most prompt tokens one request computes in one step; None: the step budget."""

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.prefill_chunk_size is not None and self.prefill_chunk_size < 1:
            raise ValueError(f"prefill_chunk_size must be >= 1, got {self.prefill_chunk_size}")

    @property
    def chunk_size(self) -> int:
        return min(self.prefill_chunk_size or self.max_num_batched_tokens, self.max_num_batched_tokens)


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    backend: str | None = None
    """torch.distributed backend; None picks gloo on CPU and nccl on CUDA."""
    expert_dispatch: str = "all_reduce"
    """How a mixture-of-experts layer combines the ranks' experts: "all_reduce" or
    "all_to_all" (engine/moe.py; docs/benchmarks.md "MoE" measures both)."""

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.expert_dispatch not in ("all_reduce", "all_to_all"):
            raise ValueError(f"expert_dispatch must be 'all_reduce' or 'all_to_all', got {self.expert_dispatch!r}")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    seed: int = 0
    max_model_len: int | None = None
    """Longest prompt + output; None: the model's max_position_embeddings."""
    rank_extension: str | None = None
    """"module:factory" each TP rank calls as ``factory(runner, tp, rank_extension_config)``
    to build an object with ``handle(bytes) -> bytes`` and ``close()`` (e.g. a KV transfer
    agent over that rank's KV region); rank 0 reaches every rank's through
    ``executor.call_extension``."""
    rank_extension_config: bytes = b""
    attention_backend: str = "auto"
    """"torch" (pure-torch paged attention, the specification), "triton" (the kernels in
    engine/kernels; on CPU only under TRITON_INTERPRET=1) or "auto": triton on CUDA, torch on CPU."""
    use_fused_ops: bool | None = None
    """Fused Triton RMSNorm/rotary/SiLU-and-mul kernels; None: on CUDA."""
    cuda_graphs: bool | None = None
    """Capture decode-only steps as CUDA graphs at start; None: on for CUDA with the triton
    backend and tensor_parallel_size 1. Needs CUDA and the triton backend."""
    overlap_output_processing: bool = True
    """Process the previous step's text (detokenization, stop strings, deltas) while the
    next forward runs: a thread on the CPU (tensor parallel size 1), the asynchronous
    launch on CUDA. Streamed deltas then arrive one step later; outputs are identical."""
    cuda_graph_max_len: int = 8192
    """Longest context a captured decode step covers (block tables are padded to it);
    a decode step with a longer context runs eagerly."""

    def __post_init__(self) -> None:
        if self.max_model_len is not None and not 1 <= self.max_model_len:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        mla = self.model.mla
        if self.attention_backend == "triton" and mla is not None and not self.kernels_support_head_dim:
            raise ValueError(f"attention_backend='triton' needs kv_lora_rank and qk_rope_head_dim powers of two >= 16, "
                             f"got {mla.kv_lora_rank} and {mla.qk_rope_head_dim}")
        if self.attention_backend == "triton" and not self.kernels_support_head_dim:
            raise ValueError(
                f"attention_backend='triton' needs head_dim a power of two in [16, 256], got {self.model.head_dim}"
            )
        if self.cuda_graph_max_len < 1:
            raise ValueError(f"cuda_graph_max_len must be >= 1, got {self.cuda_graph_max_len}")
        if self.cuda_graphs and not self.is_cuda:
            raise ValueError(f"cuda_graphs=True needs a CUDA device, got device={self.device!r}")
        if self.cuda_graphs and self.resolved_attention_backend != "triton":
            raise ValueError(
                f"cuda_graphs=True needs the triton attention backend, got attention_backend={self.attention_backend!r}"
            )
        if self.cuda_graphs and mla is not None:
            raise ValueError("cuda_graphs=True is not supported for MLA models (DeepSeek) yet")
        if self.cache.kv_cache_dtype != "auto" and mla is not None:
            raise ValueError(f"kv_cache_dtype={self.cache.kv_cache_dtype!r} is not supported for MLA models "
                             "(DeepSeek's latent cache) yet; use kv_cache_dtype='auto'")
        tp = self.parallel.tensor_parallel_size
        routing = self.model.grouped_topk
        if routing is not None and self.model.moe is not None:
            shared = routing.num_shared_experts * self.model.moe.intermediate_size
            if shared % tp:
                raise ValueError(f"n_shared_experts * moe_intermediate_size = {shared} is not divisible by "
                                 f"tensor_parallel_size={tp}")
        for name, value in (("num_attention_heads", self.model.num_heads), ("intermediate_size", self.model.intermediate_size)):
            if value % tp:
                raise ValueError(f"{name}={value} is not divisible by tensor_parallel_size={tp}")
        if self.model.num_kv_heads % tp and tp % self.model.num_kv_heads:
            raise ValueError(
                f"num_key_value_heads={self.model.num_kv_heads} and tensor_parallel_size={tp}: one must divide the other"
            )
        moe = self.model.moe
        if moe is not None and moe.num_experts % tp:  # experts are split over the TP ranks (expert parallelism)
            raise ValueError(f"num_experts={moe.num_experts} is not divisible by tensor_parallel_size={tp}")
        if moe is not None and moe.shared_expert_intermediate_size % tp:
            raise ValueError(
                f"shared_expert_intermediate_size={moe.shared_expert_intermediate_size} is not divisible by "
                f"tensor_parallel_size={tp}"
            )

    @property
    def kv_dtype(self) -> torch.dtype:
        """The KV cache's element type (``CacheConfig.kv_cache_dtype``)."""
        return torch.float8_e4m3fn if self.cache.kv_cache_dtype == "fp8_e4m3" else self.dtype

    @property
    def context_len(self) -> int:
        return self.max_model_len or self.model.max_position_embeddings

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def kernels_support_head_dim(self) -> bool:
        if self.model.mla is not None:  # engine/kernels/mla_decode.py: latent and rope dims powers of two
            return all(n >= 16 and n & (n - 1) == 0 for n in (self.model.mla.kv_lora_rank, self.model.mla.qk_rope_head_dim))
        d = self.model.head_dim
        return 16 <= d <= 256 and d & (d - 1) == 0

    @property
    def resolved_attention_backend(self) -> str:
        if self.attention_backend == "auto":
            return "triton" if self.is_cuda and self.kernels_support_head_dim else "torch"
        return self.attention_backend

    @property
    def fused_ops_enabled(self) -> bool:
        if self.use_fused_ops is None:
            return self.is_cuda and self.kernels_support_head_dim
        return self.use_fused_ops

    @property
    def cuda_graphs_enabled(self) -> bool:
        if self.cuda_graphs is None:
            return (self.is_cuda and self.resolved_attention_backend == "triton" and self.parallel.tensor_parallel_size == 1
                    and self.model.mla is None  # MLA decode steps are not captured yet
                    and self.model.moe is None)  # nor MoE ones (the expert grouping is not checked under capture)
        return self.cuda_graphs
