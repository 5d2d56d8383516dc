"""The state of one request inside the engine (one completion; n > 1 makes siblings)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .hashing import ROOT_HASH, hash_block
from .rng import wrap_seed
from .sampling_params import SamplingParams

if TYPE_CHECKING:
    from .logits_processors import TokenConstraint


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    WAITING_FOR_KV = "waiting_for_kv"
    """Blocks allocated; the prompt's KV is being written by a prefill worker."""
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def is_finished(self) -> bool:
        return self.value in ("stop", "length", "abort", "error")


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    block_size: int
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    """Tokens whose KV is in this request's blocks."""
    num_cached_tokens: int = 0
    """Prompt tokens served by the prefix cache at (latest) admission."""
    num_preemptions: int = 0
    seed: int | None = None
    """The seed its draws use (``rng.uniforms(seed, position)``): the params' seed, offset
    for n > 1 siblings; None draws from the sampler's own stream."""
    constraint: TokenConstraint | None = None
    """A grammar or other per-token constraint, applied as a bitmask before sampling."""
    logits_state: Any = None
    """The logits processors' per-request state (built on the first step that needs it)."""
    logprobs: list[dict[int, float]] = field(default_factory=list)
    siblings: list["Request"] = field(default_factory=list)
    """For n > 1: the other completions, forked from this one once its prompt is computed."""
    block_hashes: list[int] = field(default_factory=list)
    remote_prefill: bool = False
    """Decode side: the prompt's KV comes from a prefill worker instead of being computed here."""
    hold_blocks: bool = False
    """Prefill side: keep the blocks after finishing until ``release`` (the transfer reads them)."""
    prompt_logprobs: list[dict[int, float] | None] | None = None
    """With ``prompt_logprobs`` asked, on the completion that computes the prompt (never on
    n > 1 siblings): ``[None]`` then one dict per prompt position as chunks compute it (or
    all at once from a prefill worker). Complete once it has ``num_prompt_tokens`` entries."""

    def __post_init__(self) -> None:
        salt = self.sampling_params.cache_salt
        self._extra_keys = salt.encode() if salt else b""
        self.has_logits_processors = self.sampling_params.has_logits_processors
        if self.seed is None and self.sampling_params.seed is not None:
            self.seed = wrap_seed(self.sampling_params.seed)
        self.update_block_hashes()

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def prompt_logprobs_position(self) -> int | None:
        """First position whose logits the prompt logprobs still need (they give the next
        prompt token's logprob); None when none are wanted or all are in. KV before it may
        come from the prefix cache; from it on it must be computed here."""
        if self.prompt_logprobs is None or len(self.prompt_logprobs) >= self.num_prompt_tokens:
            return None
        return len(self.prompt_logprobs) - 1

    @property
    def is_prefilling(self) -> bool:
        """Still computing tokens it did not sample itself (prompt, or recompute after preemption)."""
        return self.num_tokens - self.num_computed_tokens > 1

    def token_at(self, start: int, end: int) -> list[int]:
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    def token_at_position(self, position: int) -> int:
        p = len(self.prompt_token_ids)
        return self.prompt_token_ids[position] if position < p else self.output_token_ids[position - p]

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        if self.num_tokens % self.block_size == 0:
            self.update_block_hashes()

    def update_block_hashes(self) -> None:
        """Extend ``block_hashes`` to cover every full block of the token sequence."""
        bs = self.block_size
        n_full = self.num_tokens // bs
        parent = self.block_hashes[-1] if self.block_hashes else ROOT_HASH
        for i in range(len(self.block_hashes), n_full):
            parent = hash_block(parent, self.token_at(i * bs, (i + 1) * bs), self._extra_keys)
            self.block_hashes.append(parent)
