"""The decode server: admits requests, gets their prompt KV written by a prefill
worker (or prefills locally), decodes with continuous batching and streams deltas.

Decode-first flow for a request with ``prefill_worker_id`` (design, "One request"):
1. Generate arrives; the engine admits the request and allocates blocks for the
   prompt beyond what this worker's prefix cache holds (``RemotePrefill``).
2. ``_remote_prefill`` asks the prefill worker to fill exactly those blocks
   (Prefill RPC with the destination block ids); this worker owns the memory before
   any compute starts, so no KV is ever stranded on the prefill side.
3. The prefill worker writes the KV, samples the first token and answers (with the
   prompt logprobs, if asked: this worker computes none for the request, and sends
   them on its first message of completion 0); the request joins the running batch here. Failure or timeout of that hop fails the
   request explicitly (finish_reason "error"), never a hang. The final usage reports the
   prompt tokens the prefill worker's prefix cache served (this worker's own hits only
   when it prefilled locally after all).
4. Abort (client gone or Abort RPC) cancels the in-flight Prefill RPC, which makes
   the prefill worker abort and free its side too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from typing import Protocol

import grpc

from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.outputs import CompletionDelta
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import RemotePrefill
from pdserve.proto import convert
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class PeerDirectory(Protocol):
    async def get(self, worker_id: str) -> pb.WorkerInfo | None:
        """The registered worker, or None if unknown or expired."""


class KVReceiver(Protocol):
    """Decode side of KV transfer (backend-specific; see kvtransfer)."""

    async def expect(self, transfer_id: str, source: pb.WorkerInfo, first_block_index: int, block_ids: list[int]) -> None:
        """Get ready for a write into ``block_ids`` (two-sided backends post receives)."""

    async def wait(self, transfer_id: str, timeout_s: float) -> None:
        """Return once the transfer landed; raise on failure or timeout."""

    def cancel(self, transfer_id: str) -> None:
        """Stop expecting the transfer (idempotent)."""


class DecodeService(pb_grpc.DecodeServicer):
    def __init__(
        self,
        aengine: AsyncEngine,
        worker_id: str,
        peers: PeerDirectory,
        receiver: KVReceiver,
        prefill_timeout_s: float = 60.0,
    ) -> None:
        self.aengine = aengine
        self.worker_id = worker_id
        self.peers = peers
        self.receiver = receiver
        self.prefill_timeout_s = prefill_timeout_s
        self._prefill_target: dict[str, str] = {}
        """Completion id that runs the prompt -> prefill worker id."""
        self._group_of: dict[str, str] = {}
        self._prefill_tasks: dict[str, asyncio.Task] = {}
        self._prefill_cached: dict[str, int] = {}
        """Completion id whose prompt a prefill worker computed -> the prompt tokens its
        prefix cache served (what the client saved; this worker's own hits saved nothing)."""
        self.transfers = pb.StatsResponse()
        """Counters of KV received from prefill workers (bytes, count, failures, latency)."""
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
            channel = self._channels[address] = grpc.aio.insecure_channel(
                address, options=[("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2000),
                                  ("grpc.max_receive_message_length", -1)])
        return channel

    # -- RPCs ------------------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        rid = request.request_id
        try:
            params = SamplingParams(**convert.sampling_kwargs(request.sampling_params))
        except (ValueError, TypeError) as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        remote = bool(request.prefill_worker_id)
        parent = rid if params.n == 1 else f"{rid}#0"
        if remote:
            self._prefill_target[parent] = request.prefill_worker_id
            self._group_of[parent] = rid
        num_tokens = [0] * params.n
        prompt = list(request.prompt_token_ids)
        prompt_len = len(prompt)
        num_open = params.n
        num_cached = 0
        try:
            stream = self.aengine.generate(rid, prompt, params, remote_prefill=remote)
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
                            num_cached = self._prefill_cached.pop(parent, num_cached)
                            msg.usage.CopyFrom(pb.Usage(prompt_tokens=prompt_len, completion_tokens=sum(num_tokens),
                                                        cached_tokens=num_cached))
                        yield msg
            except ValueError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        finally:
            self._prefill_target.pop(parent, None)
            self._group_of.pop(parent, None)
            self._prefill_cached.pop(parent, None)
            task = self._prefill_tasks.pop(parent, None)
            if task is not None and not task.done():
                task.cancel()

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        rid = request.request_id
        found = rid in await self.aengine.call(self.aengine.engine.request_ids)
        for parent, group in list(self._group_of.items()):
            if group == rid and parent in self._prefill_tasks:
                self._prefill_tasks[parent].cancel()
        self.aengine.abort(rid)
        return pb.AbortResponse(found=found)

    async def Stats(self, request, context) -> pb.StatsResponse:
        msg = await self.aengine.call(lambda: stats_message(self.aengine.engine, self.worker_id))
        msg.MergeFrom(self.transfers)
        return msg

    # -- the prefill hop -----------------------------------------------------------------

    async def _remote_prefill(self, rp: RemotePrefill) -> None:
        cid = rp.request.request_id
        task = asyncio.current_task()
        self._prefill_tasks[cid] = task
        group = self._group_of.get(cid, cid)
        transfer_id = f"{self.worker_id}:{cid}:{uuid.uuid4().hex[:8]}"
        try:
            target = self._prefill_target.get(cid)
            info = await self.peers.get(target) if target else None
            if info is None:
                raise _HopError(f"prefill worker {target!r} is not registered")
            await self.receiver.expect(transfer_id, info, rp.first_block_index, rp.block_ids)
            req = pb.PrefillRequest(
                request_id=cid,
                prompt_token_ids=rp.request.prompt_token_ids,
                sampling_params=convert.sampling_message(rp.request.sampling_params),
                destination=pb.KVDestination(
                    worker_id=self.worker_id, transfer_id=transfer_id,
                    first_block_index=rp.first_block_index, block_ids=rp.block_ids,
                ),
                timeout_ms=int(self.prefill_timeout_s * 1000),
            )
            resp = await pb_grpc.PrefillStub(self._channel(info.address)).Prefill(req, timeout=self.prefill_timeout_s)
            await self.receiver.wait(transfer_id, self.prefill_timeout_s)
        except asyncio.CancelledError:
            self.receiver.cancel(transfer_id)
            raise
        except _HopError as e:
            self._prefill_here(cid, transfer_id, str(e))
            return
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                self._prefill_here(cid, transfer_id, f"{e.code().name}: {e.details()}")
            else:
                self._fail_hop(group, transfer_id, f"{e.code().name}: {e.details()}")
            return
        except Exception as e:  # noqa: BLE001 - any failure of the hop fails this request only
            self._fail_hop(group, transfer_id, str(e))
            return
        finally:
            self._prefill_tasks.pop(cid, None)
        self.transfers.transfer_bytes += resp.transfer.bytes
        self.transfers.transfer_count += 1
        self.transfers.transfer_latency_ms_sum += resp.transfer.latency_ms
        lp = convert.logprobs_dict(resp.first_logprobs) if resp.HasField("first_logprobs") else None
        prompt_logprobs = None
        if rp.request.sampling_params.prompt_logprobs is not None:
            num_positions = len(rp.request.prompt_token_ids) - 1
            if len(resp.prompt_logprobs) != num_positions:
                self._fail_hop(group, transfer_id, f"prefill worker sent {len(resp.prompt_logprobs)} prompt logprobs "
                                                   f"for {num_positions} positions")
                return
            prompt_logprobs = [None, *(convert.logprobs_dict(m) for m in resp.prompt_logprobs)]
        if cid in self._group_of:  # its Generate is still open (always, unless cancelled)
            self._prefill_cached[cid] = resp.num_cached_tokens
        self.aengine.complete_remote_prefill(cid, resp.first_token_id, lp, prompt_logprobs)


    def _prefill_here(self, cid: str, transfer_id: str, why: str) -> None:
        """The prefill worker never took the hop (draining, gone, unreachable): compute
        the prompt on this worker instead of failing the request.

        NOTE: UNAVAILABLE is also what a prefill worker that died mid-transfer yields;
        it writes nothing more once dead, and the request keeps its blocks (see
        ``Scheduler.prefill_locally``), so recomputing over a partial write is safe.
        """
        log.info("remote prefill of %s not taken (%s); prefilling locally", cid, why)
        self.receiver.cancel(transfer_id)
        self.transfers.local_prefill_fallbacks += 1
        self.aengine.prefill_locally(cid)

    def _fail_hop(self, group: str, transfer_id: str, why: str) -> None:
        self.receiver.cancel(transfer_id)
        self.transfers.transfer_failures += 1
        self.aengine.abort(group, error=f"remote prefill failed: {why}")


class _HopError(Exception):
    pass


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
