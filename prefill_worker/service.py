"""The prefill server: computes prompts (batched and chunked with others, behind its
own prefix cache), samples each prompt's first token, writes the KV blocks the
decode worker lacks into that worker's destination blocks, and answers (with the
prompt logprobs when they were asked: the engine computes every prompt position
for such a request, skipping its prefix cache).

Blocks stay allocated from the end of the prompt until the transfer finished or
failed, then go back to the pool (their full blocks remain in the prefix cache).
A cancelled Prefill RPC (the decode worker aborted or went away) aborts the
request and frees everything it held.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Protocol

import grpc

from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.proto import convert
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class PeerDirectory(Protocol):
    async def get(self, worker_id: str) -> pb.WorkerInfo | None: ...


class KVSender(Protocol):
    """Prefill side of KV transfer (backend-specific; see kvtransfer)."""

    async def send(
        self, transfer_id: str, src_block_ids: list[int], destination: pb.KVDestination, peer: pb.WorkerInfo,
        timeout_s: float,
    ) -> pb.TransferStats:
        """Write the blocks into the peer's destination blocks; raise on failure or timeout."""


class PrefillService(pb_grpc.PrefillServicer):
    def __init__(self, aengine: AsyncEngine, worker_id: str, peers: PeerDirectory, sender: KVSender,
                 default_timeout_s: float = 60.0) -> None:
        self.aengine = aengine
        self.worker_id = worker_id
        self.peers = peers
        self.sender = sender
        self.default_timeout_s = default_timeout_s
        self.transfers = pb.StatsResponse()
        """Counters of KV sent to decode workers (bytes, count, failures, latency)."""

    async def Prefill(self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext) -> pb.PrefillResponse:
        rid = request.request_id
        dest = request.destination
        timeout_s = request.timeout_ms / 1000 if request.timeout_ms else self.default_timeout_s
        try:
            params = SamplingParams(**convert.sampling_kwargs(request.sampling_params))
        except (ValueError, TypeError) as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        peer = await self.peers.get(dest.worker_id)
        if peer is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"decode worker {dest.worker_id!r} is not registered")
        try:
            delta, block_ids = await self.aengine.prefill_only(rid, list(request.prompt_token_ids), params)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        try:
            src = block_ids[dest.first_block_index :]
            if len(src) != len(dest.block_ids):
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"destination has {len(dest.block_ids)} blocks from block {dest.first_block_index}, "
                    f"the prompt has {len(src)}",
                )
            try:
                stats = await self.sender.send(dest.transfer_id, src, dest, peer, timeout_s)
            except TimeoutError as e:
                self.transfers.transfer_failures += 1
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"KV transfer timed out: {e}")
            except (OSError, RuntimeError) as e:
                self.transfers.transfer_failures += 1
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"KV transfer failed: {e}")
            self.transfers.transfer_bytes += stats.bytes
            self.transfers.transfer_count += 1
            self.transfers.transfer_latency_ms_sum += stats.latency_ms
        finally:
            self.aengine.release(rid)
        token = delta.token_ids[0]
        resp = pb.PrefillResponse(request_id=rid, first_token_id=token, transfer=stats,
                                  num_cached_tokens=delta.num_cached_tokens)
        if delta.logprobs:
            resp.first_logprobs.CopyFrom(convert.logprobs_message(delta.logprobs[0], token))
        if delta.prompt_logprobs is not None:
            # Positions 1.. only (position 0 has none), the prompt token first in each.
            prompt = request.prompt_token_ids
            resp.prompt_logprobs.extend(
                convert.logprobs_message(lp, prompt[i]) for i, lp in enumerate(delta.prompt_logprobs) if i)
        return resp

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        self.aengine.abort(request.request_id)
        return pb.AbortResponse(found=True)

    async def Stats(self, request, context) -> pb.StatsResponse:
        engine = self.aengine.engine
        msg = await self.aengine.call(
            lambda: pb.StatsResponse(worker_id=self.worker_id, **dataclasses.asdict(engine.stats()))
        )
        msg.MergeFrom(self.transfers)
        return msg
