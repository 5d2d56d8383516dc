"""Messages <-> plain Python values, so the packages on either side need no proto logic.

Nothing here imports the engine: ``sampling_kwargs`` returns keyword arguments for
``pdserve.engine.SamplingParams``, whose constructor validates them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import pdserve_pb2 as pb

_FINISH = {None: pb.FINISH_REASON_UNSPECIFIED, "stop": pb.STOP, "length": pb.LENGTH, "abort": pb.ABORT, "error": pb.ERROR}
_FINISH_NAMES = {v: k for k, v in _FINISH.items()}


def sampling_kwargs(msg: pb.SamplingParams) -> dict[str, Any]:
    return dict(
        n=msg.n or 1,
        temperature=msg.temperature,
        top_p=msg.top_p,
        top_k=msg.top_k,
        min_p=msg.min_p,
        seed=msg.seed if msg.HasField("seed") else None,
        max_tokens=msg.max_tokens,
        stop=tuple(msg.stop),
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        logprobs=msg.logprobs if msg.HasField("logprobs") else None,
        skip_special_tokens=msg.skip_special_tokens,
        cache_salt=msg.cache_salt or None,
        presence_penalty=msg.presence_penalty,
        frequency_penalty=msg.frequency_penalty,
        repetition_penalty=msg.repetition_penalty if msg.HasField("repetition_penalty") else 1.0,
        logit_bias=dict(msg.logit_bias) or None,
        min_tokens=msg.min_tokens,
        allowed_token_ids=tuple(msg.allowed_token_ids.token_ids) if msg.HasField("allowed_token_ids") else None,
        banned_token_ids=tuple(msg.banned_token_ids),
        structured_output=(structured_output_kwargs(msg.structured_output)
                           if msg.HasField("structured_output") else None),
        prompt_logprobs=msg.prompt_logprobs if msg.HasField("prompt_logprobs") else None,
        include_stop_str_in_output=msg.include_stop_str_in_output,
        spaces_between_special_tokens=(msg.spaces_between_special_tokens
                                       if msg.HasField("spaces_between_special_tokens") else True),
    )


def structured_output_kwargs(msg: pb.StructuredOutput) -> dict[str, str]:
    """Keyword arguments for ``pdserve.engine.sampling_params.StructuredOutput`` (the
    engine side turns them into one; this module imports nothing of the engine)."""
    return {"kind": msg.kind, "spec": msg.spec, "reasoning": msg.reasoning}


def sampling_message(params: Any) -> pb.SamplingParams:
    """From any object with SamplingParams' attributes."""
    msg = pb.SamplingParams(
        n=params.n, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, min_p=params.min_p,
        max_tokens=params.max_tokens, stop=list(params.stop), stop_token_ids=list(params.stop_token_ids),
        ignore_eos=params.ignore_eos, skip_special_tokens=params.skip_special_tokens,
        cache_salt=params.cache_salt or "",
        presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty, logit_bias=dict(params.logit_bias or {}),
        min_tokens=params.min_tokens, banned_token_ids=list(params.banned_token_ids),
        include_stop_str_in_output=params.include_stop_str_in_output,
        spaces_between_special_tokens=params.spaces_between_special_tokens,
    )
    if params.structured_output is not None:
        msg.structured_output.kind = params.structured_output.kind
        msg.structured_output.spec = params.structured_output.spec
        msg.structured_output.reasoning = params.structured_output.reasoning
    if params.prompt_logprobs is not None:
        msg.prompt_logprobs = params.prompt_logprobs
    if params.seed is not None:
        msg.seed = params.seed
    if params.logprobs is not None:
        msg.logprobs = params.logprobs
    if params.allowed_token_ids is not None:
        msg.allowed_token_ids.token_ids.extend(params.allowed_token_ids)
    return msg


def logprobs_message(logprobs: Mapping[int, float], sampled: int) -> pb.TokenLogprobs:
    """Sampled token first, then the alternatives in descending order."""
    rest = sorted(((t, lp) for t, lp in logprobs.items() if t != sampled), key=lambda x: -x[1])
    ids = [sampled] + [t for t, _ in rest]
    return pb.TokenLogprobs(token_ids=ids, logprobs=[logprobs[sampled]] + [lp for _, lp in rest])


def logprobs_dict(msg: pb.TokenLogprobs) -> dict[int, float]:
    return dict(zip(msg.token_ids, msg.logprobs))


def finish_reason_enum(reason: str | None) -> int:
    return _FINISH[reason]


def finish_reason_name(value: int) -> str | None:
    return _FINISH_NAMES[value]
