"""One API request's Generate calls on the decode workers, merged into one stream.

Closing a :class:`Generation` (finished, failed, or the client went away) cancels
every gRPC call still open; the decode worker then aborts the request, on the
prefill worker too, and frees its blocks.

Failures, by when they happen:

1. Before the worker sent anything, it refused the call (``UNAVAILABLE``: draining,
   crashed, restarting; ``RESOURCE_EXHAUSTED``: its queue is full): the prompt is
   routed again, the worker routed around for a while, up to ``max_retries`` times.
2. After it started (the stream breaks: ``UNAVAILABLE``, ``CANCELLED`` by a stopping
   server, or it ends with completions unfinished), each unfinished completion is
   *migrated*: resumed as its own ``n = 1`` call on a worker the router picks (the
   failed one routed around), carrying the output tokens the client has, the number of
   characters of text it has, and the completion's index (its seed). The worker admits
   it with those tokens as output and streams only what follows, so the client's
   stream has no gap and no duplicate (docs/architecture.md, "Failure semantics").
   Each completion migrates at most ``max_migrations`` times; past that the stream
   ends with an error.
3. A request the worker failed (finish reason error/abort), a deadline, or bad input
   end the stream with an error.

A reader that lags (the client reads slowly, the event loop is busy) takes everything
that arrived at once (``ready``) and writes it merged per choice (``coalesce``), so
lagging costs fewer writes, not more. A prompt's block hashes, which the router looks
up in its prefix index, are salted with the request's ``cache_salt`` exactly as the
workers salt the blocks they report, so a salted prompt only ever matches blocks of its
own salt. A Generation works on a ``workers.WorkerPool`` (routing, channels, back-off),
never on the gateway. Nothing here imports torch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

from pdserve.engine.hashing import block_hashes, cache_salt_keys
from pdserve.engine.sampling_params import SamplingParams
from pdserve.proto import convert
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc

from .policy import NoWorkersError
from .errors import APIError, invalid

if TYPE_CHECKING:
    from .workers import WorkerPool

log = logging.getLogger("pdserve.gateway")


@dataclass
class Delta:
    """One streamed delta of choice ``index`` (prompt i, completion j: ``i * n + j``)."""

    index: int
    token_ids: list[int]
    text: str
    logprobs: list[pb.TokenLogprobs]
    finish_reason: str | None


def coalesce(deltas: list[Delta]) -> list[Delta]:
    """One delta per choice, in order of first appearance: a choice's consecutive deltas
    merged (token ids, text and logprobs concatenated in order; the finish reason of the
    last, which is the only one that can have one)."""
    merged: dict[int, Delta] = {}
    for d in deltas:
        prev = merged.get(d.index)
        if prev is None:
            merged[d.index] = d
        else:
            merged[d.index] = Delta(d.index, prev.token_ids + d.token_ids, prev.text + d.text,
                                    prev.logprobs + d.logprobs, d.finish_reason)
    return list(merged.values())


@dataclass
class _Choice:
    """One completion as the client sees it: what it was sent (tokens, characters of text),
    so that a migration resumes it exactly there."""

    index: int
    """Choice index: prompt * n + completion."""
    prompt: int
    completion: int
    token_ids: list[int] = field(default_factory=list)
    text_len: int = 0
    is_finished: bool = False
    num_migrations: int = 0


@dataclass
class _Call:
    """One Generate call: the choices it serves (its message index k is ``choices[k]``),
    where it runs and how it was routed (``routed_ids``: the tokens the router saw)."""

    prompt: int
    choices: list[_Choice]
    is_resume: bool
    worker_id: str
    decision: Any
    routed_ids: list[int]
    attempt: int
    rpc: grpc.aio.UnaryStreamCall
    num_received: int = 0
    is_released: bool = False
    """The router was told it ended (``on_finished``)."""


_RETRY_ON = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
"""Refusals before any message (draining or gone; queue full): the prompt goes to another worker."""
_MIGRATE_ON = {grpc.StatusCode.UNAVAILABLE: "unavailable", grpc.StatusCode.CANCELLED: "cancelled"}
"""Stream failures that mean "the worker went away" (its connection broke, it was killed
or stopped), by their metric reason; a stream that ends with completions unfinished is
"ended". Anything else (a deadline, bad input, a failed request) is not migrated."""


class Generation:
    """The Generate calls of one API request, merged into one stream of :class:`Delta`.

    ``next()`` returns deltas in arrival order and ``None`` once every choice finished;
    ``ready()`` returns, without waiting, those that arrived already. A worker failure
    that cannot be retried or migrated (module docstring) raises :class:`APIError` from
    ``next()`` once the deltas before it were taken (and cancels the other calls). Call
    ``cancel()`` (idempotent) in a ``finally``: it cancels whatever is still open.
    """

    def __init__(self, pool: WorkerPool, params: SamplingParams, arrival: float) -> None:
        self.pool = pool
        self.params = params
        self.arrival = arrival
        self.request_id = uuid.uuid4().hex
        self.num_prompt_tokens = 0
        self.num_completion_tokens = 0
        self.prompt_logprobs: dict[int, list[pb.TokenLogprobs]] = {}
        """Prompt i's logprobs (positions 1..), when asked for, once its worker sent them."""
        self._salt = cache_salt_keys(params.cache_salt)
        self._queue: asyncio.Queue = asyncio.Queue()
        self._error: APIError | None = None
        """A failure ``ready()`` took from the queue; ``next()`` raises it."""
        self._prompts: dict[int, list[int]] = {}
        self._num_cached: dict[int, int] = {}
        """Prompt i -> prompt tokens a worker's prefix cache served (the first final usage)."""
        self._calls: list[_Call] = []
        self._pumps: list[asyncio.Task] = []
        self._num_open = 0
        self._last_token_at: dict[int, float] = {}
        self._first_token_at: float | None = None
        self._done = False
        self._closed = False

    @property
    def num_cached_tokens(self) -> int:
        """Prompt tokens the workers served from their prefix caches (their final usage),
        each prompt counted once however many calls served it."""
        return sum(self._num_cached.values())

    def open(self, i: int, prompt_ids: list[int]) -> None:
        """Route prompt ``i`` and open its Generate call (503 when no worker can take it)."""
        n = self.params.n
        self.pool.metrics.prompt_tokens.inc(len(prompt_ids))
        self.num_prompt_tokens += len(prompt_ids)
        self._num_open += n
        self._prompts[i] = prompt_ids
        self._start(i, [_Choice(i * n + j, i, j) for j in range(n)], attempt=0, is_resume=False)

    def _start(self, i: int, choices: list[_Choice], attempt: int, is_resume: bool) -> None:
        """Route and open one Generate call: prompt ``i`` for ``choices``, or (``is_resume``)
        the one choice's completion continued from the tokens the client has."""
        gw = self.pool
        prompt_ids = self._prompts[i]
        routed_ids = prompt_ids + choices[0].token_ids if is_resume else prompt_ids
        hashes = block_hashes(routed_ids, gw.config.block_size, self._salt)
        try:
            decision = gw.router.route(routed_ids, hashes)
        except NoWorkersError as e:
            raise APIError(503, f"no worker can serve this request now: {e}", type="server_error",
                           code="no_workers", headers={"Retry-After": str(gw.config.retry_after_s)}) from None
        worker = gw.workers.get(decision.decode_worker_id)
        if worker is None:
            gw.router.on_finished(decision, routed_ids)
            raise APIError(503, "the chosen decode worker left the cluster; retry", type="server_error",
                           code="no_workers", headers={"Retry-After": str(gw.config.retry_after_s)})
        gw.metrics.routing.labels("remote" if decision.prefill_worker_id else "local").inc()
        gw.metrics.kv_hit_tokens.labels("decode").inc(decision.cached_tokens_decode or 0)
        gw.metrics.kv_hit_tokens.labels("prefill").inc(decision.cached_tokens_prefill or 0)
        remaining_s = max(gw.config.request_timeout_s - (time.monotonic() - self.arrival), 0.001)
        request_id = self.request_id if i == 0 else f"{self.request_id}-{i}"
        params = self.params
        if is_resume:
            c = choices[0]
            request_id = f"{request_id}-c{c.completion}-m{c.num_migrations}"
            # The prompt logprobs came with the first message of the call that broke.
            params = dataclasses.replace(params, n=1, prompt_logprobs=None)
        request = pb.GenerateRequest(
            request_id=request_id, prompt_token_ids=prompt_ids, sampling_params=convert.sampling_message(params),
            prefill_worker_id=decision.prefill_worker_id or "", timeout_ms=min(int(remaining_s * 1000) + 1, 2**32 - 1),
        )
        if is_resume:
            request.resume.CopyFrom(pb.GenerateRequest.Resume(token_ids=c.token_ids, index=c.completion,
                                                              text_len=c.text_len))
        rpc = pb_grpc.DecodeStub(gw.channel(worker.address)).Generate(request, timeout=remaining_s)
        call = _Call(i, choices, is_resume, worker.worker_id, decision, routed_ids, attempt, rpc)
        self._calls.append(call)
        self._pumps.append(asyncio.create_task(self._pump(call)))

    async def _pump(self, call: _Call) -> None:
        try:
            async for msg in call.rpc:
                call.num_received += 1
                if msg.finish_reason in (pb.ABORT, pb.ERROR):
                    log.warning("request %s failed on %s: %s", msg.request_id, call.worker_id,
                                msg.error.message or "aborted")
                    self._queue.put_nowait(APIError(
                        500, f"generation failed on the serving cluster (request {self.request_id})",
                        type="server_error", code="generation_failed"))
                    return
                i = call.prompt
                if (self.params.prompt_logprobs is not None and not call.is_resume and msg.index == 0
                        and i not in self.prompt_logprobs):
                    self.prompt_logprobs[i] = list(msg.prompt_logprobs)  # on its first message (may be [])
                if msg.HasField("usage") and i not in self._num_cached:
                    # A resumed call's cache hits may cover output tokens: only the prompt's count.
                    self._num_cached[i] = min(msg.usage.cached_tokens, len(self._prompts[i]))
                choice = call.choices[msg.index]
                reason = convert.finish_reason_name(msg.finish_reason)
                choice.token_ids.extend(msg.token_ids)
                choice.text_len += len(msg.text)
                choice.is_finished = reason is not None
                delta = Delta(choice.index, list(msg.token_ids), msg.text, list(msg.logprobs), reason)
                self._observe(delta)  # on arrival, so a reader that lags does not skew the latencies
                self._queue.put_nowait(delta)
            if not all(c.is_finished for c in call.choices):
                self._migrate(call, "ended", "the stream ended early")
        except grpc.aio.AioRpcError as e:
            code = e.code()
            if (code in _RETRY_ON and call.num_received == 0 and not call.is_resume
                    and call.attempt < self.pool.config.max_retries):
                self._retry(call, e)
            elif code in _MIGRATE_ON and (call.num_received or call.is_resume):
                self._migrate(call, _MIGRATE_ON[code], f"{code.name}: {e.details()}")
            else:
                self._queue.put_nowait(self._rpc_error(e, call.worker_id))
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():
                raise  # cancelled ourselves (the request ended): nothing to report
            # The call was cancelled under us (its channel closed): a broken stream.
            self._migrate(call, "cancelled", "the call was cancelled locally (channel closed)")
        except Exception:  # noqa: BLE001 - never leave next() waiting
            log.exception("request %s: reading the stream of %s failed", self.request_id, call.worker_id)
            self._queue.put_nowait(APIError(500, f"internal error (request {self.request_id})",
                                            type="server_error", code="internal_error"))

    def _retry(self, call: _Call, e: grpc.aio.AioRpcError) -> None:
        """The decode worker refused before sending anything (draining, gone): it did no
        work the client saw, so the prompt goes to another worker."""
        log.info("request %s: %s unavailable (%s); routing again", self.request_id, call.worker_id, e.details())
        self.pool.mark_unavailable(call.worker_id)
        self.pool.metrics.retries.inc()
        self._release(call)
        if self._closed:
            return
        try:
            self._start(call.prompt, call.choices, call.attempt + 1, is_resume=False)
        except APIError as err:
            self._queue.put_nowait(err)

    def _migrate(self, call: _Call, reason: str, why: str) -> None:
        """The call broke after it started (or while resuming): resume each of its
        unfinished completions on another worker, from what the client has."""
        gw = self.pool
        unfinished = [c for c in call.choices if not c.is_finished]
        log.warning("request %s: the stream on %s broke after %d messages (%s); resuming %d completion(s)",
                    self.request_id, call.worker_id, call.num_received, why, len(unfinished))
        gw.mark_unavailable(call.worker_id)
        self._release(call)
        if self._closed:
            return
        for c in unfinished:
            if c.num_migrations >= gw.config.max_migrations:
                gw.metrics.migrations.labels(reason, "exhausted").inc()
                self._queue.put_nowait(APIError(
                    503, f"the decode workers serving this request failed {c.num_migrations + 1} times; giving up "
                         f"(request {self.request_id}, max_migrations {gw.config.max_migrations})",
                    type="server_error", code="migrations_exhausted",
                    headers={"Retry-After": str(gw.config.retry_after_s)}))
                return
            c.num_migrations += 1
            try:
                self._start(call.prompt, [c], attempt=0, is_resume=True)
            except APIError as err:
                gw.metrics.migrations.labels(reason, "no_workers").inc()
                self._queue.put_nowait(err)
                return
            gw.metrics.migrations.labels(reason, "resumed").inc()

    def _release(self, call: _Call) -> None:
        """Tell the router the call ended (once): its load leaves the worker's figures."""
        if call.is_released:
            return
        call.is_released = True
        try:
            self.pool.router.on_finished(call.decision, call.routed_ids)
        except Exception:  # noqa: BLE001 - bookkeeping must not fail the request
            log.exception("router.on_finished failed")

    def _rpc_error(self, e: grpc.aio.AioRpcError, worker_id: str) -> APIError:
        code = e.code()
        retry = {"Retry-After": str(self.pool.config.retry_after_s)}
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return invalid(e.details() or "invalid request")
        log.warning("request %s: Generate on %s failed: %s %s", self.request_id, worker_id, code.name, e.details())
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return APIError(504, f"the request did not finish within {self.pool.config.request_timeout_s:g} s",
                            type="server_error", code="timeout")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # its queue is full: back-pressure
            return APIError(503, f"the decode workers are overloaded (request {self.request_id}); retry later",
                            type="server_error", code="overloaded", headers=retry)
        if code == grpc.StatusCode.UNAVAILABLE:
            return APIError(503, f"the decode worker is unavailable (request {self.request_id}); retry",
                            type="server_error", code="worker_unavailable", headers=retry)
        return APIError(500, f"generation failed on the serving cluster (request {self.request_id})",
                        type="server_error", code="generation_failed")

    async def next(self) -> Delta | None:
        while self._num_open:
            item = self._error if self._error is not None else await self._queue.get()
            if isinstance(item, APIError):
                self.cancel()
                raise item
            if item.finish_reason is not None:
                self._num_open -= 1
            return item
        if not self._done:
            self._done = True
            self.pool.metrics.e2e.observe(time.monotonic() - self.arrival)
            self.cancel()
        return None

    def ready(self) -> list[Delta]:
        """The deltas that arrived already, in arrival order, without waiting (stops before
        a failure, which the next ``next()`` raises)."""
        out: list[Delta] = []
        while self._num_open and self._error is None and not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, APIError):
                self._error = item
                break
            if item.finish_reason is not None:
                self._num_open -= 1
            out.append(item)
        return out

    def _observe(self, delta: Delta) -> None:
        if not delta.token_ids:
            return
        now = time.monotonic()
        metrics = self.pool.metrics
        if self._first_token_at is None:
            self._first_token_at = now
            metrics.ttft.observe(now - self.arrival)
        last = self._last_token_at.get(delta.index)
        if last is not None:
            gap = (now - last) / len(delta.token_ids)
            for _ in delta.token_ids:
                metrics.itl.observe(gap)
        self._last_token_at[delta.index] = now
        self.num_completion_tokens += len(delta.token_ids)
        metrics.completion_tokens.inc(len(delta.token_ids))

    def cancel(self) -> None:
        """Cancel every open call (the workers abort and free) and tell the router we are done.

        NOTE: once every choice finished, the calls are left to end on their own: a
        cancel racing the stream's normal end would only make the workers log aborts.
        """
        self._closed = True
        if not self._done:
            for call in self._calls:
                if not call.rpc.done():
                    call.rpc.cancel()
            for task in self._pumps:
                task.cancel()
        for call in self._calls:
            self._release(call)
