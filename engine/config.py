"""Engine configuration: one frozen dataclass tree, built once per process.

``ModelConfig`` is read from a Hugging Face ``config.json``; the other sections
come from the caller (``LLM(...)`` or the CLI). Validation happens in
``__post_init__`` and raises ``ValueError`` naming the offending value.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

ATTENTION_BACKENDS = ("auto", "torch", "triton")

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")

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

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads ({self.num_kv_heads})"
            )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        model_dir = Path(model_dir)
        path = model_dir / "config.json"
        if not path.is_file():
            raise ValueError(f"{model_dir} is not a model directory: no config.json")
        cfg = json.loads(path.read_text())
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"unsupported architecture {archs!r} in {path}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        num_heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        rope = _rope_params(cfg)
        eos = _eos_ids(model_dir, cfg)
        return cls(
            model_dir=str(model_dir),
            architecture=arch,
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
            attention_bias=arch == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            eos_token_ids=eos,
        )


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


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    """Tokens per KV block; the same on every worker of a deployment."""
    num_blocks: int | None = None
    """Explicit pool size; None derives it from ``memory_bytes``."""
    memory_bytes: int = 512 << 20
    """KV memory per rank when ``num_blocks`` is None."""
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.memory_bytes < 1:
            raise ValueError(f"memory_bytes must be >= 1, got {self.memory_bytes}")


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

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")


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
        tp = self.parallel.tensor_parallel_size
        for name, value in (("num_attention_heads", self.model.num_heads), ("intermediate_size", self.model.intermediate_size)):
            if value % tp:
                raise ValueError(f"{name}={value} is not divisible by tensor_parallel_size={tp}")
        if self.model.num_kv_heads % tp and tp % self.model.num_kv_heads:
            raise ValueError(
                f"num_key_value_heads={self.model.num_kv_heads} and tensor_parallel_size={tp}: one must divide the other"
            )

    @property
    def context_len(self) -> int:
        return self.max_model_len or self.model.max_position_embeddings

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def kernels_support_head_dim(self) -> bool:
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
            return self.is_cuda and self.resolved_attention_backend == "triton" and self.parallel.tensor_parallel_size == 1
        return self.cuda_graphs
