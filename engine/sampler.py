"""Turn a batch of next-token logits into tokens, one request per row, on the logits' device.

Order per step: raw logprobs (if asked) -> logits processors (``logits_processors.py``)
-> greedy rows take the argmax -> sampled rows: temperature, then top-k, top-p and
min-p, then one draw from what is left. Nothing sorts a whole vocabulary row.

How a sampled row is drawn (all rows at once, in torch, on any device):

1. ``e = exp((x - max) / T)`` into a reused workspace (row max, scale-and-shift, exp:
   three passes): ``e_i = p_i / p_max``, so min-p is the threshold ``e >= min_p``. The
   vocabulary is cut into chunks of ``CHUNK`` tokens; one more pass gives every chunk's
   sum (``Z`` is their total). A chunk's sum also bounds every ``e`` inside it.
2. **Window** (vocabularies of ``WINDOW_MIN_VOCAB`` and more). The ``WINDOW_CHUNKS`` chunks with the largest sums are gathered and
   sorted (a thousand values). Every token outside them is at most ``mu``, the next
   chunk's sum. Top-k, top-p (cumulative mass over ``Z``, or over the top-k mass)
   and min-p each give a threshold in that sorted window; when the strictest one is
   above ``mu`` the row's whole support lies in the window, and the token is drawn
   there by inverse CDF. This is exact, and it is the common case for a trained model.
3. **Wide rows** (a flat distribution: the support reaches past the window). A row
   with a top-k too large for the window takes its k-th value from ``torch.topk`` as a
   floor (ties kept) and its top-p mass over that floor. Then the row is
   drawn by rejection: draw from ``{e >= floor, e > pivot}`` by inverse CDF over the
   chunk sums, then within the chunk; accept if the mass strictly above the drawn token
   is below ``top_p * Z`` (then it is in the nucleus); else the drawn value becomes the
   pivot and the row draws again. The nucleus is an upper set, so every token it holds
   stays in the drawing set and the accepted draw has exactly the nucleus distribution;
   a draw is accepted with probability >= top_p. After ``MAX_ROUNDS`` a row falls back
   to one full sort.

Ties: top-k and top-p keep every token equal to the threshold value.

Randomness comes from ``rng.uniforms(seed, position)``: a request's draws at output
position j depend only on its seed and j, never on the batch or the device. A request
without a seed gets one from this sampler's own seeded stream on each call.
"""

from __future__ import annotations

import math
import random
import threading
from dataclasses import dataclass

import torch

from . import rng
from .logits_processors import LogitsProcessors
from .request import Request

CHUNK = 64
"""Tokens per chunk of the vocabulary (chunk max and sum are the coarse index)."""
WINDOW_CHUNKS = 16
"""Chunks gathered and sorted per row: the window holds CHUNK * WINDOW_CHUNKS tokens."""
WINDOW_MIN_VOCAB = 16384
"""Below this vocabulary the window's sort costs more than a rejection pass over the whole
row, so filtered rows go straight to the rejection draw."""
MAX_ROUNDS = 8
EXP_FLOOR = -87.0
"""CPU only: exp() of an input below about -87.3 (a masked token's -inf, a denormal
result) takes a scalar slow path, 3-4x a pass. Rows with processors (masks) have their
exponent clamped to this floor, and ``_EXP_FLOOR_VALUE`` (just above exp(floor)) taken off
after: masked tokens get exactly 0, and so do tokens below p_max * 1.7e-38."""
_EXP_FLOOR_VALUE = math.exp(EXP_FLOOR) * (1 + 1e-5)
"""Rejection rounds for wide rows before one exact sort."""


@dataclass
class SamplerOutput:
    token_ids: list[int]
    """-1 where every token was masked out (the processors left nothing to sample)."""
    logprobs: list[dict[int, float] | None]


