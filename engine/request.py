"""The state of one request inside the engine (one completion; n > 1 makes siblings),
and what resuming a completion elsewhere needs (:class:`Resume`)."""

from __future__ import annotations

import enum
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .hashing import ROOT_HASH, hash_block
from .rng import wrap_seed
from .sampling_params import SamplingParams

if TYPE_CHECKING:
    from .logits_processors import TokenConstraint


SIBLING_SEED_STRIDE = 1_000_003
"""Completion ``i`` of a seeded ``n > 1`` request draws with seed ``seed + i * SIBLING_SEED_STRIDE``."""


def completion_seed(seed: int | None, index: int) -> int | None:
    """The seed completion ``index`` of a request seeded ``seed`` draws with (wrapped to 64
    bits, as ``rng`` uses it); None stays None (unseeded: the sampler's own stream)."""
    return None if seed is None else wrap_seed(seed + index * SIBLING_SEED_STRIDE)


@dataclass(frozen=True)
class Resume:
    """A completion continued on this engine after the worker that produced its first
    tokens failed (the gateway migrates the stream).

    The request is admitted with ``output_token_ids`` already as its output, so positions,
    seeded draws (``rng.uniforms(seed, len(output))``), penalties, ``min_tokens``,
    ``max_tokens``, grammars and the text state (detokenizer window, the stop-string tail
    held back) all go on as if it had never moved; only what follows is streamed.
    ``completion_index`` names the completion of the original request, whose seed it
    keeps (``completion_seed``). ``text_len``, when given, is the number of characters of
    the completion's text the client has: replaying the tokens must commit exactly that
    much, or the request is refused (a gap or a duplicate would follow otherwise).
    """

    output_token_ids: tuple[int, ...] = ()
    completion_index: int = 0
    text_len: int | None = None

    def __post_init__(self) -> None:
        if self.completion_index < 0:
            raise ValueError(f"resume completion_index must be >= 0, got {self.completion_index!r}")
        if self.text_len is not None and self.text_len < 0:
            raise ValueError(f"resume text_len must be >= 0, got {self.text_len!r}")

    def validate(self, p: SamplingParams, stream: bool, vocab_size: int, ending_token_ids: Collection[int]) -> None:
        """ValueError unless this can continue an unfinished completion of a request with
        ``p`` (``ending_token_ids``: the tokens that would have ended it: EOS, stop ids)."""
        if p.n != 1:
            raise ValueError(f"a resumed completion is a request of its own (n = 1), got n = {p.n}")
        if not stream or p.prompt_logprobs is not None:
            raise ValueError("a resumed completion streams its deltas and asks for no prompt logprobs")
        tokens = self.output_token_ids
        if len(tokens) >= p.max_tokens:
            raise ValueError(f"{len(tokens)} resumed tokens leave nothing to generate (max_tokens {p.max_tokens})")
        bad = next((t for t in tokens if not isinstance(t, int) or not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ValueError(f"resumed token id {bad!r} is outside the vocabulary [0, {vocab_size})")
        bad = next((t for t in tokens if t in ending_token_ids), None)
        if bad is not None:
            raise ValueError(f"resumed token {bad} ends the completion: it had finished")


@dataclass
class KVTransfer:
    """Decode side of a remote prefill (vLLM's ``kv_transfer_params``): where the prompt's
    KV comes from and the lease it may be written under (``pdserve.kvtransfer.lease``).
    It travels on the request, so the workers need no table keyed by request ids."""

    source_worker_id: str
    """The prefill worker asked to compute the prompt."""
    group_id: str
    """The request id the client knows (n > 1: its completions are ``{group_id}#i``)."""
    transfer_id: str | None = None
    """The lease's id (128 random bits), set when the blocks are offered."""
    deadline: float | None = None
    """``time.monotonic()`` after which no write into the blocks is accepted."""
    num_remote_cached_tokens: int | None = None
    """Prompt tokens the prefill worker's prefix cache served, once it computed the prompt."""
    is_settled: bool = False
    """No write can land in the request's blocks any more (engine thread only; see
    ``LLMEngine.settle_kv_transfer``). Until then a request that ends while waiting for its
    KV keeps its blocks in quarantine."""


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
    kv_transfer: KVTransfer | None = None
    """Decode side, with ``remote_prefill``: the hop's parameters and lease (None: a bare
    remote prefill whose blocks are freed at once if it ends while waiting)."""
    hold_blocks: bool = False
    """Prefill side: keep the blocks after finishing until ``release`` (the transfer reads them)."""
    prompt_logprobs: list[dict[int, float] | None] | None = None
    """With ``prompt_logprobs`` asked, on the completion that computes the prompt (never on
    n > 1 siblings): ``[None]`` then one dict per prompt position as chunks compute it (or
    all at once from a prefill worker). Complete once it has ``num_prompt_tokens`` entries."""
    is_resumed: bool = False
    """Continued from another worker (:class:`Resume`): admitted with output tokens already.
    Under remote prefill the prefill worker's KV covers them too, but its sampled token is
    not used (it drew at output position 0): the last known token is computed here."""

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
