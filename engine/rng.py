"""Counter-based random numbers for sampling: ``u = H(seed, position, i)``.

A request's uniforms for output position ``position`` are a pure function of its seed
and that position (SplitMix64's mixer over 64-bit integers). They are computed for the
whole batch at once, on the logits' device, in integer arithmetic that wraps the same
way on every device; so a seeded request's tokens do not depend on the batch, on the
device, or on anything drawn before (a decode worker continuing a request the prefill
worker started, or a request resumed elsewhere, picks up at its position with no
state to carry).
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _signed(c: int) -> int:
    c &= _MASK64
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_C1 = _signed(0xBF58476D1CE4E5B9)
_C2 = _signed(0x94D049BB133111EB)


def wrap_seed(seed: int) -> int:
    """Any Python int as the signed 64-bit value the generator uses."""
    return _signed(seed)


def _lsr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    z = (z ^ _lsr(z, 30)) * _C1
    z = (z ^ _lsr(z, 27)) * _C2
    return z ^ _lsr(z, 31)


def uniforms(seeds: torch.Tensor, positions: torch.Tensor, num: int) -> torch.Tensor:
    """float64 [R, num] in [0, 1): draw ``i`` of row ``r`` is H(seeds[r], positions[r], i).

    ``seeds`` and ``positions`` are int64 [R] on the device the draws are wanted on.
    """
    key = _mix(_mix(seeds) + positions * _GOLDEN)
    counters = torch.arange(1, num + 1, device=seeds.device, dtype=torch.int64) * _GOLDEN
    z = _mix(key.unsqueeze(1) + counters)
    return _lsr(z, 11).to(torch.float64) * (2.0**-53)
