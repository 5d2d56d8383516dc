"""What the engine hands back: per-completion deltas each step, whole results at the end."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    """"stop", "length", "abort" or "error"; None while running."""
    logprobs: list[dict[int, float]] | None = None
    stop_reason: str | int | None = None
    """The stop string or token id that ended the completion, if any."""


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0
    prompt_logprobs: list[dict[int, float] | None] | None = None
    """With ``SamplingParams.prompt_logprobs``: one entry per prompt token; entry 0 is None,
    entry i maps prompt token i (first) and the top-k alternatives to their logprobs given
    tokens 0..i-1. Shared by every completion of the request."""

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)

    # Single-completion conveniences.
    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> list[dict[int, float]] | None:
        return self.outputs[0].logprobs


@dataclass(frozen=True)
class CompletionDelta:
    """What one step added to one completion (for streaming)."""

    request_id: str
    index: int
    token_ids: list[int]
    text: str
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None
    error: str | None = None
    """Why the request failed, with finish_reason "error"."""
    prompt_logprobs: list[dict[int, float] | None] | None = None
    """The request's prompt logprobs (see ``RequestOutput``), on the first delta completion
    0 sends (streamed: the one with its first token; otherwise its only one)."""
    num_cached_tokens: int = 0
    """Prompt tokens the prefix cache served at the request's latest admission (the same
    for every completion of a request), on each completion's final delta; 0 on the others."""
