"""A deployment's performance profile: measured points, the fitted cost model, metadata.

``pdserve plan profile`` measures a running deployment through its OpenAI endpoint
(:mod:`pdserve.loadtest.profile_run`) and saves a :class:`Profile` as JSON; the
simulator (:mod:`pdserve.loadtest.simulator`) and the planner read it back with
:meth:`Profile.load`, which validates every field.

The cost model (:class:`CostFit`), times in seconds, one *iteration* being one engine
step of one worker::

    prefill iteration  = iteration_s + prefill_token_s * T + prefill_attn_s * A
    decode iteration   = iteration_s + decode_seq_s * B + decode_ctx_s * C
                         (+ prefill_token_s * T + prefill_attn_s * A for local chunks)

where ``T`` is the prompt tokens computed in the iteration, ``A`` the attention work of
those chunks (``sum(new_len * (cached_len + new_len))``: ``n^2`` for a fresh prompt of
``n`` tokens), ``B`` the decoding sequences and ``C`` the sum of their context lengths.
``iteration_s`` (Python scheduling, layer launches) is the same engine loop on both
roles, so it is taken from the decode fit, where it is identifiable. A step with a
single decode has its own line (``single_decode_s + single_decode_ctx_s * C``) when the
profile measured batch 1 at two contexts: one row runs matrix-vector kernels, two or
more run matrix-matrix kernels, and on the CPU reference batch 2 costs about 1.5x batch
1 while batch 8 costs 1.2x batch 2. Per-request latency outside any worker queue is
``remote_overhead_s`` (gateway, RPCs, KV-hop setup) for a disaggregated request and
``local_overhead_s`` for one the decode worker prefills itself. The two colocation
slowdowns only matter when workers share a host's processors (see
``ClusterConfig.shared_cpus``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = [
    "CostFit", "DecodePoint", "DeploymentInfo", "PrefillPoint", "Profile", "PROFILE_VERSION",
    "fit_decode", "fit_linear", "fit_prefill", "fit_profile",
]

PROFILE_VERSION = 1


def _check_number(where: str, value: Any, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise ValueError(f"{where} must be a finite number >= {minimum}, got {value!r}")
    return float(value)


def _check_int(where: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where} must be an integer >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class DeploymentInfo:
    """The profiled deployment, as the operator describes it (``pdserve plan profile`` flags)."""

    num_prefill: int = 1
    num_decode: int = 1
    prefill_tp: int = 1
    decode_tp: int = 1
    #: KV blocks of one decode worker (all its TP ranks together hold this many blocks).
    kv_blocks_per_decode_worker: int = 2048
    #: KV blocks of one prefill worker: its prefix-cache capacity.
    kv_blocks_per_prefill_worker: int = 2048
    block_size: int = 16
    #: The gateway's ``disagg_threshold_tokens``: shorter uncached prompts prefill on the decode worker.
    disagg_threshold_tokens: int = 256
    #: The workers' ``--max-num-batched-tokens``: token budget of one iteration.
    max_num_batched_tokens: int = 2048
    #: The workers' ``--max-num-seqs``.
    max_num_seqs: int = 256
    model: str = ""

    def __post_init__(self) -> None:
        for name in ("num_prefill", "num_decode", "prefill_tp", "decode_tp", "kv_blocks_per_decode_worker",
                     "kv_blocks_per_prefill_worker", "block_size", "max_num_batched_tokens", "max_num_seqs"):
            _check_int(f"deployment.{name}", getattr(self, name))
        _check_int("deployment.disagg_threshold_tokens", self.disagg_threshold_tokens, 0)
        if not isinstance(self.model, str):
            raise ValueError(f"deployment.model must be a string, got {self.model!r}")


@dataclass(frozen=True)
class PrefillPoint:
    """Prompts sent together with ``max_tokens=1``; ``seconds`` is the last one's TTFT."""

    prompt_lens: tuple[int, ...]
    seconds: float

    def __post_init__(self) -> None:
        lens = tuple(self.prompt_lens)
        if not lens:
            raise ValueError("prefill point: prompt_lens must not be empty")
        for n in lens:
            _check_int("prefill point: prompt length", n)
        object.__setattr__(self, "prompt_lens", lens)
        _check_number("prefill point: seconds", self.seconds)


