"""One API request's Generate calls on the decode workers, merged into one stream.

Closing a :class:`Generation` (finished, failed, or the client went away) cancels
every gRPC call still open; the decode worker then aborts the request, on the
prefill worker too, and frees its blocks. A reader that lags (the client reads slowly,
the event loop is busy) takes everything that arrived at once (``ready``) and writes
it merged per choice (``coalesce``), so lagging costs fewer writes, not more. A
prompt's block hashes, which the router looks up in its prefix index, are salted with
the request's ``cache_salt`` exactly as the workers salt the blocks they report, so a
salted prompt only ever matches blocks of its own salt. Nothing here imports torch.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
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
    from .gateway import Gateway

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


class Generation:
    """The Generate calls of one API request, merged into one stream of :class:`Delta`.

    ``next()`` returns deltas in arrival order and ``None`` once every choice finished;
    ``ready()`` returns, without waiting, those that arrived already. A worker failure
    raises :class:`APIError` from ``next()`` once the deltas before it were taken (and
    cancels the other calls). Call ``cancel()`` (idempotent) in a ``finally``: it
    cancels whatever is still open.
    """

    def __init__(self, gateway: Gateway, params: SamplingParams, arrival: float) -> None:
        self.gateway = gateway
        self.params = params
        self.arrival = arrival
        self.request_id = uuid.uuid4().hex
        self.num_prompt_tokens = 0
        self.num_completion_tokens = 0
        self.num_cached_tokens = 0
        """Prompt tokens the workers served from their prefix caches (their final usage)."""
        self.prompt_logprobs: dict[int, list[pb.TokenLogprobs]] = {}
        """Prompt i's logprobs (positions 1..), when asked for, once its worker sent them."""
        self._salt = cache_salt_keys(params.cache_salt)
        self._queue: asyncio.Queue = asyncio.Queue()
        self._error: APIError | None = None
        """A failure ``ready()`` took from the queue; ``next()`` raises it."""
        self._calls: list[grpc.aio.UnaryStreamCall] = []
        self._pumps: list[asyncio.Task] = []
        self._decisions: list[tuple[Any, list[int]]] = []
        self._num_open = 0
        self._last_token_at: dict[int, float] = {}
        self._first_token_at: float | None = None
        self._done = False
        self._closed = False

    def open(self, i: int, prompt_ids: list[int]) -> None:
        """Route prompt ``i`` and open its Generate call (503 when no worker can take it)."""
        gw = self.gateway
        gw.metrics.prompt_tokens.inc(len(prompt_ids))
        self.num_prompt_tokens += len(prompt_ids)
        self._num_open += self.params.n
        self._call(i, prompt_ids, attempt=0)

    def _call(self, i: int, prompt_ids: list[int], attempt: int) -> None:
        gw = self.gateway
        hashes = block_hashes(prompt_ids, gw.config.block_size, self._salt)
        try:
            decision = gw.router.route(prompt_ids, hashes)
        except NoWorkersError as e:
            raise APIError(503, f"no worker can serve this request now: {e}", type="server_error",
                           code="no_workers", headers={"Retry-After": str(gw.config.retry_after_s)}) from None
        worker = gw.workers.get(decision.decode_worker_id)
        if worker is None:
            gw.router.on_finished(decision, prompt_ids)
            raise APIError(503, "the chosen decode worker left the cluster; retry", type="server_error",
                           code="no_workers", headers={"Retry-After": str(gw.config.retry_after_s)})
        self._decisions.append((decision, prompt_ids))
        gw.metrics.routing.labels("remote" if decision.prefill_worker_id else "local").inc()
        gw.metrics.kv_hit_tokens.labels("decode").inc(decision.cached_tokens_decode or 0)
        gw.metrics.kv_hit_tokens.labels("prefill").inc(decision.cached_tokens_prefill or 0)
        remaining_s = max(gw.config.request_timeout_s - (time.monotonic() - self.arrival), 0.001)
        request = pb.GenerateRequest(
            request_id=self.request_id if i == 0 else f"{self.request_id}-{i}",
            prompt_token_ids=prompt_ids, sampling_params=convert.sampling_message(self.params),
            prefill_worker_id=decision.prefill_worker_id or "", timeout_ms=min(int(remaining_s * 1000) + 1, 2**32 - 1),
        )
        call = pb_grpc.DecodeStub(gw.channel(worker.address)).Generate(request, timeout=remaining_s)
        self._calls.append(call)
        self._pumps.append(asyncio.create_task(self._pump(i, prompt_ids, call, worker.worker_id, decision, attempt)))

    async def _pump(self, i: int, prompt_ids: list[int], call: grpc.aio.UnaryStreamCall, worker_id: str,
                    decision: Any, attempt: int) -> None:
        n = self.params.n
        num_finished = 0
        num_received = 0
        try:
            async for msg in call:
                num_received += 1
                if msg.finish_reason in (pb.ABORT, pb.ERROR):
                    log.warning("request %s failed on %s: %s", msg.request_id, worker_id,
                                msg.error.message or "aborted")
                    self._queue.put_nowait(APIError(
                        500, f"generation failed on the serving cluster (request {self.request_id})",
                        type="server_error", code="generation_failed"))
                    return
                if self.params.prompt_logprobs is not None and msg.index == 0 and i not in self.prompt_logprobs:
                    self.prompt_logprobs[i] = list(msg.prompt_logprobs)  # on its first message (may be [])
                if msg.HasField("usage"):
                    self.num_cached_tokens += msg.usage.cached_tokens
                reason = convert.finish_reason_name(msg.finish_reason)
                num_finished += reason is not None
                delta = Delta(i * n + msg.index, list(msg.token_ids), msg.text, list(msg.logprobs), reason)
                self._observe(delta)  # on arrival, so a reader that lags does not skew the latencies
                self._queue.put_nowait(delta)
            if num_finished < n:
                self._queue.put_nowait(APIError(500, f"worker {worker_id} ended the stream early",
                                                type="server_error", code="generation_failed"))
        except grpc.aio.AioRpcError as e:
            if (e.code() == grpc.StatusCode.UNAVAILABLE and num_received == 0
                    and attempt < self.gateway.config.max_retries):
                self._retry(i, prompt_ids, worker_id, decision, attempt, e)
            else:
                self._queue.put_nowait(self._rpc_error(e, worker_id))
        except Exception:  # noqa: BLE001 - never leave next() waiting
            log.exception("request %s: reading the stream of %s failed", self.request_id, worker_id)
            self._queue.put_nowait(APIError(500, f"internal error (request {self.request_id})",
                                            type="server_error", code="internal_error"))

    def _retry(self, i: int, prompt_ids: list[int], worker_id: str, decision: Any, attempt: int,
               e: grpc.aio.AioRpcError) -> None:
        """The decode worker refused before sending anything (draining, gone): it did no
        work the client saw, so the prompt goes to another worker."""
        log.info("request %s: %s unavailable (%s); routing again", self.request_id, worker_id, e.details())
        self.gateway.mark_unavailable(worker_id)
        self.gateway.metrics.retries.inc()
        if self._closed:
            return
        for k, (d, _) in enumerate(self._decisions):
            if d is decision:
                del self._decisions[k]
                self.gateway.router.on_finished(decision, prompt_ids)
                break
        try:
            self._call(i, prompt_ids, attempt + 1)
        except APIError as err:
            self._queue.put_nowait(err)

    def _rpc_error(self, e: grpc.aio.AioRpcError, worker_id: str) -> APIError:
        code = e.code()
        retry = {"Retry-After": str(self.gateway.config.retry_after_s)}
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return invalid(e.details() or "invalid request")
        log.warning("request %s: Generate on %s failed: %s %s", self.request_id, worker_id, code.name, e.details())
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return APIError(504, f"the request did not finish within {self.gateway.config.request_timeout_s:g} s",
                            type="server_error", code="timeout")
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
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
            self.gateway.metrics.e2e.observe(time.monotonic() - self.arrival)
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
        metrics = self.gateway.metrics
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
                if not call.done():
                    call.cancel()
            for task in self._pumps:
                task.cancel()
        for decision, prompt_ids in self._decisions:
            try:
                self.gateway.router.on_finished(decision, prompt_ids)
            except Exception:  # noqa: BLE001 - bookkeeping must not fail the request
                log.exception("router.on_finished failed")
        self._decisions.clear()

