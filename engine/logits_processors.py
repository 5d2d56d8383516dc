"""The logits-processor stage: what changes a request's logits before it samples.

Applied in place to a batch of rows, in vLLM's order:

1. token masks: ``allowed_token_ids``, ``banned_token_ids``, ``min_tokens`` (EOS and
   ``stop_token_ids`` blocked until reached) and a per-request :class:`TokenConstraint`
   bitmask (grammars hook in here);
2. ``logit_bias`` added;
3. penalties with vLLM's definitions: repetition (tokens of the prompt or the output:
   a positive logit is divided by the penalty, a negative one multiplied), then
   ``frequency_penalty * count`` and ``presence_penalty * (count > 0)`` subtracted
   (counts are of output tokens only).

Every processor touches only the tokens it names, so its cost grows with those
tokens, not with the vocabulary (masks that keep only some tokens and constraint
bitmasks are the exceptions: they are dense by nature). Per-request state (token ids as
tensors, penalty counts) lives on the request (``Request.logits_state``) and catches up
with tokens appended since the last step, so nothing has to be told when a token is
appended, whoever appended it (this engine's sampler, or a prefill worker's first token).

``scale`` lets the sampler apply the stage after dividing by the temperature: additive
terms are multiplied by it; masks and the repetition penalty are invariant under a
positive scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from .structured_output import TokenConstraint

if TYPE_CHECKING:
    from .request import Request

__all__ = ["LogitsProcessors", "TokenConstraint", "apply_token_bitmask", "bitmask_words"]


def bitmask_words(vocab_size: int) -> int:
    return -(-vocab_size // 32)


_BYTE_PENALTY: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
"""Per (device, dtype): row ``b`` holds, for bits 0..7 of byte ``b``, 0 where set, -inf where clear."""


def _byte_penalty(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    table = _BYTE_PENALTY.get((device, dtype))
    if table is None:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        table = _BYTE_PENALTY[(device, dtype)] = torch.where(bits.bool(), 0.0, float("-inf")).to(device, dtype)
    return table


def bitmask_penalty(bitmask: torch.Tensor, vocab: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[R, vocab]: 0 where the bit of the token is set, -inf where clear or past the
    bitmask's tokens. Each byte of the (little-endian) int32 words looks up its 8 values
    in a 256-row table: one gather, where unpacking bit by bit takes four passes."""
    rows = bitmask.shape[0]
    index = bitmask.contiguous().view(torch.uint8).view(rows, -1).long()
    penalty = torch.nn.functional.embedding(index, _byte_penalty(bitmask.device, dtype)).view(rows, -1)
    width = penalty.shape[1]
    if vocab <= width:
        return penalty[:, :vocab]
    return torch.cat([penalty, penalty.new_full((rows, vocab - width), float("-inf"))], dim=1)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """Set to -inf every logit whose bit is clear, in place. logits [R, V] (V may be padded
    past the bitmask's tokens: those are disallowed); bitmask int32 [R', ceil(V'/32)] for
    logits rows ``rows`` (every row when None), on the logits' device or the CPU."""
    penalty = bitmask_penalty(bitmask.to(logits.device), logits.shape[1], logits.dtype)
    if rows is None:
        logits.add_(penalty)
    else:
        logits.index_add_(0, rows, penalty)


class _State:
    """One request's processor inputs, built on its first step (on the logits' device)."""

    def __init__(self, req: Request, eos_token_ids: frozenset[int], device: torch.device) -> None:
        p = req.sampling_params
        ids = lambda xs: torch.tensor(sorted(set(xs)), dtype=torch.long, device=device)  # noqa: E731
        self.allowed = ids(p.allowed_token_ids) if p.allowed_token_ids is not None else None
        self.banned = ids(p.banned_token_ids) if p.banned_token_ids else None
        blocked = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
        self.min_tokens_blocked = ids(blocked) if p.min_tokens and blocked else None
        self.bias_ids = self.bias_values = None
        if p.logit_bias:
            self.bias_ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=device)
            self.bias_values = torch.tensor(list(p.logit_bias.values()), dtype=torch.float32, device=device)
        self.penalties = _PenaltyCounts(req.prompt_token_ids) if p.has_penalties else None


class _PenaltyCounts:
    """Distinct tokens seen in the prompt or output: id, output count, in-prompt flag."""

    def __init__(self, prompt_token_ids: Sequence[int]) -> None:
        unique = np.unique(np.asarray(prompt_token_ids, dtype=np.int64))
        n = len(unique)
        cap = max(64, 2 * n)
        self.ids = np.zeros(cap, dtype=np.int64)
        self.ids[:n] = unique
        self.counts = np.zeros(cap, dtype=np.float32)
        self.in_prompt = np.zeros(cap, dtype=bool)
        self.in_prompt[:n] = True
        self.index = {int(t): i for i, t in enumerate(unique)}
        self.size = n
        self.num_outputs = 0

    def catch_up(self, output_token_ids: list[int]) -> None:
        for tok in output_token_ids[self.num_outputs :]:
            i = self.index.get(tok)
            if i is None:
                i = self.index[tok] = self.size
                if i == len(self.ids):
                    self.ids = np.resize(self.ids, 2 * i)
                    self.counts = np.resize(self.counts, 2 * i)
                    self.in_prompt = np.resize(self.in_prompt, 2 * i)
                self.ids[i], self.counts[i], self.in_prompt[i] = tok, 0.0, False
                self.size += 1
            self.counts[i] += 1.0
        self.num_outputs = len(output_token_ids)


