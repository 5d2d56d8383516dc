"""KV-aware routing against round robin on a shared-prefix workload: prefill-worker
prefix-cache hit rate and time to first token through the gateway, in one run.

    python benchmarks/bench_routing.py [--model DIR] [--groups 8] [--prefix-len 1024] [--suffix-len 16]
        [--requests 64] [--concurrency 2] [--prefill-blocks N] [--policies kv,round_robin]

Per policy, a fresh deployment on one embedded control plane: two prefill workers and
one decode worker as processes (plain processes, no Ray), and the gateway in-process
under uvicorn with that policy, so every policy starts with cold caches. The workload
(the same for every policy): G prefix groups of P random tokens; each request is a
group's prefix plus S fresh random tokens; the requests come in rounds, every group
once per round in a seeded random order;
requests go out from ``--concurrency`` threads as streaming /v1/completions with
``max_tokens`` tokens. ``--disagg-threshold`` defaults to 1, so every request prefills
on a prefill worker and the comparison is about which prefill worker gets it.

TTFT is measured by the client: request sent to the first SSE event that carries a
choice. The hit rate is the prefill workers' own Stats (hit tokens / query tokens,
summed over both; the decode worker's cache does not count); the ideal is each group's
prefix computed once in the whole deployment. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from pdserve.deploy.processes import WorkerProcess


def start_worker(role: str, model: str, store_url: str, worker_id: str, extra=()):
    """A started worker process (not yet waited for)."""
    return WorkerProcess(role, ["--model", model, "--store", store_url, "--worker-id", worker_id,
                                "--log-level", "WARNING", *extra])


def wait_ready(worker) -> str:
    return worker.wait_ready()


def stop(workers) -> None:
    for w in workers:
        w.stop(timeout_s=30)


def pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))]


def streaming_ttft(client, model: str, prompt: list[int], max_tokens: int) -> float:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    start = time.perf_counter()
    first = None
    with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:500]!r}")
        for line in r.iter_lines():
            if first is None and line.startswith("data: {"):
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(f"stream error: {event}")
                if event.get("choices"):
                    first = time.perf_counter() - start
    if first is None:
        raise RuntimeError("no content chunk")
    return first


def run_policy(policy: str, args, model: str, store, workload: list[list[int]]) -> dict:
    import grpc
    import httpx

    from pdserve.proto import pdserve_pb2 as pb
    from pdserve.proto import pdserve_pb2_grpc as pb_grpc
    from pdserve.router.app import ServerThread, create_app
    from pdserve.router.gateway import GatewayConfig

    common = ["--transfer-backend", args.backend, "--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    specs = [("prefill", f"p{i}-{policy}", args.prefill_blocks) for i in range(2)]
    specs.append(("decode", f"d0-{policy}", args.decode_blocks))
    procs = [start_worker(role, model, store.url, wid, [*common, "--num-kv-blocks", str(nb)])
             for role, wid, nb in specs]
    server = None
    try:
        addrs = [wait_ready(w) for w in procs]
        prefill_stubs = [pb_grpc.PrefillStub(grpc.insecure_channel(a)) for a in addrs[:2]]
        cfg = GatewayConfig(store_url=store.url, model_dir=model, router_policy=policy,
                            disagg_threshold_tokens=args.disagg_threshold, refresh_interval_s=0.2)
        server = ServerThread(create_app(cfg))
        name = cfg.model_name
        deadline = time.monotonic() + 20
        while httpx.get(server.url + "/ready").json() != {"ready": True, "prefill": 2, "decode": 1}:
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway not ready: {httpx.get(server.url + '/ready').text}")
            time.sleep(0.1)
        limits = httpx.Limits(max_connections=args.concurrency + 2)
        with httpx.Client(base_url=server.url, timeout=300, limits=limits) as client:
            # Warm-up on unrelated prompts, short and full-length (first-call costs); not timed, and
            # excluded from the hit counts. The prefixes they leave behind are evicted first (LRU).
            wrng = random.Random(12345)
            for n in (24, 24, 24, 24, len(workload[0]), len(workload[0])):
                streaming_ttft(client, name, [wrng.randrange(10, 200) for _ in range(n)], args.max_tokens)
            before = [s.Stats(pb.StatsRequest(), timeout=10) for s in prefill_stubs]
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                ttfts = list(pool.map(lambda p: streaming_ttft(client, name, p, args.max_tokens), workload))
            wall = time.perf_counter() - t0
        after = [s.Stats(pb.StatsRequest(), timeout=10) for s in prefill_stubs]
        hit = [a.prefix_cache_hit_tokens - b.prefix_cache_hit_tokens for a, b in zip(after, before)]
        query = [a.prefix_cache_query_tokens - b.prefix_cache_query_tokens for a, b in zip(after, before)]
        return {"ttft": ttfts, "hit": sum(hit), "query": sum(query), "per_worker_query": query, "wall": wall}
    finally:
        if server is not None:
            server.stop()
        stop(procs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model directory (default: the embedded tiny model)")
    ap.add_argument("--groups", type=int, default=8, help="prefix groups G")
    ap.add_argument("--prefix-len", type=int, default=1024, help="shared prefix tokens P")
    ap.add_argument("--suffix-len", type=int, default=16, help="distinct suffix tokens S")
    ap.add_argument("--requests", type=int, default=64, help="requests N per policy")
    ap.add_argument("--concurrency", type=int, default=2, help="client threads")
    ap.add_argument("--max-tokens", type=int, default=1)
    ap.add_argument("--prefill-blocks", type=int, default=None,
                    help="KV blocks per prefill worker (default: about G/2 + 1 groups' prefixes plus requests in flight)")
    ap.add_argument("--decode-blocks", type=int, default=None, help="default: all groups plus requests in flight")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: max(2048, P + S)")
    ap.add_argument("--disagg-threshold", type=int, default=1)
    ap.add_argument("--policies", default="kv,round_robin")
    ap.add_argument("--backend", default="nixl", choices=["nixl", "torch_dist"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from pdserve.deploy.cli import _resolve_model
    from pdserve.deploy.store.embedded import ControlPlaneServer
    from pdserve.engine.config import ModelConfig

    bs = 16
    prompt_blocks = -(-(args.prefix_len + args.suffix_len) // bs)
    prefix_blocks = args.prefix_len // bs
    if args.prefill_blocks is None:
        # Room for about G/2 + 1 groups' prefixes (round robin sends every group to both workers, so it
        # evicts; kv needs G/2 per worker when balanced) plus the suffix blocks of the requests in flight.
        args.prefill_blocks = (max((args.groups // 2 + 1) * prefix_blocks, args.concurrency * prompt_blocks)
                               + args.concurrency * (prompt_blocks - prefix_blocks + 1))
    if args.decode_blocks is None:
        args.decode_blocks = args.groups * prefix_blocks + (args.concurrency + 1) * (prompt_blocks + args.max_tokens)
    if args.max_num_batched_tokens is None:
        args.max_num_batched_tokens = max(2048, args.prefix_len + args.suffix_len)

    model = str(_resolve_model(args.model))
    vocab = ModelConfig.from_dir(model).vocab_size
    rng = random.Random(args.seed)
    prefixes = [[rng.randrange(10, vocab) for _ in range(args.prefix_len)] for _ in range(args.groups)]
    # Rounds: every group once per round, in a fresh seeded order (many conversations interleaved).
    order: list[int] = []
    while len(order) < args.requests:
        perm = list(range(args.groups))
        rng.shuffle(perm)
        order += perm
    order = order[: args.requests]
    workload = [prefixes[g] + [rng.randrange(10, vocab) for _ in range(args.suffix_len)] for g in order]
    shared = min(prefix_blocks, (args.prefix_len + args.suffix_len - 1) // bs) * bs
    ideal_hit = shared * (args.requests - len(set(order)))
    total = args.requests * (args.prefix_len + args.suffix_len)

    store = ControlPlaneServer()
    store.start()
    results = {}
    try:
        for policy in args.policies.split(","):
            results[policy] = run_policy(policy, args, model, store, workload)
    finally:
        store.stop()

    print(f"model {model}; {args.groups} groups x {args.prefix_len}-token prefix, {args.suffix_len}-token suffixes, "
          f"{args.requests} requests, concurrency {args.concurrency}, max_tokens {args.max_tokens}")
    print(f"2 prefill workers x {args.prefill_blocks} KV blocks (one group = {prefix_blocks}), 1 decode worker x "
          f"{args.decode_blocks}; disagg threshold {args.disagg_threshold}; backend {args.backend}")
    print(f"ideal prefill hit rate (each group computed once): {100 * ideal_hit / total:.1f}%")
    print(f"{'policy':<12} {'hit rate':>9} {'of ideal':>9} {'TTFT p50':>10} {'TTFT p90':>10} {'TTFT p99':>10} {'mean':>9} "
          f"{'req/s':>7}  prefill tokens per worker")
    for policy, r in results.items():
        t = r["ttft"]
        rate = r["hit"] / max(r["query"], 1)
        print(f"{policy:<12} {100 * rate:8.1f}% {100 * r['hit'] / max(ideal_hit, 1):8.1f}% "
              f"{1000 * pct(t, 50):8.1f}ms {1000 * pct(t, 90):8.1f}ms {1000 * pct(t, 99):8.1f}ms {1000 * statistics.mean(t):7.1f}ms "
              f"{len(t) / r['wall']:7.2f}  {r['per_worker_query']}")
    if "kv" in results:
        kv50 = pct(results["kv"]["ttft"], 50)
        for policy, r in results.items():
            if policy != "kv":
                print(f"TTFT p50 {policy} / kv = {pct(r['ttft'], 50) / kv50:.2f}x")


if __name__ == "__main__":
    main()
