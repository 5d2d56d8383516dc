"""KV-aware routing against round robin on a shared-prefix workload: prefill-worker
prefix-cache hit rate and time to first token through the gateway, in one run.

    python benchmarks/bench_routing.py [--model DIR] [--groups 8] [--prefix-len 1024] [--suffix-len 16]
        [--requests 64] [--concurrency 2,4,8] [--repeat 5] [--prefill-blocks N] [--policies kv,round_robin,up]

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
    return streaming_request(client, model, prompt, max_tokens)[0]


def streaming_request(client, model: str, prompt: list[int], max_tokens: int) -> tuple[float, int]:
    """(TTFT, prompt tokens computed = prompt - cached, from the final usage)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    computed = None
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
            if line.startswith("data: {") and '"usage"' in line:
                usage = json.loads(line[6:]).get("usage")
                if usage:
                    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                    computed = usage["prompt_tokens"] - cached
    if first is None or computed is None:
        raise RuntimeError("no content chunk or no usage")
    return first, computed


def run_batch(client, name: str, workload: list[list[int]], concurrency: int, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        out = list(pool.map(lambda p: streaming_request(client, name, p, max_tokens), workload))
    return {"ttft": [t for t, _ in out], "computed": sum(c for _, c in out), "wall": time.perf_counter() - t0}


def run_policy(policy: str, args, model: str, store, workloads: list[tuple[int, list[list[int]]]]) -> list[dict]:
    """One deployment per policy; every (concurrency, workload) in turn on it, each with
    fresh groups (the previous ones' blocks are evicted first, LRU)."""
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
        results = []
        limits = httpx.Limits(max_connections=max(c for c, _ in workloads) + 2)
        with httpx.Client(base_url=server.url, timeout=300, limits=limits) as client:
            # Warm-up on unrelated prompts, short and full-length (first-call costs); not timed, and
            # excluded from the hit counts. The prefixes they leave behind are evicted first (LRU).
            wrng = random.Random(12345)
            for n in (24, 24, 24, 24, len(workloads[0][1][0]), len(workloads[0][1][0])):
                streaming_ttft(client, name, [wrng.randrange(10, 200) for _ in range(n)], args.max_tokens)
            for concurrency, workload in workloads:
                before = [s.Stats(pb.StatsRequest(), timeout=10) for s in prefill_stubs]
                r = run_batch(client, name, workload, concurrency, args.max_tokens)
                after = [s.Stats(pb.StatsRequest(), timeout=10) for s in prefill_stubs]
                r["hit"] = sum(a.prefix_cache_hit_tokens - b.prefix_cache_hit_tokens for a, b in zip(after, before))
                r["query"] = query = [a.prefix_cache_query_tokens - b.prefix_cache_query_tokens
                                      for a, b in zip(after, before)]
                r["per_worker_query"], r["query"], r["concurrency"] = query, sum(query), concurrency
                results.append(r)
                print(f"  {policy} c={concurrency}: {summary_line(r, args)}", flush=True)
        return results
    finally:
        if server is not None:
            server.stop()
        stop(procs)


def make_workload(rng: random.Random, vocab: int, groups: int, prefix_len: int, suffix_len: int,
                  requests: int) -> tuple[list[list[int]], int]:
    """(prompts, distinct groups used): G fresh prefixes, every group once per round in a
    seeded order (many conversations interleaved), each request a fresh suffix."""
    prefixes = [[rng.randrange(10, vocab) for _ in range(prefix_len)] for _ in range(groups)]
    order: list[int] = []
    while len(order) < requests:
        perm = list(range(groups))
        rng.shuffle(perm)
        order += perm
    order = order[:requests]
    return [prefixes[g] + [rng.randrange(10, vocab) for _ in range(suffix_len)] for g in order], len(set(order))


def ideal_computed(args, num_groups: int) -> int:
    """Prompt tokens computed when each group's prefix is computed once in the deployment
    (full blocks only; the engine always computes a prompt's last token)."""
    shared = min(args.prefix_len // 16, (args.prefix_len + args.suffix_len - 1) // 16) * 16
    return args.requests * (args.prefix_len + args.suffix_len) - shared * (args.requests - num_groups)


def summary_line(r: dict, args) -> str:
    ideal_hit = args.requests * (args.prefix_len + args.suffix_len) - args._ideal_computed
    return (f"hit {100 * r['hit'] / max(ideal_hit, 1):.1f}% of ideal, computed {r['computed']} "
            f"({100 * (r['computed'] / args._ideal_computed - 1):+.1f}% vs ideal), mean TTFT "
            f"{1000 * statistics.mean(r['ttft']):.0f} ms, {len(r['ttft']) / r['wall']:.2f} req/s, per worker "
            f"{r.get('per_worker_query')}")


def spread(xs: list[float], fmt: str = "{:.1f}") -> str:
    """median [min-max]"""
    return f"{fmt.format(statistics.median(xs))} [{fmt.format(min(xs))}-{fmt.format(max(xs))}]"


def run_up(args, model: str, workloads) -> list[dict]:
    """The same workloads through `pdserve up --prefill 2` with every default (local Ray,
    embedded store, the gateway as users run it); computed tokens from each response's usage."""
    import os
    import socket
    import subprocess
    import sys
    import tempfile

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    home = tempfile.mkdtemp(prefix="pdserve-bench-routing-")
    env = dict(os.environ, PDSERVE_HOME=home)
    cmd = [sys.executable, "-m", "pdserve.deploy.cli", "up", "--prefill", "2", "--port", str(port)]
    if args.model:
        cmd += ["--model", model]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(f"{home}/up.log", "w"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/ready", timeout=2).json().get("prefill") == 2:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pdserve up did not become ready; see {home}/up.log")
            time.sleep(0.5)
        name = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        results = []
        with httpx.Client(base_url=url, timeout=300) as client:
            wrng = random.Random(12345)
            for n in (24, 24, len(workloads[0][1][0])):
                streaming_ttft(client, name, [wrng.randrange(10, 200) for _ in range(n)], args.max_tokens)
            for concurrency, workload in workloads:
                r = run_batch(client, name, workload, concurrency, args.max_tokens)
                r["concurrency"] = concurrency
                results.append(r)
                print(f"  up c={concurrency}: computed {r['computed']} "
                      f"({100 * (r['computed'] / args._ideal_computed - 1):+.1f}% vs ideal)", flush=True)
        return results
    finally:
        proc.send_signal(2)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model directory (default: the embedded tiny model)")
    ap.add_argument("--groups", type=int, default=8, help="prefix groups G")
    ap.add_argument("--prefix-len", type=int, default=1024, help="shared prefix tokens P")
    ap.add_argument("--suffix-len", type=int, default=16, help="distinct suffix tokens S")
    ap.add_argument("--requests", type=int, default=64, help="requests N per run")
    ap.add_argument("--concurrency", default="2", help="client threads; a comma-separated list runs each")
    ap.add_argument("--repeat", type=int, default=1, help="runs per concurrency, each on fresh groups")
    ap.add_argument("--max-tokens", type=int, default=1)
    ap.add_argument("--prefill-blocks", type=int, default=None,
                    help="KV blocks per prefill worker (default: about G/2 + 1 groups' prefixes plus requests in flight)")
    ap.add_argument("--decode-blocks", type=int, default=None, help="default: all groups plus requests in flight")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: max(2048, P + S)")
    ap.add_argument("--disagg-threshold", type=int, default=1)
    ap.add_argument("--policies", default="kv,round_robin", help="comma-separated; 'up' runs `pdserve up` defaults")
    ap.add_argument("--backend", default="nixl", choices=["nixl", "torch_dist"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from pdserve.deploy.cli import _resolve_model
    from pdserve.deploy.store.embedded import ControlPlaneServer
    from pdserve.engine.config import ModelConfig

    concurrencies = [int(c) for c in args.concurrency.split(",")]
    bs = 16
    prompt_blocks = -(-(args.prefix_len + args.suffix_len) // bs)
    prefix_blocks = args.prefix_len // bs
    cmax = max(concurrencies)
    if args.prefill_blocks is None:
        # Room for about G/2 + 1 groups' prefixes (round robin sends every group to both workers, so it
        # evicts; kv needs G/2 per worker when balanced) plus the suffix blocks of the requests in flight.
        # The same size for every concurrency of a run (a larger one would let round robin keep every group on
        # both workers at high concurrency); requests of uncached groups beyond it wait for blocks.
        args.prefill_blocks = (args.groups // 2 + 1) * prefix_blocks + cmax * (prompt_blocks - prefix_blocks + 1)
    if args.decode_blocks is None:
        args.decode_blocks = args.groups * prefix_blocks + (cmax + 1) * (prompt_blocks + args.max_tokens)
    if args.max_num_batched_tokens is None:
        args.max_num_batched_tokens = max(2048, args.prefix_len + args.suffix_len)

    model = str(_resolve_model(args.model))
    vocab = ModelConfig.from_dir(model).vocab_size
    rng = random.Random(args.seed)
    workloads = []
    num_groups = None
    for c in concurrencies:
        for _ in range(args.repeat):
            prompts, num_groups = make_workload(rng, vocab, args.groups, args.prefix_len, args.suffix_len,
                                                args.requests)
            workloads.append((c, prompts))
    args._ideal_computed = ideal_computed(args, num_groups)
    total = args.requests * (args.prefix_len + args.suffix_len)
    ideal_hit = total - args._ideal_computed

    results: dict[str, list[dict]] = {}
    policies = args.policies.split(",")
    store = ControlPlaneServer()
    store.start()
    try:
        for policy in policies:
            if policy == "up":
                continue
            results[policy] = run_policy(policy, args, model, store, workloads)
    finally:
        store.stop()
    if "up" in policies:
        results["up"] = run_up(args, model, workloads)

    print(f"model {model}; {args.groups} groups x {args.prefix_len}-token prefix, {args.suffix_len}-token suffixes, "
          f"{args.requests} requests per run, concurrency {concurrencies} x {args.repeat} repeats (fresh groups "
          f"each), max_tokens {args.max_tokens}")
    print(f"2 prefill workers x {args.prefill_blocks} KV blocks (one group = {prefix_blocks}), 1 decode worker x "
          f"{args.decode_blocks}; disagg threshold {args.disagg_threshold}; backend {args.backend}")
    print(f"ideal prefill hit rate (each group computed once): {100 * ideal_hit / total:.1f}%; ideal prompt tokens "
          f"computed per run: {args._ideal_computed}")
    print("median [min-max] over the repeats:")
    print(f"{'policy':<12} {'conc':>4} {'hit of ideal %':>22} {'computed vs ideal %':>24} {'mean TTFT ms':>22} "
          f"{'TTFT p50 ms':>20} {'req/s':>20}")
    for policy, runs in results.items():
        for c in concurrencies:
            rs = [r for r in runs if r["concurrency"] == c]
            hit = spread([100 * r["hit"] / max(ideal_hit, 1) for r in rs]) if "hit" in rs[0] else "-"
            comp = spread([100 * (r["computed"] / args._ideal_computed - 1) for r in rs], "{:+.1f}")
            print(f"{policy:<12} {c:>4} {hit:>22} {comp:>24} "
                  f"{spread([1000 * statistics.mean(r['ttft']) for r in rs], '{:.0f}'):>22} "
                  f"{spread([1000 * pct(r['ttft'], 50) for r in rs], '{:.0f}'):>20} "
                  f"{spread([len(r['ttft']) / r['wall'] for r in rs], '{:.2f}'):>20}")
    if "kv" in results:
        for policy, runs in results.items():
            if policy in ("kv", "up"):
                continue
            for c in concurrencies:
                pairs = [(k, o) for k, o in zip(results["kv"], runs) if k["concurrency"] == c]
                ttft = [statistics.mean(o["ttft"]) / statistics.mean(k["ttft"]) for k, o in pairs]
                rate = [(len(k["ttft"]) / k["wall"]) / (len(o["ttft"]) / o["wall"]) for k, o in pairs]
                print(f"kv vs {policy}, concurrency {c}: mean TTFT {spread(ttft, '{:.2f}')}x better, "
                      f"req/s {spread(rate, '{:.2f}')}x (per repeat, same workload)")


if __name__ == "__main__":
    main()
