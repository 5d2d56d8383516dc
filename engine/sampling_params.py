"""Per-request sampling parameters, validated on construction."""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass

# Bounds that keep one request from monopolising a worker.
MAX_N = 128
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_LEN = 256
GREEDY_BELOW_TEMPERATURE = 1e-5
"""Temperatures below this sample greedily."""
MAX_LOGIT_BIAS = 1024
"""Entries of ``logit_bias`` (OpenAI documents no count; a bound keeps the per-step work bounded)."""
MAX_TOKEN_ID_LIST = 4096
"""Entries of ``allowed_token_ids`` / ``banned_token_ids``."""
MAX_GRAMMAR_CHARS = 64 << 10
"""Length of a structured-output spec (schema, regex, grammar, choices)."""
STRUCTURED_OUTPUT_KINDS = ("json", "json_object", "regex", "choice", "grammar")
REASONING_MODES = ("", "optional", "open")


@dataclass(frozen=True)
class StructuredOutput:
    """A grammar the output must match, applied as a token mask at every step.

    ``kind``: "json" (``spec`` is a JSON schema), "json_object" (any JSON object; ``spec``
    empty), "regex", "choice" (``spec`` is a JSON list of strings) or "grammar" (Lark, or
    GBNF/EBNF as llama.cpp and vLLM write it). Compiled by ``structured_output.py``; with
    ``reasoning``, the grammar applies after the model's thinking block.
    """

    kind: str
    spec: str = ""
    reasoning: str = ""
    """Reasoning models: "" (the grammar starts at the first token), "optional" (a
    ``<think>...</think>`` block may come first: Qwen3) or "open" (the output starts inside
    the block, whose ``</think>`` ends it: DeepSeek-R1). The block is free text."""

    def __post_init__(self) -> None:
        if self.reasoning not in REASONING_MODES:
            raise ValueError(f"structured_output reasoning must be one of {REASONING_MODES}, got {self.reasoning!r}")
        if self.kind not in STRUCTURED_OUTPUT_KINDS:
            raise ValueError(f"structured_output kind must be one of {STRUCTURED_OUTPUT_KINDS}, got {self.kind!r}")
        if not isinstance(self.spec, str):
            raise ValueError(f"structured_output spec must be a string, got {type(self.spec).__name__}")
        if len(self.spec) > MAX_GRAMMAR_CHARS:
            raise ValueError(f"structured_output spec has {len(self.spec)} characters; at most {MAX_GRAMMAR_CHARS}")
        if self.kind != "json_object" and not self.spec:
            raise ValueError(f"structured_output of kind {self.kind!r} needs a spec")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request.

    temperature == 0 means greedy; top_k == 0 or -1 disables top-k; top_p == 1 and
    min_p == 0 disable those filters.
    """

    n: int = 1
    """Number of completions; they share the prompt's KV blocks."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    """Per-request seed: the same seed gives the same output whatever else is batched."""
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    """Stop strings; the matched string is not included in the output text."""
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    """Return the sampled token's logprob plus this many top alternatives."""
    skip_special_tokens: bool = True
    cache_salt: str | None = None
    """Separates prefix-cache entries between tenants."""
    presence_penalty: float = 0.0
    """vLLM/OpenAI: subtracted from the logit of every token already generated, in [-2, 2]."""
    frequency_penalty: float = 0.0
    """vLLM/OpenAI: subtracted once per earlier occurrence in the output, in [-2, 2]."""
    repetition_penalty: float = 1.0
    """vLLM (CTRL): logits of tokens in the prompt or output are divided by it when positive,
    multiplied when negative; > 0, 1 disables."""
    logit_bias: Mapping[int, float] | None = None
    """Token id -> value in [-100, 100] added to its logit before sampling (and before greedy)."""
    min_tokens: int = 0
    """EOS and ``stop_token_ids`` cannot be sampled before this many output tokens."""
    allowed_token_ids: tuple[int, ...] | None = None
    """Only these tokens can be sampled (None: all)."""
    banned_token_ids: tuple[int, ...] = ()
    """These tokens can never be sampled."""
    structured_output: StructuredOutput | None = None
    """The output must match this grammar (JSON schema, regex, choice, Lark/EBNF)."""
    prompt_logprobs: int | None = None
    """vLLM: return each prompt token's logprob (given the tokens before it) plus this many
    top alternatives; the first prompt token has none. Such prompts skip the prefix cache."""
    include_stop_str_in_output: bool = False
    """vLLM: keep the matched stop string at the end of the text."""
    spaces_between_special_tokens: bool = True
    """vLLM: with ``skip_special_tokens`` false, special tokens are separated from the
    text around them by a space."""

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        except TypeError:
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}") from None
        try:
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        except TypeError:
            raise ValueError(f"stop_token_ids must be a list of integers, got {self.stop_token_ids!r}") from None
        if not isinstance(self.n, int) or not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be an integer in [1, {MAX_N}], got {self.n!r}")
        if not self.temperature >= 0.0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (disabled) or a positive integer, got {self.top_k!r}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not -(2**63) <= self.seed < 2**63):
            # torch generators take 64 bits; n > 1 siblings add small offsets to the seed.
            raise ValueError(f"seed must be an integer in [-2**63, 2**63), got {self.seed!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not 0 < len(s) <= MAX_STOP_STRING_LEN:
                raise ValueError(f"stop strings must be non-empty str of <= {MAX_STOP_STRING_LEN} chars, got {s!r}")
        for t in self.stop_token_ids:
            if not isinstance(t, int) or t < 0:
                raise ValueError(f"stop_token_ids must be non-negative integers, got {t!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -2.0 <= v <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {v!r}")
        rp = self.repetition_penalty
        if isinstance(rp, bool) or not isinstance(rp, (int, float)) or not (rp > 0.0 and math.isfinite(rp)):
            raise ValueError(f"repetition_penalty must be > 0, got {rp!r}")
        if not isinstance(self.min_tokens, int) or isinstance(self.min_tokens, bool) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        object.__setattr__(self, "logit_bias", _bias_map(self.logit_bias))
        if self.allowed_token_ids is not None:
            object.__setattr__(self, "allowed_token_ids", _id_tuple(self.allowed_token_ids, "allowed_token_ids"))
            if not self.allowed_token_ids:
                raise ValueError("allowed_token_ids must not be empty")
        object.__setattr__(self, "banned_token_ids", _id_tuple(self.banned_token_ids, "banned_token_ids"))
        if isinstance(self.structured_output, Mapping):  # from the wire (proto/convert.py)
            object.__setattr__(self, "structured_output", StructuredOutput(**self.structured_output))
        if self.structured_output is not None:
            if not isinstance(self.structured_output, StructuredOutput):
                raise ValueError(f"structured_output must be a StructuredOutput, got {self.structured_output!r:.100}")
            if self.min_tokens:
                # The grammar may end (only EOS allowed) before min_tokens lets EOS through.
                raise ValueError("min_tokens cannot be combined with structured output")
        if self.prompt_logprobs is not None and (
                not isinstance(self.prompt_logprobs, int) or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS):
            raise ValueError(f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs!r}")

    @property
    def is_greedy(self) -> bool:
        # Below this, 1 / temperature overflows the sampler's float32 logits; the draw is the
        # argmax anyway (vLLM uses the same cut).
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    @property
    def effective_top_k(self) -> int:
        return 0 if self.top_k in (-1, 0) else self.top_k

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def has_logits_processors(self) -> bool:
        """Anything that changes logits before sampling (the engine may add a grammar on top)."""
        return bool(
            self.has_penalties or self.logit_bias or self.min_tokens or self.allowed_token_ids is not None
            or self.banned_token_ids
        )


def _bias_map(bias) -> dict[int, float] | None:
    if not bias:
        return None
    if not isinstance(bias, Mapping):
        raise ValueError(f"logit_bias must be a mapping of token id to bias, got {bias!r:.100}")
    if len(bias) > MAX_LOGIT_BIAS:
        raise ValueError(f"logit_bias has {len(bias)} entries; at most {MAX_LOGIT_BIAS}")
    out = {}
    for k, v in bias.items():
        try:
            tok = operator.index(k)
        except TypeError:
            raise ValueError(f"logit_bias keys must be token ids, got {k!r}") from None
        if tok < 0:
            raise ValueError(f"logit_bias token id must be >= 0, got {tok}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100.0 <= v <= 100.0:
            raise ValueError(f"logit_bias values must be in [-100, 100], got {v!r} for token {tok}")
        out[tok] = float(v)
    return out


def _id_tuple(ids, name: str) -> tuple[int, ...]:
    if isinstance(ids, (str, bytes)):
        raise ValueError(f"{name} must be a list of token ids, got {ids!r:.100}")
    try:
        out = tuple(operator.index(t) for t in ids)
    except TypeError:
        raise ValueError(f"{name} must be a list of integer token ids, got {ids!r:.100}") from None
    if len(out) > MAX_TOKEN_ID_LIST:
        raise ValueError(f"{name} has {len(out)} entries; at most {MAX_TOKEN_ID_LIST}")
    bad = next((t for t in out if t < 0), None)
    if bad is not None:
        raise ValueError(f"{name} must hold non-negative token ids, got {bad}")
    return out
