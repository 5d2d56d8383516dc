"""A validated body's sampling fields -> ``SamplingParams``, for both endpoints.

Everything a worker would refuse is bounded here, before anything is routed, and a
refusal is a 400 whose ``param`` names the field of the body (``max_completion_tokens``
where the client sent that, not the engine's ``max_tokens``). ``null`` means the
default. OpenAI's ``logit_bias`` arrives keyed by token-id strings
(``{"50256": -100}``) and leaves keyed by ints; token ids are checked against the
model's vocabulary here, since the client learns nothing useful from a worker's
refusal. ``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens``,
``allowed_token_ids``, ``stop_token_ids``, ``ignore_eos``, ``skip_special_tokens``,
``spaces_between_special_tokens``, ``include_stop_str_in_output`` and ``cache_salt`` are
vLLM's extensions, with vLLM's names and meanings. Nothing here imports torch.
"""

from __future__ import annotations

import math
import re
from typing import Any

from pdserve.engine.sampling_params import MAX_LOGIT_BIAS, MAX_TOKEN_ID_LIST, SamplingParams

from .errors import invalid

# ASCII digits only: int() would also take " 5", "1_0" and "٣". Longer numbers cannot
# be token ids anyway, and bounding the length keeps int() cheap.
_TOKEN_ID_KEY = re.compile(r"-?[0-9]{1,19}")


def sampling_params(req: Any, *, vocab_size: int, max_n: int, max_logprobs: int, max_tokens: int,
                    max_tokens_param: str, logprobs: int | None, logprobs_param: str) -> SamplingParams:
    """SamplingParams from a body validated by ``schemas`` (either endpoint's model)."""
    n = 1 if req.n is None else req.n
    if not 1 <= n <= max_n:
        raise invalid(f"n must be in [1, {max_n}], got {n}", param="n")
    temperature = 1.0 if req.temperature is None else req.temperature
    if not 0.0 <= temperature <= 2.0:
        raise invalid(f"temperature must be in [0, 2], got {temperature}", param="temperature")
    if logprobs is not None and not 0 <= logprobs <= max_logprobs:
        raise invalid(f"{logprobs_param} must be in [0, {max_logprobs}], got {logprobs}", param=logprobs_param)
    top_k = req.top_k or 0
    if top_k >= vocab_size:  # keeps every token, like 0; and fits the wire's int32
        top_k = 0
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(req, name)
        if value is not None and not -2.0 <= value <= 2.0:
            raise invalid(f"{name} must be in [-2, 2], got {value}", param=name)
    repetition_penalty = 1.0 if req.repetition_penalty is None else req.repetition_penalty
    if not (repetition_penalty > 0.0 and math.isfinite(repetition_penalty)):
        raise invalid(f"repetition_penalty must be > 0 (1 disables it), got {repetition_penalty}",
                      param="repetition_penalty")
    min_tokens = _min_tokens(req, max_tokens, max_tokens_param)
    names = {"max_tokens": max_tokens_param, "logprobs": logprobs_param, "at": "stop"}
    try:
        return SamplingParams(
            n=n, temperature=temperature, top_p=1.0 if req.top_p is None else req.top_p,
            top_k=top_k, min_p=req.min_p or 0.0, seed=req.seed, max_tokens=max_tokens,
            stop=req.stop or (), ignore_eos=bool(req.ignore_eos), logprobs=logprobs,
            presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=repetition_penalty, logit_bias=_logit_bias(req.logit_bias, vocab_size),
            min_tokens=min_tokens, allowed_token_ids=_allowed_token_ids(req.allowed_token_ids, vocab_size),
            stop_token_ids=_stop_token_ids(req.stop_token_ids, vocab_size),
            skip_special_tokens=_flag(req.skip_special_tokens, True),
            spaces_between_special_tokens=_flag(req.spaces_between_special_tokens, True),
            include_stop_str_in_output=_flag(req.include_stop_str_in_output, False),
            cache_salt=req.cache_salt,
        )
    except ValueError as e:  # SamplingParams names the field first ("top_p must be in ...")
        first = str(e).split(" ", 1)[0]
        raise invalid(str(e), param=names.get(first, first)) from None


def _min_tokens(req: Any, max_tokens: int, max_tokens_param: str) -> int:
    min_tokens = req.min_tokens or 0
    if min_tokens < 0:
        raise invalid(f"min_tokens must be >= 0, got {min_tokens}", param="min_tokens")
    if min_tokens > max_tokens:
        is_sent = max_tokens_param in req.model_fields_set and getattr(req, max_tokens_param) is not None
        default = "" if is_sent else ", its default here"
        raise invalid(f"min_tokens ({min_tokens}) must not exceed {max_tokens_param} ({max_tokens}{default})",
                      param="min_tokens")
    return min_tokens


def _logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float] | None:
    """OpenAI's ``{"50256": -100}`` as ``{50256: -100.0}``."""
    if not bias:
        return None
    if len(bias) > MAX_LOGIT_BIAS:
        raise invalid(f"logit_bias has {len(bias)} entries; at most {MAX_LOGIT_BIAS}", param="logit_bias")
    out: dict[int, float] = {}
    for key, value in bias.items():
        if not _TOKEN_ID_KEY.fullmatch(key):
            raise invalid(f"logit_bias keys must be token ids written as integers, got {key[:40]!r}",
                          param="logit_bias")
        token_id = int(key)
        if not 0 <= token_id < vocab_size:
            raise invalid(f"logit_bias token id {token_id} is outside the vocabulary [0, {vocab_size})",
                          param="logit_bias")
        if token_id in out:  # "5" and "05"
            raise invalid(f"logit_bias names token id {token_id} more than once", param="logit_bias")
        if not -100.0 <= value <= 100.0:
            raise invalid(f"logit_bias values must be in [-100, 100], got {value} for token id {token_id}",
                          param="logit_bias")
        out[token_id] = float(value)
    return out


def _flag(value: bool | None, default: bool) -> bool:
    return default if value is None else value


def _stop_token_ids(ids: list[int] | None, vocab_size: int) -> tuple[int, ...]:
    if not ids:
        return ()
    if len(ids) > MAX_TOKEN_ID_LIST:
        raise invalid(f"stop_token_ids has {len(ids)} entries; at most {MAX_TOKEN_ID_LIST}", param="stop_token_ids")
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise invalid(f"stop_token_ids: token id {bad} is outside the vocabulary [0, {vocab_size})",
                      param="stop_token_ids")
    return tuple(ids)


def _allowed_token_ids(ids: list[int] | None, vocab_size: int) -> tuple[int, ...] | None:
    if ids is None:
        return None
    if not ids:
        raise invalid("allowed_token_ids must not be empty (null allows every token)", param="allowed_token_ids")
    if len(ids) > MAX_TOKEN_ID_LIST:
        raise invalid(f"allowed_token_ids has {len(ids)} entries; at most {MAX_TOKEN_ID_LIST}",
                      param="allowed_token_ids")
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise invalid(f"allowed_token_ids: token id {bad} is outside the vocabulary [0, {vocab_size})",
                      param="allowed_token_ids")
    return tuple(ids)


__all__ = ["sampling_params"]
