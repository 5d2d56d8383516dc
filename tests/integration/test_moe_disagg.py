"""Qwen3-MoE through prefill worker -> KV transfer -> decode worker, as real processes,
with the experts split over the ranks of a TP 2 worker (expert parallelism) on one side
and a TP 1 worker on the other, on both transfer backends; output equals Hugging Face's
greedy continuation token for token and every block comes back on both workers.

Attention stays tensor-parallel under expert parallelism, so the KV layout (and its
TP re-shard between P and D) is the dense models' one: this checks that the MoE ranks
compute the same KV and tokens wherever the experts live.
"""

from __future__ import annotations

import pytest

import hf_reference as H
from pdserve.deploy.store.embedded import ControlPlaneServer
from pdserve.engine import SamplingParams
from test_disagg_workers import Worker, generate

pytestmark = pytest.mark.integration

MAX_TOKENS = 12


@pytest.fixture(scope="module", params=[(1, 2, "nixl"), (2, 1, "torch_dist")], ids=["tp1to2-nixl", "tp2to1-torchdist"])
def moe_cluster(request, hf_model_dir):
    p_tp, d_tp, backend = request.param
    model_dir = hf_model_dir("qwen3_moe")
    server = ControlPlaneServer()
    server.start()
    workers = []
    try:
        workers.append(Worker("prefill", model_dir, server.url, "p0", backend, extra=["--tp", str(p_tp)]))
        workers.append(Worker("decode", model_dir, server.url, "d0", backend, extra=["--tp", str(d_tp)]))
        yield model_dir, *workers
    finally:
        for w in reversed(workers):
            w.stop()
        server.stop()


def test_moe_prefill_to_decode_equals_hf(moe_cluster):
    model_dir, p, d = moe_cluster
    prompts = H.random_prompts(H.read_config(model_dir)["vocab_size"], [3, 16, 40, 90], seed=14)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    got = [generate(d, f"m{i}", pr, params)[0] for i, pr in enumerate(prompts)]
    assert got == H.hf_greedy(model_dir, prompts, MAX_TOKENS)
    assert p.all_free() and d.all_free()