@dataclass(frozen=True)
class DecodePoint:
    """``batch_size`` sequences decoding together at mean context ``context_len``: ``step_s`` per token."""

    batch_size: int
    context_len: float
    step_s: float

    def __post_init__(self) -> None:
        _check_int("decode point: batch_size", self.batch_size)
        _check_number("decode point: context_len", self.context_len)
        _check_number("decode point: step_s", self.step_s)


@dataclass(frozen=True)
class CostFit:
    """Coefficients of the cost model in the module docstring (seconds)."""

    iteration_s: float
    prefill_token_s: float
    prefill_attn_s: float
    decode_seq_s: float
    decode_ctx_s: float
    remote_overhead_s: float
    local_overhead_s: float
    #: KV hop time per prompt token beyond the fixed part in ``remote_overhead_s``
    #: (bytes per token / bandwidth); 0 when the profile could not separate it.
    transfer_token_s: float = 0.0
    #: A step with a single decode (and no prompt chunk): ``single_decode_s +
    #: single_decode_ctx_s * context``. Matrix-vector kernels serve one row and
    #: matrix-matrix kernels two or more, so batch 1 is fitted on its own when the
    #: profile measured it; None: the general formula.
    single_decode_s: float | None = None
    single_decode_ctx_s: float | None = None
    #: Workers sharing one host (the CPU test bed): how much longer a prefill iteration
    #: takes while a decode worker computes, and the reverse (0.2: 20% longer). 0 on
    #: accelerators, where each worker owns its device.
    prefill_colocation_slowdown: float = 0.0
    decode_colocation_slowdown: float = 0.0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value is None and name in ("single_decode_s", "single_decode_ctx_s"):
                continue
            _check_number(f"fit.{name}", value)
        if (self.single_decode_s is None) != (self.single_decode_ctx_s is None):
            raise ValueError("fit.single_decode_s and fit.single_decode_ctx_s must be set together")

    def prefill_s(self, chunks: Sequence[tuple[int, int]]) -> float:
        """Compute time of prompt chunks ``(new_len, cached_len)``, without the iteration's fixed cost."""
        num_tokens = sum(n for n, _ in chunks)
        attn = sum(n * (c + n) for n, c in chunks)
        return self.prefill_token_s * num_tokens + self.prefill_attn_s * attn

    def decode_s(self, num_seqs: int, sum_ctx: float) -> float:
        """Compute time of ``num_seqs`` decodes with contexts summing to ``sum_ctx``, without the fixed cost."""
        return self.decode_seq_s * num_seqs + self.decode_ctx_s * sum_ctx

    def step_s(self, chunks: Sequence[tuple[int, int]] = (), num_decodes: int = 0, sum_ctx: float = 0) -> float:
        """One whole engine step (fixed cost included) on the profiled worker."""
        if num_decodes == 1 and not chunks and self.single_decode_s is not None:
            return self.single_decode_s + self.single_decode_ctx_s * sum_ctx
        t = self.iteration_s + self.prefill_s(chunks)
        if num_decodes:
            t += self.decode_s(num_decodes, sum_ctx)
        return t


