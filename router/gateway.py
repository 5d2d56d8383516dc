"""The gateway's core, below HTTP: configuration, the worker view, tokenization, and
running one API request's Generate calls on the decode workers.

Flow of one request (design, "One request", steps 1-3):

1. ``encode_prompts`` / ``encode_chat`` turn the validated body into token ids;
   ``sampling_params`` (``sampling.py``) and ``check_length`` bound everything a worker
   would refuse.
2. ``generate`` computes each prompt's chained block hashes, asks the router for a
   decode worker (and, when remote prefill pays, a prefill worker), and opens
   ``Decode.Generate`` on that worker with the decision's ``prefill_worker_id``.
   Request ids are made here (uuid4); nothing internal comes from the client.
3. :class:`Generation` merges the per-prompt streams into one stream of choice deltas.
   Closing it (finished, failed, or the client went away) cancels every gRPC call that
   is still open; the decode worker then aborts the request, on the prefill worker too,
   and frees its blocks.

The worker registry, channels and back-off live in ``workers.WorkerPool``; a
``Generation`` uses the pool, not the gateway. Nothing here imports torch.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.tokenizer import Tokenizer
from pdserve.proto import auth

from . import sampling
from .cost import CostWeights
from .metrics import GatewayMetrics
from .policy import Router
from .reasoning import get_reasoning_parser
from .tool_parsers import get_tool_parser
from .generation import Generation
from .workers import WorkerPool
from .limits import BodyBudget
from .errors import APIError, invalid

log = logging.getLogger("pdserve.gateway")

_COST_DEFAULTS = CostWeights()
_TEMPLATE_RESERVED = frozenset({"messages", "tools", "add_generation_prompt", "bos_token", "eos_token",
                                "continue_final_message", "tokenize", "return_dict"})
"""Template variables the server sets itself; ``chat_template_kwargs`` cannot override them."""



@dataclass(frozen=True)
class GatewayConfig:
    """Everything one gateway process needs; validated on construction."""

    store_url: str
    """Control-plane store: ``grpc://host:port`` (embedded server) or ``redis://...``."""
    model_dir: str
    """Model directory: tokenizer, chat template, context length, served name."""
    served_model_name: str | None = None
    """Name clients put in ``model``; default: the model directory's name (what workers register)."""
    api_key: str | None = None
    """When set, every /v1 route needs ``Authorization: Bearer <api_key>``."""
    router_policy: str = "kv"
    block_size: int = 16
    """Tokens per KV block; must equal the workers' (hashes are per full block)."""
    disagg_threshold_tokens: int = 256
    """Uncached prompt tokens from which prefill runs on a prefill worker."""
    balance_abs_tokens: int = _COST_DEFAULTS.balance_abs_tokens
    """kv policy, prefill side: queued prefill tokens a worker may have above the least
    loaded one before its load counts against its prefix hits (``cost.py``)."""
    balance_rel: float = _COST_DEFAULTS.balance_rel
    """... and the ratio to the least loaded one's queue it must exceed as well."""
    decode_balance_abs_tokens: int = _COST_DEFAULTS.decode_balance_abs_tokens
    """kv policy, decode side: the same absolute threshold over the decode load (KV
    tokens used + 256 per running request + queued prefill tokens)."""
    decode_balance_rel: float = _COST_DEFAULTS.decode_balance_rel
    """... and its relative threshold."""
    share_placements: bool = True
    """kv policy: publish every routing decision to the store (``pending`` KV events) and
    apply the other gateways', so gateway replicas sharing the store see each other's
    prefixes in flight. Off: one gateway only (saves a store write per request)."""
    events_interval_s: float = 0.025
    """How often the KV event stream (workers' blocks, other gateways' placements) is read."""
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None
    """Longest accepted prompt; default: the context length minus one."""
    max_n: int = 16
    max_logprobs: int = 20
    max_prompts: int = 32
    """Prompts in one /v1/completions request."""
    request_timeout_s: float = 600.0
    """Deadline of one request's Generate calls, from its arrival."""
    max_inflight: int = 256
    """Generation requests served at once; beyond: 503 with Retry-After. A request takes
    its slot only once its whole body was read (``limits.py``)."""
    retry_after_s: int = 1
    header_timeout_s: float = 30.0
    """Seconds a connection may take to send a request's headers; then it is closed."""
    body_timeout_s: float = 30.0
    """Seconds a client may take to send a request's body; then 408."""
    max_body_bytes_reading: int = 256 << 20
    """Bytes of request bodies being read at once, over all connections; beyond: 503."""
    send_timeout_s: float = 30.0
    """Seconds one write of a streamed response may wait for the client to read; then the
    stream is ended and its generation cancelled."""
    max_connections: int = 2048
    """Open connections (uvicorn's ``limit_concurrency``); beyond: uvicorn's plain 503."""
    refresh_interval_s: float = 0.5
    #: Times a prompt is routed again when its decode worker refuses it before sending
    #: anything (UNAVAILABLE: draining, restarting, gone).
    max_retries: int = 2
    #: Times one completion is resumed on another decode worker after its stream broke
    #: mid-way (the worker died, was stopped, or ended the stream early); past it the
    #: stream ends with an error (``generation.py``).
    max_migrations: int = 3
    #: Seconds a worker that answered UNAVAILABLE (or broke a stream) gets no new
    #: requests (unless it re-registers as a new incarnation sooner).
    unavailable_backoff_s: float = 5.0
    stats_interval_s: float = 1.0
    """How often workers' Stats feed the router's load view (0: never)."""
    tool_call_parser: str | None = None
    """How "auto" tool choice finds calls in the output (``tool_parsers.TOOL_PARSERS``:
    hermes, llama3_json, mistral); None: requests with tools need a forced tool_choice."""
    reasoning_parser: str | None = None
    """Splits thinking into ``reasoning_content`` (``reasoning.REASONING_PARSERS``: qwen3,
    deepseek_r1); None: the output is content as it is."""
    cluster_secret: bytes | None = field(default_factory=auth.load_secret, repr=False)
    """Signs every call to the workers and a ``grpc://`` store (``pdserve.proto.auth``);
    default: ``$PDSERVE_CLUSTER_SECRET`` / ``$PDSERVE_CLUSTER_SECRET_FILE``, as the
    workers read it; None: calls are unsigned (workers without a secret, on loopback)."""

    def __post_init__(self) -> None:
        if not self.store_url:
            raise ValueError(f"store_url must be set, got {self.store_url!r}")
        if not (Path(self.model_dir) / "tokenizer.json").is_file():
            raise ValueError(f"model_dir {self.model_dir!r} has no tokenizer.json")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must be a non-empty string or None")
        positive = ("block_size", "max_body_bytes", "max_n", "max_prompts", "max_inflight", "request_timeout_s",
                    "refresh_interval_s", "header_timeout_s", "body_timeout_s", "max_body_bytes_reading",
                    "send_timeout_s", "max_connections", "events_interval_s")
        for name in positive:
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        for name in ("disagg_threshold_tokens", "max_logprobs", "retry_after_s", "stats_interval_s", "max_retries",
                     "max_migrations", "unavailable_backoff_s"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {self.max_prompt_tokens!r}")
        self.cost_weights  # noqa: B018 - ValueError naming a bad threshold
        if self.tool_call_parser is not None:
            get_tool_parser(self.tool_call_parser)  # ValueError naming the known ones
        if self.reasoning_parser is not None:
            get_reasoning_parser(self.reasoning_parser)

    @property
    def cost_weights(self) -> CostWeights:
        return replace(_COST_DEFAULTS, balance_abs_tokens=self.balance_abs_tokens, balance_rel=self.balance_rel,
                       decode_balance_abs_tokens=self.decode_balance_abs_tokens,
                       decode_balance_rel=self.decode_balance_rel)

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model_dir).resolve().name