class Sampler:
    def __init__(self, seed: int = 0, *, vocab_size: int | None = None, eos_token_ids=()) -> None:
        self._seeds = random.Random(seed)
        self._vocab_size = vocab_size
        self._eos = tuple(eos_token_ids)
        self._processors: LogitsProcessors | None = None

    def processors(self, logits_width: int) -> LogitsProcessors:
        """The processor stage for the model's vocabulary (the bitmask width), by default
        the logits' width."""
        vocab_size = self._vocab_size or logits_width
        if self._processors is None or self._processors.vocab_size != vocab_size:
            self._processors = LogitsProcessors(vocab_size, self._eos)
        return self._processors

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        """logits: [B, V] (any float dtype, any device), one row per request."""
        if logits.dtype != torch.float32:
            logits = logits.float()
        device = logits.device
        params = [r.sampling_params for r in requests]
        logprobs = self._logprobs(logits, params)
        processed = [LogitsProcessors.needed(r) for r in requests]
        greedy = [p.is_greedy for p in params]
        plain = [i for i, (g, q) in enumerate(zip(greedy, processed)) if g and not q]
        if len(plain) == len(requests):
            tokens = logits.argmax(dim=-1)
        else:
            tokens = torch.empty(len(requests), dtype=torch.int64, device=device)
            if plain:
                index = torch.tensor(plain, device=device)
                tokens[index] = logits[index].argmax(dim=-1)
        # Greedy rows with processors: argmax of their processed copy.
        rows = [i for i, (g, q) in enumerate(zip(greedy, processed)) if g and q]
        if rows:
            index = torch.tensor(rows, device=device)
            sub = logits[index]
            self.processors(logits.shape[1]).apply(sub, [requests[i] for i in rows])
            tokens[index] = _argmax_or_dead(sub)
        rows = [i for i, g in enumerate(greedy) if not g]
        if rows:
            tokens[torch.tensor(rows, device=device)] = self._sample(
                logits, rows, [requests[i] for i in rows], [processed[i] for i in rows])
        token_list = tokens.tolist()
        self._add_sampled_logprobs(logits, logprobs, token_list)
        return SamplerOutput(token_list, logprobs)

    # -- logprobs (of the raw model distribution) ----------------------------------------

    @staticmethod
    def _logprobs(logits: torch.Tensor, params) -> list[dict[int, float] | None]:
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        out: list[dict[int, float] | None] = [None] * len(params)
        k = max((params[i].logprobs for i in want), default=0)
        if not want or k == 0:
            for i in want:
                out[i] = {}
            return out
        index = torch.tensor(want, device=logits.device)
        top_vals, top_ids = torch.log_softmax(logits[index], dim=-1).topk(k, dim=-1)
        top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
        for row, i in enumerate(want):
            n = params[i].logprobs
            out[i] = dict(zip(top_ids[row][:n], top_vals[row][:n]))
        return out

    @staticmethod
    def _add_sampled_logprobs(logits: torch.Tensor, logprobs: list, tokens: list[int]) -> None:
        missing = [i for i, lp in enumerate(logprobs) if lp is not None and tokens[i] >= 0 and tokens[i] not in lp]
        if not missing:
            return
        index = torch.tensor(missing, device=logits.device)
        rows = logits[index]
        picked = rows.gather(1, torch.tensor([tokens[i] for i in missing], device=logits.device).unsqueeze(1))
        values = (picked.squeeze(1) - torch.logsumexp(rows, dim=-1)).tolist()
        for i, v in zip(missing, values):
            logprobs[i][tokens[i]] = v

    # -- sampled rows ----------------------------------------------------------------------

    def _sample(self, logits: torch.Tensor, rows: list[int], requests: list[Request], processed: list[bool]) -> torch.Tensor:
        device = logits.device
        num_rows, vocab = len(rows), logits.shape[1]
        params = [r.sampling_params for r in requests]
        num_chunks = -(-vocab // CHUNK)
        ws = _buffer("workspace", (num_rows, num_chunks * CHUNK), device)
        ws[:, vocab:] = float("-inf")
        inv_t = torch.tensor([1.0 / p.temperature for p in params], dtype=torch.float32, device=device)
        src = logits if num_rows == logits.shape[0] else logits[torch.tensor(rows, device=device)]
        chunks = ws.view(num_rows, num_chunks, CHUNK)
        if not any(processed):
            # e = exp((x - max) / T) in three passes: max, scale-and-shift, exp.
            row_max = src.amax(-1, keepdim=True)
            torch.addcmul(-(row_max * inv_t.unsqueeze(1)), src, inv_t.unsqueeze(1), out=ws[:, :vocab])
            dead = torch.zeros(num_rows, dtype=torch.bool, device=device)
        else:
            torch.mul(src, inv_t.unsqueeze(1), out=ws[:, :vocab])
            sub = [i for i, q in enumerate(processed) if q]
            if len(sub) == num_rows:
                self.processors(vocab).apply(ws[:, :vocab], requests, inv_t)
            else:
                index = torch.tensor(sub, device=device)
                part = ws[index]
                self.processors(vocab).apply(part[:, :vocab], [requests[i] for i in sub], inv_t[index])
                ws.index_copy_(0, index, part)
            row_max = ws.amax(-1, keepdim=True)
            dead = torch.isneginf(row_max).squeeze(1)
            ws.sub_(row_max.masked_fill(dead.unsqueeze(1), 0.0))
        floor = device.type == "cpu" and any(processed)
        if floor:
            ws.clamp_(min=EXP_FLOOR)
        ws.exp_()  # e = p / p_max; padding and masked tokens become 0
        if floor:
            ws.sub_(_EXP_FLOOR_VALUE).clamp_(min=0.0)
        chunk_sum32 = chunks.sum(-1)  # [R, NC]; also a bound on every e inside the chunk
        chunk_sum = chunk_sum32.double()
        total = chunk_sum.sum(-1)

        seeds = torch.tensor([self._seed_of(r) for r in requests], dtype=torch.int64, device=device)
        positions = torch.tensor([len(r.output_token_ids) for r in requests], dtype=torch.int64, device=device)
        u = rng.uniforms(seeds, positions, MAX_ROUNDS + 1)
        top_k = torch.tensor([p.effective_top_k for p in params], dtype=torch.int64, device=device)
        top_p = torch.tensor([p.top_p for p in params], dtype=torch.float64, device=device)
        min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device)

        out = torch.empty(num_rows, dtype=torch.int64, device=device)
        # Plain temperature rows: one draw over the chunk sums. Which path a row takes depends
        # on its own parameters and logits only, so its draws never depend on the batch.
        plain = [i for i, p in enumerate(params) if not (p.effective_top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0)]
        if len(plain) == num_rows:
            out.copy_(_inverse_cdf(ws, chunk_sum, u[:, 0])[0])
            out[dead] = -1
            return out
        if plain:
            plain_index = torch.tensor(plain, device=device)
            out[plain_index] = _inverse_cdf(ws[plain_index], chunk_sum[plain_index], u[plain_index, 0])[0]
        use_window = vocab >= WINDOW_MIN_VOCAB
        if use_window:
            num_win = min(num_chunks, WINDOW_CHUNKS)
            best = chunk_sum32.topk(min(num_chunks, num_win + 1), dim=-1)
            # A top-p-only row whose window holds less than top_p of the mass cannot resolve
            # there (a flat distribution): it skips the sort, and if every row does, so does all.
            hopeless = (top_k == 0) & (min_p == 0) & (best.values[:, :num_win].sum(-1).double() < top_p * total)
            use_window = not bool(hopeless.all())
        if use_window:
            mu = best.values[:, num_win] if num_win < num_chunks else torch.full((num_rows,), -1.0, device=device)
            index = best.indices[:, :num_win]
            window = chunks.gather(1, index.unsqueeze(-1).expand(-1, -1, CHUNK)).view(num_rows, -1)
            ids = (index.unsqueeze(-1) * CHUNK + torch.arange(CHUNK, device=device)).view(num_rows, -1)
            vals, order = window.sort(dim=-1, descending=True)
            ok, token = _resolve(vals, ids.gather(1, order), mu, total, top_k, top_p, min_p, u[:, 0])
            ok &= ~hopeless
        else:
            ok = torch.zeros(num_rows, dtype=torch.bool, device=device)
            token = torch.empty(num_rows, dtype=torch.int64, device=device)
        if plain:
            ok[plain_index] = True
            token[plain_index] = out[plain_index]
        out.copy_(token)

        wide = (~ok).nonzero().squeeze(1).tolist()
        if wide:
            index = torch.tensor(wide, device=device)
            e = ws if len(wide) == num_rows else ws[index]
            floor, mass = min_p[index], total[index]
            big_k = [r for r, i in enumerate(wide) if params[i].effective_top_k > 0]
            if big_k:
                # Top-k wider than the window: its k-th value becomes a floor (ties kept, as in
                # the window), and top-p is taken over the mass at or above it.
                sub = torch.tensor(big_k, device=device)
                k = top_k[index[sub]].clamp(max=vocab)
                kth = e[sub].topk(int(k.max()), dim=-1).values.gather(1, (k - 1).unsqueeze(1))
                floor = floor.clone()
                floor[sub] = torch.maximum(floor[sub], kth.squeeze(1))
                mass = mass.clone()
                mass[sub] = _mass_at_least(e[sub], kth.squeeze(1)).double()
            out[index] = _draw_by_rejection(e, chunk_sum[index], mass, top_p[index], floor, u[index, 1:])
        out[dead] = -1
        return out

    def _seed_of(self, req: Request) -> int:
        return req.seed if req.seed is not None else rng.wrap_seed(self._seeds.getrandbits(64))