@dataclass(frozen=True)
class Profile:
    deployment: DeploymentInfo
    fit: CostFit
    prefill_points: tuple[PrefillPoint, ...] = ()
    decode_points: tuple[DecodePoint, ...] = ()
    #: Free-form facts about the run (URL, time, the hop measurement...).
    metadata: dict = field(default_factory=dict, hash=False)

    def to_json(self) -> dict:
        return {
            "version": PROFILE_VERSION,
            "deployment": asdict(self.deployment),
            "fit": asdict(self.fit),
            "points": {
                "prefill": [{"prompt_lens": list(p.prompt_lens), "seconds": p.seconds} for p in self.prefill_points],
                "decode": [asdict(p) for p in self.decode_points],
            },
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_json(cls, data: Any) -> Profile:
        """Validate and build; ``ValueError`` naming the first bad field."""
        if not isinstance(data, dict):
            raise ValueError(f"profile must be a JSON object, got {type(data).__name__}")
        if data.get("version") != PROFILE_VERSION:
            raise ValueError(f"profile version must be {PROFILE_VERSION}, got {data.get('version')!r}")
        for key in ("deployment", "fit"):
            if not isinstance(data.get(key), dict):
                raise ValueError(f"profile needs a {key!r} object, got {data.get(key)!r}")
        deployment = _build(DeploymentInfo, data["deployment"], "deployment")
        fit = _build(CostFit, data["fit"], "fit")
        points = data.get("points", {})
        if not isinstance(points, dict):
            raise ValueError(f"profile 'points' must be an object, got {points!r}")
        prefill = tuple(_build(PrefillPoint, p, "prefill point") for p in _list(points, "prefill"))
        decode = tuple(_build(DecodePoint, p, "decode point") for p in _list(points, "decode"))
        metadata = data.get("metadata", {})
        if not isinstance(metadata, dict):
            raise ValueError(f"profile 'metadata' must be an object, got {metadata!r}")
        return cls(deployment, fit, prefill, decode, metadata)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        if not Path(path).is_file():
            raise ValueError(f"profile {str(path)!r} does not exist (write one with `pdserve plan profile`)")
        try:
            data = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"profile {str(path)!r} is not valid JSON: {e}") from None
        try:
            return cls.from_json(data)
        except ValueError as e:
            raise ValueError(f"profile {str(path)!r}: {e}") from None


def _list(points: dict, key: str) -> list:
    value = points.get(key, [])
    if not isinstance(value, list):
        raise ValueError(f"profile points.{key} must be a list, got {value!r}")
    return value