class Gateway:
    """One API request's side: the tokenizer and limits, admission, and opening its
    Generation on the worker pool (``workers.WorkerPool``: registry, channels, backoff)."""

    def __init__(self, config: GatewayConfig, router: Any = None) -> None:
        self.config = config
        self.tokenizer = Tokenizer.from_dir(config.model_dir)
        model_config = json.loads((Path(config.model_dir) / "config.json").read_text())
        self.context_len: int = model_config["max_position_embeddings"]
        self.vocab_size: int = model_config["vocab_size"]
        self.max_prompt_tokens = min(config.max_prompt_tokens or self.context_len - 1, self.context_len - 1)
        self.tool_parser = get_tool_parser(config.tool_call_parser) if config.tool_call_parser else None
        self.reasoning_parser = get_reasoning_parser(config.reasoning_parser) if config.reasoning_parser else None
        self.router = router or Router(policy=config.router_policy, block_size=config.block_size,
                                       disagg_threshold_tokens=config.disagg_threshold_tokens,
                                       balance_abs_tokens=config.balance_abs_tokens, balance_rel=config.balance_rel,
                                       decode_balance_abs_tokens=config.decode_balance_abs_tokens,
                                       decode_balance_rel=config.decode_balance_rel,
                                       origin=f"gw-{uuid.uuid4().hex[:12]}" if config.share_placements else None)
        self.metrics = GatewayMetrics()
        self.pool = WorkerPool(config, self.router, self.metrics)
        self.num_inflight = 0
        self.body_budget = BodyBudget(config.max_body_bytes_reading)
        self._token_text: dict[int, str] = {}

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        await self.pool.start()

    async def stop(self) -> None:
        await self.pool.stop()

    async def ready(self) -> dict[str, Any]:
        return await self.pool.ready()

    def metrics_targets(self) -> list[dict[str, Any]]:
        return self.pool.metrics_targets()

    # -- admission and input ----------------------------------------------------------------

    def admit(self) -> None:
        """Take an in-flight slot (give it back with ``release``); 503 when full."""
        if self.num_inflight >= self.config.max_inflight:
            raise APIError(503, "the server is overloaded; retry later", type="server_error", code="overloaded",
                           headers={"Retry-After": str(self.config.retry_after_s)})
        self.num_inflight += 1
        self.metrics.running.set(self.num_inflight)

    def release(self) -> None:
        self.num_inflight -= 1
        self.metrics.running.set(self.num_inflight)

    def encode_prompts(self, prompt: str | list, add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids of each prompt of a completions request (string, strings, ids, id lists);
        ``add_special_tokens`` (vLLM): the tokenizer adds its BOS to text prompts."""
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompts = [prompt]
        else:
            prompts = prompt
        if not prompts:
            raise invalid("prompt must not be empty", param="prompt")
        if len(prompts) > self.config.max_prompts:
            raise invalid(f"at most {self.config.max_prompts} prompts per request, got {len(prompts)}", param="prompt")
        out = []
        for p in prompts:
            if len(p) == 0:
                raise invalid("prompt must not be empty", param="prompt")
            if isinstance(p, str):
                out.append(self.tokenizer.encode(p, add_special_tokens=add_special_tokens))
            else:
                out.append(self.check_token_ids(p, "prompt"))
        return out

    def check_token_ids(self, token_ids: list[int], param: str) -> list[int]:
        """``token_ids`` when every one is in the vocabulary; 400 naming ``param`` otherwise."""
        bad = next((t for t in token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise invalid(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})", param=param)
        return list(token_ids)

    @property
    def template_knows_developer(self) -> bool:
        """The chat template mentions the developer role (otherwise it becomes system, as in vLLM)."""
        return "developer" in (self.tokenizer.chat_template or "")

    def encode_chat(self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None,
                    template_kwargs: dict[str, Any] | None = None, add_generation_prompt: bool = True) -> list[int]:
        """The chat template applied to ``messages`` (and ``tools``; ``template_kwargs``: the
        request's ``chat_template_kwargs``, e.g. Qwen3's ``enable_thinking``, and ``documents``)."""
        if self.tokenizer.chat_template is None:
            raise invalid("this model has no chat template; use /v1/completions", param="messages")
        kwargs = dict(template_kwargs or {})
        clash = next((k for k in kwargs if k in _TEMPLATE_RESERVED), None)
        if clash is not None:
            raise invalid(f"chat_template_kwargs cannot set {clash!r}", param="chat_template_kwargs")
        try:
            return self.tokenizer.encode_chat(messages, add_generation_prompt, tools=tools, **kwargs)
        except Exception as e:  # noqa: BLE001 - template errors (raise_exception) are the client's input
            raise invalid(f"the chat template rejected the messages: {e}", param="messages") from None

    def check_length(self, prompt_ids: list[int], max_tokens: int, prompt_param: str, max_tokens_param: str) -> None:
        if len(prompt_ids) > self.max_prompt_tokens:
            raise invalid(f"the prompt is too long: {len(prompt_ids)} tokens, the limit is {self.max_prompt_tokens}",
                          param=prompt_param, code="context_length_exceeded")
        if len(prompt_ids) + max_tokens > self.context_len:
            raise invalid(
                f"This model's maximum context length is {self.context_len} tokens. However, you requested "
                f"{len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the prompt, {max_tokens} for the "
                f"completion). Reduce the prompt or {max_tokens_param}.",
                param=max_tokens_param, code="context_length_exceeded")

    def sampling_params(self, req: Any, *, max_tokens: int, max_tokens_param: str, logprobs: int | None,
                        logprobs_param: str) -> SamplingParams:
        """SamplingParams from a validated body; out-of-range values are 400 naming the param."""
        return sampling.sampling_params(
            req, vocab_size=self.vocab_size, max_n=self.config.max_n, max_logprobs=self.config.max_logprobs,
            max_tokens=max_tokens, max_tokens_param=max_tokens_param, logprobs=logprobs,
            logprobs_param=logprobs_param)

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    # -- generation ----------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams, arrival: float) -> Generation:
        """Route every prompt and open its Generate call; 503 when no worker can take it."""
        gen = Generation(self.pool, params, arrival)
        try:
            for i, prompt_ids in enumerate(prompts):
                gen.open(i, prompt_ids)
        except BaseException:
            gen.cancel()
            raise
        return gen


__all__ = ["Gateway", "GatewayConfig", "Generation"]
