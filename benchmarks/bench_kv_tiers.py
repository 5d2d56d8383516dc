"""KV memory tiers below a worker's KV region (engine/kv_tiers.py): prefix hit rate and
time to first token through `pdserve up`, tiers off against the host tier and host + disk
(and the Mooncake pool with ``--kv-pool``), in one run.

    python benchmarks/bench_kv_tiers.py [--model DIR] [--groups 8] [--prefix-len 1024] [--suffix-len 16]
        [--rounds 3] [--concurrency 1] [--max-tokens 4] [--configs off,host,host_disk] [--kv-pool] [--fp8]

Deployment, per configuration a fresh one (cold caches): `pdserve up --spec FILE` as a
subprocess with its own ``$PDSERVE_HOME`` and a cluster secret this script chose (so it
can sign the workers' Stats calls); the spec runs one decode worker and no prefill
worker, so that worker prefills every prompt itself. One worker because the tiers sit
below the KV region of the worker that computes the prompt: with a prefill worker, the
decode worker's requests arrive as remote prefills and never look in its tiers, and a
second process only adds noise on a 2-core machine. Its KV region is a quarter of the
prefix working set (``--num-kv-blocks``), and the tier flags come from the spec's
``extra_args``:

* ``off``: no tier; a prefix evicted from the region is recomputed.
* ``host``: ``--kv-offload-memory`` holding twice the working set.
* ``host_disk``: a host tier as large as the region (region + host: half the working
  set, so the disk has to serve the rest) and ``--kv-offload-dir`` holding twice it.
* ``pool`` (only with ``--kv-pool``, and only when `pdserve up` takes ``--kv-pool`` and
  the worker ``--kv-pool-master``): the host tier of ``host_disk``, the pool below it
  instead of the disk (`pdserve up --kv-pool` starts the master).

The workload (the same prompts for every configuration): G groups of P random tokens;
each request is a group's prefix plus S fresh random tokens; R rounds, every group once
per round in a seeded order, so a prefix comes back after about G other requests, and the
prefix working set (G x P tokens) is 4x the region. Requests go out from
``--concurrency`` threads as streaming /v1/completions (greedy, ``ignore_eos``).

Figures: the hit rate is the worker's own Stats (prefix-cache hit tokens / query tokens
over the measured requests; tier hits are hits); the ideal is every repeated prefix a
hit (its full blocks), the first request of each group a miss. TTFT is the client's:
request sent to the first SSE event with a choice. Every configuration must produce the
same completions as ``off`` (greedy): the count that differ is printed. After the
requests the worker must come back idle with every region block free, and every process
of the deployment must be gone after SIGINT; both are printed. Prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

CONFIGS = ("off", "host", "host_disk", "pool")


def pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))]


def streaming_request(client, model: str, prompt: list[int], max_tokens: int) -> tuple[float, int, str]:
    """(TTFT, cached prompt tokens from the final usage, completion text)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = cached = None
    text = []
    with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:500]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"stream error: {event}")
            if event.get("choices"):
                if first is None:
                    first = time.perf_counter() - start
                text += [c.get("text") or "" for c in event["choices"]]
            if event.get("usage"):
                cached = (event["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    if first is None or cached is None:
        raise RuntimeError("no content chunk or no usage")
    return first, cached, "".join(text)


def make_workload(rng: random.Random, vocab: int, groups: int, prefix_len: int, suffix_len: int,
                  rounds: int) -> list[tuple[int, list[int]]]:
    """(group, prompt) per request: every group once per round, in a seeded order."""
    prefixes = [[rng.randrange(10, vocab) for _ in range(prefix_len)] for _ in range(groups)]
    out = []
    for _ in range(rounds):
        order = list(range(groups))
        rng.shuffle(order)
        out += [(g, prefixes[g] + [rng.randrange(10, vocab) for _ in range(suffix_len)]) for g in order]
    return out


def ideal_hit_tokens(workload: list[tuple[int, list[int]]], prefix_len: int, block_size: int) -> int:
    """Every repeated prefix a hit in full blocks (the engine always computes a prompt's last token)."""
    seen: set[int] = set()
    hit = 0
    for g, prompt in workload:
        if g in seen:
            hit += min(prefix_len // block_size, (len(prompt) - 1) // block_size) * block_size
        seen.add(g)
    return hit


def block_bytes(model: str, block_size: int, dtype_bytes: int = 4) -> int:
    """Bytes of one KV block of one rank (TP 1, float32 unless told)."""
    from pdserve.engine.config import ModelConfig

    m = ModelConfig.from_dir(model)
    return m.num_layers * m.num_cache_planes * m.num_kv_heads * block_size * m.head_dim * dtype_bytes


@dataclass
class Tiers:
    """One configuration: the decode worker's tier flags (blocks; bytes are derived)."""

    name: str
    num_host_blocks: int = 0
    num_disk_blocks: int = 0
    kv_pool: bool = False

    def worker_args(self, block_bytes: int, disk_dir: Path) -> list[str]:
        args = []
        if self.num_host_blocks:
            args += ["--kv-offload-memory", str(self.num_host_blocks * block_bytes)]
        if self.num_disk_blocks:
            args += ["--kv-offload-dir", str(disk_dir), "--kv-offload-dir-size", str(self.num_disk_blocks * block_bytes)]
        return args


@dataclass
class Deployment:
    """`pdserve up --spec` as a subprocess in its own $PDSERVE_HOME, with a secret we chose."""

    spec: dict
    up_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        from pdserve.proto import auth

        self.home = Path(tempfile.mkdtemp(prefix="pdserve-bench-kv-tiers-"))
        self.secret = auth.generate_secret()
        self.store = None
        self.proc = None

    def start(self, timeout_s: float = 300.0) -> None:
        import httpx
        import yaml

        from pdserve.deploy.store import open_store
        from pdserve.proto import auth

        (self.home / "spec.yaml").write_text(yaml.safe_dump(self.spec, sort_keys=False))
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "PDSERVE_HOME": str(self.home), auth.SECRET_ENV: self.secret.decode()}
        cmd = [sys.executable, "-m", "pdserve.deploy.cli", "up", "--spec", str(self.home / "spec.yaml"),
               "--port", str(port), *self.up_args]
        self.log = open(self.home / "up.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                r = httpx.get(self.url + "/ready", timeout=2)
                if r.status_code == 200 and r.json().get("decode", 0) >= 1:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pdserve up did not become ready; see {self.home}/up.log")
            time.sleep(0.5)
        state = json.loads((self.home / "up.json").read_text())
        self.store = open_store(state["store_url"], cluster_secret=self.secret)

    def stats(self) -> list:
        """Every worker's StatsResponse (decode workers only here)."""
        from pdserve.proto import auth
        from pdserve.proto import pdserve_pb2 as pb
        from pdserve.proto import pdserve_pb2_grpc as pb_grpc

        out = []
        for info in self.store.list_workers():
            stub = pb_grpc.PrefillStub if info.role == pb.PREFILL else pb_grpc.DecodeStub
            with auth.insecure_channel(info.address, self.secret) as ch:
                out.append(stub(ch).Stats(pb.StatsRequest(), timeout=10))
        return out

    def wait_idle(self, timeout_s: float = 60.0) -> tuple[bool, float, list]:
        """(every worker idle with every region block free, seconds it took, last Stats)."""
        t0 = time.monotonic()
        while True:
            stats = self.stats()
            if all(s.num_running == 0 and s.num_waiting == 0 and s.num_kv_blocks_free == s.num_kv_blocks_total
                   and s.num_open_grammars == 0 for s in stats):
                return True, time.monotonic() - t0, stats
            if time.monotonic() - t0 > timeout_s:
                return False, time.monotonic() - t0, stats
            time.sleep(0.5)

    def own_pids(self) -> list[int]:
        """Processes started under this deployment's $PDSERVE_HOME (up, Ray, workers)."""
        needle = f"PDSERVE_HOME={self.home}\0".encode()
        pids = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit() and int(d.name) != os.getpid():
                try:
                    if needle in (d / "environ").read_bytes():
                        pids.append(int(d.name))
                except OSError:
                    pass
        return pids

    def stop(self, timeout_s: float = 90.0) -> list[int]:
        """SIGINT to `pdserve up`; returns the pids still alive afterwards (should be none)."""
        if self.store is not None:
            self.store.close()
            self.store = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        deadline = time.monotonic() + 30
        while (left := self.own_pids()) and time.monotonic() < deadline:
            time.sleep(0.5)
        self.log.close()
        return left


def run_config(tiers: Tiers, args, model: str, bb: int, workload, warmup) -> dict:
    import httpx

    spec = {"model": model, "dtype": "float32", "block_size": args.block_size, "num_kv_blocks": args.region_blocks,
            "extra_args": ["--log-level", "WARNING", "--max-num-batched-tokens", str(args.max_num_batched_tokens)],
            "pools": [{"role": "decode", "count": 1}]}
    dep = Deployment(spec, ["--kv-pool"] if tiers.kv_pool else [])
    extra = tiers.worker_args(bb, dep.home / "kv-disk")
    if extra:
        spec["pools"][0]["extra_args"] = extra
    r: dict = {"name": tiers.name, "tiers": tiers}
    t0 = time.perf_counter()
    try:
        dep.start()
        r["start_s"] = time.perf_counter() - t0
        name = httpx.get(dep.url + "/v1/models").json()["data"][0]["id"]
        with httpx.Client(base_url=dep.url, timeout=args.request_timeout) as client:
            for prompt in warmup:  # first-call costs; not counted, evicted first (LRU)
                streaming_request(client, name, prompt, args.max_tokens)
            before = dep.stats()[0]
            t1 = time.perf_counter()
            pool = ThreadPoolExecutor(args.concurrency)
            try:
                out = list(pool.map(lambda gp: streaming_request(client, name, gp[1], args.max_tokens), workload))
            except Exception as e:
                # A stuck request is a finding: say where the worker stands, send nothing more.
                pool.shutdown(wait=False, cancel_futures=True)
                s = dep.stats()[0]
                raise RuntimeError(f"{tiers.name}: a request failed ({e!r}); the worker: running {s.num_running}, "
                                   f"waiting {s.num_waiting}, free {s.num_kv_blocks_free}/{s.num_kv_blocks_total}, "
                                   f"tier hit tokens {s.tier_hit_tokens}; log: {dep.home}/up.log") from e
            pool.shutdown()
            r["wall_s"] = time.perf_counter() - t1
            after = dep.stats()[0]
        r["ttft"] = [t for t, _, _ in out]
        r["cached"] = sum(c for _, c, _ in out)
        r["texts"] = [x for _, _, x in out]
        r["hit"] = after.prefix_cache_hit_tokens - before.prefix_cache_hit_tokens
        r["query"] = after.prefix_cache_query_tokens - before.prefix_cache_query_tokens
        r["tier_hit"] = after.tier_hit_tokens - before.tier_hit_tokens
        r["idle"], r["idle_s"], final = dep.wait_idle()
        s = final[0]
        r["final"] = (f"running {s.num_running}, waiting {s.num_waiting}, free {s.num_kv_blocks_free}/"
                      f"{s.num_kv_blocks_total}, host used {s.num_host_blocks_used}/{s.num_host_blocks_total}")
    finally:
        r["left_pids"] = dep.stop()
        r["home"] = dep.home
    return r


def pool_available() -> str | None:
    """None when `pdserve up --kv-pool` and the worker's --kv-pool-master exist; else why not."""
    from pdserve.deploy.runner import build_parser
    from pdserve.deploy.up import add_arguments

    up = argparse.ArgumentParser()
    add_arguments(up)
    if not any("--kv-pool" in a.option_strings for a in up._actions):
        return "`pdserve up` has no --kv-pool"
    if not any("--kv-pool-master" in a.option_strings for a in build_parser("decode")._actions):
        return "the worker runner has no --kv-pool-master"
    try:
        from pdserve.deploy.kvpool import find_master_binary

        find_master_binary()
    except (ImportError, FileNotFoundError) as e:
        return str(e)
    return None


def run_fp8(args) -> None:
    """FP8 vs bfloat16 KV cache: blocks per GiB, transfer time per request, accuracy
    (benchmarks/bench_fp8_kv.py, which this runs)."""
    from bench_fp8_kv import run

    from pdserve.deploy.cli import _resolve_model

    run(str(_resolve_model(args.model).resolve()), seed=args.seed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model directory (default: the embedded tiny model)")
    ap.add_argument("--groups", type=int, default=8, help="prefix groups G")
    ap.add_argument("--prefix-len", type=int, default=1024, help="shared prefix tokens P")
    ap.add_argument("--suffix-len", type=int, default=16, help="fresh suffix tokens S per request")
    ap.add_argument("--rounds", type=int, default=3, help="R: every group once per round")
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--region-ratio", type=float, default=4.0,
                    help="prefix working set / KV region (the region still fits the requests in flight)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--request-timeout", type=float, default=120.0,
                    help="seconds one request may take before the run stops (a stuck worker is a finding)")
    ap.add_argument("--configs", default="off,host,host_disk", help=f"comma-separated, of {','.join(CONFIGS[:3])}")
    ap.add_argument("--kv-pool", action="store_true", help="add the `pool` row (`pdserve up --kv-pool`)")
    ap.add_argument("--fp8", action="store_true", help="FP8 vs bf16 KV cache instead (bench_fp8_kv.py)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.fp8:
        return run_fp8(args)

    from pdserve.deploy.cli import _resolve_model
    from pdserve.engine.config import ModelConfig

    model = str(_resolve_model(args.model).resolve())
    bs = args.block_size
    bb = block_bytes(model, bs)
    prefix_blocks = args.prefix_len // bs
    working_set = args.groups * prefix_blocks
    request_blocks = -(-(args.prefix_len + args.suffix_len + args.max_tokens) // bs)
    args.region_blocks = max(int(working_set / args.region_ratio), args.concurrency * request_blocks)
    configs = {"off": Tiers("off"), "host": Tiers("host", num_host_blocks=2 * working_set),
               "host_disk": Tiers("host_disk", num_host_blocks=args.region_blocks, num_disk_blocks=2 * working_set)}
    names = args.configs.split(",")
    for n in names:
        if n not in configs:
            ap.error(f"--configs: unknown {n!r}; known: {', '.join(configs)}")
    if args.kv_pool:
        why = pool_available()
        if why is not None:
            ap.error(f"--kv-pool: the pool is not available: {why}")
        configs["pool"] = Tiers("pool", num_host_blocks=args.region_blocks, kv_pool=True)
        names.append("pool")

    vocab = ModelConfig.from_dir(model).vocab_size
    rng = random.Random(args.seed)
    workload = make_workload(rng, vocab, args.groups, args.prefix_len, args.suffix_len, args.rounds)
    wrng = random.Random(12345)
    warmup = [[wrng.randrange(10, vocab) for _ in range(n)] for n in (24, 24, args.prefix_len + args.suffix_len)]
    ideal = ideal_hit_tokens(workload, args.prefix_len, bs)
    query = sum(len(p) for _, p in workload)

    print(f"model {model}; {args.groups} groups x {args.prefix_len}-token prefix + {args.suffix_len} fresh tokens, "
          f"{args.rounds} rounds = {len(workload)} requests, concurrency {args.concurrency}, "
          f"max_tokens {args.max_tokens}", flush=True)
    print(f"1 decode worker (prefills itself); KV region {args.region_blocks} blocks of {bb >> 10} KiB; prefix "
          f"working set {working_set} blocks ({working_set / args.region_blocks:.1f}x the region)", flush=True)
    print(f"ideal hit rate (every repeated prefix a hit): {100 * ideal / query:.1f}% ({ideal} of {query} tokens)",
          flush=True)
    if args.kv_pool:
        from pdserve.proto import pdserve_pb2 as pb

        if not hasattr(pb, "KV_TIER_POOL"):
            print("NOTE: the proto has no KV_TIER_POOL: the worker may take --kv-pool-master without a pool tier "
                  "behind it; the pool row then measures the host tier alone", flush=True)

    results = []
    t_all = time.perf_counter()
    for n in names:
        r = run_config(configs[n], args, model, bb, workload, warmup)
        results.append(r)
        print(f"  {n}: started in {r['start_s']:.0f} s, requests {r['wall_s']:.0f} s; hit "
              f"{100 * r['hit'] / max(r['query'], 1):.1f}% ({100 * r['hit'] / max(ideal, 1):.1f}% of ideal), usage "
              f"cached {r['cached']}, tier {r['tier_hit']}; TTFT p50 {1000 * pct(r['ttft'], 50):.0f} ms; idle "
              f"{r['idle']} after {r['idle_s']:.1f} s ({r['final']}); left {r['left_pids'] or 'none'}", flush=True)

    base = next((r for r in results if r["name"] == "off"), None)
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s")
    print(f"{'config':<10} {'host blk':>8} {'disk blk':>8} {'hit rate':>9} {'of ideal':>9} {'from tiers':>10} "
          f"{'usage cached':>12} {'TTFT p50':>9} {'TTFT p90':>9} {'p50 vs off':>10} {'outputs = off':>13} "
          f"{'idle, all free':>15} {'procs left':>10}")
    for r in results:
        t = r["tiers"]
        p50 = pct(r["ttft"], 50)
        speed = f"{pct(base['ttft'], 50) / p50:.2f}x" if base else "-"
        same = f"{sum(a == b for a, b in zip(r['texts'], base['texts']))}/{len(r['texts'])}" if base else "-"
        print(f"{r['name']:<10} {t.num_host_blocks:>8} {t.num_disk_blocks:>8} "
              f"{100 * r['hit'] / max(r['query'], 1):>8.1f}% {100 * r['hit'] / max(ideal, 1):>8.1f}% "
              f"{r['tier_hit']:>10} {r['cached']:>12} {1000 * p50:>7.0f}ms {1000 * pct(r['ttft'], 90):>7.0f}ms "
              f"{speed:>10} {same:>13} {'yes' if r['idle'] else 'NO':>15} {len(r['left_pids']):>10}")
    host = next((r for r in results if r["name"] == "host"), None)
    if host and base:
        frac = host["hit"] / max(ideal, 1)
        speed = pct(base["ttft"], 50) / pct(host["ttft"], 50)
        print(f"goals (issue 16): host hit rate >= 90% of ideal: {100 * frac:.1f}% "
              f"({'met' if frac >= 0.9 else 'not met'}); host TTFT p50 >= 3x better than off: {speed:.2f}x "
              f"({'met' if speed >= 3 else 'not met'})")


if __name__ == "__main__":
    main()
