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

A background task refreshes the worker list from the control-plane store every
``refresh_interval_s`` (and the workers' Stats for the router's load view); the store
client is blocking, so it runs in a thread. Nothing here imports torch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc

from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.tokenizer import Tokenizer
from pdserve.proto import auth
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc

from . import sampling
from .events import EventFollower
from .metrics import GatewayMetrics
from .policy import Router
from .reasoning import get_reasoning_parser
from .tool_parsers import get_tool_parser
from .generation import Generation
from .limits import BodyBudget
from .errors import APIError, invalid

log = logging.getLogger("pdserve.gateway")

CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20)]
"""A first message carrying a long prompt's logprobs (k + 1 per prompt token) outgrows
gRPC's default 4 MiB."""

_TEMPLATE_RESERVED = frozenset({"messages", "tools", "add_generation_prompt", "bos_token", "eos_token",
                                "continue_final_message", "tokenize", "return_dict"})
"""Template variables the server sets itself; ``chat_template_kwargs`` cannot override them."""

PREFILL_ROLES = (pb.PREFILL, pb.BOTH)
DECODE_ROLES = (pb.DECODE, pb.BOTH)


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
                    "send_timeout_s", "max_connections")
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
        if self.tool_call_parser is not None:
            get_tool_parser(self.tool_call_parser)  # ValueError naming the known ones
        if self.reasoning_parser is not None:
            get_reasoning_parser(self.reasoning_parser)

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model_dir).resolve().name


