"""Mixture-of-experts execution: routing, grouped expert GEMMs, expert parallelism.

One MoE layer, as the model calls it (x is replicated on every TP rank, as attention's
all-reduce leaves it):

1. the model's router gives logits [T, E]; ``select_experts`` turns them into
   ``topk_weights`` [T, k] (float32) and ``topk_ids`` [T, k];
2. ``FusedMoE.forward`` runs each (token, expert) pair on the rank that holds the
   expert: pairs are sorted by expert, each expert's rows go through one gate_up GEMM,
   SiLU-and-mul and one down GEMM (``fused_experts``), and are summed per token,
   weighted;
3. the ranks' partial sums are combined, so every rank returns the same [T, H].

Expert parallelism (EP): the TP group's ranks split the experts, E / tp each, whole
(rank r holds experts [r*E/tp, (r+1)*E/tp)); attention stays tensor-parallel, so the
KV cache layout and the KV transfer are the same as for a dense model. Two ways to
combine (``FusedMoE.dispatch``):

- ``"all_reduce"`` (default): every rank already has every token, so each runs its own
  experts on all tokens' pairs for them and one all-reduce of [T, H] sums the parts (the
  all-gather + reduce-scatter pattern, with the all-gather free since the tokens are
  replicated and the reduce-scatter followed by an all-gather being an all-reduce).
- ``"all_to_all"``: rank r takes 1/tp of the tokens, sends each of their pairs' hidden
  rows to the expert's rank (all-to-all), gets the expert outputs back (all-to-all),
  combines, and the ranks all-gather the tokens. It moves k rows per token twice where
  the all-reduce moves about two; it pays off only with token-sharded (data-parallel)
  attention, where there is no replicated [T, H] to start from.

benchmarks/bench_moe.py measures both; docs/benchmarks.md "MoE" has the figures.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import _param
from .parallel import TPGroup

DISPATCH_MODES = ("all_reduce", "all_to_all")


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k routing (Qwen2/3-MoE, Mixtral): router_logits [T, E] ->
    (topk_weights [T, k] float32, topk_ids [T, k] int64). The softmax is float32 like
    the reference; with ``renormalize`` the k weights are rescaled to sum to 1."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def fused_experts_torch(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
    first_expert: int = 0,
) -> torch.Tensor:
    """The specification (and the CPU path) of the fused expert computation.

    x: [T, H]; w13: [E, 2I, H] (gate rows then up rows of each local expert); w2: [E, H, I];
    topk_weights [T, k] float32, topk_ids [T, k] global expert ids. Only pairs whose
    expert is local (``first_expert <= id < first_expert + E``) count; returns
    ``sum_j w[t, j] * down(silu(gate(x_t)) * up(x_t))`` over them, [T, H] in x's dtype.
    Each pair's output is weighted in float32 and rounded to x's dtype; a token's k rows
    are then added in top-k order (pairs of other ranks' experts count as zero).
    """
    T, k = topk_ids.shape
    E = w13.shape[0]
    local = topk_ids.reshape(-1) - first_expert
    pairs = torch.nonzero((local >= 0) & (local < E)).squeeze(1)
    experts = local[pairs]
    order = torch.argsort(experts, stable=True)
    pairs, experts = pairs[order], experts[order]
    tokens = pairs // k
    rows = x[tokens]  # [N, H], grouped by expert
    out_rows = torch.empty_like(rows)
    counts = torch.bincount(experts, minlength=E).tolist()
    start = 0
    for e, n in enumerate(counts):  # a slice per expert that has rows; no masked work
        if n:
            gate, up = F.linear(rows[start : start + n], w13[e]).chunk(2, dim=-1)
            out_rows[start : start + n] = F.linear(F.silu(gate) * up, w2[e])
            start += n
    weighted = (out_rows.float() * topk_weights.reshape(-1)[pairs].unsqueeze(1)).to(x.dtype)
    out = x.new_zeros(T * k, x.shape[1])
    out[pairs] = weighted
    return out.view(T, k, x.shape[1]).sum(dim=1)


class FusedMoE(nn.Module):
    """This rank's share of a layer's experts and the combine across ranks.

    Parameters: ``w13`` [E_local, 2I, H] (gate then up of each expert, stacked) and
    ``w2`` [E_local, H, I]. Their ``weight_loader(param, tensor, shard)`` takes one
    checkpoint tensor: shard ``(expert_id, "gate" | "up" | "down")`` for one expert's
    [I, H] / [H, I] matrix (global id; experts of other ranks are skipped), or
    ``(None, "gate_up" | "down")`` for every expert at once ([E, 2I, H] / [E, H, I], the
    fused layout transformers 5 uses in memory).
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, tp: TPGroup) -> None:
        super().__init__()
        self.tp = tp
        self.num_experts = num_experts
        self.first_expert, self.num_local_experts = tp.shard(num_experts)
        self.intermediate_size = intermediate_size
        self.w13 = _param(self.num_local_experts, 2 * intermediate_size, hidden_size, loader=self._load)
        self.w2 = _param(self.num_local_experts, hidden_size, intermediate_size, loader=self._load)
        self.fused_ops = False
        """The Triton kernel (engine/kernels/fused_moe.py) instead of the torch twin."""
        self.dispatch = "all_reduce"
        """How the ranks combine; see the module docstring. Set by ``set_expert_dispatch``."""
        self.loaded: set[tuple[int, str]] = set()
        """(global expert id, "gate" | "up" | "down") of every matrix loaded so far."""

    def _load(self, param: torch.Tensor, loaded: torch.Tensor, shard: tuple[int | None, str]) -> None:
        expert, which = shard
        I = self.intermediate_size
        if expert is None:  # every expert at once
            if loaded.shape[0] != self.num_experts or loaded.shape[1:] != param.shape[1:]:
                raise ValueError(f"checkpoint tensor {which} has shape {tuple(loaded.shape)}, expected "
                                 f"[{self.num_experts}, {', '.join(map(str, param.shape[1:]))}]")
            param.data.copy_(loaded.narrow(0, self.first_expert, self.num_local_experts))
            matrices = ("down",) if which == "down" else ("gate", "up")
            self.loaded.update((self.first_expert + e, m) for e in range(self.num_local_experts) for m in matrices)
            return
        e = expert - self.first_expert
        if not 0 <= e < self.num_local_experts:
            return  # another rank's expert
        target = {"gate": param.data[e, :I], "up": param.data[e, I:], "down": param.data[e]}[which]
        if target.shape != loaded.shape:
            raise ValueError(f"expert {expert} {which} has shape {tuple(loaded.shape)}, expected {tuple(target.shape)}")
        target.copy_(loaded)
        self.loaded.add((expert, which))

    def missing_weights(self) -> list[str]:
        """This rank's expert matrices that no checkpoint tensor filled."""
        experts = range(self.first_expert, self.first_expert + self.num_local_experts)
        return [f"expert {e} {m}" for e in experts for m in ("gate", "up", "down") if (e, m) not in self.loaded]

    def experts(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """This rank's experts' weighted sum for each token of x, [T, H] (no combine)."""
        if self.fused_ops:
            from .kernels.fused_moe import fused_experts

            return fused_experts(x, self.w13, self.w2, topk_weights, topk_ids, self.first_expert)
        return fused_experts_torch(x, self.w13, self.w2, topk_weights, topk_ids, self.first_expert)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """x [T, H] (the same on every rank), topk_weights [T, k] float32, topk_ids [T, k]
        -> the combined MoE output [T, H], the same on every rank."""
        if self.tp.size == 1 or self.dispatch == "all_reduce":
            return self.tp.all_reduce(self.experts(x, topk_weights, topk_ids))
        return self._all_to_all(x, topk_weights, topk_ids)

    def _all_to_all(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        tp, (T, k) = self.tp, topk_ids.shape
        per_rank = -(-T // tp.size)
        start, end = min(T, tp.rank * per_rank), min(T, (tp.rank + 1) * per_rank)
        # This rank's tokens' pairs, ordered by the rank that holds their expert.
        ids = topk_ids[start:end].reshape(-1)
        dest = ids // self.num_local_experts
        order = torch.argsort(dest, stable=True)
        send_counts = torch.bincount(dest, minlength=tp.size)
        recv_counts = tp.all_to_all(send_counts, [1] * tp.size, [1] * tp.size)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        rows = tp.all_to_all(x[start:end][order // k], send, recv)
        recv_ids = tp.all_to_all(ids[order], send, recv)
        # One expert per received row, weight 1: the sender applies the routing weight.
        ones = torch.ones(rows.shape[0], 1, dtype=torch.float32, device=x.device)
        done = tp.all_to_all(self.experts(rows, ones, recv_ids.unsqueeze(1)), recv, send)
        weighted = (done.float() * topk_weights[start:end].reshape(-1)[order].unsqueeze(1)).to(x.dtype)
        mine = x.new_zeros(per_rank, x.shape[1]).index_add_(0, order // k, weighted)
        return tp.all_gather_rows(mine)[:T]


def set_expert_dispatch(root: nn.Module, mode: str) -> None:
    """Switch every ``FusedMoE`` under ``root`` to ``mode`` (one of ``DISPATCH_MODES``)."""
    if mode not in DISPATCH_MODES:
        raise ValueError(f"expert_dispatch must be one of {DISPATCH_MODES}, got {mode!r}")
    for module in root.modules():
        if isinstance(module, FusedMoE):
            module.dispatch = mode
