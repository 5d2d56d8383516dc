"""The prefill server: computes prompts (batched and chunked with others, behind its
own prefix cache), samples each prompt's first token, writes the KV blocks the
decode worker lacks into that worker's destination blocks, and answers (with the
prompt logprobs when they were asked: the engine computes every prompt position
for such a request, skipping its prefix cache).

Every answer carries the hop's outcome (``pb.HopOutcome``; gRPC statuses are left to
the transport): HOP_DONE once the decode worker's agents admitted and received the
whole write; HOP_NEVER_STARTED when nothing was written into the destination (bad
request, unknown decode worker, or the decode worker refused the transfer: no live
lease with that id and those blocks); HOP_TRANSFER_FAILED when a write was started
and failed or timed out (the destination blocks may be half-written); HOP_ABORTED
when the request was aborted here. The write must end by the request's deadline
(``timeout_ms`` from its arrival), which comes before the decode worker's lease
expires (``kvtransfer.lease``).

Blocks stay allocated from the end of the prompt until the transfer finished or
failed, then go back to the pool (their full blocks remain in the prefix cache).
A cancelled Prefill RPC (the decode worker aborted or went away) aborts the
request, cancels its write and frees everything it held.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Protocol

import grpc

from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.proto import convert
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_OUTCOME_FIELDS = {pb.HOP_DONE: "done", pb.HOP_NEVER_STARTED: "never_started",
                   pb.HOP_TRANSFER_FAILED: "transfer_failed", pb.HOP_ABORTED: "aborted"}


class PeerDirectory(Protocol):
    async def get(self, worker_id: str) -> pb.WorkerInfo | None: ...


class KVSender(Protocol):
    """Prefill side of KV transfer (backend-specific; see kvtransfer)."""

    async def send(
        self, transfer_id: str, src_block_ids: list[int], destination: pb.KVDestination, peer: pb.WorkerInfo,
        timeout_s: float,
    ) -> pb.TransferStats:
        """Write the blocks into the peer's destination blocks within ``timeout_s``. Raises
        ``kvtransfer.worker.TransferFailed`` (its ``is_started`` False when the receiver
        refused before any byte moved) or ``TimeoutError``."""


class PrefillService(pb_grpc.PrefillServicer):
    def __init__(self, aengine: AsyncEngine, worker_id: str, peers: PeerDirectory, sender: KVSender,
                 default_timeout_s: float = 60.0) -> None:
        self.aengine = aengine
        self.worker_id = worker_id
        self.peers = peers
        self.sender = sender
        self.default_timeout_s = default_timeout_s
        self.transfers = pb.StatsResponse()
        """Counters of KV sent to decode workers (bytes, count, failures, latency, outcomes)."""

    async def Prefill(self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext) -> pb.PrefillResponse:
        rid = request.request_id
        dest = request.destination
        timeout_s = request.timeout_ms / 1000 if request.timeout_ms else self.default_timeout_s
        deadline = time.monotonic() + timeout_s  # the write must end by then (the lease outlives it)
        resp = pb.PrefillResponse(request_id=rid)
        try:
            params = SamplingParams(**convert.sampling_kwargs(request.sampling_params))
        except (ValueError, TypeError) as e:
            return self._answer(resp, pb.HOP_NEVER_STARTED, f"invalid sampling parameters: {e}")
        peer = await self.peers.get(dest.worker_id)
        if peer is None:
            return self._answer(resp, pb.HOP_NEVER_STARTED, f"decode worker {dest.worker_id!r} is not registered")
        try:
            delta, block_ids = await self.aengine.prefill_only(rid, list(request.prompt_token_ids), params)
        except ValueError as e:
            return self._answer(resp, pb.HOP_NEVER_STARTED, f"invalid request: {e}")
        except RuntimeError as e:  # aborted here (Abort RPC) or failed by the engine
            return self._answer(resp, pb.HOP_ABORTED, str(e))
        try:
            src = block_ids[dest.first_block_index :]
            if len(src) != len(dest.block_ids):
                return self._answer(resp, pb.HOP_NEVER_STARTED,
                                    f"destination has {len(dest.block_ids)} blocks from block {dest.first_block_index}, "
                                    f"the prompt has {len(src)}")
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:  # the decode worker gave up on this hop already
                return self._answer(resp, pb.HOP_NEVER_STARTED, f"no time left to write (timeout {timeout_s:.3g}s)")
            try:
                stats = await self.sender.send(dest.transfer_id, src, dest, peer, remaining_s)
            except TimeoutError as e:
                self.transfers.transfer_failures += 1
                return self._answer(resp, pb.HOP_TRANSFER_FAILED, f"KV transfer timed out: {e}")
            except (OSError, RuntimeError) as e:  # TransferFailed among them
                if not getattr(e, "is_started", True):  # refused, or unreachable: nothing written
                    return self._answer(resp, pb.HOP_NEVER_STARTED, f"KV transfer not started: {e}")
                self.transfers.transfer_failures += 1
                return self._answer(resp, pb.HOP_TRANSFER_FAILED, f"KV transfer failed: {e}")
            self.transfers.transfer_bytes += stats.bytes
            self.transfers.transfer_count += 1
            self.transfers.transfer_latency_ms_sum += stats.latency_ms
        finally:
            self.aengine.release(rid)
        token = delta.token_ids[0]
        resp.first_token_id = token
        resp.transfer.CopyFrom(stats)
        resp.num_cached_tokens = delta.num_cached_tokens
        resp.destination.CopyFrom(dest)
        if delta.logprobs:
            resp.first_logprobs.CopyFrom(convert.logprobs_message(delta.logprobs[0], token))
        if delta.prompt_logprobs is not None:
            # Positions 1.. only (position 0 has none), the prompt token first in each.
            prompt = request.prompt_token_ids
            resp.prompt_logprobs.extend(
                convert.logprobs_message(lp, prompt[i]) for i, lp in enumerate(delta.prompt_logprobs) if i)
        return self._answer(resp, pb.HOP_DONE)

    def _answer(self, resp: pb.PrefillResponse, outcome: int, error: str = "") -> pb.PrefillResponse:
        resp.outcome = outcome
        resp.error = error
        counters = self.transfers.hop_outcomes
        setattr(counters, _OUTCOME_FIELDS[outcome], getattr(counters, _OUTCOME_FIELDS[outcome]) + 1)
        if error:
            log.info("prefill of %s: %s (%s)", resp.request_id, pb.HopOutcome.Name(outcome), error)
        return resp

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        rid = request.request_id
        # NOTE: a request whose prompt is computed is being written: its Prefill call
        # releases the blocks once the write ended. Releasing them now could hand them to
        # another request while their bytes are read (then sent to the decode worker as DONE).
        if not await self.aengine.call(lambda: rid in self.aengine.engine.scheduler.held):
            self.aengine.abort(rid)
        return pb.AbortResponse(found=True)

    async def Stats(self, request, context) -> pb.StatsResponse:
        engine = self.aengine.engine
        msg = await self.aengine.call(
            lambda: pb.StatsResponse(worker_id=self.worker_id, **dataclasses.asdict(engine.stats()))
        )
        msg.MergeFrom(self.transfers)
        return msg