class Gateway:
    """Owns the tokenizer, the router, the store client, the worker channels and metrics."""

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
                                       disagg_threshold_tokens=config.disagg_threshold_tokens)
        self.metrics = GatewayMetrics()
        self.workers: dict[str, pb.WorkerInfo] = {}
        self.num_inflight = 0
        self.body_budget = BodyBudget(config.max_body_bytes_reading)
        self._store = None
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._tasks: list[asyncio.Task] = []
        self._follower = None
        self._token_text: dict[int, str] = {}
        self._refresh_failing = False
        #: worker_id -> (started_at_ms, monotonic time until which it gets no new requests)
        self._unavailable: dict[str, tuple[int, float]] = {}

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        from pdserve.deploy.store import open_store  # noqa: PLC0415 - redis is imported only when used

        self._store = await asyncio.to_thread(open_store, self.config.store_url,
                                              cluster_secret=self.config.cluster_secret)
        await self.refresh()
        self._tasks.append(asyncio.create_task(self._refresh_loop(), name="gateway-refresh"))
        if self.config.stats_interval_s > 0 and hasattr(self.router, "update_load"):
            self._tasks.append(asyncio.create_task(self._stats_loop(), name="gateway-stats"))
        await self._start_event_follower()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._follower is not None:
            await asyncio.to_thread(self._follower.stop)
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        if self._store is not None:
            self._store.close()

    async def _start_event_follower(self) -> None:
        """Feed the router's prefix index from the store's KV events."""
        index = getattr(self.router, "index", None)
        if index is None:
            return
        self._follower = EventFollower(self._store, index)
        self._follower.start()

    # -- the worker view ----------------------------------------------------------------

    async def refresh(self) -> None:
        try:
            workers = await asyncio.to_thread(self._store.list_workers)
        except Exception as e:  # noqa: BLE001 - keep the last known view; retried next interval
            if not self._refresh_failing:
                log.warning("listing workers failed (keeping the last known %d): %s", len(self.workers), e)
            self._refresh_failing = True
            return
        self._refresh_failing = False
        # Draining workers keep their channels (their streams run on) but get no new requests.
        self.workers = {w.worker_id: w for w in workers}
        self._update_router()
        for w in workers:
            if w.kv_layout.block_size and w.kv_layout.block_size != self.config.block_size:
                log.warning("worker %s uses block_size %d, the gateway %d: prefix routing will miss",
                            w.worker_id, w.kv_layout.block_size, self.config.block_size)
        routable = [w for w in workers if not w.draining]
        self.metrics.workers.labels("prefill").set(sum(w.role in PREFILL_ROLES for w in routable))
        self.metrics.workers.labels("decode").set(sum(w.role in DECODE_ROLES for w in routable))
        addresses = {w.address for w in workers}
        for address in [a for a in self._channels if a not in addresses]:
            await self._channels.pop(address).close()

    def _update_router(self) -> None:
        now = time.monotonic()
        for wid, (started_at_ms, until) in list(self._unavailable.items()):
            w = self.workers.get(wid)
            if now >= until or w is None or w.started_at_ms != started_at_ms:
                del self._unavailable[wid]
        live = [w for w in self.workers.values() if not w.draining]
        routable = [w for w in live if w.worker_id not in self._unavailable]
        if not any(w.role in DECODE_ROLES for w in routable):
            routable = live  # a suspect worker beats none: its call fails or it recovered
        self.router.update_workers(routable)

    def metrics_targets(self) -> list[dict[str, Any]]:
        """The workers' Prometheus endpoints in ``http_sd_configs`` form."""
        out = []
        for w in sorted(self.workers.values(), key=lambda w: w.worker_id):
            if not w.metrics_url:
                continue
            url = urlsplit(w.metrics_url)
            out.append({"targets": [url.netloc], "labels": {
                "__metrics_path__": url.path or "/metrics", "worker_id": w.worker_id,
                "role": pb.Role.Name(w.role).lower(), "draining": str(w.draining).lower()}})
        return out

    def mark_unavailable(self, worker_id: str) -> None:
        """A worker refused a call (UNAVAILABLE) or broke a stream: route around it for a while."""
        w = self.workers.get(worker_id)
        if w is not None:
            self._unavailable[worker_id] = (w.started_at_ms, time.monotonic() + self.config.unavailable_backoff_s)
            self._update_router()

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.refresh_interval_s)
            await self.refresh()

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.stats_interval_s)
            await asyncio.gather(*(self._poll_stats(w) for w in list(self.workers.values())))

    async def _poll_stats(self, worker: pb.WorkerInfo) -> None:
        channel = self.channel(worker.address)
        stub = pb_grpc.DecodeStub(channel) if worker.role in DECODE_ROLES else pb_grpc.PrefillStub(channel)
        try:
            stats = await stub.Stats(pb.StatsRequest(), timeout=1.0)
        except grpc.aio.AioRpcError as e:
            log.debug("Stats of %s failed: %s", worker.worker_id, e.code().name)
            return
        self.router.update_load(worker.worker_id, stats)

    async def ready(self) -> dict[str, Any]:
        """``{"ready": bool, "prefill": n, "decode": n}`` from a fresh look at the store."""
        try:
            workers = await asyncio.wait_for(asyncio.to_thread(self._store.list_workers), timeout=5.0)
        except Exception as e:  # noqa: BLE001 - not ready is the answer
            return {"ready": False, "prefill": 0, "decode": 0, "reason": f"control-plane store: {e}"}
        workers = [w for w in workers if not w.draining]
        num_prefill = sum(w.role in PREFILL_ROLES for w in workers)
        num_decode = sum(w.role in DECODE_ROLES for w in workers)
        # Decode workers alone serve (they prefill locally); prefill workers alone cannot.
        return {"ready": num_decode >= 1, "prefill": num_prefill, "decode": num_decode}

    def channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = auth.aio_insecure_channel(address, self.config.cluster_secret,
                                                                          options=CHANNEL_OPTIONS)
        return channel

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
        gen = Generation(self, params, arrival)
        try:
            for i, prompt_ids in enumerate(prompts):
                gen.open(i, prompt_ids)
        except BaseException:
            gen.cancel()
            raise
        return gen


__all__ = ["Gateway", "GatewayConfig", "Generation"]