def _argmax_or_dead(x: torch.Tensor) -> torch.Tensor:
    best = x.argmax(dim=-1)
    dead = torch.isneginf(x.amax(dim=-1))
    return best.masked_fill(dead, -1)


def _resolve(vals: torch.Tensor, ids: torch.Tensor, mu: torch.Tensor, total: torch.Tensor, top_k: torch.Tensor,
             top_p: torch.Tensor, min_p: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Thresholds and one draw inside a sorted candidate window.

    vals [R, W] e-values sorted descending with their token ids; every token outside
    the window has e <= mu. Returns (resolved [R] bool, token [R]): resolved rows have
    their whole support inside the window, and their token is exact.
    """
    num_rows, width = vals.shape
    v64 = vals.double()
    has_k = top_k > 0
    k_index = (top_k.clamp(1, width) - 1).unsqueeze(1)
    t_k = torch.where(has_k, vals.gather(1, k_index).squeeze(1), torch.zeros_like(mu))
    k_ok = ~has_k | ((top_k <= width) & (t_k > mu))
    in_k = vals >= t_k.unsqueeze(1)
    mass_k = torch.where(has_k, (v64 * in_k).sum(-1), total)
    cum = v64.cumsum(-1)
    goal = (top_p * mass_k).unsqueeze(1)
    num_p = ((cum - v64 < goal) & in_k).sum(-1).clamp(min=1)
    t_p = vals.gather(1, (num_p - 1).unsqueeze(1)).squeeze(1)
    p_found = (top_p < 1.0) & (cum.gather(1, (num_p - 1).unsqueeze(1)).squeeze(1) >= goal.squeeze(1)) & (t_p > mu)
    threshold = torch.maximum(torch.maximum(t_k, min_p), torch.where(p_found, t_p, torch.zeros_like(t_p)))
    ok = k_ok & (threshold > mu)
    weights = v64 * (vals >= threshold.unsqueeze(1))
    cdf = weights.cumsum(-1)
    target = (u * cdf[:, -1]).unsqueeze(1)
    pick = torch.searchsorted(cdf, target, right=True).clamp(max=width - 1)
    return ok, ids.gather(1, pick).squeeze(1)


def _draw_by_rejection(e: torch.Tensor, chunk_sum: torch.Tensor, total: torch.Tensor, top_p: torch.Tensor,
                       min_p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Exact draws for rows whose support is wider than the window.

    e [R, NC * CHUNK] with e = p / p_max (padding 0). Support = nucleus(top_p over mass
    ``total``) ∩ {e >= min_p}: ``min_p`` is any floor on e (min-p, or a top-k's k-th value).
    """
    num_rows, width = e.shape
    device = e.device
    num_chunks = width // CHUNK
    out = torch.full((num_rows,), -1, dtype=torch.int64, device=device)
    active = torch.arange(num_rows, device=device)
    pivot = torch.full((num_rows,), -1.0, device=device)
    for rnd in range(u.shape[1]):
        rows = e if rnd == 0 else e[active]
        if rnd == 0 and not bool((min_p > 0).any()):
            masked, sums = rows, chunk_sum
        else:
            # Round 0 has no pivot yet; later rounds hold few rows.
            masked = _masked(rows, torch.ge, min_p[active])
            if rnd:
                masked.mul_(rows > pivot[active].unsqueeze(1))
            sums = masked.view(-1, num_chunks, CHUNK).sum(-1).double()
        token, value = _inverse_cdf(masked, sums, u[active, rnd])
        if not bool((top_p[active] < 1.0).any()):
            accept = torch.ones_like(value, dtype=torch.bool)
        elif rnd + 1 < u.shape[1]:
            above = _mass_above(rows, value).double()
            accept = (top_p[active] >= 1.0) | (above < top_p[active] * total[active])
        else:  # out of rounds: settle the rest exactly
            accept = torch.zeros_like(value, dtype=torch.bool)
            token = _draw_by_sort(rows, total[active], top_p[active], min_p[active], u[active, rnd])
            accept[:] = True
        out[active[accept]] = token[accept]
        pivot[active[~accept]] = value[~accept]
        active = active[~accept]
        if active.numel() == 0:
            break
    return out


def _mass_at_least(e: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """float32 [R]: sum of the entries of each row >= ``value`` [R]."""
    return _masked(e, torch.ge, value).sum(-1)


def _mass_above(e: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """float32 [R]: sum of the entries of each row strictly greater than ``value`` [R]."""
    return _masked(e, torch.gt, value).sum(-1)


def _masked(e: torch.Tensor, compare, value: torch.Tensor) -> torch.Tensor:
    """``e`` where ``compare(e, value)`` else 0, in a reused buffer. NOTE: compare into a
    float buffer, then multiply: on the CPU ``torch.where`` over a vocabulary row is ~4x
    slower, and a bool mask times a float tensor copies the mask to float first."""
    out = _scratch(e)
    compare(e, value.unsqueeze(1), out=out)
    return out.mul_(e)


_BUFFERS = threading.local()
"""Per-thread reused buffers (an engine samples on its own thread; two engines in one
process never share one)."""


def _buffer(name: str, shape: tuple[int, ...], device: torch.device,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A reused contiguous buffer: per-step temporaries the size of the logits cost page
    faults when allocated anew."""
    buffers = _BUFFERS.__dict__.setdefault("by_key", {})
    key = (name, device, dtype)
    size = 1
    for n in shape:
        size *= n
    buf = buffers.get(key)
    if buf is None or buf.numel() < size:
        buf = buffers[key] = torch.empty(size, dtype=dtype, device=device)
    return buf[:size].view(shape)


def _scratch(like: torch.Tensor) -> torch.Tensor:
    return _buffer("scratch", tuple(like.shape), like.device, like.dtype)


def _inverse_cdf(e: torch.Tensor, chunk_sum: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One draw per row from weights ``e`` [R, NC * CHUNK] with their chunk sums: the chunk
    first, then the token inside it. Returns (token ids, their e values)."""
    num_rows = e.shape[0]
    cdf = chunk_sum.cumsum(-1)
    target = u * cdf[:, -1]
    chunk = torch.searchsorted(cdf, target.unsqueeze(1), right=True).clamp(max=cdf.shape[1] - 1)
    before = torch.where(chunk > 0, cdf.gather(1, (chunk - 1).clamp(min=0)), torch.zeros_like(cdf[:, :1]))
    inside = e.view(num_rows, -1, CHUNK).gather(1, chunk.unsqueeze(-1).expand(-1, -1, CHUNK)).squeeze(1).double()
    cw = inside.cumsum(-1)
    # float32 chunk sums vs this float64 cumsum may differ in the last bits: stay inside.
    rest = torch.minimum(target.unsqueeze(1) - before, cw[:, -1:] * (1 - 1e-12))
    j = torch.searchsorted(cw, rest, right=True).clamp(max=CHUNK - 1)
    token = chunk.squeeze(1) * CHUNK + j.squeeze(1)
    return token, e.gather(1, token.unsqueeze(1)).squeeze(1)


def _draw_by_sort(e: torch.Tensor, total: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
                  u: torch.Tensor) -> torch.Tensor:
    vals, ids = e.sort(dim=-1, descending=True)
    none = torch.zeros_like(top_p, dtype=torch.int64)
    _, token = _resolve(vals, ids, torch.full_like(min_p, -1.0), total, none, top_p, min_p, u)
    return token