class LogitsProcessors:
    """Applies every request's processors to its row, vectorized over the batch."""

    def __init__(self, vocab_size: int, eos_token_ids: Sequence[int] = ()) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = frozenset(eos_token_ids)

    @staticmethod
    def needed(req: Request) -> bool:
        return req.has_logits_processors or req.constraint is not None

    def _state(self, req: Request, device: torch.device) -> _State:
        state = req.logits_state
        if state is None:
            state = req.logits_state = _State(req, self.eos_token_ids, device)
        return state

    def apply(self, logits: torch.Tensor, requests: Sequence[Request], scale: torch.Tensor | None = None) -> None:
        """In place on ``logits`` [R, V]: row ``i`` belongs to ``requests[i]``; ``scale``
        [R] multiplies the additive terms (1 when None)."""
        device = logits.device
        states = [self._state(r, device) for r in requests]
        self._masks(logits, requests, states)
        self._bias(logits, states, scale)
        self._penalties(logits, requests, states, scale)

    # -- 1. masks --------------------------------------------------------------------

    def _masks(self, logits: torch.Tensor, requests: Sequence[Request], states: list[_State]) -> None:
        device = logits.device
        neg_inf = float("-inf")
        allowed = [(i, s.allowed) for i, s in enumerate(states) if s.allowed is not None]
        if allowed:
            rows, ids = _flat(allowed, device)
            kept = logits[rows, ids]
            logits[torch.tensor([i for i, _ in allowed], device=device)] = neg_inf
            logits[rows, ids] = kept
        blocked = [(i, s.banned) for i, s in enumerate(states) if s.banned is not None]
        blocked += [
            (i, s.min_tokens_blocked) for i, (s, r) in enumerate(zip(states, requests))
            if s.min_tokens_blocked is not None and len(r.output_token_ids) < r.sampling_params.min_tokens
        ]
        if blocked:
            logits[_flat(blocked, device)] = neg_inf
        constrained = [i for i, r in enumerate(requests) if r.constraint is not None]
        if constrained:
            bitmask = torch.zeros(len(constrained), bitmask_words(self.vocab_size), dtype=torch.int32)
            by_class: dict[type, list[tuple[TokenConstraint, int]]] = {}
            for row, i in enumerate(constrained):
                constraint = requests[i].constraint
                constraint.catch_up(requests[i].output_token_ids)  # the engine did already
                by_class.setdefault(type(constraint), []).append((constraint, row))
            for cls, items in by_class.items():
                cls.fill_bitmasks(items, bitmask)
            every_row = len(constrained) == logits.shape[0]
            apply_token_bitmask(logits, bitmask, None if every_row else torch.tensor(constrained, device=device))

    # -- 2. logit_bias -----------------------------------------------------------------

    def _bias(self, logits: torch.Tensor, states: list[_State], scale: torch.Tensor | None) -> None:
        entries = [(i, s) for i, s in enumerate(states) if s.bias_ids is not None]
        if not entries:
            return
        rows, ids = _flat([(i, s.bias_ids) for i, s in entries], logits.device)
        values = torch.cat([s.bias_values for _, s in entries])
        if scale is not None:
            values = values * scale[rows]
        logits.index_put_((rows, ids), values, accumulate=True)

    # -- 3. penalties ------------------------------------------------------------------

    def _penalties(self, logits: torch.Tensor, requests: Sequence[Request], states: list[_State],
                   scale: torch.Tensor | None) -> None:
        entries = [(i, r, s.penalties) for i, (r, s) in enumerate(zip(requests, states)) if s.penalties is not None]
        if not entries:
            return
        for _, req, pen in entries:
            pen.catch_up(req.output_token_ids)
        sizes = [pen.size for _, _, pen in entries]
        device = logits.device
        rows = torch.from_numpy(np.repeat(np.array([i for i, _, _ in entries], dtype=np.int64), sizes)).to(device)
        ids = torch.from_numpy(np.concatenate([pen.ids[: pen.size] for _, _, pen in entries])).to(device)
        counts = torch.from_numpy(np.concatenate([pen.counts[: pen.size] for _, _, pen in entries])).to(device)
        per_row = torch.tensor(
            [[r.sampling_params.repetition_penalty, r.sampling_params.frequency_penalty,
              r.sampling_params.presence_penalty] for _, r, _ in entries], dtype=torch.float32, device=device)
        expand = torch.repeat_interleave(per_row, torch.tensor(sizes, device=device), dim=0)
        rep, freq, pres = expand.unbind(1)
        # Every entry is a token of the prompt or the output, so repetition applies to all.
        values = logits[rows, ids]
        values = torch.where(values > 0, values / rep, values * rep)
        additive = freq * counts + pres * (counts > 0).float()
        if scale is not None:
            additive = additive * scale[rows]
        logits[rows, ids] = values - additive


def _flat(pairs: list[tuple[int, torch.Tensor]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token id) index tensors for every (row, ids) pair."""
    ids = torch.cat([t for _, t in pairs])
    sizes = torch.tensor([t.numel() for _, t in pairs], device=device)
    rows = torch.repeat_interleave(torch.tensor([i for i, _ in pairs], device=device), sizes)
    return rows, ids
