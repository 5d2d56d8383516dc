"""Time to first token: disaggregated (prefill worker -> KV transfer -> decode worker)
against the same decode worker prefilling locally, in one run.

    python benchmarks/bench_disagg.py [--model DIR] [--prompt-len 2000] [--trials 5] [--backend nixl]

Starts an embedded control plane and two worker processes (plain processes, no
Ray). Each trial uses fresh random prompts, so no prefix cache helps either path;
the two paths alternate. The difference of the medians is the cost of the hop;
it is reported against the local prefill time. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import grpc

from pdserve.deploy.processes import WorkerProcess


def start_worker(role: str, model: str, store_url: str, worker_id: str, backend: str, extra=()) -> tuple:
    w = WorkerProcess(role, ["--model", model, "--store", store_url, "--worker-id", worker_id,
                             "--transfer-backend", backend, "--log-level", "WARNING", *extra])
    return w.proc, w.wait_ready()


def ttft(stub, rid: str, prompt: list[int], prefill: str) -> float:
    from pdserve.proto import pdserve_pb2 as pb

    req = pb.GenerateRequest(request_id=rid, prompt_token_ids=prompt, prefill_worker_id=prefill,
                             sampling_params=pb.SamplingParams(n=1, temperature=0.0, top_p=1.0, max_tokens=1, ignore_eos=True))
    start = time.perf_counter()
    for msg in stub.Generate(req, timeout=300):
        if msg.token_ids:
            return time.perf_counter() - start
    raise RuntimeError(f"{rid}: no token")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model directory (default: the embedded tiny model)")
    ap.add_argument("--prompt-len", type=int, default=2000)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--backend", default="nixl", choices=["nixl", "torch_dist"])
    ap.add_argument("--threads", type=int, default=2, help="torch threads per worker")
    args = ap.parse_args()

    from pdserve.deploy.cli import _resolve_model
    from pdserve.deploy.store.embedded import ControlPlaneServer
    from pdserve.engine.config import ModelConfig
    from pdserve.proto import pdserve_pb2 as pb
    from pdserve.proto import pdserve_pb2_grpc as pb_grpc

    model = str(_resolve_model(args.model))
    vocab = ModelConfig.from_dir(model).vocab_size
    server = ControlPlaneServer()
    server.start()
    blocks = str(-(-args.prompt_len // 16) * 3)
    extra = ["--num-kv-blocks", blocks, "--max-num-batched-tokens", str(args.prompt_len)]
    procs = []
    try:
        p, _ = start_worker("prefill", model, server.url, "p0", args.backend, extra)
        procs.append(p)
        d, d_addr = start_worker("decode", model, server.url, "d0", args.backend, extra)
        procs.append(d)
        stub = pb_grpc.DecodeStub(grpc.insecure_channel(d_addr))
        rng = random.Random(0)
        prompt = lambda: [rng.randrange(10, vocab) for _ in range(args.prompt_len)]  # noqa: E731
        ttft(stub, "warm-local", prompt(), "")
        ttft(stub, "warm-remote", prompt(), "p0")
        local, remote = [], []
        for i in range(args.trials):
            local.append(ttft(stub, f"local-{i}", prompt(), ""))
            remote.append(ttft(stub, f"remote-{i}", prompt(), "p0"))
        stats = stub.Stats(pb.StatsRequest())
        m_local, m_remote = statistics.median(local), statistics.median(remote)
        mib = stats.transfer_bytes / max(stats.transfer_count, 1) / 2**20
        print(f"model {model}, prompt {args.prompt_len} tokens, backend {args.backend}, {args.trials} trials each")
        print(f"TTFT local prefill on the decode worker: median {1000 * m_local:8.1f} ms  (all: {[round(1000 * x) for x in local]})")
        print(f"TTFT disaggregated (prefill -> {args.backend} -> decode): median {1000 * m_remote:8.1f} ms  (all: {[round(1000 * x) for x in remote]})")
        print(f"hop cost {1000 * (m_remote - m_local):+.1f} ms = {100 * (m_remote - m_local) / m_local:+.1f}% of the prefill time")
        print(f"KV per request {mib:.1f} MiB, mean transfer latency {stats.transfer_latency_ms_sum / max(stats.transfer_count, 1):.2f} ms "
              f"(prefill side, write to DONE)")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)
        server.stop()


if __name__ == "__main__":
    main()
