"""Turn a batch of next-token logits into tokens, one request per row.

Sampling draws ``argmax(p / E)`` with ``E ~ Exp(1)`` per vocabulary entry, which
picks token i with probability p_i. Each seeded request draws its noise from its
own generator, in the same amount every step, so its output does not depend on
what else is in the batch. Logprobs are of the model's raw distribution (before
temperature and filters).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .request import Request


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        """logits: [B, V] (any float dtype), one row per request."""
        logits = logits.float()
        params = [r.sampling_params for r in requests]
        logprobs = self._logprobs(logits, params)
        tokens = logits.argmax(dim=-1)
        sample_rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if sample_rows:
            rows = torch.tensor(sample_rows, device=logits.device)
            # NOTE: sampling runs on the CPU even when the model is on a GPU: the seeded
            # per-request generators (and so the noise streams) live there, which keeps
            # a seed's tokens the same on every device and batch.
            sampled = self._sample(logits[rows].cpu(), [requests[i] for i in sample_rows])
            tokens[rows] = sampled.to(tokens.device)
        token_list = tokens.tolist()
        for i, lp in enumerate(logprobs):
            if lp is not None and token_list[i] not in lp:
                lp[token_list[i]] = _raw_logprob(logits[i], token_list[i])
        return SamplerOutput(token_list, logprobs)

    @staticmethod
    def _logprobs(logits: torch.Tensor, params) -> list[dict[int, float] | None]:
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        out: list[dict[int, float] | None] = [None] * len(params)
        if not want:
            return out
        lp = torch.log_softmax(logits[want], dim=-1)
        k = max(params[i].logprobs for i in want)
        top_vals, top_ids = lp.topk(max(k, 1), dim=-1)
        for row, i in enumerate(want):
            n = params[i].logprobs
            out[i] = dict(zip(top_ids[row, :n].tolist(), top_vals[row, :n].tolist()))
        return out

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        params = [r.sampling_params for r in requests]
        temps = torch.tensor([p.temperature for p in params]).unsqueeze(1)
        logits = logits / temps
        top_ks = [p.effective_top_k for p in params]
        top_ps = [p.top_p for p in params]
        if any(top_ks) or any(p < 1.0 for p in top_ps):
            logits = _apply_top_k_top_p(logits, top_ks, top_ps)
        probs = torch.softmax(logits, dim=-1)
        min_ps = torch.tensor([p.min_p for p in params])
        if bool((min_ps > 0).any()):
            threshold = probs.max(dim=-1, keepdim=True).values * min_ps.unsqueeze(1)
            probs = probs.masked_fill(probs < threshold, 0.0)
        noise = torch.empty_like(probs)
        for row, req in enumerate(requests):
            noise[row].exponential_(generator=req.generator or self.generator)
        return (probs / noise).argmax(dim=-1)


def _apply_top_k_top_p(logits: torch.Tensor, top_ks: list[int], top_ps: list[float]) -> torch.Tensor:
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab).unsqueeze(0)
    ks = torch.tensor([k if k > 0 else vocab for k in top_ks]).unsqueeze(1)
    drop = ranks >= ks
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= torch.tensor(top_ps).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def _raw_logprob(logits_row: torch.Tensor, token_id: int) -> float:
    return float(torch.log_softmax(logits_row, dim=-1)[token_id])
