"""Transfer leases and hop outcomes between real workers, on both KV transfer backends.

A decode worker admits KV writes only under a lease it offered (transfer id, blocks,
deadline; kvtransfer/lease.py). Checked here, each test ending with every block free on
every worker:

* a forged Prefill call (a made-up transfer id, naming every block of the decode worker)
  is refused by the decode side and counted, and a request decoding meanwhile is
  token-for-token the single engine's;
* a prefill worker dying once its write was admitted: the decode worker recomputes the
  prompt (torch_dist: nothing more can land once revoked) or fails the request cleanly
  and holds the blocks until the lease's deadline (NIXL: a posted WRITE may still land);
* a write arriving after the hop gave up and the lease expired is refused and counted,
  while the request itself was prefilled locally.

The decode worker's hop timeout is 1 s (lease: 1 s + 5 s), so waiting out a lease stays short.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import hf_reference as H
from pdserve.deploy.processes import WorkerProcess, wait_all_free
from pdserve.deploy.store.embedded import ControlPlaneServer
from pdserve.engine import LLM, SamplingParams
from pdserve.kvtransfer.lease import LEASE_MARGIN_S
from pdserve.proto import convert
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

NUM_BLOCKS = 64
HOP_TIMEOUT_S = 1.0
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def Worker(role, model_dir, store_url, worker_id, backend):
    return WorkerProcess(role, ["--model", str(model_dir), "--store", store_url, "--worker-id", worker_id,
                                "--num-kv-blocks", str(NUM_BLOCKS), "--transfer-backend", backend,
                                "--heartbeat-ttl", "5", "--prefill-timeout", str(HOP_TIMEOUT_S),
                                "--log-level", "WARNING"])


class RoguePrefill:
    """``rogue_prefill.py`` in a process of its own, to be registered as a prefill worker."""

    def __init__(self, store_url: str, worker_id: str, backend: str, layout: dict) -> None:
        self.worker_id = worker_id
        self.cfg = dict(backend=backend, name=f"{worker_id}.r0", store=store_url, layout=layout,
                        late_s=HOP_TIMEOUT_S + LEASE_MARGIN_S + 0.5)
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("rogue_prefill.py")),
                                      json.dumps(self.cfg)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()

    def register(self, store, like: pb.WorkerInfo) -> None:
        """Registered as ``like`` (the same model and KV layout) with its own address and agent."""
        ready = self.wait_for("READY", 60).split()
        info = pb.WorkerInfo()
        info.CopyFrom(like)
        info.worker_id, info.address, info.started_at_ms = self.worker_id, ready[1], int(time.time() * 1000)
        del info.transfer.ranks[:]
        info.transfer.ranks.add(tp_rank=0, agent_name=self.cfg["name"], metadata=bytes.fromhex(ready[2]),
                                num_blocks=NUM_BLOCKS)
        store.register(info, 600)

    def wait_for(self, prefix: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = next((ln for ln in list(self.lines) if ln.startswith(prefix)), None)
            if line is not None:
                return line
            if self.proc.poll() is not None and prefix == "READY":
                break
            time.sleep(0.02)
        raise AssertionError(f"the rogue prefill worker printed no {prefix!r}: {self.lines}")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture(scope="module", params=["nixl", "torch_dist"])
def cluster(request, hf_model_dir):
    """p0, d0 and a rogue prefill worker "p-rogue" (``rogue_prefill.py``), started together."""
    from pdserve.kvtransfer.base import unpack_metadata

    backend = request.param
    model_dir = hf_model_dir("llama")
    server = ControlPlaneServer()
    server.start()
    p, d = Worker("prefill", model_dir, server.url, "p0", backend), Worker("decode", model_dir, server.url, "d0", backend)
    rogue = None
    try:
        p.wait_ready()
        like = server.store.get_worker("p0")
        layout = unpack_metadata(like.transfer.ranks[0].metadata)[0]["layout"]
        rogue = RoguePrefill(server.url, "p-rogue", backend, layout)
        d.wait_ready()
        rogue.register(server.store, like)
        yield server, p, d, rogue, backend
    finally:
        if rogue is not None:
            rogue.kill()
        for w in (d, p):
            w.stop()
        server.stop()


@pytest.fixture(scope="module")
def reference(hf_model_dir):
    """Greedy tokens of a single engine, by (prompt, max_tokens)."""
    llm = LLM(hf_model_dir("llama"), num_kv_blocks=NUM_BLOCKS)
    cache: dict[tuple, list[int]] = {}

    def tokens(prompt: list[int], params: SamplingParams = GREEDY) -> list[int]:
        key = (tuple(prompt), params.max_tokens)
        if key not in cache:
            cache[key] = llm.generate([prompt], params)[0].token_ids
        return cache[key]

    yield tokens
    llm.shutdown()


def test_forged_prefill_is_refused_and_changes_no_other_request(cluster, reference):
    """Anyone reaching a prefill worker asks it to write into every block of d0 under
    made-up transfer ids, while d0 decodes a greedy request whose KV sits in some of them."""
    _, p, d, _, _ = cluster
    prompt = H.random_prompts(1000, [40], seed=21)[0]
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    want = reference(prompt, params)
    before = d.stats()
    req = pb.GenerateRequest(request_id="victim", prompt_token_ids=prompt, prefill_worker_id="p0",
                             sampling_params=convert.sampling_message(params))
    stream = pb_grpc.DecodeStub(d.channel).Generate(req, timeout=60)
    tokens = list(next(stream).token_ids)  # it decodes now: its KV is in d0's blocks

    def forge(first: int) -> pb.PrefillResponse:  # 8 forgeries of 8 blocks: the whole pool
        dest = pb.KVDestination(worker_id="d0", transfer_id=secrets.token_hex(16), first_block_index=0,
                                block_ids=range(first, first + 8))
        return pb_grpc.PrefillStub(p.channel).Prefill(pb.PrefillRequest(
            request_id=f"forged-{first}", prompt_token_ids=H.random_prompts(1000, [8 * 16], seed=first)[0],
            sampling_params=convert.sampling_message(GREEDY), destination=dest, timeout_ms=5000), timeout=10)

    with ThreadPoolExecutor(8) as pool:
        forged = list(pool.map(forge, range(0, NUM_BLOCKS, 8)))
    for msg in stream:
        tokens.extend(msg.token_ids)
    assert tokens == want
    for resp in forged:
        assert resp.outcome == pb.HOP_NEVER_STARTED and "no such transfer expected" in resp.error, resp
    after = d.stats()
    assert after.refused_transfers - before.refused_transfers == len(forged)
    assert after.hop_outcomes.done - before.hop_outcomes.done == 1
    assert wait_all_free([p, d])


def test_write_after_the_lease_expired_is_refused(cluster, reference):
    """The prefill worker answers nothing within the hop's timeout and no write was admitted:
    d0 prefills locally. The write it sends once the lease expired is refused and counted."""
    _, p, d, rogue, _ = cluster
    prompt = H.random_prompts(1000, [50], seed=23)[0]
    before = d.stats()
    tokens, final = d.generate("late", prompt, GREEDY, "p-rogue", 30)
    assert final.finish_reason == pb.LENGTH and tokens == reference(prompt)
    assert d.stats().hop_outcomes.never_started == before.hop_outcomes.never_started + 1
    states = json.loads(rogue.wait_for("WROTE", 20).split(" ", 1)[1])
    assert all(state == "failed" and "refused" in message for state, message in states), states
    assert d.stats().refused_transfers == before.refused_transfers + len(states)
    assert wait_all_free([p, d])


def test_prefill_worker_dying_mid_transfer(cluster, reference):
    """Its write was admitted, then it died: TRANSFER_FAILED. torch_dist's receiver copies
    nothing once the lease is revoked, so d0 recomputes into the blocks; a NIXL WRITE may
    still land, so d0 fails the request and frees the blocks at the lease's deadline."""
    server, p, d, rogue, backend = cluster
    prompt = H.random_prompts(1000, [70], seed=22)[0]
    try:
        before = d.stats()
        start = time.monotonic()
        tokens, final = d.generate("dies", prompt, GREEDY, "p-rogue", 30)
        rogue.wait_for("ADMITTED", 5)
        after = d.stats()
        if backend == "torch_dist":
            # Admitted and copied, or cut before the copy (never admitted): recomputed either way.
            assert final.finish_reason == pb.LENGTH and tokens == reference(prompt)
            counted = {k: getattr(after.hop_outcomes, k) - getattr(before.hop_outcomes, k)
                       for k in ("transfer_failed", "never_started")}
            assert sum(counted.values()) == 1 and after.local_prefill_fallbacks == before.local_prefill_fallbacks + 1
            assert wait_all_free([d], timeout_s=10)
        else:
            assert final.finish_reason == pb.ERROR and tokens == [] and "TRANSFER_FAILED" in final.error.message
            assert after.hop_outcomes.transfer_failed == before.hop_outcomes.transfer_failed + 1
            assert after.transfer_failures == before.transfer_failures + 1
            s = d.stats()
            assert s.num_kv_blocks_free < s.num_kv_blocks_total  # held: a write may still land
            assert wait_all_free([d], timeout_s=HOP_TIMEOUT_S + LEASE_MARGIN_S + 5)
            assert time.monotonic() - start >= HOP_TIMEOUT_S + LEASE_MARGIN_S - 1
    finally:
        rogue.kill()
        server.store.deregister("p-rogue")
    assert d.generate("after", prompt, GREEDY, "p0")[0] == reference(prompt)
    assert wait_all_free([p, d])
