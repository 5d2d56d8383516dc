"""An LLMEngine driven by one background thread, for asyncio servers.

Every call into the engine runs on the engine thread (commands are closures queued
to it), so the engine needs no locks. Deltas go back to per-request asyncio queues in
one thread hop per step: the engine thread collects every request's deltas of a loop
iteration and hands them over with a single ``call_soon_threadsafe`` (one event-loop
wake-up per step, not one per request). A consumer that lags behind the engine gets
every step it missed at once, merged into one delta per completion (``coalesce``).
Requests admitted for remote prefill are handed to ``on_remote_prefill`` (a coroutine
function) on the event loop. With ``max_waiting_requests``, ``generate`` refuses a
request (:class:`QueueFullError`, before any work) while that many wait to be
scheduled: a bounded queue, so a worker under overload answers "go elsewhere" at once
instead of queueing without end.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from .engine import LLMEngine
from .outputs import CompletionDelta
from .request import Resume
from .sampling_params import SamplingParams
from .scheduler import RemotePrefill


class QueueFullError(Exception):
    """``generate`` refused a request: the waiting queue is full (nothing was done)."""


class AsyncEngine:
    def __init__(
        self,
        engine: LLMEngine,
        loop: asyncio.AbstractEventLoop,
        on_remote_prefill: Callable[[RemotePrefill], Awaitable[None]] | None = None,
        max_waiting_requests: int | None = None,
    ) -> None:
        if max_waiting_requests is not None and max_waiting_requests < 1:
            raise ValueError(f"max_waiting_requests must be >= 1 or None, got {max_waiting_requests!r}")
        self.engine = engine
        self.loop = loop
        self.on_remote_prefill = on_remote_prefill
        self.max_waiting_requests = max_waiting_requests
        """``generate`` refuses new requests while this many wait to be scheduled (None: no bound)."""
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue] = {}
        """request_id -> queue of the CompletionDelta lists each step produced for it."""
        self._prefill_only: set[str] = set()
        self._request_of: dict[str, str] = {}
        """Completion id ("{request_id}#{i}" when n > 1) -> request id."""
        self._outbox: list[tuple[asyncio.Queue, Any]] = []
        """(stream, item) deliveries made since the last flush (engine thread only)."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pdserve-engine", daemon=True)
        self._thread.start()

    # -- calls from the event loop ---------------------------------------------------

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` on the engine thread and return its result (exceptions propagate)."""
        fut = self.loop.create_future()

        def command() -> None:
            try:
                result = fn()
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                self.loop.call_soon_threadsafe(_set_exception, fut, e)
            else:
                self.loop.call_soon_threadsafe(_set_result, fut, result)

        self._commands.put(command)
        return await fut

    async def generate(
        self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams, *, remote_prefill: bool = False,
        resume: Resume | None = None,
    ) -> AsyncIterator[list[CompletionDelta]]:
        """Add a request and yield its deltas until every completion finished.

        Each yield holds at most one delta per completion: everything the engine produced
        since the consumer last asked, merged in order (one step's worth when the consumer
        keeps up, several steps' when it lags; see ``coalesce``). ``resume``: see
        ``LLMEngine.add_request``. Raises ValueError (bad input) or QueueFullError
        (``max_waiting_requests`` wait already) before yielding anything. If the consumer
        stops early (client gone, cancellation), the request is aborted and its blocks freed.
        """
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        for i in range(params.n if params.n > 1 else 0):
            self._request_of[f"{request_id}#{i}"] = request_id
        try:
            await self.call(lambda: self._admit(request_id, prompt_token_ids, params, remote_prefill, resume))
        except BaseException:
            self._streams.pop(request_id, None)
            for i in range(params.n if params.n > 1 else 0):
                self._request_of.pop(f"{request_id}#{i}", None)
            raise
        finished = False
        num_open = params.n
        try:
            while num_open:
                deltas = await stream.get()
                if not stream.empty():  # the consumer lagged: take every step it missed
                    deltas = list(deltas)
                    while not stream.empty():
                        deltas.extend(stream.get_nowait())
                    deltas = coalesce(deltas)
                num_open -= sum(1 for d in deltas if d.finish_reason is not None)
                yield deltas
            finished = True
        finally:
            self._streams.pop(request_id, None)
            for i in range(params.n if params.n > 1 else 0):
                self._request_of.pop(f"{request_id}#{i}", None)
            if not finished:
                self.abort(request_id)
            else:
                self._commands.put(lambda: self.engine.take_finished(request_id, []))

    def _admit(self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams,
               remote_prefill: bool, resume: Resume | None) -> None:
        """Add a request unless the waiting queue is full (on the engine thread: the count is exact)."""
        num_waiting = self.engine.scheduler.num_waiting
        if self.max_waiting_requests is not None and num_waiting >= self.max_waiting_requests:
            raise QueueFullError(f"{num_waiting} requests are waiting to be scheduled "
                                 f"(max_waiting_requests={self.max_waiting_requests})")
        self.engine.add_request(request_id, prompt_token_ids, params, remote_prefill=remote_prefill, resume=resume)

    async def prefill_only(
        self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> tuple[CompletionDelta, list[int]]:
        """Prefill side: compute the prompt and sample its first token. Returns that delta and
        the request's block ids, which stay allocated until ``release``. Cancelled: aborted."""
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        try:
            self._prefill_only.add(request_id)
            await self.call(lambda: self.engine.add_prefill_only(request_id, prompt_token_ids, params))
            # NOTE: the engine thread hands over the block ids with the delta (``_dispatch``),
            # so the KV write can start at once instead of waiting for the next step.
            (delta,), block_ids = await stream.get()
        except BaseException:
            self.abort(request_id)
            raise
        finally:
            self._streams.pop(request_id, None)
            self._prefill_only.discard(request_id)
        if delta.finish_reason in ("abort", "error"):
            raise RuntimeError(delta.error or f"prefill of {request_id} was aborted")
        return delta, block_ids

    def release(self, request_id: str) -> None:
        """Free the blocks a prefill-only request held (from any thread)."""
        self._commands.put(lambda: self.engine.release(request_id))

    def abort(self, request_id: str, error: str | None = None) -> None:
        """Abort from any thread; the request's stream gets its final delta(s)."""
        self._commands.put(lambda: self._dispatch(self.engine.abort_request(request_id, error=error)))

    def complete_remote_prefill(
        self, request_id: str, first_token_id: int, logprobs: dict[int, float] | None,
        prompt_logprobs: list[dict[int, float] | None] | None = None,
    ) -> None:
        def command() -> None:
            try:
                delta = self.engine.complete_remote_prefill(request_id, first_token_id, logprobs, prompt_logprobs)
            except ValueError as e:
                if request_id in self.engine.scheduler.awaiting_kv:  # a bad answer, not an abort: fail it
                    group = self._request_of.get(request_id, request_id)
                    self._dispatch(self.engine.abort_request(group, error=f"remote prefill: {e}"))
                return  # else aborted meanwhile: nothing waits for this KV any more
            if delta is not None:  # None: a resumed request, which computes its next token itself
                self._dispatch([delta])

        self._commands.put(command)

    def prefill_locally(self, request_id: str) -> None:
        def command() -> None:
            try:
                self.engine.prefill_locally(request_id)
            except ValueError:
                pass  # aborted meanwhile

        self._commands.put(command)

    def shutdown(self) -> None:
        self._stop.set()
        self._commands.put(lambda: None)  # wake the thread if it waits for a command
        self._thread.join(timeout=10)
        self.engine.shutdown()

    # -- the engine thread -----------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            busy = self.engine.has_unfinished and not self._only_awaiting_kv()
            try:
                # Busy: take what is queued and step. Idle: sleep until a command comes (every
                # change of the engine's state is one), instead of waking to poll.
                cmd = self._commands.get(block=not busy)
            except queue.Empty:
                cmd = None
            while cmd is not None:
                cmd()
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    cmd = None
            self._flush()  # aborts and completed hops answer now, not after the step
            if self.engine.has_unfinished and not self._only_awaiting_kv():
                try:
                    self._dispatch(self.engine.step())
                except Exception as e:  # noqa: BLE001 - a failed step fails its requests, not the server
                    for rid in self.engine.request_ids():
                        self._dispatch(self.engine.abort_request(rid, error=f"engine step failed: {e!r}"))
                self._flush()
            for rp in self.engine.take_remote_prefills():
                if self.on_remote_prefill is not None:
                    self.loop.call_soon_threadsafe(_spawn, self.loop, self.on_remote_prefill(rp))

    def _only_awaiting_kv(self) -> bool:
        """Nothing to step: every unfinished request waits for a prefill worker's KV (a
        request loading from the KV tiers does not: the next step promotes it; nor one
        reading from the KV pool: steps poll the reads)."""
        s = self.engine.scheduler
        return not s.running and not s.waiting and not s.loading and not s.pool_fetching

    def _dispatch(self, deltas: list[CompletionDelta]) -> None:
        """Queue each request's deltas for delivery by the next ``_flush`` (engine thread)."""
        by_request: dict[str, list[CompletionDelta]] = {}
        for d in deltas:
            rid = self._request_of.get(d.request_id, d.request_id)
            by_request.setdefault(rid, []).append(d)
        for rid, ds in by_request.items():
            stream = self._streams.get(rid)
            if stream is None:
                continue
            if rid in self._prefill_only:
                # A prefill-only request ends with its first token: forget it here and
                # hand over the blocks it keeps for the transfer (until ``release``).
                self.engine.take_finished(rid, [])
                self._outbox.append((stream, (ds, self.engine.block_ids(rid))))
            else:
                self._outbox.append((stream, ds))

    def _flush(self) -> None:
        """Hand everything dispatched since the last flush to the event loop in one hop."""
        if self._outbox:
            batch, self._outbox = self._outbox, []
            self.loop.call_soon_threadsafe(_deliver, batch)


def coalesce(deltas: list[CompletionDelta]) -> list[CompletionDelta]:
    """One delta per completion, in order of first appearance: consecutive steps' deltas
    of a completion merged (token ids, text and logprobs concatenated in order; the
    finish reason, error and cached-token count of the last, which is the only one that
    can have them; the prompt logprobs of the first, the only one that can have those)."""
    merged: dict[str, CompletionDelta] = {}
    for d in deltas:
        prev = merged.get(d.request_id)
        if prev is None:
            merged[d.request_id] = d
            continue
        logprobs = None
        if prev.logprobs is not None or d.logprobs is not None:
            logprobs = [*(prev.logprobs or ()), *(d.logprobs or ())]
        merged[d.request_id] = CompletionDelta(
            d.request_id, d.index, prev.token_ids + d.token_ids, prev.text + d.text, logprobs,
            d.finish_reason, d.error or prev.error,
            prompt_logprobs=prev.prompt_logprobs if prev.prompt_logprobs is not None else d.prompt_logprobs,
            num_cached_tokens=d.num_cached_tokens,
        )
    return list(merged.values())


def _deliver(batch: list[tuple[asyncio.Queue, Any]]) -> None:
    for stream, item in batch:
        stream.put_nowait(item)


def _set_result(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


def _spawn(loop: asyncio.AbstractEventLoop, coro: Awaitable[None]) -> None:
    loop.create_task(coro)
