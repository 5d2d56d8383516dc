"""A decoded request body -> what the gateway runs: validated, tokenized and bounded.

Order of checks, cheapest first: the JSON's shape and types (400, ``schemas.parse``),
the model name (404), every field's policy (400: unknown, or known but not honoured;
``fields.py``), the prompt (tokenized; the chat template applied; cut to its last
``truncate_prompt_tokens`` tokens), then values and lengths (400). Anything a worker
would refuse is refused here, before routing. Large bodies run this on a worker thread
(``app.py``). Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pdserve.engine.sampling_params import SamplingParams, StructuredOutput

from .choices import ChatOutput
from .structured import structured_output, validate
from .tools import ChoiceMode, Tool, forced_schema, parse_tool_choice, parse_tools, tool_calls_for_template

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
    chat_output: ChatOutput | None = None
    """Chat: how the output is read (reasoning, tool calls)."""
    echo: list[str] | None = None
    """Completions with ``echo``: each prompt's text, prepended to its choices."""
    num_prompt_logprobs: int | None = None
    """vLLM's ``prompt_logprobs`` asked for in the answer."""


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
    chat_output = echo = None
    structured, structured_param = structured_output(req)
    if chat:
        tools = parse_tools(req.tools)
        choice = parse_tool_choice(req.tool_choice, tools)
        parser = gateway.tool_parser
        if choice.mode is ChoiceMode.AUTO and parser is None:
            raise invalid("tool_choice 'auto' needs a server started with --tool-call-parser; send tool_choice "
                          "'required' or a named function, or 'none'", param="tool_choice")
        schema = forced_schema(tools, choice, req.parallel_tool_calls is not False)
        if schema is not None:
            if structured is not None:
                raise invalid(f"{structured_param} cannot be combined with a forced tool_choice", param="tool_choice")
            structured, structured_param = _forced_structured_output(schema), "tool_choice"
        if structured is not None and gateway.reasoning_parser is not None:  # the answer follows the thinking
            structured = dataclasses.replace(structured, reasoning=gateway.reasoning_parser.grammar_mode)
        chat_output = ChatOutput(tools, choice, parser, gateway.reasoning_parser, req.include_reasoning is not False)
        prompts = [encode_chat(gateway, req, tools)[-keep:]]
        prompt_param = "messages"
        max_tokens_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None:  # as OpenAI: whatever room the context leaves
            max_tokens = max(gateway.context_len - len(prompts[0]), 1)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        logprobs_param = "top_logprobs"
    else:
        encoded = gateway.encode_prompts(req.prompt, req.add_special_tokens is not False)
        prompts = [p[-keep:] for p in encoded]
        prompt_param, max_tokens_param = "prompt", "max_tokens"
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        logprobs, logprobs_param = req.logprobs, "logprobs"
        if req.echo:
            echo = [_echo_text(text, kept, ids, gateway)
                    for text, kept, ids in zip(_prompt_texts(req.prompt, len(prompts)), prompts, encoded)]
    if max_tokens < 1:
        raise invalid(f"{max_tokens_param} must be >= 1, got {max_tokens}", param=max_tokens_param)
    params = gateway.sampling_params(req, max_tokens=max_tokens, max_tokens_param=max_tokens_param,
                                     logprobs=logprobs, logprobs_param=logprobs_param)
    num_prompt_logprobs = req.prompt_logprobs
    if num_prompt_logprobs is not None and not 0 <= num_prompt_logprobs <= gateway.config.max_logprobs:
        raise invalid(f"prompt_logprobs must be in [0, {gateway.config.max_logprobs}], got {num_prompt_logprobs}",
                      param="prompt_logprobs")
    # Echo with logprobs scores the prompt too (the workers compute it with the prompt).
    wanted = [k for k in (num_prompt_logprobs, logprobs if echo is not None else None) if k is not None]
    try:
        params = dataclasses.replace(params, structured_output=structured,
                                     prompt_logprobs=max(wanted) if wanted else None)
    except ValueError as e:  # min_tokens with a grammar
        raise invalid(f"{e} ({structured_param})", param="min_tokens") from None
    for prompt_ids in prompts:
        gateway.check_length(prompt_ids, max_tokens, prompt_param, max_tokens_param)
    return GenerationJob(prompts, params, bool(req.stream), req.include_usage, req.continuous_usage, logprobs,
                         chat_output=chat_output, echo=echo, num_prompt_logprobs=num_prompt_logprobs)


def encode_chat(gateway: Gateway, req: Any, tools: list[Tool]) -> list[int]:
    """A chat request's prompt: its messages (past tool calls' arguments as objects, as
    templates take them), tools, documents and ``chat_template_kwargs`` through the template."""
    messages = req.template_messages(gateway.template_knows_developer)
    for i, m in enumerate(messages):
        if m.get("tool_calls") is not None:
            m["tool_calls"] = tool_calls_for_template(m["tool_calls"], param=f"messages[{i}].tool_calls")
    kwargs = dict(req.chat_template_kwargs or {})
    if req.documents is not None:
        kwargs["documents"] = req.documents
    return gateway.encode_chat(messages, tools=[t.to_template() for t in tools] or None, template_kwargs=kwargs,
                               add_generation_prompt=req.add_generation_prompt is not False)


def _prompt_texts(prompt: Any, count: int) -> list[str | None]:
    if isinstance(prompt, str):
        return [prompt]
    return [p if isinstance(p, str) else None for p in prompt] if prompt and not isinstance(prompt[0], int) \
        else [None] * count


def _echo_text(text: str | None, kept: list[int], ids: list[int], gateway: Gateway) -> str:
    """What ``echo`` prepends: the prompt as sent when it was text and not truncated, else
    its (kept) token ids decoded, special tokens included."""
    if text is not None and len(kept) == len(ids):
        return text
    return gateway.tokenizer.decode(kept, skip_special_tokens=False)


def _forced_structured_output(schema: dict[str, Any]) -> StructuredOutput:
    """The grammar of a forced tool choice (the functions' schemas, validated like any)."""
    try:
        so = StructuredOutput("json", json.dumps(schema))
    except ValueError as e:  # the tools' schemas together outgrow a spec
        raise invalid(f"tools: {e}", param="tools") from None
    validate(so, "tools")
    return so


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
        token_ids = encode_chat(gateway, req, parse_tools(req.tools))
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
