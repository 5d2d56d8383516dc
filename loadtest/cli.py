"""``pdserve loadtest``: the command line of the load tester.

    pdserve loadtest --url http://127.0.0.1:8000 --workload fixed --input-len 512 \\
        --output-len 128 --concurrency 8 --num-requests 200 --output-dir out/
    pdserve loadtest --url URL --workload synthetic --input-dist lognormal:mean=512,sigma=0.6 \\
        --output-dist fixed:128 --rate 4 --duration 60 --slo-ttft 500 --slo-tpot 50
    pdserve loadtest --url URL --sweep --slo-ttft 500 --num-requests 100 --output-dir sweep/

``add_arguments(parser)`` fills a parser (deploy/cli.py wires it as a subcommand);
``run(args)`` returns 0 on success, 2 on bad arguments (one line on stderr), 1 when
every request failed or the server could not be used.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from .client import TargetError
from .config import ENDPOINTS, WORKLOADS, LoadTestConfig
from .distributions import LengthDistribution
from .report import format_table, write_run
from .runner import run_loadtest
from .sweep import arun_sweep


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("target")
    g.add_argument("--url", default="http://127.0.0.1:8000",
                   help="server root (OpenAI-compatible), default %(default)s")
    g.add_argument("--endpoint", choices=ENDPOINTS, default="completions")
    g.add_argument("--model", help="model name (default: the first id of GET /v1/models)")
    g.add_argument("--api-key", help="sent as 'Authorization: Bearer' (default: $OPENAI_API_KEY)")
    g.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="do not send ignore_eos (output lengths then depend on the model)")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--timeout", type=float, default=300.0, help="per-request limit in seconds (default %(default)s)")
    g.add_argument("--drain-timeout", dest="drain_timeout_s", type=float, metavar="S",
                   help="after --duration, seconds in-flight requests may still run (default: --timeout)")

    g = p.add_argument_group("workload")
    g.add_argument("--workload", choices=WORKLOADS, default="fixed")
    g.add_argument("--input-len", type=int, default=512, help="fixed prompt tokens; multi-turn: tokens per new message")
    g.add_argument("--output-len", type=int, default=128)
    g.add_argument("--input-dist", metavar="DIST",
                   help="e.g. lognormal:mean=512,sigma=0.6 | normal:mean=M,std=S | uniform:min=A,max=B | fixed:N "
                        "(synthetic; also multi-turn messages)")
    g.add_argument("--output-dist", metavar="DIST", help="as --input-dist, for output lengths")
    g.add_argument("--num-prefix-groups", type=int, default=4, help="shared-prefix: groups G")
    g.add_argument("--prefix-len", type=int, default=256, help="shared-prefix: prefix tokens P")
    g.add_argument("--suffix-len", type=int, default=64, help="shared-prefix: suffix tokens S")
    g.add_argument("--num-turns", type=int, default=3, help="multi-turn: turns per conversation")
    g.add_argument("--trace", dest="trace_path", metavar="FILE", help="trace: Mooncake-format JSONL file")
    g.add_argument("--trace-block-size", type=int, default=512, help="trace: tokens per hash id")
    g.add_argument("--trace-time-scale", type=float, default=1.0, help="trace: multiply timestamps by this")
    g.add_argument("--tokenizer", dest="tokenizer_dir", metavar="DIR",
                   help="model directory whose tokenizer makes prompt lengths exact (else approximate)")
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("load")
    g.add_argument("--rate", type=float, help="open loop: requests/s (conversations/s for multi-turn)")
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrivals; 1 = Poisson")
    g.add_argument("--concurrency", type=int, help="closed loop: requests in flight (with --rate: a cap)")
    g.add_argument("--num-requests", type=int, help="requests to send")
    g.add_argument("--duration", dest="duration_s", type=float, metavar="S", help="seconds to send for")
    g.add_argument("--slo-ttft", dest="slo_ttft_ms", type=float, metavar="MS", help="TTFT SLO in ms")
    g.add_argument("--slo-tpot", dest="slo_tpot_ms", type=float, metavar="MS", help="TPOT SLO in ms")
    g.add_argument("--slo-e2e", dest="slo_e2e_ms", type=float, metavar="MS", help="end-to-end latency SLO in ms")

    g = p.add_argument_group("sweep")
    g.add_argument("--sweep", action="store_true", help="find the highest rate meeting the SLOs")
    g.add_argument("--sweep-attainment", type=float, default=0.9, help="fraction of requests that must meet the SLOs")
    g.add_argument("--sweep-max-steps", type=int, default=8, help="rates tried at most")
    g.add_argument("--sweep-start-rate", type=float, help="first rate (default: --rate, else 1)")

    g = p.add_argument_group("output")
    g.add_argument("--output-dir", metavar="DIR", help="write summary.json, requests.jsonl and plots here")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no live progress on stderr")


def build_config(args: argparse.Namespace) -> LoadTestConfig:
    """The config from parsed arguments; ValueError on bad values."""
    return LoadTestConfig(
        base_url=args.url, endpoint=args.endpoint, model=args.model,
        api_key=args.api_key if args.api_key is not None else os.environ.get("OPENAI_API_KEY") or None,
        ignore_eos=args.ignore_eos, temperature=args.temperature, workload=args.workload,
        input_len=args.input_len, output_len=args.output_len,
        input_dist=LengthDistribution.parse(args.input_dist) if args.input_dist else None,
        output_dist=LengthDistribution.parse(args.output_dist) if args.output_dist else None,
        num_prefix_groups=args.num_prefix_groups, prefix_len=args.prefix_len, suffix_len=args.suffix_len,
        num_turns=args.num_turns, trace_path=args.trace_path, trace_block_size=args.trace_block_size,
        trace_time_scale=args.trace_time_scale, tokenizer_dir=args.tokenizer_dir, seed=args.seed,
        rate=(args.sweep_start_rate or args.rate or 1.0) if args.sweep else args.rate,
        burstiness=args.burstiness, concurrency=args.concurrency,
        num_requests=args.num_requests, duration_s=args.duration_s, timeout_s=args.timeout,
        drain_timeout_s=args.drain_timeout_s,
        slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms, slo_e2e_ms=args.slo_e2e_ms,
        show_progress=args.progress and sys.stderr.isatty(),
    )


def run(args: argparse.Namespace) -> int:
    try:
        config = build_config(args)
        if args.sweep:
            return _sweep(config, args)
        result = run_loadtest(config)
    except ValueError as e:
        print(f"pdserve loadtest: error: {e}", file=sys.stderr)
        return 2
    except TargetError as e:
        print(f"pdserve loadtest: {e}", file=sys.stderr)
        return 1
    summary = result.summary
    print(format_table(summary, title=f"{config.workload} load test, {result.model}"))
    if args.output_dir:
        paths = write_run(args.output_dir, config, result.model, summary, result.records)
        print(f"wrote {', '.join(str(p) for p in paths)}")
    if summary["num_requests"] > 0 and summary["num_completed"] == 0:
        print(f"pdserve loadtest: every request failed: {summary['errors']}", file=sys.stderr)
        return 1
    return 0


def _sweep(config: LoadTestConfig, args: argparse.Namespace) -> int:
    if not 0 < args.sweep_attainment <= 1:
        raise ValueError(f"--sweep-attainment must be in (0, 1], got {args.sweep_attainment}")
    if args.sweep_start_rate is not None and not args.sweep_start_rate > 0:
        raise ValueError(f"--sweep-start-rate must be > 0, got {args.sweep_start_rate}")

    def on_step(rate: float, summary: dict) -> None:
        print(f"rate {rate:8.3f} req/s: attainment {summary['slo_attainment']:.1%}, "
              f"goodput {summary['goodput']:.2f} req/s, errors {summary['num_errors']}", flush=True)

    sweep = asyncio.run(arun_sweep(config, args.sweep_attainment, args.sweep_max_steps, None, args.output_dir,
                                   on_step))
    if sweep.best_rate is None:
        print(f"no rate tried met the SLOs for {args.sweep_attainment:.0%} of requests")
    else:
        bound = "" if sweep.is_saturated else " (not saturated: a lower bound)"
        print(f"highest rate meeting the SLOs for >= {args.sweep_attainment:.0%} of requests: "
              f"{sweep.best_rate:.3f} req/s{bound}")
        best = next(p for p in sweep.points if p["rate"] == sweep.best_rate)
        print(format_table(best, title=f"at {sweep.best_rate:.3f} req/s"))
    if args.output_dir:
        print(f"wrote {args.output_dir}/sweep.json and sweep plots")
    if all(p["num_completed"] == 0 for p in sweep.points):
        print("pdserve loadtest: every request failed", file=sys.stderr)
        return 1
    return 0
