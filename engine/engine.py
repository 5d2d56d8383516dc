"""The engine loop: validate and queue requests, then step = schedule -> run -> process.

``step()`` returns the deltas produced by that step; ``LLM`` (offline) and the
workers (online) are thin loops around it. An ``n > 1`` request becomes n
completions named ``{request_id}#{index}`` that share the prompt's KV blocks.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .config import EngineConfig
from .executor import make_executor
from .kv_cache_manager import KVCacheManager, KVCacheStats
from .kv_tiers import DiskKVFiles, DiskTierMeta, layout_digest, tier_dtype
from .model_runner import (ModelOutput, StepInputs, add_prompt_logprobs, kv_block_bytes, order_for_step,
                           prepare_inputs)
from .output_processor import CompletionText
from .outputs import CompletionDelta, CompletionOutput, RequestOutput
from .parallel import TPGroup
from .request import KVTransfer, Request, RequestStatus, Resume, completion_seed
from .sampler import Sampler
from .sampling_params import SamplingParams
from .scheduler import RemotePrefill, Scheduler
from .structured_output import Grammars
from .tokenizer import Tokenizer

log = logging.getLogger("pdserve.engine")

@dataclass(frozen=True)
class EngineStats:
    """Load and cache figures a worker reports (and the router weighs)."""

    num_waiting: int
    num_running: int
    num_queued_prefill_tokens: int
    num_kv_blocks_total: int
    num_kv_blocks_free: int
    prefix_cache_hit_tokens: int
    prefix_cache_query_tokens: int
    num_open_grammars: int = 0
    tier_hit_tokens: int = 0
    """Of the prefix hits, tokens loaded back from the host tier."""
    num_host_blocks_total: int = 0
    num_host_blocks_used: int = 0
    pool_hit_tokens: int = 0
    """Prompt tokens read from the cluster-shared KV pool into the host tier."""
    pool_puts: int = 0
    """Blocks put to the KV pool (rank 0's shards; already there counts)."""
    pool_put_failures: int = 0
    """Blocks not put (pool full, master unreachable): a lost future hit, nothing more."""
    pool_get_failures: int = 0
    """Blocks whose pool read failed (master unreachable): their requests computed them."""


class _Completion:
    """Per-completion output state: the accumulated result and its text."""

    def __init__(self, request: Request, index: int, tokenizer: Tokenizer | None, stream: bool,
                 eos_token_ids: frozenset[int] = frozenset()) -> None:
        self.request = request
        p = request.sampling_params
        self.output = CompletionOutput(index=index, logprobs=[] if p.logprobs is not None else None)
        self.text = CompletionText(
            tokenizer, request.prompt_token_ids, p.stop, p.skip_special_tokens, stream,
            include_stop_str_in_output=p.include_stop_str_in_output,
            spaces_between_special_tokens=p.spaces_between_special_tokens,
            stop_token_ids=set(p.stop_token_ids) | (set() if p.ignore_eos else eos_token_ids))
        self.stream = stream
        """Deltas for every token; otherwise only the final one (offline callers wait for it)."""
        self.prompt_logprobs_sent = False

    def resume(self, resume: Resume) -> None:
        """Take the resumed tokens as produced already: the grammar accepts them, and the
        text state (detokenizer window, held-back stop-string tail) is rebuilt by replaying
        them; the text they commit counts as streamed (the client has it). ValueError when
        that is not a state the completion could have been in while unfinished."""
        req = self.request
        self.output.token_ids.extend(resume.output_token_ids)
        if req.constraint is not None:
            req.constraint.catch_up(req.output_token_ids)
            if req.constraint.is_terminated:
                raise ValueError("the resumed tokens complete the grammar: the completion had finished")
        for token_id in resume.output_token_ids:
            if self.text.append(token_id, False):
                raise ValueError("the resumed tokens complete a stop string: the completion had finished")
        text_len = len(self.text.take_delta())
        if resume.text_len is not None and text_len != resume.text_len:
            raise ValueError(f"the resumed tokens commit {text_len} characters of text, the client has "
                             f"{resume.text_len}")
        self.prompt_logprobs_sent = True

    def take_prompt_logprobs(self) -> list[dict[int, float] | None] | None:
        """The request's prompt logprobs for its first delta (None after, and on siblings)."""
        if self.prompt_logprobs_sent:
            return None
        self.prompt_logprobs_sent = True
        return self.request.prompt_logprobs


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer: Tokenizer | None = None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        cache = config.cache
        num_blocks = cache.num_blocks or cache.memory_bytes // kv_block_bytes(config, TPGroup(0, config.parallel.tensor_parallel_size))
        if num_blocks < 1:
            raise ValueError(f"KV memory {cache.memory_bytes} bytes holds no block; raise it or set num_blocks")
        self.num_blocks = num_blocks
        block_bytes = kv_block_bytes(config, TPGroup(0, config.parallel.tensor_parallel_size))
        self.num_host_blocks = cache.num_host_blocks(block_bytes)
        self.num_disk_blocks = cache.num_disk_blocks(block_bytes)
        self._disk_meta = DiskTierMeta(cache.offload_dir) if self.num_disk_blocks else None
        self.kv = KVCacheManager(num_blocks, cache.block_size, cache.enable_prefix_caching, self.num_host_blocks,
                                 self.num_disk_blocks, self._disk_meta)
        if self._disk_meta is not None:
            self._restore_disk_tier()
        self.scheduler = Scheduler(config.scheduler, self.kv)
        eos = set(config.model.eos_token_ids)
        if tokenizer is not None:
            eos |= tokenizer.eos_token_ids
        self.eos_token_ids = frozenset(eos)
        self.sampler = Sampler(config.seed, vocab_size=config.model.vocab_size, eos_token_ids=self.eos_token_ids)
        self._completions: dict[str, _Completion] = {}
        self._groups: dict[str, list[str]] = {}
        self._remote_prefills: list[RemotePrefill] = []
        self._last_logits: tuple[torch.Tensor, list[Request]] | None = None
        self.executor = make_executor(config, num_blocks)
        pool = getattr(self.executor.runner, "pool", None)
        self.kv.pool_enabled = pool is not None and pool.client is not None  # rank 0 joined the pool
        self.num_pool_puts = self.num_pool_put_failures = self.num_pool_get_failures = 0
        self._pending_text: list[tuple[_Completion, int, dict[int, float] | None, str | None]] = []
        """Tokens appended whose text is not processed yet (see ``step``)."""
        self._stopped: set[str] = set()
        """Completions a stop string ended while still scheduled: finished after the step."""
        self._overlap = config.overlap_output_processing
        self._grammars: Grammars | None = None
        self._forward_thread = None
        if self._overlap and not config.is_cuda and config.parallel.tensor_parallel_size == 1:
            self._forward_thread = ThreadPoolExecutor(1, thread_name_prefix="pdserve-forward")

    def _restore_disk_tier(self) -> None:
        """Re-index the blocks a previous run of this worker left in the disk tier (every
        rank's file must hold them); their stored events go out with the next publish."""
        c = self.config
        m = c.model
        tp = c.parallel.tensor_parallel_size
        _, local_heads = TPGroup(0, tp).kv_head_shard(m.num_kv_heads)
        shape = (m.num_layers, m.num_cache_planes, local_heads, c.cache.block_size, m.head_dim)
        digest = layout_digest(c)
        files = [DiskKVFiles(c.cache.offload_dir, r, digest, shape, tier_dtype(c)) for r in range(tp)]
        entries = self._disk_meta.scan(self.num_disk_blocks, files)
        self.kv.disk.restore(entries)
        if entries:
            log.info("disk KV tier: %d blocks from a previous run re-indexed", len(entries))

    @property
    def last_logits(self) -> dict[str, torch.Tensor]:
        """Logits rows of the latest step, by request id (for tests and scoring)."""
        if self._last_logits is None:
            return {}
        logits, sampled = self._last_logits
        return {r.request_id: logits[i] for i, r in enumerate(sampled)}

    # -- requests ------------------------------------------------------------------

    def tokenize(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model directory has no tokenizer; pass prompts as token ids")
            return self.tokenizer.encode(prompt)
        try:
            return [operator.index(t) for t in prompt]  # ints, numpy ints; not floats or strings
        except TypeError:
            raise ValueError(f"prompt must be a string or a sequence of integer token ids, got {prompt!r:.100}") from None

    def add_request(
        self, request_id: str, prompt: str | Sequence[int], params: SamplingParams, *,
        remote_prefill: bool | KVTransfer = False, stream: bool = True, resume: Resume | None = None,
    ) -> list[int]:
        """Validate and queue a request; returns its prompt token ids. Raises ValueError on bad input.

        With ``remote_prefill`` the request is admitted with blocks for its whole prompt
        and waits for a prefill worker to write them (see ``take_remote_prefills``); given
        as a ``KVTransfer`` (the hop's parameters), it rides on the request, and a request
        that ends while waiting keeps its blocks until ``settle_kv_transfer``.
        Without ``stream`` only the final delta of each completion is returned and the text
        is decoded once, into the final ``RequestOutput``, unless stop strings need it per token.
        With ``resume`` (``n`` = 1, streamed, no prompt logprobs) the request continues a
        completion another worker started (:class:`Resume`): its output starts with the
        resumed tokens and its deltas carry only what follows them.
        """
        rids = [request_id] if params.n == 1 else [f"{request_id}#{i}" for i in range(params.n)]
        # Completion ids must not collide either (e.g. "x#0" next to an n > 1 request "x").
        taken = next((r for r in (request_id, *rids)
                      if r in self._groups or r in self._completions or r in self.scheduler.quarantined), None)
        if taken is not None:
            raise ValueError(f"duplicate request_id {taken!r}")
        prompt_ids = self.tokenize(prompt)
        self._validate(prompt_ids, params)
        if resume is not None:
            ending = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
            resume.validate(params, stream, self.config.model.vocab_size, ending)
        bs = self.config.cache.block_size
        if resume is None:
            reqs = [Request(rid, list(prompt_ids), params, bs, seed=completion_seed(params.seed, i))
                    for i, rid in enumerate(rids)]
        else:
            reqs = [Request(request_id, list(prompt_ids), params, bs, output_token_ids=list(resume.output_token_ids),
                            seed=completion_seed(params.seed, resume.completion_index), is_resumed=True)]
        if params.structured_output is not None:
            for req in reqs:  # siblings each follow their own matcher
                req.constraint = self.grammars.constraint(params.structured_output)
        comps = [_Completion(req, i, self.tokenizer, stream, self.eos_token_ids) for i, req in enumerate(reqs)]
        if resume is not None:
            try:
                comps[0].resume(resume)
            except ValueError:
                _close_constraint(reqs[0])
                raise
        reqs[0].remote_prefill = bool(remote_prefill)  # siblings fork from it once the KV is in
        reqs[0].kv_transfer = remote_prefill if isinstance(remote_prefill, KVTransfer) else None
        self.scheduler.add_request(reqs[0], reqs[1:])
        for req, comp in zip(reqs, comps):
            self._completions[req.request_id] = comp
        self._groups[request_id] = rids
        return prompt_ids

    @property
    def grammars(self) -> Grammars:
        """Compiled structured-output grammars for this engine's tokenizer (built on first use)."""
        if self._grammars is None:
            if self.tokenizer is None:
                raise ValueError("structured outputs need a tokenizer; this model directory has none")
            self._grammars = Grammars(self.tokenizer.to_json(), self.config.model.vocab_size, self.eos_token_ids)
        return self._grammars

    def _validate(self, prompt_ids: list[int], p: SamplingParams) -> None:
        if not prompt_ids:
            raise ValueError("prompt is empty")
        vocab = self.config.model.vocab_size
        bad = next((t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad!r} is outside the vocabulary [0, {vocab})")
        for name in ("stop_token_ids", "logit_bias", "allowed_token_ids", "banned_token_ids"):
            bad = next((t for t in getattr(p, name) or () if t >= vocab), None)
            if bad is not None:
                raise ValueError(f"{name}: token id {bad} is outside the vocabulary [0, {vocab})")
        if p.allowed_token_ids is not None and set(p.allowed_token_ids) <= set(p.banned_token_ids):
            raise ValueError("allowed_token_ids are all in banned_token_ids: no token could be sampled")
        total = len(prompt_ids) + p.max_tokens
        if total > self.config.context_len:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({p.max_tokens}) = {total} exceeds the "
                f"context length {self.config.context_len}"
            )
        needed = self.kv.num_blocks_needed(total)
        if needed > self.num_blocks:
            raise ValueError(f"request needs {needed} KV blocks but the pool has {self.num_blocks}")
        if p.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model directory has none")

    def add_prefill_only(self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        """Prefill side: compute the prompt, sample its first token with ``params`` (seed
        included), and hold the blocks after finishing until ``release(request_id)``."""
        # The first token goes through the same processors as on decode: min_tokens still
        # blocks EOS and stop_token_ids at position 0, penalties see the same prompt.
        first_only = dataclasses.replace(params, n=1, max_tokens=1, min_tokens=min(params.min_tokens, 1), stop=())
        self.add_request(request_id, prompt_token_ids, first_only, stream=False)
        self.scheduler.requests[request_id].hold_blocks = True

    def release(self, request_id: str) -> bool:
        """Free the blocks a prefill-only request held for its transfer (idempotent)."""
        return self.scheduler.release(request_id)

    def block_ids(self, request_id: str) -> list[int]:
        return self.kv.block_ids(request_id)

    def take_remote_prefills(self) -> list[RemotePrefill]:
        """Requests admitted since the last call whose prompt KV a prefill worker must write."""
        out, self._remote_prefills = self._remote_prefills, []
        return out

    def complete_remote_prefill(
        self, request_id: str, first_token_id: int, logprobs: dict[int, float] | None = None,
        prompt_logprobs: list[dict[int, float] | None] | None = None,
    ) -> CompletionDelta | None:
        """The prefill worker wrote the prompt's KV and sampled ``first_token_id``: decode on.
        ``prompt_logprobs`` (``RequestOutput``'s form) are what it computed, if asked.

        A resumed request (``Request.is_resumed``) returns None: its KV covers the prompt and
        the resumed tokens, but the prefill worker drew its token at output position 0 with
        the resumed tokens taken for prompt, so that token is dropped and the last known
        token is computed here; the next one is then sampled at its own position and state.
        """
        waiting = self.scheduler.awaiting_kv.get(request_id)
        if waiting is not None and waiting.is_resumed:
            req = self.scheduler.complete_remote_prefill(request_id)
            # NOTE: this recomputes one slot the transfer wrote (same token, same context).
            req.num_computed_tokens -= 1
            return None
        if waiting is not None and waiting.prompt_logprobs is not None:
            if prompt_logprobs is None or len(prompt_logprobs) != waiting.num_prompt_tokens:
                raise ValueError(f"request {request_id!r} needs {waiting.num_prompt_tokens} prompt logprobs entries, "
                                 f"got {None if prompt_logprobs is None else len(prompt_logprobs)}")
            waiting.prompt_logprobs = list(prompt_logprobs)
        req = self.scheduler.complete_remote_prefill(request_id)
        # NOTE: draws are a function of (seed, output position), so the seeded stream goes on
        # from position 1 exactly as in a single engine, with no state to carry over.
        return self._append(req, first_token_id, logprobs)

    def settle_kv_transfer(self, request_id: str, transfer_id: str) -> bool:
        """The lease ``transfer_id`` of a remote prefill is settled (no write can land in the
        blocks any more): frees the blocks of a request that ended while waiting for its KV
        (True), else lets it free them at once when it ends."""
        return self.scheduler.settle_remote_prefill(request_id, transfer_id)

    def prefill_locally(self, request_id: str) -> None:
        """Compute a remote-prefill request's prompt here after all (its prefill worker
        refused or left). Raises ValueError if it is not waiting for KV."""
        self.scheduler.prefill_locally(request_id)

    def abort_request(self, request_id: str, *, error: str | None = None) -> list[CompletionDelta]:
        """End a request (all its completions) at any point; its blocks are freed now (those
        of a remote prefill still waiting for KV under an unsettled lease once it is settled:
        ``settle_kv_transfer``).

        Returns a final delta for each completion that had not finished, with
        finish_reason "error" when ``error`` is given, else "abort".
        """
        self.scheduler.release(request_id)
        reason = "abort" if error is None else "error"
        status = RequestStatus.FINISHED_ABORTED if error is None else RequestStatus.FINISHED_ERROR
        deltas = []
        for rid in self._groups.pop(request_id, ()):
            self.scheduler.finish_request(rid, status)
            comp = self._completions.pop(rid, None)
            if comp is not None:
                _close_constraint(comp.request)
            if comp is not None and comp.output.finish_reason is None:
                comp.output.finish_reason = reason
                deltas.append(CompletionDelta(rid, comp.output.index, [], "", None, reason, error))
        return deltas

    def request_ids(self) -> list[str]:
        """Ids of every request the engine still tracks (running, waiting, unfetched)."""
        return list(self._groups)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished or bool(self._pending_text)

    def kv_cache_stats(self) -> KVCacheStats:
        return self.kv.stats()

    def stats(self) -> EngineStats:
        s = self.scheduler
        kv = self.kv.stats()
        return EngineStats(
            num_waiting=s.num_waiting,
            num_running=s.num_seqs,
            num_queued_prefill_tokens=s.queued_prefill_tokens(),
            num_kv_blocks_total=kv.num_total_blocks,
            num_kv_blocks_free=kv.num_free_blocks,
            prefix_cache_hit_tokens=s.num_prefix_hit_tokens,
            prefix_cache_query_tokens=s.num_prefix_query_tokens,
            num_open_grammars=self._grammars.num_open if self._grammars is not None else 0,
            tier_hit_tokens=s.num_host_hit_tokens,
            num_host_blocks_total=self.num_host_blocks,
            num_host_blocks_used=len(self.kv.host) if self.kv.host is not None else 0,
            pool_hit_tokens=s.num_pool_hit_tokens,
            pool_puts=self.num_pool_puts,
            pool_put_failures=self.num_pool_put_failures,
            pool_get_failures=self.num_pool_get_failures,
        )

    # -- the loop ------------------------------------------------------------------

    def step(self) -> list[CompletionDelta]:
        """Schedule -> run -> sample -> append. Returns the deltas that are ready: with
        streamed text, the text of the previous step's tokens is processed while this
        step's forward runs (``_forward``), so those deltas come one step later."""
        sched = self.scheduler.schedule()
        self._remote_prefills.extend(sched.remote_prefills)
        copies = self.kv.take_copy_ops()  # tier copies: every rank runs them first
        if sched.is_empty:
            fetching = bool(self.scheduler.pool_fetching)
            if copies or fetching:  # (a step with no copies polls the pool reads)
                self._pool_report(self.executor.execute(StepInputs.copies_only(copies)))
            deltas = self._process_text()
            if (not deltas and self.scheduler.has_unfinished and not self.scheduler.awaiting_kv
                    and not self.scheduler.loading and not fetching):
                raise RuntimeError("scheduler made no progress with requests pending (pool too small?)")
            return deltas
        ordered = order_for_step(sched.scheduled)
        tables = self.kv.tables
        rows = [tables.row(s.request.request_id) for s in ordered]
        inputs = prepare_inputs(ordered, tables.array, rows, self.config.cache.block_size)
        if copies:
            inputs.set_copy_ops(copies)
        output, deltas = self._forward(inputs)
        logits = output.logits
        sampling = [s.request for s in ordered if s.samples]
        sampled = self.sampler(logits, sampling) if sampling else None
        self._last_logits = (logits, sampling)
        if output.prompt_logprobs is not None:
            add_prompt_logprobs(ordered, output.prompt_logprobs)  # before num_computed_tokens moves on
        self.scheduler.update_after_step(sched)
        self._pool_report(output)
        for i, req in enumerate(sampling):
            if req.request_id in self._stopped:
                continue  # a stop string ended it in the previous step's text: drop this token
            token_id = sampled.token_ids[i]
            if token_id < 0:
                deltas.append(self._fail(req, "no token can be sampled: the logits processors masked every token"))
            else:
                self._append_token(req, token_id, sampled.logprobs[i])
        self._finish_stopped()
        if not self.scheduler.running or not self._overlap:
            deltas += self._process_text()  # nothing runs next to hide it behind
        else:
            deltas += self._process_text(only_immediate=True)
        self._finish_stopped()
        return deltas

    def _forward(self, inputs) -> tuple[ModelOutput, list[CompletionDelta]]:
        """Run the step's forward and, meanwhile, the previous step's text (a thread on the
        CPU; on CUDA the launch is asynchronous and the sampler's first read waits)."""
        if not self._overlap or not self._pending_text:
            return self.executor.execute(inputs), []
        if self._forward_thread is None:
            output = self.executor.execute(inputs)
            return output, self._process_text()
        future = self._forward_thread.submit(self.executor.execute, inputs)
        try:
            deltas = self._process_text()
        finally:
            output = future.result()
        return output, deltas

    def _pool_report(self, output: ModelOutput) -> None:
        """Rank 0's KV pool news of the step: reads every rank finished (their requests go
        back to the queue), blocks put (published as tier "pool"), failures."""
        report = output.pool
        if report is None:
            return
        if report.fetched:
            self.scheduler.pool_results(report.fetched)
        self.kv.pool_stored(report.stored)
        self.num_pool_puts += len(report.stored)
        self.num_pool_put_failures += report.num_put_failures
        self.num_pool_get_failures += report.num_get_failures

    def _fail(self, req: Request, error: str) -> CompletionDelta:
        comp = self._completions[req.request_id]
        comp.output.finish_reason = "error"
        self.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_ERROR)
        _close_constraint(req)
        return CompletionDelta(req.request_id, comp.output.index, [], "", None, "error", error)

    def _append(self, req: Request, token_id: int, logprobs: dict[int, float] | None) -> CompletionDelta:
        """Append one token and process its text now (outside the step loop)."""
        self._append_token(req, token_id, logprobs)
        item = self._pending_text.pop()  # its own item only: others keep their place
        (delta,) = self._text_deltas([item], every_token=True)
        self._finish_stopped()
        return delta

    def _append_token(self, req: Request, token_id: int, logprobs: dict[int, float] | None) -> None:
        """The token's part: output ids, EOS / stop ids / length (a finished request's blocks
        are freed now). Its text is queued for ``_process_text``."""
        comp = self._completions[req.request_id]
        p = req.sampling_params
        req.append_token(token_id)
        out = comp.output
        out.token_ids.append(token_id)
        if logprobs is not None:
            out.logprobs.append(logprobs)
        reason = None
        if req.constraint is not None:
            try:
                req.constraint.catch_up(req.output_token_ids)
            except ValueError as e:  # only a peer that sampled without the grammar gets here
                log.warning("request %s: %s", req.request_id, e)
                reason = "error"
        if reason == "error":
            pass
        elif (not p.ignore_eos and token_id in self.eos_token_ids) or token_id in p.stop_token_ids:
            reason, out.stop_reason = "stop", token_id
        elif req.constraint is not None and req.constraint.is_terminated:
            reason, out.stop_reason = "stop", token_id  # the grammar's end token, even with ignore_eos
        elif len(out.token_ids) >= p.max_tokens or req.num_tokens >= self.config.context_len:
            reason = "length"
        if reason is not None:
            status = {"stop": RequestStatus.FINISHED_STOPPED, "length": RequestStatus.FINISHED_LENGTH,
                      "error": RequestStatus.FINISHED_ERROR}[reason]
            self.scheduler.finish_request(req.request_id, status)
            _close_constraint(req)
        self._pending_text.append((comp, token_id, logprobs, reason))

    def _process_text(self, only_immediate: bool = False) -> list[CompletionDelta]:
        """Text, stop strings and the deltas of queued tokens. ``only_immediate``: just the
        completions with no per-token text work (the rest waits for the next forward)."""
        if only_immediate:
            items = [it for it in self._pending_text if not it[0].text.incremental]
            self._pending_text = [it for it in self._pending_text if it[0].text.incremental]
        else:
            items, self._pending_text = self._pending_text, []
        return self._text_deltas(items)

    def _text_deltas(self, items, every_token: bool = False) -> list[CompletionDelta]:
        deltas = []
        for comp, token_id, logprobs, reason in items:
            out = comp.output
            rid = comp.request.request_id
            if out.finish_reason is not None or self._completions.get(rid) is not comp:
                continue  # aborted, or ended by a stop string in an earlier token
            if comp.text.append(token_id, reason is not None):
                if reason is None:
                    self._stopped.add(rid)
                reason, out.stop_reason = "stop", comp.text.stop_string
            if reason is not None:
                out.finish_reason = reason
                out.text = comp.text.final_text(out.token_ids)
            elif not comp.stream and not every_token:
                continue
            deltas.append(CompletionDelta(
                rid, out.index, [token_id], comp.text.take_delta(),
                [logprobs] if logprobs is not None else None, reason,
                prompt_logprobs=comp.take_prompt_logprobs(),
                num_cached_tokens=comp.request.num_cached_tokens if reason is not None else 0,
            ))
        return deltas

    def _finish_stopped(self) -> None:
        for rid in self._stopped:
            self.scheduler.finish_request(rid, RequestStatus.FINISHED_STOPPED)
            comp = self._completions.get(rid)
            if comp is not None:
                _close_constraint(comp.request)
        self._stopped.clear()

    # -- results -------------------------------------------------------------------

    def take_finished(self, request_id: str, prompt_token_ids: list[int]) -> RequestOutput | None:
        """The whole result of a request once all its completions finished (and forget it)."""
        rids = self._groups.get(request_id)
        if rids is None or any(self._completions[r].output.finish_reason is None for r in rids):
            return None
        del self._groups[request_id]
        comps = [self._completions.pop(r) for r in rids]
        return RequestOutput(
            request_id=request_id,
            prompt_token_ids=prompt_token_ids,
            outputs=[c.output for c in comps],
            num_cached_tokens=comps[0].request.num_cached_tokens,
            prompt_logprobs=comps[0].request.prompt_logprobs,
        )

    def shutdown(self) -> None:
        if self._forward_thread is not None:
            self._forward_thread.shutdown()
        self.executor.shutdown()
        if self._disk_meta is not None:
            self._disk_meta.close()


def _close_constraint(req: Request) -> None:
    if req.constraint is not None:
        req.constraint.close()
        req.constraint = None
