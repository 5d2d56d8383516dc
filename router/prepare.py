"""A decoded request body -> what the gateway runs: validated, tokenized and bounded.

Order of checks, cheapest first: the JSON's shape and types (400, ``schemas.parse``),
the model name (404), every field's policy (400: unknown, or known but not honoured;
``fields.py``), the prompt (tokenized; the chat template applied; cut to its last
``truncate_prompt_tokens`` tokens), then values and lengths (400). Anything a worker
would refuse is refused here, before routing. Large bodies run this on a worker thread
(``app.py``). Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pdserve.engine.sampling_params import SamplingParams

from .errors import APIError, invalid
from .schemas import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeChatRequest,
                      TokenizeCompletionRequest, parse)

if TYPE_CHECKING:
    from .gateway import Gateway


@dataclass(frozen=True)
class GenerationJob:
    """A validated generation request."""

    prompts: list[list[int]]
    params: SamplingParams
    stream: bool
    include_usage: bool
    continuous_usage: bool
    num_top_logprobs: int | None


def check_model(gateway: Gateway, model: str | None) -> None:
    """404 in OpenAI's form unless ``model`` (when given) is the served model."""
    name = gateway.config.model_name
    if model is not None and model != name:
        shown = model if len(model) <= 200 else model[:197] + "..."
        raise APIError(404, f"The model '{shown}' does not exist; this server serves '{name}'", param="model",
                       code="model_not_found")


def prepare_generation(gateway: Gateway, body: Any, chat: bool) -> GenerationJob:
    """Validate a /v1/completions or /v1/chat/completions body (400/404 on anything a
    worker would refuse or this server does not honour)."""
    req = parse(ChatCompletionRequest if chat else CompletionRequest, body)
    check_model(gateway, req.model)
    req.check()
    keep = _truncation(gateway, req.truncate_prompt_tokens)
    if chat:
        prompts = [gateway.encode_chat(req.template_messages(gateway.template_knows_developer))[-keep:]]
        prompt_param = "messages"
        max_tokens_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None:  # as OpenAI: whatever room the context leaves
            max_tokens = max(gateway.context_len - len(prompts[0]), 1)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        logprobs_param = "top_logprobs"
    else:
        prompts = [p[-keep:] for p in gateway.encode_prompts(req.prompt, req.add_special_tokens is not False)]
        prompt_param, max_tokens_param = "prompt", "max_tokens"
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        logprobs, logprobs_param = req.logprobs, "logprobs"
    if max_tokens < 1:
        raise invalid(f"{max_tokens_param} must be >= 1, got {max_tokens}", param=max_tokens_param)
    params = gateway.sampling_params(req, max_tokens=max_tokens, max_tokens_param=max_tokens_param,
                                     logprobs=logprobs, logprobs_param=logprobs_param)
    for prompt_ids in prompts:
        gateway.check_length(prompt_ids, max_tokens, prompt_param, max_tokens_param)
    return GenerationJob(prompts, params, bool(req.stream), req.include_usage, req.continuous_usage, logprobs)


def _truncation(gateway: Gateway, k: int | None) -> int:
    """How many prompt tokens to keep, from the end (vLLM's ``truncate_prompt_tokens``:
    k >= 1, at most the context length); the whole prompt when not given."""
    if k is None:
        return 0  # ids[-0:] is every id
    if not 1 <= k <= gateway.context_len:
        raise invalid(f"truncate_prompt_tokens must be in [1, {gateway.context_len}] (the context length), got {k}",
                      param="truncate_prompt_tokens")
    return k


def tokenize(gateway: Gateway, body: Any) -> dict[str, Any]:
    """``POST /tokenize``: vLLM's ``{model?, prompt}`` or ``{model?, messages, ...}`` ->
    ``{"count", "max_model_len", "tokens", "token_strs"}``."""
    chat = isinstance(body, dict) and body.get("messages") is not None
    req = parse(TokenizeChatRequest if chat else TokenizeCompletionRequest, body)
    check_model(gateway, req.model)
    req.check()
    if chat:
        token_ids = gateway.encode_chat(req.template_messages(gateway.template_knows_developer))
    else:
        token_ids = gateway.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False)
    token_strs = gateway.tokenizer.convert_ids_to_tokens(token_ids) if req.return_token_strs else None
    return {"count": len(token_ids), "max_model_len": gateway.context_len, "tokens": token_ids,
            "token_strs": token_strs}


def detokenize(gateway: Gateway, body: Any) -> dict[str, Any]:
    """``POST /detokenize``: ``{model?, tokens}`` -> ``{"prompt"}`` (special tokens kept, as vLLM)."""
    req = parse(DetokenizeRequest, body)
    check_model(gateway, req.model)
    req.check()
    token_ids = gateway.check_token_ids(req.tokens, "tokens")
    return {"prompt": gateway.tokenizer.decode(token_ids, skip_special_tokens=False)}


__all__ = ["GenerationJob", "check_model", "detokenize", "prepare_generation", "tokenize"]
