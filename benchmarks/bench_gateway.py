"""Gateway overhead: end-to-end latency of short requests through the OpenAI gateway
(HTTP + router) against calling the decode worker's gRPC Generate directly, in one run.

    python benchmarks/bench_gateway.py [--model DIR] [--prompt-len 8] [--max-tokens 2] [--reps 300]
        [--policy kv] [--stream]

Starts an embedded control plane, one decode worker as a process, and the gateway as
its own process (``serve``, like a deployment). No prefill worker: every request
prefills locally on the decode worker, so no KV transfer adds noise. Both paths send
the same token-id prompt with the same sampling (greedy, ``ignore_eos``, ``max_tokens``)
and wait for the whole answer; they alternate, with the order swapped every repetition,
so drift on a noisy machine hits both alike. The difference of the percentiles is the
gateway's cost (HTTP parsing, JSON, router decision, one more gRPC hop, response
building). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import random
import socket
import statistics
import subprocess
import time

from pdserve.deploy.processes import WorkerProcess, start_gateway

def start_worker(role: str, model: str, store_url: str, worker_id: str, extra=()) -> tuple:
    w = WorkerProcess(role, ["--model", model, "--store", store_url, "--worker-id", worker_id,
                             "--log-level", "WARNING", *extra])
    return w.proc, w.wait_ready()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model directory (default: the embedded tiny model)")
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=2)
    ap.add_argument("--reps", type=int, default=300, help="requests per path (alternating)")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--policy", default="kv")
    ap.add_argument("--stream", action="store_true", help="gateway path: streaming response, read to the end")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import grpc
    import httpx

    from pdserve.deploy.cli import _resolve_model
    from pdserve.deploy.store.embedded import ControlPlaneServer
    from pdserve.engine.config import ModelConfig
    from pdserve.proto import pdserve_pb2 as pb
    from pdserve.proto import pdserve_pb2_grpc as pb_grpc

    model = str(_resolve_model(args.model))
    vocab = ModelConfig.from_dir(model).vocab_size
    rng = random.Random(args.seed)
    prompt = [rng.randrange(10, vocab) for _ in range(args.prompt_len)]

    store = ControlPlaneServer()
    store.start()
    procs = []
    try:
        d, d_addr = start_worker("decode", model, store.url, "d0", ["--num-kv-blocks", "256"])
        procs.append(d)
        port = free_port()
        cfg = {"store_url": store.url, "model_dir": model, "router_policy": args.policy}
        gw, url = start_gateway(cfg, port)
        procs.append(gw)
        name = httpx.get(url + "/v1/models").json()["data"][0]["id"]

        channel = grpc.insecure_channel(d_addr)
        stub = pb_grpc.DecodeStub(channel)
        sp = pb.SamplingParams(n=1, temperature=0.0, top_p=1.0, max_tokens=args.max_tokens, ignore_eos=True)
        counter = iter(range(1 << 62))

        def direct() -> float:
            req = pb.GenerateRequest(request_id=f"direct-{next(counter)}", prompt_token_ids=prompt,
                                     sampling_params=sp)
            start = time.perf_counter()
            n = sum(len(msg.token_ids) for msg in stub.Generate(req, timeout=60))
            elapsed = time.perf_counter() - start
            if n != args.max_tokens:
                raise RuntimeError(f"direct: {n} tokens")
            return elapsed

        client = httpx.Client(base_url=url, timeout=60)
        body = {"model": name, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0,
                "ignore_eos": True}

        def gateway() -> float:
            start = time.perf_counter()
            if args.stream:
                with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                    done = any(line == "data: [DONE]" for line in r.iter_lines())
                elapsed = time.perf_counter() - start
                if r.status_code != 200 or not done:
                    raise RuntimeError(f"gateway: HTTP {r.status_code}")
                return elapsed
            r = client.post("/v1/completions", json=body)
            elapsed = time.perf_counter() - start
            if r.status_code != 200 or r.json()["usage"]["completion_tokens"] != args.max_tokens:
                raise RuntimeError(f"gateway: HTTP {r.status_code} {r.text[:300]}")
            return elapsed

        for _ in range(args.warmup):
            gateway()
            direct()
        times = {"direct": [], "gateway": []}
        for i in range(args.reps):
            pair = ((gateway, "gateway"), (direct, "direct"))
            for fn, key in (pair if i % 2 == 0 else pair[::-1]):
                times[key].append(fn())
        client.close()
        channel.close()
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        store.stop()

    print(f"model {model}; prompt {args.prompt_len} tokens, max_tokens {args.max_tokens}, {args.reps} requests per "
          f"path alternating, local prefill on the decode worker, gateway policy {args.policy}"
          f"{', streaming' if args.stream else ''}")
    print(f"{'path':<30} {'p50':>9} {'p90':>9} {'p99':>9} {'mean':>9} {'min':>9}")
    rows = (("direct gRPC Decode.Generate", times["direct"]), ("gateway /v1/completions", times["gateway"]))
    for label, t in rows:
        print(f"{label:<30} " + " ".join(f"{1000 * v:7.2f}ms" for v in
                                         (pct(t, 50), pct(t, 90), pct(t, 99), statistics.mean(t), min(t))))
    g, dd = times["gateway"], times["direct"]
    print(f"{'gateway overhead (difference)':<30} " + " ".join(
        f"{1000 * v:+7.2f}ms" for v in (pct(g, 50) - pct(dd, 50), pct(g, 90) - pct(dd, 90), pct(g, 99) - pct(dd, 99),
                                        statistics.mean(g) - statistics.mean(dd), min(g) - min(dd))))


if __name__ == "__main__":
    main()
