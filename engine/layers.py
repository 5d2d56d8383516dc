"""Building blocks of Llama-family models, each sharded for one TP rank.

Every parameter that comes from a checkpoint carries a ``weight_loader(param,
tensor, shard_id)`` that cuts this rank's slice out of the full (single-device)
tensor, so the checkpoint loader stays a name map.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import RopeScaling
from .parallel import TPGroup


def _copy_loader(param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"checkpoint tensor has shape {tuple(loaded.shape)}, expected {tuple(param.shape)}")
    param.data.copy_(loaded)


def _param(*shape: int, loader=_copy_loader) -> nn.Parameter:
    p = nn.Parameter(torch.empty(*shape), requires_grad=False)
    p.weight_loader = loader
    return p


def set_fused_ops(root: nn.Module, enabled: bool) -> None:
    """Switch every module under ``root`` that has a ``fused_ops`` flag (norms, MLP, attention)."""
    if enabled:
        from .kernels import activation, norm, rotary  # noqa: F401 - fail here, not mid-forward, without Triton
    for module in root.modules():
        if hasattr(module, "fused_ops"):
            module.fused_ops = enabled


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 like the reference; optionally adds the residual first."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _param(dim)
        self.fused_ops = False

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if self.fused_ops:
            from .kernels.norm import rms_norm

            return rms_norm(x, self.weight, self.eps, residual)
        if residual is not None:
            x = residual = x + residual
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(dtype)
        return out if residual is None else (out, residual)


class ColumnParallelLinear(nn.Module):
    """y = x W^T (+ b) with W's output rows split across ranks; ``out_sizes`` lists merged sub-matrices.

    Each merged sub-matrix i (e.g. gate and up) is split separately, so rank r holds
    rows [r*out_i/tp, (r+1)*out_i/tp) of every one of them.
    """

    def __init__(self, in_features: int, out_sizes: list[int], tp: TPGroup, bias: bool = False) -> None:
        super().__init__()
        self.tp = tp
        self.local_sizes = self._local_sizes(out_sizes)
        self.offsets = [sum(self.local_sizes[:i]) for i in range(len(out_sizes))]
        total = sum(self.local_sizes)
        self.weight = _param(total, in_features, loader=self._load)
        self.bias = _param(total, loader=self._load) if bias else None

    def _local_sizes(self, out_sizes: list[int]) -> list[int]:
        return [self.tp.shard(n)[1] for n in out_sizes]

    def _shard_start(self, index: int) -> int:
        """First row of sub-matrix ``index`` (in the full checkpoint tensor) that this rank holds."""
        return self.tp.rank * self.local_sizes[index]

    def _load(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: int = 0) -> None:
        n = self.local_sizes[shard_id]
        param.data.narrow(0, self.offsets[shard_id], n).copy_(loaded.narrow(0, self._shard_start(shard_id), n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection; this rank's query heads and its (possibly replicated) KV heads."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, tp: TPGroup, bias: bool) -> None:
        self.head_dim = head_dim
        self.num_local_heads = tp.shard(num_heads)[1]
        self.kv_start, self.num_local_kv_heads = tp.kv_head_shard(num_kv_heads)
        super().__init__(hidden, [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], tp, bias)

    def _local_sizes(self, out_sizes: list[int]) -> list[int]:
        kv = self.num_local_kv_heads * self.head_dim
        return [self.num_local_heads * self.head_dim, kv, kv]

    def _shard_start(self, index: int) -> int:
        return super()._shard_start(0) if index == 0 else self.kv_start * self.head_dim

    def _load(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: str = "q") -> None:
        super()._load(param, loaded, "qkv".index(shard_id))


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_local W_local^T): W's input columns are split across ranks."""

    def __init__(self, in_features: int, out_features: int, tp: TPGroup) -> None:
        super().__init__()
        self.tp = tp
        _, self.local_in = tp.shard(in_features)
        self.weight = _param(out_features, self.local_in, loader=self._load)

    def _load(self, param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
        param.data.copy_(loaded.narrow(1, self.tp.rank * self.local_in, self.local_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(F.linear(x, self.weight))


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split across ranks (vocab padded to a multiple of tp); also the LM head."""

    def __init__(self, vocab_size: int, hidden: int, tp: TPGroup) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.shard_size = -(-vocab_size // tp.size)
        self.start = tp.rank * self.shard_size
        self.weight = _param(self.shard_size, hidden, loader=self._load)

    def _load(self, param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
        part = loaded[self.start : self.start + self.shard_size]
        param.data.zero_()
        param.data[: part.shape[0]].copy_(part)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(token_ids, self.weight)
        local = token_ids - self.start
        outside = (local < 0) | (local >= self.shard_size)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0.0)
        return self.tp.all_reduce(out)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits (gathered from every rank) for the given hidden states."""
        local = F.linear(hidden, self.weight)
        return self.tp.all_gather(local)[..., : self.vocab_size]


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE with a precomputed cos/sin table indexed by position."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: RopeScaling | None, dtype: torch.dtype) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos().to(dtype), persistent=False)
        self.register_buffer("sin", emb.sin().to(dtype), persistent=False)
        self.fused_ops = False

    def for_step(self, positions: torch.Tensor):
        """``rotate(q, k) -> (q, k)`` for this step's tokens, shared by every layer."""
        if self.fused_ops:
            from .kernels.rotary import apply_rotary

            return functools.partial(apply_rotary, positions=positions, cos=self.cos, sin=self.sin)
        return functools.partial(RotaryEmbedding.apply, self.cos_sin(positions))

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token tables [T, 1, D], looked up once per step and shared by every layer."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    @staticmethod
    def apply(cos_sin: tuple[torch.Tensor, torch.Tensor], q: torch.Tensor, k: torch.Tensor):
        # q: [T, H, D], k: [T, Hkv, D]
        cos, sin = cos_sin
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
