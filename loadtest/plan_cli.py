"""``pdserve plan``: profile a deployment, simulate one configuration, recommend pool sizes.

    pdserve plan profile   --url http://127.0.0.1:8000 [--api-key K] [--tokenizer DIR] --out profile.json
                           [--prefill N --decode M --prefill-tp T --decode-tp T --kv-blocks B ...]
    pdserve plan simulate  --profile profile.json --prefill N --decode M [workload] [SLOs] [--json]
    pdserve plan recommend --profile profile.json --gpus 8 [--tp-sizes 1,2,4,8] [workload] [SLOs] [--json]

The workload flags are the load test's (same names, same ``LoadTestConfig``), so one
spec drives both ``pdserve loadtest`` and the simulation. Bad input: a message and exit
code 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from .config import WORKLOADS, LoadTestConfig
from .distributions import LengthDistribution
from .planner import format_table, plan
from .profile import DeploymentInfo, Profile
from .sim_router import POLICIES
from .sim_workload import sim_requests
from .simulator import SLO, ClusterConfig, simulate

_SIM_URL = "http://simulated.invalid"  # the builder needs a URL; nothing is sent


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _add_deployment_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("the profiled deployment (as launched)")
    g.add_argument("--prefill", type=int, default=1, help="prefill workers")
    g.add_argument("--decode", type=int, default=1, help="decode workers")
    g.add_argument("--prefill-tp", type=int, default=1)
    g.add_argument("--decode-tp", type=int, default=1)
    g.add_argument("--kv-blocks", type=int, default=2048,
                   help="KV blocks per decode worker (default 2048: the runner's 512 MiB for the tiny model)")
    g.add_argument("--prefill-kv-blocks", type=int, default=2048, help="KV blocks per prefill worker")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--disagg-threshold", type=int, default=256, help="the gateway's disagg_threshold_tokens")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--max-num-seqs", type=int, default=256)


def _add_workload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload (the load test's flags)")
    g.add_argument("--workload", default="fixed", choices=WORKLOADS)
    g.add_argument("--input-len", type=int, default=512)
    g.add_argument("--output-len", type=int, default=128)
    g.add_argument("--input-dist", default=None, help="e.g. lognormal:mean=512,sigma=0.6 (synthetic)")
    g.add_argument("--output-dist", default=None)
    g.add_argument("--num-prefix-groups", type=int, default=4)
    g.add_argument("--prefix-len", type=int, default=256)
    g.add_argument("--suffix-len", type=int, default=64)
    g.add_argument("--num-turns", type=int, default=3)
    g.add_argument("--trace", default=None, help="Mooncake JSONL trace (workload trace)")
    g.add_argument("--trace-block-size", type=int, default=512)
    g.add_argument("--trace-time-scale", type=float, default=1.0)
    g.add_argument("--tokenizer", default=None, help="model directory: exact prompt lengths and block hashes")
    g.add_argument("--endpoint", default="completions", choices=["completions", "chat"])
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--rate", type=float, default=None, help="open loop: requests/s")
    g.add_argument("--burstiness", type=float, default=1.0)
    g.add_argument("--concurrency", type=int, default=None, help="closed loop: requests in flight")
    g.add_argument("--num-requests", type=int, default=500)
    g.add_argument("--slo-ttft", type=float, default=None, help="TTFT objective, ms")
    g.add_argument("--slo-tpot", type=float, default=None, help="TPOT objective, ms")
    g.add_argument("--slo-e2e", type=float, default=None, help="end-to-end objective, ms")
    s = p.add_argument_group("simulation")
    s.add_argument("--profile", required=True, help="profile JSON from `pdserve plan profile`")
    s.add_argument("--policy", default="kv", choices=POLICIES, help="routing policy")
    s.add_argument("--tp-efficiency", type=float, default=0.9, help="TP speed-up efficiency per doubling")
    s.add_argument("--shared-cpus", type=int, default=None,
                   help="workers share this many processors (a CPU test bed); default: one device each")
    s.add_argument("--json", action="store_true", help="machine-readable output")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="plan_command", required=True)
    p = sub.add_parser("profile", help="measure a running deployment and fit its cost model")
    p.add_argument("--url", required=True, help="the gateway, e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    p.add_argument("--tokenizer", default=None, help="model directory: text prompts of exact length")
    p.add_argument("--out", required=True, help="profile JSON to write")
    p.add_argument("--prefill-lens", type=_int_list, default=None, help="e.g. 256,512,1024 (>= threshold)")
    p.add_argument("--decode-batch-sizes", type=_int_list, default=(1, 2, 4, 8))
    p.add_argument("--decode-context-lens", type=_int_list, default=(32, 1024))
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    _add_deployment_args(p)

    p = sub.add_parser("simulate", help="simulate one configuration on a workload")
    p.add_argument("--prefill", type=int, required=True, help="prefill workers")
    p.add_argument("--decode", type=int, required=True, help="decode workers")
    p.add_argument("--prefill-tp", type=int, default=1)
    p.add_argument("--decode-tp", type=int, default=1)
    _add_workload_args(p)

    p = sub.add_parser("recommend", help="simulate every configuration a GPU budget allows; recommend one")
    p.add_argument("--gpus", type=int, required=True, help="GPU budget")
    p.add_argument("--tp-sizes", type=_int_list, default=(1,), help="TP sizes to consider, e.g. 1,2,4,8")
    p.add_argument("--max-workers-per-pool", type=int, default=None,
                   help="skip candidates with more workers than this in a pool (large budgets)")
    _add_workload_args(p)


def workload_config(args: argparse.Namespace) -> LoadTestConfig:
    """The LoadTestConfig the workload flags describe (what `pdserve loadtest` would send)."""
    dist = lambda text: None if text is None else LengthDistribution.parse(text)  # noqa: E731
    return LoadTestConfig(
        base_url=_SIM_URL, endpoint=args.endpoint, workload=args.workload, input_len=args.input_len,
        output_len=args.output_len, input_dist=dist(args.input_dist), output_dist=dist(args.output_dist),
        num_prefix_groups=args.num_prefix_groups, prefix_len=args.prefix_len, suffix_len=args.suffix_len,
        num_turns=args.num_turns, trace_path=args.trace, trace_block_size=args.trace_block_size,
        trace_time_scale=args.trace_time_scale, tokenizer_dir=args.tokenizer, seed=args.seed, rate=args.rate,
        burstiness=args.burstiness, concurrency=args.concurrency,
        num_requests=None if args.workload == "trace" else args.num_requests,
        slo_ttft_ms=args.slo_ttft, slo_tpot_ms=args.slo_tpot, slo_e2e_ms=args.slo_e2e)


def _concurrency(config: LoadTestConfig) -> int | None:
    if config.rate is not None or config.workload == "trace":
        if config.concurrency is not None:
            raise ValueError("the simulator takes --rate or --concurrency, not both")
        return None
    if config.concurrency is None:
        return None  # everything at once: every arrival at 0
    return config.concurrency


def _prepare(args: argparse.Namespace):
    profile = Profile.load(args.profile)
    config = workload_config(args)
    requests = sim_requests(config, profile.deployment.block_size)
    slo = SLO(args.slo_ttft, args.slo_tpot, args.slo_e2e)
    return profile, config, requests, slo


def _run_profile(args: argparse.Namespace) -> int:
    from .profile_run import ProfileRunConfig, run_profile  # noqa: PLC0415 - httpx only here

    deployment = DeploymentInfo(
        num_prefill=args.prefill, num_decode=args.decode, prefill_tp=args.prefill_tp, decode_tp=args.decode_tp,
        kv_blocks_per_decode_worker=args.kv_blocks, kv_blocks_per_prefill_worker=args.prefill_kv_blocks,
        block_size=args.block_size, disagg_threshold_tokens=args.disagg_threshold,
        max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs)
    thr = args.disagg_threshold
    lens = args.prefill_lens or tuple(sorted({max(thr, 16)} | {n for n in (384, 512, 768, 1024, 1536) if n > thr}))
    config = ProfileRunConfig(base_url=args.url, api_key=args.api_key, model=args.model, tokenizer_dir=args.tokenizer,
                              prefill_lens=lens, reps=args.reps, decode_batch_sizes=args.decode_batch_sizes,
                              decode_context_lens=args.decode_context_lens, decode_tokens=args.decode_tokens)
    profile = run_profile(config, deployment, log=lambda msg: print(f"pdserve plan: {msg}", file=sys.stderr))
    profile.save(args.out)
    f = profile.fit
    print(f"pdserve plan: wrote {args.out}: iteration {1e3 * f.iteration_s:.2f} ms, prefill "
          f"{1e6 * f.prefill_token_s:.1f} us/token + {1e9 * f.prefill_attn_s:.2f} ns/token^2, decode "
          f"{1e3 * f.decode_seq_s:.3f} ms/seq + {1e6 * f.decode_ctx_s:.3f} us/context token, overhead remote "
          f"{1e3 * f.remote_overhead_s:.1f} ms / local {1e3 * f.local_overhead_s:.1f} ms; worst relative error "
          f"of the fit: prefill {profile.metadata['prefill_max_rel_error']:.0%}, decode "
          f"{profile.metadata['decode_max_rel_error']:.0%}")
    return 0


def _run_simulate(args: argparse.Namespace) -> int:
    profile, config, requests, slo = _prepare(args)
    cluster = ClusterConfig(args.prefill, args.decode, args.prefill_tp, args.decode_tp, policy=args.policy,
                            tp_efficiency=args.tp_efficiency, shared_cpus=args.shared_cpus)
    result = simulate(profile, cluster, requests, slo=slo, concurrency=_concurrency(config))
    s = result.summary
    if args.json:
        print(json.dumps({"config": cluster.label, "summary": s}, indent=2))
        return 0
    print(f"{cluster.label} ({cluster.num_gpus} GPUs), {s['num_completed']} requests, {s['duration_s']:.1f} s")
    for key in ("ttft_ms", "tpot_ms", "e2e_ms"):
        v = s[key]
        print(f"  {key[:-3].upper():5s} ms: " + "  ".join(
            f"{q} {'-' if v[q] is None else f'{v[q]:.1f}'}" for q in ("mean", "p50", "p90", "p99")))
    print(f"  throughput {s['request_throughput']:.3f} req/s, {s['output_throughput']:.1f} tok/s; goodput "
          f"{s['goodput']:.3f} req/s ({s['goodput_per_gpu']:.3f}/GPU), SLO attainment {100 * s['slo_attainment']:.1f}%")
    print(f"  prefills local {s['num_local_prefill']}, remote {s['num_remote_prefill']}; prefix-hit tokens "
          f"{s['prefix_hit_tokens']}; preemptions {s['num_preemptions']}")
    return 0


def _run_recommend(args: argparse.Namespace) -> int:
    profile, config, requests, slo = _prepare(args)
    base = ClusterConfig(1, 1, policy=args.policy, tp_efficiency=args.tp_efficiency, shared_cpus=args.shared_cpus)
    result = plan(profile, requests, args.gpus, args.tp_sizes, slo=slo, concurrency=_concurrency(config), base=base,
                  max_workers_per_pool=args.max_workers_per_pool)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return 0
    best = result.best.config
    print(format_table(result.rows()))
    print(f"recommended: {best.num_prefill} prefill worker(s) x TP {best.prefill_tp}, {best.num_decode} decode "
          f"worker(s) x TP {best.decode_tp} ({best.num_gpus} of {args.gpus} GPUs): "
          f"pdserve up --prefill {best.num_prefill} --decode {best.num_decode} --prefill-tp {best.prefill_tp} "
          f"--decode-tp {best.decode_tp}")
    return 0


def run(args: argparse.Namespace) -> int:
    handler = {"profile": _run_profile, "simulate": _run_simulate, "recommend": _run_recommend}[args.plan_command]
    try:
        return handler(args)
    except ValueError as e:
        print(f"pdserve plan: error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pdserve plan")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
