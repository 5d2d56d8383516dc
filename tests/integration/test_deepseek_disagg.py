"""DeepSeek-V3 through prefill worker -> KV transfer -> decode worker, as real processes,
across tensor-parallel sizes (1 -> 2 and 2 -> 1) on both transfer backends.

The MLA latent cache is replicated on every TP rank, so each decode rank receives the
whole latent of the prompt's blocks from ONE prefill rank (kvtransfer/layout.py; the
planner's unit test checks the bytes). Output must equal Hugging Face's greedy tokens,
and every block must be free on both workers afterwards. As in test_disagg_workers.py,
the control plane is the embedded store served over gRPC, and both workers register
with it, which checks that their KV layouts (cache kind included) agree.
"""

from __future__ import annotations

import pytest

import hf_reference as H
from pdserve.deploy.processes import WorkerProcess, wait_all_free
from pdserve.deploy.store.embedded import ControlPlaneServer
from pdserve.engine import SamplingParams
from pdserve.proto import pdserve_pb2 as pb

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NUM_BLOCKS = 64
MAX_TOKENS = 16


def Worker(role: str, model_dir, store_url: str, worker_id: str, backend: str, tp: int) -> WorkerProcess:
    w = WorkerProcess(role, ["--model", str(model_dir), "--store", store_url, "--worker-id", worker_id,
                             "--num-kv-blocks", str(NUM_BLOCKS), "--transfer-backend", backend, "--tp", str(tp),
                             "--heartbeat-ttl", "5", "--prefill-timeout", "30", "--log-level", "WARNING"])
    w.wait_ready(timeout_s=300)
    return w


@pytest.mark.parametrize(("p_tp", "d_tp", "backend"), [
    (1, 2, "nixl"),
    pytest.param(2, 1, "torch_dist", marks=pytest.mark.heavy),
    pytest.param(1, 2, "torch_dist", marks=pytest.mark.heavy),
    pytest.param(2, 1, "nixl", marks=pytest.mark.heavy),
], ids=["tp1to2-nixl", "tp2to1-torchdist", "tp1to2-torchdist", "tp2to1-nixl"])
def test_heterogeneous_tp_equals_hf(p_tp, d_tp, backend, hf_model_dir):
    model_dir = hf_model_dir("deepseek_v3")
    prompts = H.standard_prompts(H.read_config(model_dir)["vocab_size"])[::3]  # 1, 17, 64, 200 tokens
    traces = H.hf_greedy_steps(model_dir, prompts, MAX_TOKENS)
    server = ControlPlaneServer()
    server.start()
    workers = []
    try:
        workers.append(Worker("prefill", model_dir, server.url, "p0", backend, p_tp))
        workers.append(Worker("decode", model_dir, server.url, "d0", backend, d_tp))
        p, d = workers
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
        for i, prompt in enumerate(prompts):
            tokens, final = d.generate(f"r{i}", prompt, params, "p0", timeout_s=120)
            msg = H.describe_token_mismatch(f"P(tp{p_tp})->D(tp{d_tp}) {backend}", i, prompt, tokens, traces[i])
            assert msg is None, msg
            assert final is not None and final.finish_reason == pb.LENGTH
        assert wait_all_free([p, d]), "KV blocks still held after every request finished"
        # Every prompt was prefilled remotely and its latent transferred.
        stats = d.stats()
        assert stats.local_prefill_fallbacks == 0 and stats.transfer_count == len(prompts)
        assert stats.transfer_failures == 0 and stats.refused_transfers == 0
    finally:
        for w in reversed(workers):
            w.stop()
        server.stop()