def _build(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be an object, got {data!r}")
    names = set(cls.__dataclass_fields__)
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{where} has unknown fields {sorted(unknown)}")
    try:
        return cls(**data)
    except TypeError as e:  # a required field is missing
        raise ValueError(f"{where}: {e}") from None


# ----------------------------------------------------------------------------- fitting


def fit_linear(features: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with non-negative coefficients (costs cannot be negative).

    Ordinary least squares, then any negative coefficient is pinned to 0 and the rest
    refitted, until none is negative (an active-set NNLS that is exact for the few
    features used here). Columns are scaled to unit norm first so the solve is well
    conditioned whatever the units (tokens vs tokens squared).
    """
    x = np.asarray(features, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"features {x.shape} do not match {y.shape[0]} measurements")
    if x.shape[0] == 0:
        raise ValueError("no measurements to fit")
    norms = np.linalg.norm(x, axis=0)
    norms[norms == 0] = 1.0
    xs = x / norms
    active = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(xs[:, active], y, rcond=None)
        if (sol >= 0).all():
            coef[:] = 0
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    return coef / norms


def fit_decode(points: Sequence[DecodePoint]) -> tuple[float, float, float, float | None, float | None]:
    """``(iteration_s, decode_seq_s, decode_ctx_s, single_decode_s, single_decode_ctx_s)``.

    Batch 1 is fitted on its own (``iteration + ctx``) when there are batch-1 points at two
    or more contexts and three or more batched points; otherwise one fit covers all and
    the single-decode pair is None.
    """
    if len(points) < 3:
        raise ValueError(f"need at least 3 decode points to fit 3 coefficients, got {len(points)}")
    singles = [p for p in points if p.batch_size == 1]
    batched = [p for p in points if p.batch_size > 1]
    split = len({p.context_len for p in singles}) >= 2 and len(batched) >= 3
    general = batched if split else points
    x = np.array([[1.0, p.batch_size, p.batch_size * p.context_len] for p in general])
    a, b, c = fit_linear(x, np.array([p.step_s for p in general]))
    if not split:
        return float(a), float(b), float(c), None, None
    a1, c1 = fit_linear(np.array([[1.0, p.context_len] for p in singles]), np.array([p.step_s for p in singles]))
    return float(a), float(b), float(c), float(a1), float(c1)


def fit_prefill(points: Sequence[PrefillPoint]) -> tuple[float, float, float]:
    """``(intercept_s, prefill_token_s, prefill_attn_s)`` from unloaded TTFTs of remote prefills.

    The intercept is everything that does not grow with the prompt: the iteration's
    fixed cost plus the per-request overheads.
    """
    if len(points) < 3:
        raise ValueError(f"need at least 3 prefill points to fit 3 coefficients, got {len(points)}")
    x = np.array([[1.0, sum(p.prompt_lens), sum(n * n for n in p.prompt_lens)] for p in points])
    y = np.array([p.seconds for p in points])
    t0, b, c = fit_linear(x, y)
    return float(t0), float(b), float(c)


def _max_rel_error(predicted: Sequence[float], measured: Sequence[float]) -> float:
    return max((abs(p - m) / m for p, m in zip(predicted, measured) if m > 0), default=0.0)


def fit_profile(
    deployment: DeploymentInfo,
    prefill_points: Sequence[PrefillPoint],
    decode_points: Sequence[DecodePoint],
    *,
    hop_s: float = 0.0,
    transfer_token_s: float = 0.0,
    prefill_colocation_slowdown: float = 0.0,
    decode_colocation_slowdown: float = 0.0,
    metadata: dict | None = None,
) -> Profile:
    """Fit both curves and split the fixed latencies (see the module docstring).

    ``hop_s``: measured TTFT difference between a remote and a local prefill of (almost)
    the same prompt on an idle deployment; the local overhead is the remote one minus it.
    """
    iteration_s, decode_seq_s, decode_ctx_s, single_s, single_ctx_s = fit_decode(decode_points)
    intercept_s, prefill_token_s, prefill_attn_s = fit_prefill(prefill_points)
    remote_overhead_s = max(0.0, intercept_s - iteration_s)
    fit = CostFit(
        iteration_s=iteration_s, prefill_token_s=prefill_token_s, prefill_attn_s=prefill_attn_s,
        decode_seq_s=decode_seq_s, decode_ctx_s=decode_ctx_s, remote_overhead_s=remote_overhead_s,
        local_overhead_s=max(0.0, remote_overhead_s - max(0.0, hop_s)), transfer_token_s=transfer_token_s,
        single_decode_s=single_s, single_decode_ctx_s=single_ctx_s,
        prefill_colocation_slowdown=max(0.0, prefill_colocation_slowdown),
        decode_colocation_slowdown=max(0.0, decode_colocation_slowdown),
    )
    prefill_pred = [intercept_s + prefill_token_s * sum(p.prompt_lens) + prefill_attn_s * sum(n * n for n in p.prompt_lens)
                    for p in prefill_points]
    decode_pred = [fit.step_s((), p.batch_size, p.batch_size * p.context_len) for p in decode_points]
    meta = {"created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "prefill_intercept_s": intercept_s,
            "hop_s": hop_s,
            # How well the model explains its own points (worst relative error): a large
            # value means a noisy run or a cost the model does not have.
            "prefill_max_rel_error": _max_rel_error(prefill_pred, [p.seconds for p in prefill_points]),
            "decode_max_rel_error": _max_rel_error(decode_pred, [p.step_s for p in decode_points]),
            **(metadata or {})}
    return Profile(deployment, fit, tuple(prefill_points), tuple(decode_points), meta)
