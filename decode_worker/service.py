"""The decode server: admits requests, gets their prompt KV written by a prefill
worker (or prefills locally), decodes with continuous batching and streams deltas.

Decode-first flow for a request with ``prefill_worker_id`` (design, "One request"):
1. Generate arrives; the engine admits the request and allocates blocks for the
   prompt beyond what this worker's prefix cache holds (``RemotePrefill``).
2. ``_remote_prefill`` offers a lease on exactly those blocks (``kvtransfer.lease``: a
   random transfer id, the prefill worker asked, a deadline), has its agents expect
   that transfer, and asks the prefill worker to fill them (Prefill RPC with the
   destination block ids and the transfer id); this worker owns the memory before any
   compute starts, so no KV is ever stranded on the prefill side.
3. The prefill worker writes the KV (its write is admitted only under the lease),
   samples the first token and answers with the hop's outcome (and the prompt
   logprobs, if asked: this worker computes none for the request, and sends them on its
   first message of completion 0). HOP_DONE with an accepted completion: the request
   joins the running batch here. Otherwise ``decide_hop`` rules: nothing was admitted
   -> this worker prefills locally; a write was admitted -> the blocks are garbage:
   recomputed here once no byte can land any more, else the request fails with
   finish_reason "error" and its blocks wait for the lease's deadline. Never a hang.
   The final usage reports the prompt tokens the prefill worker's prefix cache served
   (this worker's own hits only when it prefilled locally after all).
4. Abort (client gone or Abort RPC) cancels the in-flight Prefill RPC, which makes
   the prefill worker abort and free its side too; the blocks are freed once the
   lease is settled.

A request that finds the waiting queue full (``--max-waiting-requests``) is refused
with ``RESOURCE_EXHAUSTED`` before any work, so the gateway can route it elsewhere.

A request with ``resume`` continues a completion another decode worker started (the
gateway migrates streams off a failed worker): the engine admits it with the resumed
tokens as output and streams only what follows. Its prefill hop, if any, carries the
prompt and those tokens; the prefill worker's sampled token is dropped (see
``LLMEngine.complete_remote_prefill``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any, Awaitable, Callable, Protocol

import grpc

from pdserve.engine.async_engine import AsyncEngine, QueueFullError
from pdserve.engine.outputs import CompletionDelta
from pdserve.engine.request import KVTransfer, Request, Resume
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import RemotePrefill
from pdserve.kvtransfer.lease import LEASE_MARGIN_S, HopAction, HopOutcome, Lease, LeaseTable, decide_hop
from pdserve.proto import auth, convert
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class PeerDirectory(Protocol):
    async def get(self, worker_id: str) -> pb.WorkerInfo | None:
        """The registered worker, or None if unknown or expired."""


class KVReceiver(Protocol):
    """Decode side of KV transfer (backend-specific; see kvtransfer.worker)."""

    receiver_controls_writes: bool
    """After ``revoke`` returns no byte of that transfer lands (two-sided backends)."""
    on_refusals: Callable[[list[tuple[str, str, str]]], None] | None
    """Set here: called with the (agent, transfer id, reason) of every write refused."""

    async def expect(self, transfer_id: str, source: pb.WorkerInfo, first_block_index: int, block_ids: list[int],
                     timeout_s: float) -> None:
        """Admit ``source``'s write of ``transfer_id`` into ``block_ids``, and nothing else, for
        ``timeout_s``."""

    async def wait(self, transfer_id: str, timeout_s: float) -> None:
        """Return once the transfer landed and was admitted; raise on failure or timeout."""

    async def revoke(self, transfer_id: str) -> bool:
        """Stop admitting the transfer; True if a writer had been admitted (bytes may have landed)."""

    async def collect_refusals(self) -> None:
        """Report the refusals not reported yet to ``on_refusals``."""


class DecodeService(pb_grpc.DecodeServicer):
    def __init__(
        self,
        aengine: AsyncEngine,
        worker_id: str,
        peers: PeerDirectory,
        receiver: KVReceiver,
        prefill_timeout_s: float = 60.0,
        *,
        cluster_secret: bytes | None = None,
    ) -> None:
        self.aengine = aengine
        self.cluster_secret = cluster_secret
        """Signs the calls to prefill workers (``pdserve.proto.auth``); None: unsigned."""
        self.worker_id = worker_id
        self.peers = peers
        self.receiver = receiver
        self.prefill_timeout_s = prefill_timeout_s
        self.leases = LeaseTable()
        """The hops in flight, by transfer id (each with its task)."""
        self._background: set[asyncio.Task] = set()
        self.transfers = pb.StatsResponse()
        """Counters of KV received from prefill workers (bytes, count, failures, latency,
        hop outcomes, refused transfers)."""
        receiver.on_refusals = self._on_refusals
        self._channels: dict[str, grpc.aio.Channel] = {}
        """Prefill worker address -> channel, kept across hops (a new one per hop cost a
        connection setup each time; gRPC reconnects a kept one if its peer restarts)."""
        aengine.on_remote_prefill = self._remote_prefill

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            # A prefill worker restarted on the same address must be reachable within
            # seconds, not after gRPC's default reconnect backoff (up to 120 s); until
            # then hops fail fast with UNAVAILABLE and are prefilled here.
            # No 4 MiB cap on answers: prompt logprobs grow with the prompt (21 entries a
            # token at k = 20, about 20 MB at a 128k context).
            channel = self._channels[address] = auth.aio_insecure_channel(
                address, self.cluster_secret, options=[("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2000),
                                  ("grpc.max_receive_message_length", -1)])
        return channel

    # -- RPCs ------------------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        rid = request.request_id
        try:
            params = SamplingParams(**convert.sampling_kwargs(request.sampling_params))
            resume = _resume(request)
        except (ValueError, TypeError) as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        # The hop's parameters ride on the request that computes the prompt.
        kv = KVTransfer(request.prefill_worker_id, rid) if request.prefill_worker_id else None
        num_tokens = [0] * params.n
        prompt = list(request.prompt_token_ids)
        prompt_len = len(prompt)
        num_open = params.n
        num_cached = 0
        try:
            stream = self.aengine.generate(rid, prompt, params, remote_prefill=kv or False, resume=resume)
            try:
                # One message per completion per read: when this stream lags behind the
                # engine (a slow reader), the steps it missed arrive merged (AsyncEngine).
                async for deltas in stream:
                    for d in deltas:
                        num_tokens[d.index] += len(d.token_ids)
                        num_open -= d.finish_reason is not None
                        if d.finish_reason is not None and d.index == 0:
                            # The prompt once, as the gateway counts it (siblings share it).
                            num_cached = d.num_cached_tokens
                        msg = _delta_message(rid, d, prompt)
                        if num_open == 0:
                            if kv is not None and kv.num_remote_cached_tokens is not None:
                                num_cached = kv.num_remote_cached_tokens
                            msg.usage.CopyFrom(pb.Usage(prompt_tokens=prompt_len, completion_tokens=sum(num_tokens),
                                                        cached_tokens=num_cached))
                        yield msg
            except ValueError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            except QueueFullError as e:  # refused before any work: the gateway routes it elsewhere
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"worker {self.worker_id} is full: {e}")
        finally:
            lease = self.leases.get(kv.transfer_id) if kv is not None else None
            if lease is not None and lease.task is not None and not lease.task.done():
                lease.task.cancel()

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        rid = request.request_id
        found = rid in await self.aengine.call(self.aengine.engine.request_ids)
        for lease in self.leases.live():
            if lease.group_id == rid and lease.task is not None:
                lease.task.cancel()
        self.aengine.abort(rid)
        return pb.AbortResponse(found=found)

    async def Stats(self, request, context) -> pb.StatsResponse:
        try:
            await self.receiver.collect_refusals()
        except Exception:  # noqa: BLE001 - counters stay as they were; Stats must answer
            log.warning("collecting refused KV transfers failed", exc_info=True)
        msg = await self.aengine.call(lambda: stats_message(self.aengine.engine, self.worker_id))
        msg.MergeFrom(self.transfers)
        return msg

    # -- the prefill hop -----------------------------------------------------------------

    async def _remote_prefill(self, rp: RemotePrefill) -> None:
        """One hop under one lease (module docstring, steps 2-4)."""
        req, kv, cid = rp.request, rp.request.kv_transfer, rp.request.request_id
        if kv is None:  # admitted as remote with nobody to ask
            self.aengine.prefill_locally(cid)
            return
        lease = self.leases.offer(kv.source_worker_id, cid, kv.group_id, rp.first_block_index, rp.block_ids,
                                  self.prefill_timeout_s + LEASE_MARGIN_S)
        kv.transfer_id, kv.deadline = lease.transfer_id, lease.deadline
        lease.task = asyncio.current_task()
        outcome, why, resp, expected, landed = HopOutcome.NEVER_STARTED, "", None, False, False
        if req.status.is_finished:  # aborted before its hop began
            await self._finish_hop(rp, lease, HopOutcome.ABORTED, "aborted", None, False, False, cancelled=True)
            return
        try:
            info = await self.peers.get(kv.source_worker_id)
            if info is None:
                why = f"prefill worker {kv.source_worker_id!r} is not registered"
            else:
                expected = True  # from here on, revoke what the agents may have admitted
                await self.receiver.expect(lease.transfer_id, info, rp.first_block_index, rp.block_ids,
                                           self.leases.remaining_s(lease))
                resp = await pb_grpc.PrefillStub(self._channel(info.address)).Prefill(
                    self._prefill_request(rp, lease), timeout=self.prefill_timeout_s)
                # An outcome this worker does not know is as ambiguous as no answer.
                known = resp.outcome in {o.value for o in HopOutcome}
                outcome = HopOutcome(resp.outcome) if known else HopOutcome.TRANSFER_FAILED
                why = resp.error
                if outcome is HopOutcome.DONE:
                    await self.receiver.wait(lease.transfer_id, self.leases.remaining_s(lease))
                    landed = True
                    dest = resp.destination
                    why = self.leases.complete(lease.transfer_id, dest.first_block_index, list(dest.block_ids))
                    if why:
                        self.transfers.refused_transfers += 1
                        outcome = HopOutcome.TRANSFER_FAILED
        except asyncio.CancelledError:  # aborted here: the request is ending already
            self._spawn(self._end_hop(rp, lease, HopOutcome.ABORTED, "cancelled", None, expected, landed,
                                      cancelled=True))
            raise
        except grpc.aio.AioRpcError as e:  # no answer: ambiguous, so whatever may have been written
            outcome, why = HopOutcome.TRANSFER_FAILED, f"{e.code().name}: {e.details()}"
        except Exception as e:  # noqa: BLE001 - any failure of the hop ends this request's hop only
            outcome, why = HopOutcome.TRANSFER_FAILED, f"{type(e).__name__}: {e}"
            landed = landed or getattr(e, "is_started", False)  # TransferFailed knows
        await self._finish_hop(rp, lease, outcome, why, resp, expected, landed)

    async def _finish_hop(self, *args: Any, **kwargs: Any) -> None:
        """``_end_hop`` in a task of its own: cancelling the hop (its Generate ending) must
        not cut the lease's settlement short, or the blocks would never be freed."""
        await asyncio.shield(self._spawn(self._end_hop(*args, **kwargs)))

    def _prefill_request(self, rp: RemotePrefill, lease: Lease) -> pb.PrefillRequest:
        return pb.PrefillRequest(
            request_id=rp.request.request_id,
            prompt_token_ids=rp.request.all_token_ids,  # a resumed request's output too
            sampling_params=convert.sampling_message(_hop_params(rp.request)),
            destination=pb.KVDestination(
                worker_id=self.worker_id, transfer_id=lease.transfer_id,
                first_block_index=rp.first_block_index, block_ids=rp.block_ids,
            ),
            timeout_ms=int(self.prefill_timeout_s * 1000),
        )

    async def _end_hop(self, rp: RemotePrefill, lease: Lease, outcome: HopOutcome, why: str,
                       resp: pb.PrefillResponse | None, expected: bool, landed: bool, cancelled: bool = False) -> None:
        """Act on how the hop ended (``decide_hop``), count it, and settle the lease.
        ``expected``: the agents were told to expect the transfer; ``landed``: they received
        it, or said while failing that a writer had been admitted."""
        cid, group = rp.request.request_id, lease.group_id
        is_started = outcome is HopOutcome.DONE or landed
        if outcome is not HopOutcome.DONE:
            self.leases.revoke(lease.transfer_id)
            if expected:
                try:
                    is_started = await self.receiver.revoke(lease.transfer_id) or landed
                except Exception:  # noqa: BLE001 - unknown: assume a writer was admitted
                    log.warning("revoking KV transfer %s failed", lease.transfer_id, exc_info=True)
                    is_started = True
        decision = decide_hop(outcome, is_started, self.receiver.receiver_controls_writes)
        counters = self.transfers.hop_outcomes
        field = decision.outcome.name.lower()
        setattr(counters, field, getattr(counters, field) + 1)
        if decision.outcome is HopOutcome.TRANSFER_FAILED:
            self.transfers.transfer_failures += 1
        if decision.action is HopAction.COMPLETE:
            self._complete(rp, resp)
        elif cancelled:
            pass  # the request is being aborted: nothing to recompute, nobody to tell
        elif decision.action is HopAction.PREFILL_LOCALLY:
            log.info("remote prefill of %s: %s (%s); prefilling locally", cid, decision.outcome.name, why)
            self.transfers.local_prefill_fallbacks += 1
            self.aengine.prefill_locally(cid)
        else:
            log.warning("remote prefill of %s: %s (%s)", cid, decision.outcome.name, why)
            self.aengine.abort(group, error=f"remote prefill failed: {decision.outcome.name}: {why}")
        # NOTE: after the engine command above, so a request it ends is quarantined first.
        self._settle(lease, self.leases.remaining_s(lease) if decision.hold_until_deadline else 0.0)

    def _complete(self, rp: RemotePrefill, resp: pb.PrefillResponse) -> None:
        cid, group = rp.request.request_id, rp.request.kv_transfer.group_id
        self.transfers.transfer_bytes += resp.transfer.bytes
        self.transfers.transfer_count += 1
        self.transfers.transfer_latency_ms_sum += resp.transfer.latency_ms
        lp = convert.logprobs_dict(resp.first_logprobs) if resp.HasField("first_logprobs") else None
        prompt_logprobs = None
        if rp.request.sampling_params.prompt_logprobs is not None:
            num_positions = len(rp.request.prompt_token_ids) - 1
            if len(resp.prompt_logprobs) != num_positions:
                self.aengine.abort(group, error=f"remote prefill failed: prefill worker sent "
                                                f"{len(resp.prompt_logprobs)} prompt logprobs for {num_positions} positions")
                return
            prompt_logprobs = [None, *(convert.logprobs_dict(m) for m in resp.prompt_logprobs)]
        rp.request.kv_transfer.num_remote_cached_tokens = resp.num_cached_tokens
        self.aengine.complete_remote_prefill(cid, resp.first_token_id, lp, prompt_logprobs)

    def _settle(self, lease: Lease, delay_s: float) -> None:
        """No write can land in the lease's blocks after ``delay_s``: the engine may free
        them then if their request ended (``LLMEngine.settle_kv_transfer``)."""
        cid, tid = lease.request_id, lease.transfer_id

        def settle() -> None:
            self._spawn(self.aengine.call(lambda: self.aengine.engine.settle_kv_transfer(cid, tid)))

        if delay_s > 0:
            asyncio.get_running_loop().call_later(delay_s, settle)
        else:
            settle()

    def _on_refusals(self, refusals: list[tuple[str, str, str]]) -> None:
        self.transfers.refused_transfers += len(refusals)
        for agent, tid, reason in refusals:
            log.warning("refused a KV transfer from %s (transfer %s): %s", agent, tid, reason)

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Future:
        task = asyncio.ensure_future(coro)
        self._background.add(task)  # a task nobody references may be collected mid-flight
        task.add_done_callback(self._background.discard)
        return task


