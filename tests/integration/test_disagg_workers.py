"""Prefill worker -> KV transfer -> decode worker, as real processes over real gRPC.

The control plane is the embedded store served over gRPC (what a single-machine
`pdserve up` runs). Output must equal the single-process engine token for token,
and every block must be free on both workers afterwards (their Stats say so).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time

import grpc
import pytest

import hf_reference as H
from pdserve.deploy.processes import WorkerProcess, wait_all_free
from pdserve.deploy.store.embedded import ControlPlaneServer
from pdserve.engine import LLM, SamplingParams
from pdserve.proto import convert
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

BACKENDS = ["nixl", "torch_dist"]
NUM_BLOCKS = 64


def Worker(role: str, model_dir, store_url: str, worker_id: str, backend: str, extra=()) -> WorkerProcess:
    """A started worker process of this module's shape (see pdserve.deploy.processes)."""
    w = WorkerProcess(role, ["--model", str(model_dir), "--store", store_url, "--worker-id", worker_id,
                             "--num-kv-blocks", str(NUM_BLOCKS), "--transfer-backend", backend,
                             "--heartbeat-ttl", "5", "--prefill-timeout", "10", "--log-level", "WARNING", *extra])
    w.wait_ready()
    return w


# torch_dist's run of this module is in the heavy tier (pytest -m heavy) for time: the
# default run still takes torch_dist end to end through tp_cluster below, test_moe_disagg,
# test_prompt_logprobs and test_kvtransfer_leases, and agent to agent in test_kvtransfer.
@pytest.fixture(scope="module", params=["nixl", pytest.param("torch_dist", marks=pytest.mark.heavy)])
def cluster(request, hf_model_dir):
    model_dir = hf_model_dir("llama")
    server = ControlPlaneServer()
    server.start()
    workers = []
    try:
        workers.append(Worker("prefill", model_dir, server.url, "p0", request.param))
        workers.append(Worker("decode", model_dir, server.url, "d0", request.param))
        yield model_dir, server, *workers, request.param
    finally:
        for w in reversed(workers):
            w.stop()
        server.stop()


def generate(d: Worker, rid: str, prompt, params: SamplingParams, prefill="p0", timeout=60):
    return d.generate(rid, prompt, params, prefill, timeout)


