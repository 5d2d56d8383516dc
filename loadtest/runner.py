"""Running a load test: arrivals, concurrency, bounds, and the result.

The run, step by step:

1. Build the workload (``WorkloadBuilder``) and, without ``model``, ask GET /v1/models.
2. Start the clock. Sessions (one request, or one conversation) are started:
   - open loop (``rate``, or a trace): each at its arrival offset, whatever is in flight
     (with ``concurrency`` as well, a request that arrives while ``concurrency``
     requests are in flight waits for a slot, as vLLM's ``--max-concurrency``);
   - closed loop (``concurrency`` only): ``concurrency`` loops each start the next
     session as soon as their previous one ends;
   - neither: every session at once.
   A conversation's turns run one after another inside its session; a failed turn
   ends the conversation and its unsent turns are recorded as ``conversation_aborted``.
3. Sending stops at ``num_requests`` or when ``duration_s`` has passed (nothing new is
   started after it; a request still waiting for a concurrency slot is not sent).
   Requests in flight then get up to ``drain_timeout_s`` (default ``timeout_s``) to
   finish; any still running are cancelled. Both kinds are recorded as
   ``cancelled_at_end``. Each request also has its own ``timeout_s`` limit, so a run
   always ends by itself.
4. Records (one per request sent or due) are summarized by loadtest/metrics.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx

from .client import first_model, send
from .config import LoadTestConfig
from .metrics import RequestRecord, summarize
from .progress import Progress
from .prompts import PromptFactory
from .workloads import RequestSpec, Session, WorkloadBuilder, follow_up


@dataclass
class LoadTestResult:
    """``summary``: the dict described in loadtest/metrics.py; ``records``: one per request."""

    config: LoadTestConfig
    model: str
    summary: dict
    records: list[RequestRecord]


def run_loadtest(config: LoadTestConfig) -> LoadTestResult:
    """Run ``config`` to the end (blocking; not from inside a running event loop)."""
    return asyncio.run(arun_loadtest(config))


async def arun_loadtest(config: LoadTestConfig, factory: PromptFactory | None = None) -> LoadTestResult:
    """Run ``config`` to the end. ``factory`` reuses an already loaded tokenizer (sweeps)."""
    if factory is None:
        factory = await asyncio.to_thread(PromptFactory.from_dir, config.tokenizer_dir)
    builder = WorkloadBuilder(config, factory)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=1024)
    timeout = httpx.Timeout(config.timeout_s, connect=min(config.timeout_s, 30.0))
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        model = config.model or await first_model(client, config)
        run = _Run(config, client, model, factory, Progress(config.num_requests, config.show_progress))
        records = await run.execute(builder.sessions())
    return LoadTestResult(config, model, summarize(records, config.slo_ttft_ms, config.slo_tpot_ms,
                                                   config.slo_e2e_ms), records)


class _Run:
    def __init__(self, config: LoadTestConfig, client: httpx.AsyncClient, model: str, factory: PromptFactory,
                 progress: Progress) -> None:
        self.config, self.client, self.model, self.factory, self.progress = config, client, model, factory, progress
        self.records: list[RequestRecord] = []
        self.slots = asyncio.Semaphore(config.concurrency) if config.concurrency and not config.is_closed_loop \
            else None
        self.start = 0.0
        self.deadline: float | None = None

    def is_past_deadline(self) -> bool:
        return self.deadline is not None and time.perf_counter() >= self.deadline

    async def execute(self, sessions: Iterator[Session]) -> list[RequestRecord]:
        self.start = time.perf_counter()
        if self.config.duration_s is not None:
            self.deadline = self.start + self.config.duration_s
        tasks: set[asyncio.Task] = set()
        ticker = asyncio.create_task(self.progress.tick()) if self.progress.enabled else None
        try:
            if self.config.is_closed_loop:
                tasks = {asyncio.create_task(self._closed_loop(sessions)) for _ in range(self.config.concurrency)}
            else:
                await self._open_loop(sessions, tasks)
            await self._finish(tasks)
        finally:
            for task in tasks:
                task.cancel()
            if ticker is not None:
                ticker.cancel()
            self.progress.close()
        return sorted(self.records, key=lambda r: r.request_id)

    async def _open_loop(self, sessions: Iterator[Session], tasks: set[asyncio.Task]) -> None:
        for session in sessions:
            if session.arrival_s is not None:
                delay = self.start + session.arrival_s - time.perf_counter()
                if self.deadline is not None:
                    delay = min(delay, self.deadline - time.perf_counter())
                if delay > 0:
                    await asyncio.sleep(delay)
            if self.is_past_deadline():
                return
            task = asyncio.create_task(self._session(session))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def _closed_loop(self, sessions: Iterator[Session]) -> None:
        # The iterator is shared: each loop takes the next session (no await in between).
        for session in sessions:
            if self.is_past_deadline():
                return
            await self._session(session)

    async def _finish(self, tasks: set[asyncio.Task]) -> None:
        """Wait for in-flight sessions: without a duration until they end (each request has
        its own timeout); with one, up to ``drain_timeout_s`` more, then cancel the rest."""
        if not tasks:
            return
        if self.deadline is None:
            await asyncio.gather(*tasks)
            return
        # Sessions may run on until the deadline (a closed loop is still sending; an open loop
        # may have sent its last request early), then get the drain period.
        _, pending = await asyncio.wait(set(tasks), timeout=max(0.0, self.deadline - time.perf_counter()))
        if pending:
            _, pending = await asyncio.wait(pending, timeout=self.config.drain_timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _session(self, session: Session) -> None:
        prompt = None
        answer = ""
        failed: RequestRecord | None = None
        for spec in session.requests:
            if failed is not None:
                self._add(spec, error=("conversation_aborted", f"turn {failed.turn} failed: {failed.error}"))
                continue
            if spec.turn > 0 and self.is_past_deadline():
                return  # not sent: the run is over
            if spec.new_message is not None:
                prompt = follow_up(spec, prompt, answer)
                input_len = self.factory.count_chat(prompt) if self.config.endpoint == "chat" \
                    else self.factory.count_completion(prompt)
            else:
                prompt, input_len = spec.prompt, spec.input_len
            record = self._add(spec, input_len=input_len)
            try:
                if self.slots is not None:
                    async with self.slots:
                        if self.is_past_deadline():  # waited for a slot past the end: not in flight
                            self._never_sent(record)
                            self.progress.update(record)
                            return
                        answer = await send(self.client, self.config, self.model, prompt, record, self.start)
                else:
                    answer = await send(self.client, self.config, self.model, prompt, record, self.start)
            except asyncio.CancelledError:
                if record.error is None:  # cancelled while waiting for a slot: due but never sent
                    self._never_sent(record)
                self.progress.update(record)
                raise
            self.progress.update(record)
            if not record.is_ok:
                failed = record

    @staticmethod
    def _never_sent(record: RequestRecord) -> None:
        record.error, record.error_message = "cancelled_at_end", "never sent: no free slot before the end"

    def _add(self, spec: RequestSpec, input_len: int | None = None,
             error: tuple[str, str] | None = None) -> RequestRecord:
        record = RequestRecord(spec.request_id, spec.session_id, spec.turn, spec.group_id,
                               spec.input_len if input_len is None else input_len, spec.output_len,
                               scheduled_s=spec.arrival_s)
        if error is not None:
            record.error, record.error_message = error
        self.records.append(record)
        return record