def _resume(request: pb.GenerateRequest) -> Resume | None:
    if not request.HasField("resume"):
        return None
    r = request.resume
    return Resume(tuple(r.token_ids), r.index, r.text_len)


def _hop_params(request: Request) -> SamplingParams:
    """What the prefill worker samples its first token with. A resumed request drops that
    token, so it asks for no grammar (nothing to compile) and no logprobs."""
    p = request.sampling_params
    return dataclasses.replace(p, structured_output=None, logprobs=None) if request.is_resumed else p


def _delta_message(request_id: str, d: CompletionDelta, prompt: list[int]) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(
        request_id=request_id, index=d.index, token_ids=d.token_ids, text=d.text,
        finish_reason=convert.finish_reason_enum(d.finish_reason),
    )
    if d.logprobs:
        for tok, lp in zip(d.token_ids, d.logprobs):
            msg.logprobs.append(convert.logprobs_message(lp, tok))
    if d.prompt_logprobs is not None:
        # Positions 1.. only (the gateway adds position 0's null), the prompt token first.
        msg.prompt_logprobs.extend(convert.logprobs_message(lp, prompt[i]) for i, lp in enumerate(d.prompt_logprobs) if i)
    if d.error:
        msg.error.CopyFrom(pb.Error(code="internal", message=d.error))
    return msg


def stats_message(engine, worker_id: str) -> pb.StatsResponse:
    """Called on the engine thread."""
    return pb.StatsResponse(worker_id=worker_id, **dataclasses.asdict(engine.stats()))