def test_greedy_equals_single_engine_concurrently(cluster):
    model_dir, _, p, d, _ = cluster
    prefix = H.random_prompts(1000, [40], seed=9)[0]
    prompts = H.random_prompts(1000, [1, 17, 60], seed=10) + [prefix + [5, 6], prefix + [7, 8, 9]]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    with LLM(model_dir, num_kv_blocks=NUM_BLOCKS) as llm:
        ref = [o.token_ids for o in llm.generate(prompts, params)]
    results: dict[int, list[int]] = {}
    threads = [threading.Thread(target=lambda i=i, pr=pr: results.__setitem__(i, generate(d, f"r{i}", pr, params)[0]))
               for i, pr in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [results[i] for i in range(len(prompts))] == ref
    assert p.all_free() and d.all_free()


def test_local_prefill_on_decode_worker(cluster):
    model_dir, _, p, d, _ = cluster
    prompt = H.random_prompts(1000, [30], seed=11)[0]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    with LLM(model_dir, num_kv_blocks=NUM_BLOCKS) as llm:
        ref = llm.generate([prompt], params)[0].token_ids
    tokens, final = generate(d, "local", prompt, params, prefill="")
    assert tokens == ref and final.usage.completion_tokens == 8 and final.usage.prompt_tokens == 30
    assert d.all_free()


def test_unregistered_prefill_worker_means_local_prefill(cluster):
    """A hop to a prefill worker that left never started: the decode worker prefills."""
    _, _, p, d, _ = cluster
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    before = d.stats().local_prefill_fallbacks
    tokens, final = generate(d, "nope", [1, 2, 3], params, prefill="p-missing")
    assert final.finish_reason == pb.LENGTH and tokens == generate(d, "here", [1, 2, 3], params, prefill="")[0]
    assert d.stats().local_prefill_fallbacks == before + 1
    assert d.all_free()


def test_bad_params_are_invalid_argument_and_worker_keeps_serving(cluster):
    _, _, p, d, _ = cluster
    with pytest.raises(grpc.RpcError) as e:
        generate(d, "bad", [1, 2, 3], SamplingParams(max_tokens=100000))  # beyond the context
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "100000" in e.value.details()
    tokens, _ = generate(d, "good", [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    assert len(tokens) == 3 and d.all_free()


def test_abort_during_decode_frees_both(cluster):
    _, _, p, d, _ = cluster
    req = pb.GenerateRequest(request_id="long", prompt_token_ids=list(range(3, 40)), prefill_worker_id="p0",
                             sampling_params=convert.sampling_message(SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True)))
    stream = pb_grpc.DecodeStub(d.channel).Generate(req, timeout=60)
    next(stream)  # first token arrived: prefill and transfer are done, decoding runs
    stream.cancel()  # the client goes away
    deadline = time.monotonic() + 10
    while not (d.all_free() and p.all_free()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert d.all_free() and p.all_free()


def test_prefill_worker_killed_mid_request(cluster):
    model_dir, server, p, d, backend = cluster
    victim = Worker("prefill", model_dir, server.url, "p-victim", backend, extra=["--max-num-batched-tokens", "16"])
    try:
        os.kill(victim.proc.pid, 19)  # SIGSTOP: it accepts the connection but never answers
        start = time.monotonic()
        before = d.stats()
        tokens, final = generate(d, "orphan", list(range(3, 200)), SamplingParams(max_tokens=4), prefill="p-victim")
        # No answer within the hop's timeout, but its agents never asked to write (no claim
        # was admitted under the lease): nothing was written, so the decode worker prefilled.
        assert final.finish_reason == pb.LENGTH and len(tokens) == 4 and time.monotonic() - start < 30
        after = d.stats()
        assert after.hop_outcomes.never_started == before.hop_outcomes.never_started + 1
        assert after.local_prefill_fallbacks == before.local_prefill_fallbacks + 1
        victim.proc.kill()
        tokens, final = generate(d, "survivor", [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
        assert len(tokens) == 3 and final.finish_reason == pb.LENGTH
        assert d.all_free()
    finally:
        victim.proc.kill()
        victim.stop()



def block_bytes(model_dir, tp=1) -> int:
    cfg = H.read_config(model_dir)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * 16 * head_dim * 4


def test_prefix_cached_on_decode_moves_only_missing_blocks(cluster):
    model_dir, server, p, d, _ = cluster
    prefix = H.random_prompts(1000, [64], seed=12)[0]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    with LLM(model_dir, num_kv_blocks=NUM_BLOCKS) as llm:
        ref = [o.token_ids for o in llm.generate([prefix + [1, 2, 3], prefix + [4, 5, 6, 7]], params)]
    before, p_before = d.stats().transfer_bytes, p.stats().transfer_bytes
    assert generate(d, "first", prefix + [1, 2, 3], params)[0] == ref[0]
    moved_first = d.stats().transfer_bytes - before
    assert generate(d, "second", prefix + [4, 5, 6, 7], params)[0] == ref[1]
    moved_second = d.stats().transfer_bytes - before - moved_first
    assert moved_first == 5 * block_bytes(model_dir)  # 67 tokens: 5 blocks
    assert moved_second == 1 * block_bytes(model_dir)  # the 4 full prefix blocks were cached on decode
    assert p.stats().transfer_bytes - p_before == moved_first + moved_second  # both sides count the same bytes
    assert p.all_free() and d.all_free()


def test_usage_reports_the_prompt_tokens_the_computing_workers_cache_served(cluster):
    """usage.cached_tokens on the final message: the prefill worker's hits when it computed
    the prompt (not the decode worker's own, which saved nothing), the decode worker's when
    it prefilled itself (fallback included), the prompt once for n > 1."""
    _, _, p, d, _ = cluster
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    remote, local = H.random_prompts(1000, [40, 40], seed=15)  # 2 full blocks each

    def cached(rid, prompt, prefill="p0", **kw):
        tokens, final = generate(d, rid, prompt, dataclasses.replace(params, **kw), prefill=prefill)
        assert final.finish_reason == pb.LENGTH and final.HasField("usage"), final
        assert final.usage.prompt_tokens == len(prompt) and final.usage.completion_tokens == len(tokens)
        return final.usage.cached_tokens

    assert cached("remote-1", remote) == 0
    assert cached("remote-2", remote) == 32  # the prefill worker's prefix cache
    assert cached("local-1", local, prefill="") == 0
    assert cached("local-2", local, prefill="") == 32
    # Cached on the decode worker only: the prefill worker computed all of it.
    assert cached("local-then-remote", local) == 0
    # The hop never started: the decode worker prefilled, from its own cache.
    assert cached("fallback", remote, prefill="p-missing") == 32
    for prefill in ("p0", ""):  # three completions, one prompt
        assert cached(f"n3-{prefill}", remote, prefill=prefill, n=3, temperature=1.0, seed=4) == 32
    assert wait_all_free([p, d])


def test_workers_publish_kv_events(cluster):
    from pdserve.engine.hashing import block_hashes

    model_dir, server, p, d, _ = cluster
    prompt = H.random_prompts(1000, [48], seed=13)[0]
    generate(d, "events", prompt, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    want = set(block_hashes(prompt, 16))
    deadline = time.monotonic() + 10
    seen: dict[str, set] = {"p0": set(), "d0": set()}
    after = 0
    while time.monotonic() < deadline and not all(want <= v for v in seen.values()):
        batch = server.store.read_kv_events(after)
        for ev in batch.events:
            if ev.WhichOneof("event") == "stored" and ev.worker_id in seen:
                seen[ev.worker_id].update(ev.stored.block_hashes)
        after = batch.last_seq
        time.sleep(0.1)
    assert want <= seen["p0"] and want <= seen["d0"]


def test_abort_during_prefill_frees_both(cluster):
    model_dir, server, p, d, backend = cluster
    slow = Worker("prefill", model_dir, server.url, "p-slow", backend, extra=["--max-num-batched-tokens", "8"])
    try:
        req = pb.GenerateRequest(request_id="cut", prompt_token_ids=list(range(3, 400)), prefill_worker_id="p-slow",
                                 sampling_params=convert.sampling_message(SamplingParams(max_tokens=4)))
        stream = pb_grpc.DecodeStub(d.channel).Generate(req, timeout=60)
        deadline = time.monotonic() + 20
        while slow.stats().num_running == 0 and time.monotonic() < deadline:  # prefill under way
            time.sleep(0.02)
        assert slow.stats().num_running == 1
        stream.cancel()
        deadline = time.monotonic() + 10
        while not (d.all_free() and slow.all_free()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert d.all_free() and slow.all_free()
    finally:
        slow.stop()


@pytest.fixture(scope="module", params=[(1, 2, "nixl", "embedded"), (2, 1, "torch_dist", "redis")],
                ids=["tp1to2-nixl-embedded", "tp2to1-torchdist-redis"])
def tp_cluster(request, hf_model_dir):
    p_tp, d_tp, backend, store_kind = request.param
    model_dir = hf_model_dir("llama")
    server = None
    if store_kind == "redis":
        from redis_server import RedisServer

        redis = RedisServer().start()
        url = redis.url
    else:
        server = ControlPlaneServer()
        server.start()
        url = server.url
    workers = []
    try:
        workers.append(Worker("prefill", model_dir, url, "p0", backend, extra=["--tp", str(p_tp)]))
        workers.append(Worker("decode", model_dir, url, "d0", backend, extra=["--tp", str(d_tp)]))
        yield model_dir, *workers
    finally:
        for w in reversed(workers):
            w.stop()
        if server is not None:
            server.stop()
        else:
            redis.stop()


def test_heterogeneous_tp_equals_single_engine(tp_cluster):
    model_dir, p, d = tp_cluster
    prompts = H.random_prompts(1000, [3, 16, 40, 90], seed=14)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    with LLM(model_dir, num_kv_blocks=NUM_BLOCKS) as llm:
        ref = [o.token_ids for o in llm.generate(prompts, params)]
    assert [generate(d, f"t{i}", pr, params)[0] for i, pr in enumerate(prompts)] == ref
    assert p.all_free() and d.all_free()


def test_abort_during_transfer_frees_both(cluster):
    """Freeze the decode worker so the prefill worker's write cannot finish, abort, resume."""
    import signal

    model_dir, server, p, d, backend = cluster
    slow = Worker("prefill", model_dir, server.url, "p-xfer", backend, extra=["--max-num-batched-tokens", "8"])
    try:
        req = pb.GenerateRequest(request_id="mid-transfer", prompt_token_ids=list(range(3, 300)),
                                 prefill_worker_id="p-xfer",
                                 sampling_params=convert.sampling_message(SamplingParams(max_tokens=4)))
        stream = pb_grpc.DecodeStub(d.channel).Generate(req, timeout=60)
        deadline = time.monotonic() + 20
        while slow.stats().num_running == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(d.proc.pid, signal.SIGSTOP)  # prefill is running; the decode side now stands still
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # prefill done, blocks held: the write is in flight
                s = slow.stats()
                if s.num_running == 0 and s.num_waiting == 0 and s.num_kv_blocks_free < s.num_kv_blocks_total:
                    break
                time.sleep(0.02)
            s = slow.stats()
            assert s.num_running == 0 and s.num_kv_blocks_free < s.num_kv_blocks_total, s
            stream.cancel()
        finally:
            os.kill(d.proc.pid, signal.SIGCONT)
        deadline = time.monotonic() + 30
        while not (d.all_free() and slow.all_free()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert d.all_free() and slow.all_free()
    finally:
        slow.stop()


def test_abort_from_the_prefill_side_fails_the_request_and_frees_both(cluster):
    model_dir, server, p, d, backend = cluster
    slow = Worker("prefill", model_dir, server.url, "p-abort", backend, extra=["--max-num-batched-tokens", "8"])
    try:
        results = {}
        t = threading.Thread(target=lambda: results.update(out=generate(d, "p-side", list(range(3, 300)),
                                                                         SamplingParams(max_tokens=4), prefill="p-abort")))
        t.start()
        deadline = time.monotonic() + 20
        while slow.stats().num_running == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        pb_grpc.PrefillStub(slow.channel).Abort(pb.AbortRequest(request_id="p-side"), timeout=10)
        t.join(30)
        tokens, final = results["out"]
        assert tokens == [] and final.finish_reason == pb.ERROR
        deadline = time.monotonic() + 10
        while not (d.all_free() and slow.all_free()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert d.all_free() and slow.all_free()
    finally:
        slow.stop()


def test_prefill_worker_sigkilled_mid_prefill(cluster):
    model_dir, server, p, d, backend = cluster
    victim = Worker("prefill", model_dir, server.url, "p-dies", backend, extra=["--max-num-batched-tokens", "8"])
    try:
        results = {}
        params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        t = threading.Thread(target=lambda: results.update(out=generate(d, "dies", list(range(3, 300)), params,
                                                                         prefill="p-dies")))
        start = time.monotonic()
        t.start()
        while victim.stats().num_running == 0 and time.monotonic() < start + 20:
            time.sleep(0.02)
        victim.proc.kill()
        t.join(30)
        # The hop died with its prefill worker (UNAVAILABLE): the decode worker prefilled
        # the prompt itself and the request completed, with the same tokens.
        tokens, final = results["out"]
        assert final.finish_reason == pb.LENGTH and time.monotonic() - start < 30
        assert tokens == generate(d, "local", list(range(3, 300)), params, prefill="")[0]
        assert d.all_free()
        tokens, final = generate(d, "after-death", [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
        assert len(tokens) == 3
    finally:
        victim.stop()
