"""The `pdserve` command line.

    pdserve up [--model DIR] [--prefill N] [--decode M] [--port 8000] ...
    pdserve make-tiny-model DIR
    pdserve generate [--model DIR] --prompt TEXT [--max-tokens N] ...
    pdserve loadtest --url URL [--workload ...] [--rate R | --concurrency C] ...
    pdserve plan profile|recommend ...
    pdserve scale --prefill N --decode M

Without --model, commands use the embedded default: the tiny random-weight Llama
that `make-tiny-model` writes, created on first use under $PDSERVE_HOME
(default ~/.cache/pdserve).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .state import default_model_dir


def _resolve_model(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    from pdserve.engine.tiny_model import ensure_tiny_model

    return ensure_tiny_model(default_model_dir())


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from pdserve.engine.tiny_model import make_tiny_model

    path = make_tiny_model(args.dir, seed=args.seed)
    print(f"wrote tiny model to {path}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from pdserve.engine.sampling_params import SamplingParams  # no torch: bad arguments fail in a blink

    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_tokens=args.max_tokens,
        seed=args.seed,
        stop=tuple(args.stop or ()),
    )

    from pdserve.engine import LLM

    model = _resolve_model(args.model)
    prompts = args.prompt or ["The quick brown fox"]
    with LLM(model, tensor_parallel_size=args.tensor_parallel_size, dtype=args.dtype) as llm:
        for prompt, out in zip(prompts, llm.generate(prompts, params)):
            if args.verbose:
                print(f"--- prompt: {prompt!r} ({len(out.prompt_token_ids)} tokens), finish: {out.finish_reason}")
            print(prompt + out.text)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from .up import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description="Disaggregated prefill/decode LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny-model", help="write a small random-weight Llama with a real tokenizer")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_tiny_model)

    p = sub.add_parser("generate", help="offline generation")
    p.add_argument("--model", help="Hugging Face model directory (default: the embedded tiny model)")
    p.add_argument("--prompt", action="append", help="prompt text; repeat for a batch")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--tensor-parallel-size", "--tp", type=int, default=1)
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_generate)

    from .up import add_arguments

    p = sub.add_parser("up", help="run the whole cluster: workers (Ray), control plane, OpenAI gateway")
    add_arguments(p)
    p.set_defaults(func=cmd_up)

    from pdserve.loadtest import cli as loadtest_cli
    from pdserve.loadtest import plan_cli

    from . import scale

    p = sub.add_parser("loadtest", help="load-test any OpenAI-compatible endpoint (TTFT, TPOT, goodput)")
    loadtest_cli.add_arguments(p)
    p.set_defaults(func=loadtest_cli.run)

    p = sub.add_parser("plan", help="profile a deployment and recommend prefill:decode pool sizes")
    plan_cli.add_arguments(p)
    p.set_defaults(func=plan_cli.run)

    from . import gateway_cmd

    p = sub.add_parser("gateway", help="one more OpenAI gateway on a running deployment (shares its store)")
    gateway_cmd.add_arguments(p)
    p.set_defaults(func=gateway_cmd.run)

    p = sub.add_parser("scale", help="change the pool sizes of a running `pdserve up`")
    scale.add_arguments(p)
    p.set_defaults(func=scale.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"pdserve: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unwritable/missing paths: a message, not a traceback
        print(f"pdserve: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
